"""The "cpu" gated_retrieve op against naive torch, on a quiet machine and beside a CPU-bound
neighbour, in one run.

    PYTHONPATH=$PWD python bench/cpu_op_under_load.py [--m 100000] [--prefill 16] [--rounds 9]
        [--baseline-so OTHER/neuraldb_kernels/_cpu.cpython-311-x86_64-linux-gnu.so]

Timed per case (m keys of width d1 = 1536, residuals of width 576, keys float32 or bfloat16;
n = 1 decode and n = --prefill queries):
- "op":    neuraldb_kernels.gated_retrieve(q, K, R, gamma, backend="cpu"), the full call.
- "naive": what a user writes with keys normalised ONCE when stored (not timed):
           normalize(q) @ Kn.T in Kn's dtype, max, gate, gather.
- "baseline" (with --baseline-so): another build of the C++ extension (say, before a change),
           its gated_retrieve called directly; before and after then share one run and one load.
All run with torch.get_num_threads() threads (--threads sets it; default: torch's default).

"loaded": one busy-loop process per core (os.cpu_count()) runs beside the timed calls; the script
starts them, and they stop when the phase ends (each also exits on its own after --load-seconds).
Op and naive are interleaved round by round, so both see the same neighbour. The ratio reported
is naive / op of the median times (the median, not the min: under load the slow rounds are the
point); the gate is loaded ratio >= 1.0 for every case. Exit status 1 when the gate fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import neuraldb_kernels as nk

D1, D2, GAMMA = 1536, 576, 0.5
KEY_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}


# A CPU-bound neighbour: a bare interpreter spinning until its deadline (time.time() seconds).
BUSY_LOOP = "import sys, time\ndeadline = float(sys.argv[1])\nwhile time.time() < deadline: pass"


class Neighbours:
    """`count` busy-loop processes for the duration of a `with` block (each exits on its own after
    `seconds` at most, should this process die first)."""

    def __init__(self, count: int, seconds: float):
        self.count, self.seconds, self.processes = count, seconds, []

    def __enter__(self):
        deadline = str(time.time() + self.seconds)
        self.processes = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP, deadline]) for _ in range(self.count)]
        time.sleep(0.5)  # let the interpreters start spinning
        return self

    def __exit__(self, *exc):
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.wait()
        return False


@dataclasses.dataclass
class Timing:
    median_s: float
    min_s: float


def interleaved_times(fns: dict, rounds: int) -> dict:
    """Timing of each zero-argument callable over `rounds` interleaved calls, after one warm-up."""
    for fn in fns.values():
        fn()
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: Timing(statistics.median(s), min(s)) for name, s in samples.items()}


def make_inputs(m: int, n_max: int, key_dtype: torch.dtype):
    """K (m, D1) in key_dtype with a planted match for query 0, R (m, D2) float32, q (n_max, D1)
    float32, and Kn = K normalised once (what a user stores for the naive code)."""
    gen = torch.Generator().manual_seed(0)
    K = torch.empty(m, D1, dtype=key_dtype)
    Kn = torch.empty(m, D1, dtype=key_dtype)
    for s in range(0, m, 8192):
        block = torch.randn(min(8192, m - s), D1, generator=gen)
        K[s : s + len(block)] = block
        Kn[s : s + len(block)] = F.normalize(K[s : s + len(block)].float(), dim=-1)
    R = torch.randn(m, D2, generator=gen)
    q = torch.randn(n_max, D1, generator=gen)
    q[0] = K[m // 3].float() * 2
    return q, K, Kn, R


def naive(q, Kn, R, gamma):
    """normalize(q) @ Kn.T in Kn's dtype (keys pre-normalised), max, gate, gather."""
    best, index = (F.normalize(q, dim=-1).to(Kn.dtype) @ Kn.T).max(dim=-1)
    return R[index] * (best > gamma)[:, None].to(R.dtype)


def load_extension(path: str):
    """The compiled extension at `path`, imported beside the package's own (its init symbol is
    PyInit__cpu, so the module name must end in "_cpu")."""
    spec = importlib.util.spec_from_file_location("baseline_kernel._cpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=100_000)
    parser.add_argument("--prefill", type=int, default=16, help="queries per call of the prefill case")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--baseline-so", default=None, help="another build of neuraldb_kernels._cpu to time too")
    parser.add_argument("--load-seconds", type=float, default=300.0, help="upper bound on each loaded phase")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cores = os.cpu_count() or 1
    print(f"torch {torch.__version__}, {cores} cores, {torch.get_num_threads()} torch threads, "
          f"neuraldb_kernels from {os.path.dirname(nk.__file__)}, load average {os.getloadavg()[0]:.1f}")

    baseline = load_extension(args.baseline_so) if args.baseline_so else None
    rows = []
    for key_name, key_dtype in KEY_DTYPES.items():
        q_all, K, Kn, R = make_inputs(args.m, args.prefill, key_dtype)
        for n in (1, args.prefill):
            q = q_all[:n].contiguous()
            op_out, op_index, _ = nk.gated_retrieve(q, K, R, GAMMA, backend="cpu", return_index=True)
            assert op_index[0].item() == args.m // 3 and torch.equal(op_out[0], R[args.m // 3])
            fns = {
                "op": lambda q=q: nk.gated_retrieve(q, K, R, GAMMA, backend="cpu"),
                "naive": lambda q=q: naive(q, Kn, R, GAMMA),
            }
            if baseline is not None:
                fns["baseline"] = lambda q=q: baseline.gated_retrieve(q, K, R, GAMMA, torch.get_num_threads())
            quiet = interleaved_times(fns, args.rounds)
            with Neighbours(cores, args.load_seconds):
                loaded = interleaved_times(fns, args.rounds)
            rows.append((f"n={n}, {key_name}", quiet, loaded))
        del K, Kn, R

    names = ["op", "naive"] + (["baseline"] if baseline is not None else [])
    print("\nmedian ms (min ms) per call; ratio = naive / op (and naive / baseline) of the medians")
    header = [f"{phase} {name}" for phase in ("quiet", "loaded") for name in names + ["ratio"]]
    print("| case | " + " | ".join(header) + " |")
    print("|---" * (len(header) + 1) + "|")
    ok = True
    for case, quiet, loaded in rows:
        cells = [case]
        for t in (quiet, loaded):
            cells += [f"{t[name].median_s * 1e3:.1f} ({t[name].min_s * 1e3:.1f})" for name in names]
            cells.append(" / ".join(f"{t['naive'].median_s / t[name].median_s:.2f}x"
                                    for name in names if name != "naive"))
        ok &= loaded["naive"].median_s >= loaded["op"].median_s
        print("| " + " | ".join(cells) + " |")
    print(f"gate (loaded ratio >= 1.0 in every case): {'pass' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
