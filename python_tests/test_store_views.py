"""Live views of NeuralDB: row <-> id mapping under random adds / upserts / deletes checked against
an independent dict model, immutability of snapshots, a concurrent reader and writer, and search
against a float64 brute force."""

import random
import threading

import pytest
import torch

import neuraldb_kernels.ops.torch_backend as torch_backend
from neuraldb_kernels.store import NeuralDB

D1, D2 = 5, 3


def _encoded(numbers, dtype=torch.float32):
    """Keys and residuals that encode each fact's number in every entry (exact in bfloat16 up to 256)."""
    numbers = torch.as_tensor(numbers, dtype=torch.float64).reshape(-1, 1)
    keys = (numbers + 1) * torch.ones(1, D1, dtype=torch.float64)
    residuals = -(numbers + 1) * torch.ones(1, D2, dtype=torch.float64)
    return keys.to(dtype), residuals.to(dtype)


def _as_rows(keys):
    """The rows of a (k, d) tensor as a sorted list of tuples (a fact's key rows in any order)."""
    return sorted(map(tuple, keys.tolist()))


def _assert_matches_model(db, model, dtypes, *, files=False):
    """model: id -> ((k, D1) keys, own key first, (D2,) residual) in float64."""
    assert len(db) == len(model) and set(db) == set(model)
    rows = sum(len(keys) for keys, _ in model.values())
    assert db.key_rows == rows
    for dtype in dtypes:
        snap = db.snapshot(dtype=dtype)
        assert snap.keys.shape == (rows, D1) and snap.keys.dtype == dtype and snap.keys.is_contiguous()
        ids = snap.ids_at(range(rows))
        assert ids == db.ids_at(torch.arange(rows)) and set(ids) == set(model)
        rows_of = {}
        for row, fact_id in enumerate(ids):
            rows_of.setdefault(fact_id, []).append(row)
            assert torch.equal(snap.residuals[row], model[fact_id][1].to(db.dtype).to(dtype))
        for fact_id, (keys, _) in model.items():  # each fact's rows hold exactly its keys
            assert _as_rows(snap.keys[rows_of[fact_id]]) == _as_rows(keys.to(db.dtype).to(dtype))
    if files:  # the file holds each fact's keys in order, its own key first
        for fact_id, (keys, residual) in model.items():
            stored = db.get(fact_id)
            assert torch.equal(stored.keys, keys.to(db.dtype)) and torch.equal(stored.key, keys[0].to(db.dtype))


