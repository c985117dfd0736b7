"""How many CPU threads torch (and the "cpu" gated_retrieve kernel) should use by default.

torch starts one thread per core. On a machine that other processes already keep busy, that
oversubscribes the cores: every parallel region then waits for its slowest thread, which the OS
has preempted, and a SmolLM2 forward on 2 shared cores ran several times slower with 2 threads
than with 1 (bench/RESULTS.md, "Thread default on a shared machine"). The rule below uses only
the cores the recent load leaves idle; the CLI and the test suite call it at start-up.
"""

import os

THREADS_ENV = "NEURALDB_THREADS"


def default_threads() -> int:
    """The number of threads to give torch.set_num_threads (an int >= 1).

    NEURALDB_THREADS, when set, is used as is (a whole number from 1 to 1024, else ValueError).
    Otherwise: cores - the 1-minute load average, rounded, clamped to [1, cores], where cores is
    the number of CPUs this process may run on (its affinity mask). A quiet machine gets every
    core; a machine whose load already fills its cores gets 1 thread.
    """
    value = os.environ.get(THREADS_ENV)
    if value is not None:
        try:
            threads = int(value.strip())
        except ValueError:
            threads = 0
        if not 1 <= threads <= 1024:
            raise ValueError(f"{THREADS_ENV}={value!r}: expected a whole number of threads from 1 to 1024")
        return threads
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity masks on this platform (macOS, Windows)
        cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on this platform (Windows)
        load = 0.0
    return max(1, min(cores, round(cores - load)))
