"""neuraldb_kernels.threads.default_threads: the documented rule on stated cores and loads, the
NEURALDB_THREADS override and its errors."""

import os

import pytest

from neuraldb_kernels.threads import THREADS_ENV, default_threads


@pytest.fixture
def machine(monkeypatch):
    """Sets the cores in this process's affinity mask and the 1-minute load average it sees."""
    monkeypatch.delenv(THREADS_ENV, raising=False)

    def set_machine(cores: int, load: float):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
        monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))

    return set_machine


@pytest.mark.parametrize(
    "cores, load, expected",
    [
        (2, 0.0, 2),  # quiet: every core
        (2, 0.4, 2),
        (2, 0.6, 1),  # a busy neighbour on one of two cores
        (2, 9.4, 1),  # load beyond the cores: one thread, never zero
        (16, 3.2, 13),
        (16, 0.0, 16),
        (1, 0.0, 1),
    ],
)
def test_uses_the_cores_the_load_leaves_idle(machine, cores, load, expected):
    machine(cores, load)
    assert default_threads() == expected


def test_counts_only_the_cores_this_process_may_use(machine):
    machine(3, 0.0)  # e.g. `taskset -c 0-2` on a larger machine
    assert default_threads() == 3


def test_without_a_load_average_every_core_is_used(machine, monkeypatch):
    machine(4, 0.0)

    def no_load_average():
        raise OSError("load average unobtainable")

    monkeypatch.setattr(os, "getloadavg", no_load_average)
    assert default_threads() == 4


@pytest.mark.parametrize("value, expected", [("1", 1), ("3", 3), (" 8 ", 8), ("1024", 1024)])
def test_environment_variable_overrides_the_rule(machine, monkeypatch, value, expected):
    machine(2, 9.0)
    monkeypatch.setenv(THREADS_ENV, value)
    assert default_threads() == expected


@pytest.mark.parametrize("value", ["0", "-2", "1025", "1e20", "two", "", "1.5"])
def test_bad_environment_variable_is_a_clear_error(machine, monkeypatch, value):
    machine(2, 0.0)
    monkeypatch.setenv(THREADS_ENV, value)
    with pytest.raises(ValueError, match=rf"{THREADS_ENV}=.*whole number of threads from 1 to 1024"):
        default_threads()
