"""The compressed key index the store keeps in sync (`NeuralDB.key_index`, store/view.py
`KeyCodeBuffers`): after any sequence of adds, upserts, deletes and refreshes (another process
writing) the index handed out for a snapshot equals a fresh `KeyIndex.from_keys` of the snapshot's
keys bit for bit, and retrieval through it equals the full-precision op (and the float64
reference); indexes handed out earlier never change; one add costs O(d1), not O(m)."""

import os
import random
import statistics
import subprocess
import sys
import time

import pytest
import torch

import neuraldb_kernels as nk
from neuraldb_kernels.ops import key_index as ki
from neuraldb_kernels.store import NeuralDB

D1, D2 = 96, 8
CODE_FIELDS = ("codes", "row_scale", "row_error", "row_norm")
BACKEND = "cpu" if "cpu" in nk.available_backends()["cpu"].usable_on else "torch"


def clustered(n, generator, centres):
    """n keys around the shared `centres` (so candidate sets are small but not trivial)."""
    picks = torch.randint(0, centres.shape[0], (n,), generator=generator)
    return centres[picks] + 0.4 * torch.randn(n, D1, generator=generator)


def assert_fresh(index, snapshot, fmt="int8"):
    """`index` is the snapshot's: its keys are the snapshot's K and its codes those of a fresh index."""
    assert index.keys.data_ptr() == snapshot.keys.data_ptr() and index.m == snapshot.keys.shape[0]
    fresh = nk.KeyIndex.from_keys(snapshot.keys.clone(), codes=fmt)
    for name in CODE_FIELDS:
        assert torch.equal(getattr(index, name), getattr(fresh, name)), name


def assert_same_retrieval(index, snapshot, q, assert_matches_reference):
    """gated_retrieve through `index` == the full-precision op over the snapshot (and float64)."""
    gamma = snapshot.gammas if snapshot.has_key_gammas else snapshot.gamma
    result = ki.retrieve(q, index, snapshot.residuals, gamma, backend=BACKEND)
    out, found, score = nk.gated_retrieve(q, snapshot.keys, snapshot.residuals, gamma, backend=BACKEND,
                                          return_index=True)
    assert torch.equal(result.index, found)
    assert torch.equal(result.out.view(torch.uint8), out.view(torch.uint8))
    if BACKEND == "torch":  # BLAS rounds a dot product by matrix shape (ops/key_index.py)
        assert torch.allclose(result.score, score, rtol=0, atol=4 * 2.0**-24)
    else:
        assert torch.equal(result.score, score)
    assert_matches_reference(q, snapshot.keys, snapshot.residuals, gamma, result.out, result.index, result.score)
    return result


@pytest.mark.parametrize("storage, view", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                           (torch.bfloat16, torch.float32)], ids=str)
def test_index_follows_random_adds_upserts_deletes(storage, view, assert_matches_reference):
    rng = random.Random(7)
    generator = torch.Generator().manual_seed(7)
    centres = torch.randn(5, D1, generator=generator)
    db = NeuralDB(d1=D1, d2=D2, dtype=storage, gamma=0.5)
    db.add(clustered(20, generator, centres), torch.randn(20, D2, generator=generator),
           ids=[f"f{i}" for i in range(20)])
    counts = {f"f{i}": 1 for i in range(20)}  # id -> number of keys
    kept = []  # (index, snapshot, clones of its codes, queries, retrieval then)
    fired = 0
    for step in range(40):
        action = rng.choice(["add", "add", "same", "moved", "delete", "gamma"])
        ids = sorted(counts)
        if action == "add":
            new = [f"n{step}-{j}" for j in range(rng.randint(1, 3))]
            extra = [clustered(rng.randint(1, 2), generator, centres) if rng.random() < 0.4 else None for _ in new]
            gammas = [torch.rand(1 + (0 if e is None else len(e)), generator=generator) * 0.4 + 0.4
                      if rng.random() < 0.3 else None for e in extra]
            db.add(clustered(len(new), generator, centres), torch.randn(len(new), D2, generator=generator), new,
                   extra_keys=extra, key_gammas=gammas)
            counts.update((i, 1 + (0 if e is None else len(e))) for i, e in zip(new, extra))
        elif action == "same":  # same number of keys: rewritten in place
            fact = rng.choice(ids)
            extra = clustered(counts[fact] - 1, generator, centres) if counts[fact] > 1 else None
            db.upsert(clustered(1, generator, centres)[0], torch.randn(D2, generator=generator), fact, extra_keys=extra)
        elif action == "moved":  # another number of keys: removed and appended
            fact = rng.choice(ids)
            db.upsert(clustered(1, generator, centres)[0], torch.randn(D2, generator=generator), fact,
                      extra_keys=clustered(counts[fact], generator, centres))
            counts[fact] += 1
        elif action == "delete" and len(ids) > 4:
            gone = rng.sample(ids, rng.randint(1, 2))
            db.delete(gone)
            for fact in gone:
                del counts[fact]
        elif action == "gamma":
            db.gamma = rng.choice([0.45, 0.5, 0.55])
        if step % 3 == 2:  # in between, no index is held: the store rewrites its codes in place
            continue
        snapshot = db.snapshot(dtype=view)
        index = db.key_index(snapshot)
        assert index.m == db.key_rows == sum(counts.values())
        assert_fresh(index, snapshot)
        q = snapshot.keys[torch.randint(0, index.m, (6,), generator=generator)].float()
        q = q + 0.2 * torch.randn(q.shape, generator=generator)
        result = assert_same_retrieval(index, snapshot, q, assert_matches_reference)
        fired += int((result.index >= 0).sum())
        if step % 10 == 0:
            kept.append((index, snapshot, [getattr(index, name).clone() for name in CODE_FIELDS], q, result))
    assert fired > 0  # the gate opened: retrieval returned residuals, not only misses
    for index, snapshot, codes, q, then in kept:  # handed out earlier, unchanged since
        assert all(torch.equal(getattr(index, name), before) for name, before in zip(CODE_FIELDS, codes))
        gamma = snapshot.gammas if snapshot.has_key_gammas else snapshot.gamma
        now = ki.retrieve(q, index, snapshot.residuals, gamma, backend=BACKEND)
        assert torch.equal(now.index, then.index) and torch.equal(now.out, then.out)


