"""NeuralDB store benchmarks (pytest-benchmark).

- one-at-a-time adds are not quadratic: time of the last 1k of 10k single-fact adds / the first 1k,
  on an on-disk database with SmolLM2 dimensions (d1=1536, d2=576);
- a 100k-fact database with SmolLM2 dimensions: build (batched adds), open, on-disk size, add one
  fact, delete one fact (with and without an outstanding snapshot, i.e. copy-on-write or in place).
  Set NEURALDB_BENCH_100K=1 to run it (several minutes on 2 CPU cores, ~2 GB of disk).

Run: python -m pytest bench/test_bench_store.py --benchmark-only -s   (numbers printed and stored
in benchmark.extra_info).
"""

import os
import time

import pytest
import torch

from neuraldb_kernels.store import NeuralDB
from neuraldb_kernels.store.schema import database_files

D1, D2 = 1536, 576  # SmolLM2-135M: FFN intermediate size, hidden size


def _facts(n, generator):
    return torch.randn(n, D1, generator=generator), torch.randn(n, D2, generator=generator)


def test_single_fact_adds_are_not_quadratic(benchmark, tmp_path):
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    keys, residuals = _facts(10_000, generator)
    durations = []

    def add_10k():
        path = tmp_path / f"adds{len(durations)}.ndb"
        with NeuralDB(path, d1=D1, d2=D2) as db:
            db.view()  # a live view, as during serving: appends must not copy it
            started = time.perf_counter()
            marks = []
            for i in range(10_000):
                db.add(keys[i], residuals[i], f"f{i}")
                if i % 1000 == 999:
                    marks.append(time.perf_counter())
            durations.append([b - a for a, b in zip([started] + marks, marks)])

    benchmark.pedantic(add_10k, rounds=1, iterations=1)
    per_thousand = durations[-1]
    ratio = per_thousand[-1] / per_thousand[0]
    benchmark.extra_info.update(first_1k_s=per_thousand[0], last_1k_s=per_thousand[-1], ratio=ratio,
                                per_thousand_s=per_thousand)
    print(f"\n10k single adds: first 1k {per_thousand[0]:.3f} s, last 1k {per_thousand[-1]:.3f} s, "
          f"ratio {ratio:.2f}, all {[round(t, 3) for t in per_thousand]}")
    assert ratio < 3.0


@pytest.mark.skipif(os.environ.get("NEURALDB_BENCH_100K") != "1", reason="set NEURALDB_BENCH_100K=1 (minutes)")
def test_100k_fact_database(benchmark, tmp_path):
    torch.set_num_threads(2)
    generator = torch.Generator().manual_seed(1)
    path = tmp_path / "100k.ndb"
    results = {}

    def build():
        with NeuralDB(path, d1=D1, d2=D2) as db:
            for start in range(0, 100_000, 10_000):
                db.add(*_facts(10_000, generator), [f"f{i}" for i in range(start, start + 10_000)])

    started = time.perf_counter()
    build()
    results["build_s"] = time.perf_counter() - started
    results["disk_bytes"] = sum(os.path.getsize(file) for file in database_files(path) if file.exists())
    results["raw_vector_bytes"] = 100_000 * (D1 + D2) * 4

    def open_db():
        return NeuralDB.open(path)

    db = benchmark.pedantic(open_db, rounds=1, iterations=1)
    results["open_s"] = benchmark.stats.stats.mean
    started = time.perf_counter()
    K, R = db.view()
    results["first_view_s"] = time.perf_counter() - started
    assert K.shape == (100_000, D1)
    del K, R

    key, residual = _facts(1, generator)
    for name, action in (("add_one_s", lambda: db.add(key[0], residual[0], "extra")),
                         ("delete_one_s", lambda: db.delete("f123")),
                         ("add_one_again_s", lambda: db.add(key[0], residual[0], "extra2"))):
        started = time.perf_counter()
        action()
        results[name] = time.perf_counter() - started
    snapshot = db.view()  # outstanding snapshot: the next delete copies the buffers once
    started = time.perf_counter()
    db.delete("f456")
    results["delete_one_with_snapshot_s"] = time.perf_counter() - started
    del snapshot
    started = time.perf_counter()
    db.search(torch.randn(D1, generator=generator), k=5)
    results["search_s"] = time.perf_counter() - started
    db.close()
    benchmark.extra_info.update(results)
    print("\n100k facts:", {name: round(value, 4) if isinstance(value, float) else value for name, value in results.items()})
