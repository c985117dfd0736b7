"""Benchmark session setup: every suite runs torch with BENCH_THREADS threads (2, the CI machine's
cores, unless NEURALDB_BENCH_THREADS says otherwise), restored afterwards."""

import os

import pytest
import torch

BENCH_THREADS = int(os.environ.get("NEURALDB_BENCH_THREADS", "2"))


@pytest.fixture(scope="module", autouse=True)
def bench_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(BENCH_THREADS)
    yield BENCH_THREADS
    torch.set_num_threads(previous)