def test_index_handed_out_before_a_write_keeps_its_version():
    generator = torch.Generator().manual_seed(3)
    keys = torch.randn(6, D1, generator=generator)
    db = NeuralDB(d1=D1, d2=D2)
    db.add(keys, torch.randn(6, D2, generator=generator), ids=list("abcdef"))
    snapshot = db.snapshot()
    index = db.key_index(snapshot)
    expected = nk.KeyIndex.from_keys(keys)
    db.upsert(torch.randn(D1, generator=generator), torch.randn(D2, generator=generator), "b")  # in place
    db.delete(["a"])  # swap-remove: row 5 moves to row 0
    db.add(torch.randn(2, D1, generator=generator), torch.randn(2, D2, generator=generator), ids=["g", "h"])
    assert index.m == 6 and torch.equal(index.keys, keys)
    for name in CODE_FIELDS:
        assert torch.equal(getattr(index, name), getattr(expected, name)), name
    now = db.snapshot()
    assert_fresh(db.key_index(now), now)
    index.append(torch.randn(1, D1, generator=generator))  # the caller's own copy: the store is unaffected
    again = db.snapshot()
    assert_fresh(db.key_index(again), again)


def test_adds_encode_only_the_new_rows(monkeypatch):
    """After the first request, the store encodes the rows written, never the whole view."""
    from neuraldb_kernels.store import view

    generator = torch.Generator().manual_seed(4)
    db = NeuralDB(d1=D1, d2=D2)
    db.add(torch.randn(300, D1, generator=generator), torch.randn(300, D2, generator=generator),
           ids=[f"f{i}" for i in range(300)])
    encoded = []
    encode = view.encode_rows
    monkeypatch.setattr(view, "encode_rows", lambda keys, fmt, *capacity: encoded.append(keys.shape[0]) or encode(keys, fmt, *capacity))
    assert_fresh(db.key_index(db.snapshot()), db.snapshot())
    assert encoded == [300]  # built once
    for i in range(5):
        db.add(torch.randn(D1, generator=generator), torch.randn(D2, generator=generator), ids=f"g{i}")
        snapshot = db.snapshot()
        assert_fresh(db.key_index(snapshot), snapshot)
    db.upsert(torch.randn(D1, generator=generator), torch.randn(D2, generator=generator), "f7")
    db.delete(["f3", "g1"])
    snapshot = db.snapshot()
    assert_fresh(db.key_index(snapshot), snapshot)
    assert encoded == [300, 1, 1, 1, 1, 1, 1]  # five adds and one replaced row; the delete moves codes


def test_stale_or_foreign_snapshots_get_an_index_of_their_own_keys():
    generator = torch.Generator().manual_seed(5)
    db = NeuralDB(d1=D1, d2=D2)
    db.add(torch.randn(8, D1, generator=generator), torch.randn(8, D2, generator=generator),
           ids=[f"f{i}" for i in range(8)])
    old = db.snapshot(dtype=torch.float16)
    db.key_index(old)
    db.delete("f2")
    assert_fresh(db.key_index(old), old)  # keys changed since: built from the snapshot's keys
    current = db.snapshot(dtype=torch.float16)
    db.clear_views()  # the float16 view and its codes are freed
    assert_fresh(db.key_index(current), current)
    other = NeuralDB(d1=D1, d2=D2)
    other.add(torch.randn(3, D1, generator=generator), torch.randn(3, D2, generator=generator), ids=list("xyz"))
    foreign = other.snapshot()
    assert_fresh(db.key_index(foreign), foreign)