@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16], ids=str)
def test_random_operations_match_a_dict_model(tmp_path, storage):
    rng = random.Random(1234)
    generator = torch.Generator().manual_seed(5)
    db = NeuralDB(tmp_path / "r.ndb", d1=D1, d2=D2, dtype=storage)
    model = {}  # id -> (key, residual) in float64, the independent reference
    kept_snapshots = []  # (snapshot, cloned keys, cloned residuals, ids at the time)
    next_number = 0
    def extra_keys(n):
        """For n facts: None or 1-2 more keys each (facts change their key count on upsert)."""
        counts = [rng.choice([0, 0, 1, 2]) for _ in range(n)]
        return [torch.randn(c, D1, generator=generator, dtype=torch.float64) if c else None for c in counts]

    def with_extra(key, extra):
        return key.unsqueeze(0) if extra is None else torch.cat([key.unsqueeze(0), extra])

    for step in range(160):
        action = rng.choice(["add", "add", "delete", "upsert", "snapshot"])
        if action == "add":
            n = rng.randint(1, 6)
            keys = torch.randn(n, D1, generator=generator, dtype=torch.float64)
            residuals = torch.randn(n, D2, generator=generator, dtype=torch.float64)
            ids = [f"f{next_number + i}" for i in range(n)]
            extra = extra_keys(n)
            next_number += n
            if n == 1:
                db.add(keys[0], residuals[0], ids[0], extra_keys=extra[0])
            else:
                db.add(keys, residuals, ids, extra_keys=extra)
            model.update({fact_id: (with_extra(keys[i], extra[i]), residuals[i]) for i, fact_id in enumerate(ids)})
        elif action == "delete" and model:
            doomed = rng.sample(sorted(model), rng.randint(1, min(4, len(model))))
            assert db.delete(doomed) == doomed
            for fact_id in doomed:
                del model[fact_id]
        elif action == "upsert" and model:
            ids = rng.sample(sorted(model), min(2, len(model))) + [f"f{next_number}"]
            next_number += 1
            keys = torch.randn(len(ids), D1, generator=generator, dtype=torch.float64)
            residuals = torch.randn(len(ids), D2, generator=generator, dtype=torch.float64)
            extra = extra_keys(len(ids))
            db.upsert(keys, residuals, ids, extra_keys=extra)
            model.update({fact_id: (with_extra(keys[i], extra[i]), residuals[i]) for i, fact_id in enumerate(ids)})
        else:
            snap = db.snapshot(dtype=torch.float64)
            kept_snapshots.append((snap, snap.keys.clone(), snap.residuals.clone(), snap.ids_at(range(len(snap.keys)))))
        if step % 10 == 0:
            _assert_matches_model(db, model, [storage, torch.float64])
    _assert_matches_model(db, model, [storage, torch.float64], files=True)
    for snap, keys, residuals, ids in kept_snapshots:  # no later mutation changed an earlier snapshot
        assert torch.equal(snap.keys, keys) and torch.equal(snap.residuals, residuals)
        assert snap.ids_at(range(len(keys))) == ids
    db.close()
    with NeuralDB.open(tmp_path / "r.ndb") as reopened:
        _assert_matches_model(reopened, model, [storage], files=True)


def test_snapshot_survives_append_growth_update_and_delete():
    db = NeuralDB(d1=D1, d2=D2)
    db.add(*_encoded(range(16)), [f"f{i}" for i in range(16)])  # exactly the initial capacity
    snap = db.snapshot()
    expected = (snap.keys.clone(), snap.residuals.clone(), snap.ids_at(range(16)))
    db.add(*_encoded([16]), "f16")  # grows the buffers
    snap2 = db.snapshot()
    db.add(*_encoded([17]), "f17")  # writes after snap2's last row, in place
    db.delete(["f0", "f5"])  # swap-remove moves f17 / f16 into snap2's rows 0 and 5
    db.upsert(*_encoded([99]), "f3")
    db.delete("f17")  # frees a row ...
    db.add(*_encoded([18]), "f18")  # ... that this append reuses
    assert torch.equal(snap.keys, expected[0]) and torch.equal(snap.residuals, expected[1])
    assert snap.ids_at(range(16)) == expected[2]
    ids2 = snap2.ids_at(range(17))
    assert ids2 == [f"f{i}" for i in range(17)]
    for row, fact_id in enumerate(ids2):
        assert torch.equal(snap2.keys[row], _encoded([int(fact_id[1:])])[0][0])
    assert snap2.version < db.version and db.snapshot().version == db.version


def test_deletes_copy_the_buffers_only_while_a_snapshot_is_in_use():
    db = NeuralDB(d1=D1, d2=D2)
    db.add(*_encoded(range(40)), [f"f{i}" for i in range(40)])

    def master_keys():
        return db._live.views.buffers[db._live.views.master_key]._keys

    db.view()  # dropped at once
    buffer = master_keys()
    db.delete("f0")
    db.add(*_encoded([40]), "f40")
    db.upsert(*_encoded([41]), "f2")
    assert master_keys() is buffer  # in place: O(d) per change
    column = db.view()[0][:, :2]  # only a view of a snapshot stays alive
    expected = column.clone()
    db.delete("f1")
    assert master_keys() is not buffer and torch.equal(column, expected)  # copied on write
    snap = db.snapshot()
    ids = snap.ids_at(range(len(snap.keys)))
    db.delete(["f3", "f4"])
    assert snap.ids_at(range(len(snap.keys))) == ids
    del column, snap
    buffer = master_keys()
    db.delete("f5")
    assert master_keys() is buffer


def test_concurrent_reader_never_sees_a_half_written_fact():
    db = NeuralDB(d1=D1, d2=D2, dtype=torch.float32)
    stop = threading.Event()
    failures = []

    def writer():
        try:
            write()
        except BaseException as error:  # reported by the assertion below
            failures.append(f"writer failed: {error!r}")
        finally:
            stop.set()

    def write():
        rng = random.Random(7)
        number = 0
        live = []
        while number < 1500:
            n = rng.choice([1, 1, 3, 40])
            db.add(*_encoded(range(number, number + n)), [f"f{i}" for i in range(number, number + n)])
            live.extend(f"f{i}" for i in range(number, number + n))
            number += n
            if rng.random() < 0.4:
                doomed = rng.sample(live, min(len(live), rng.randint(1, 5)))
                db.delete(doomed)
                live = [fact_id for fact_id in live if fact_id not in set(doomed)]
            if live and rng.random() < 0.2:
                fact_id = rng.choice(live)
                db.upsert(*_encoded([int(fact_id[1:])]), fact_id)  # same values, rewritten in place

    def reader():
        views = 0
        while not stop.is_set() or views < 5:
            snap = db.snapshot(dtype=torch.float64)
            ids = snap.ids_at(range(len(snap.keys)))
            numbers = torch.tensor([int(fact_id[1:]) for fact_id in ids], dtype=torch.float64)
            keys, residuals = _encoded(numbers, torch.float64)
            if not (torch.equal(snap.keys, keys) and torch.equal(snap.residuals, residuals)):
                failures.append(f"inconsistent snapshot at version {snap.version}")
                return
            views += 1

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not failures and stop.is_set()


def test_search_matches_float64_brute_force(monkeypatch):
    monkeypatch.setattr(torch_backend, "_CHUNK_ELEMENTS", 7 * 16)  # 7 key rows per chunk: several to merge
    generator = torch.Generator().manual_seed(3)
    keys = torch.randn(50, 16, generator=generator, dtype=torch.float64)
    db = NeuralDB(d1=16, d2=2)
    ids = db.add(keys, torch.zeros(50, 2), metadata=[{"subject": f"s{i}"} for i in range(50)])
    for trial in range(5):
        q = torch.randn(16, generator=generator, dtype=torch.float64)
        stored = keys.float().double()
        cosines = (stored @ q) / (stored.norm(dim=1) * q.norm())
        order = torch.argsort(cosines, descending=True)
        hits = db.search(q.float(), k=6)
        assert [hit.id for hit in hits] == [ids[i] for i in order[:6].tolist()]
        assert [hit.metadata["subject"] for hit in hits] == [f"s{i}" for i in order[:6].tolist()]
        assert torch.allclose(torch.tensor([hit.cosine for hit in hits], dtype=torch.float64), cosines[order[:6]], atol=1e-6)
    assert len(db.search(torch.ones(16), k=80)) == 50


def test_views_on_other_devices_and_dtypes_follow_the_store():
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    db = NeuralDB(d1=D1, d2=D2, dtype=torch.float16)
    db.add(*_encoded(range(3)), ["f0", "f1", "f2"])
    for device in devices:
        K, R = db.view(device, torch.float32)
        assert K.device.type == device and K.dtype == torch.float32
    db.add(*_encoded(range(3, 30)), [f"f{i}" for i in range(3, 30)])
    db.delete(["f1", "f7"])
    model = {f"f{i}": tuple(t[0].double() for t in _encoded([i])) for i in range(30) if i not in (1, 7)}
    for device in devices:
        snap = db.snapshot(device, torch.float32)
        for row, fact_id in enumerate(snap.ids_at(range(28))):
            assert torch.equal(snap.keys[row].cpu(), model[fact_id][0].to(torch.float32))
    db.clear_views()
    assert list(db._live.views.buffers) == [db._live.views.master_key]