WRITER = r"""
import sys, torch
from neuraldb_kernels.store import NeuralDB

generator = torch.Generator().manual_seed(9)
d1, d2 = int(sys.argv[2]), int(sys.argv[3])
db = NeuralDB.open(sys.argv[1])
db.add(torch.randn(4, d1, generator=generator), torch.randn(4, d2, generator=generator), ["w0", "w1", "w2", "w3"],
       extra_keys=[None, torch.randn(2, d1, generator=generator), None, None])
db.upsert(torch.randn(d1, generator=generator), torch.randn(d2, generator=generator), "f1")  # in place
db.upsert(torch.randn(d1, generator=generator), torch.randn(d2, generator=generator), "f4",
          extra_keys=torch.randn(1, d1, generator=generator))  # 1 -> 2 keys: moved
db.delete(["f0", "w2"])
db.close()
"""


def test_index_follows_what_another_process_committed(tmp_path, assert_matches_reference):
    generator = torch.Generator().manual_seed(8)
    path = tmp_path / "shared.ndb"
    NeuralDB(path, d1=D1, d2=D2).add(torch.randn(10, D1, generator=generator),
                                     torch.randn(10, D2, generator=generator), ids=[f"f{i}" for i in range(10)])
    reader = NeuralDB.open(path)
    before = reader.snapshot()
    held = reader.key_index(before)
    codes = held.codes.clone()
    source = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": source + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run([sys.executable, "-c", WRITER, str(path), str(D1), str(D2)], env=env, check=True, timeout=120)
    assert reader.refresh()
    snapshot = reader.snapshot()
    index = reader.key_index(snapshot)
    assert index.m == 10 + 6 + 1 - 1 - 1  # 4 facts with 6 keys added; f4 one key more; f0 and w2 gone
    assert_fresh(index, snapshot)
    assert sorted(reader) == sorted(NeuralDB.open(path, readonly=True))  # the same facts as a fresh open
    q = snapshot.keys[:5] + 0.1 * torch.randn(5, D1, generator=generator)
    assert_same_retrieval(index, snapshot, q, assert_matches_reference)
    assert torch.equal(held.codes, codes) and held.m == 10  # the index held across the refresh


def _median_add_seconds(db, generator, adds=25):
    """Median seconds of one single-fact add, with a snapshot and its key index held throughout (as
    an attached model holds them) and requested again after each add."""
    snapshot = db.snapshot()
    index = db.key_index(snapshot)
    times = []
    for _ in range(adds + 1):
        key, residual = torch.randn(D1, generator=generator), torch.randn(D2, generator=generator)
        started = time.perf_counter()
        db.add(key, residual)
        snapshot = db.snapshot()
        index = db.key_index(snapshot)
        times.append(time.perf_counter() - started)
    assert index.m == db.key_rows
    return statistics.median(times[1:])  # the first may grow the buffers (amortised doubling)


def test_one_add_costs_the_same_with_50k_indexed_rows_as_with_1k():
    """No O(m) work per add: the median time of one add (and the index of the new snapshot) at 50k
    rows is within a generous factor of that at 1k rows, measured interleaved under any load."""
    generator = torch.Generator().manual_seed(6)
    small, large = NeuralDB(d1=D1, d2=D2), NeuralDB(d1=D1, d2=D2)
    for db, m in ((small, 1_000), (large, 50_000)):
        db.add(torch.randn(m, D1, generator=generator), torch.randn(m, D2, generator=generator),
               ids=[f"f{i}" for i in range(m)])
        db.key_index(db.snapshot())  # built once, O(m)
    start = time.perf_counter()
    nk.KeyIndex.from_keys(large.snapshot().keys)
    rebuild = time.perf_counter() - start  # what an O(m) add would cost at least
    ratios = []
    for round_ in range(3):
        ratios.append(_median_add_seconds(large, generator) / _median_add_seconds(small, generator))
    assert statistics.median(ratios) < 4.0, ratios
    assert _median_add_seconds(large, generator) < rebuild / 4  # the bound above can tell O(m) from O(1)


def test_bad_requests_raise_clear_errors():
    db = NeuralDB(d1=D1, d2=D2)
    db.add(torch.randn(2, D1), torch.randn(2, D2), ids=["a", "b"])
    snapshot = db.snapshot()
    with pytest.raises(TypeError, match="Snapshot"):
        db.key_index(snapshot.keys)
    with pytest.raises(ValueError, match="unknown code format"):
        db.key_index(snapshot, "int3")
    with pytest.raises(ValueError, match="fp8_e4m3 codes need"):
        db.key_index(snapshot, torch.float8_e4m3fn)
    db.close()
    with pytest.raises(ValueError, match="closed"):
        db.key_index(snapshot)
