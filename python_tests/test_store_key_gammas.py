"""Per-key gate thresholds (key_gammas) in the store: stored per fact (NULL = the database's gamma),
validated on write and read, covered by the row checksum, migrated as NULL from older files,
carried by export/import and refresh, and held by every view as a float32 (m,) row aligned with K
(checked against an independent dict model under random adds, upserts, deletes and gamma changes)."""

import json
import random
import sqlite3

import pytest
import torch

from neuraldb_kernels.store import CorruptDatabaseError, NeuralDB

D1, D2 = 6, 3


def _vectors(n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, D1, generator=generator), torch.randn(n, D2, generator=generator)


def _f32(values):
    """Python floats exactly as float32 stores them."""
    return torch.tensor(values, dtype=torch.float64).float().double().tolist()


def _expected_gammas(snap, model, gamma):
    """The threshold of every row of `snap` from the model: id -> ((k, D1) keys, thresholds or None)."""
    out = []
    for row, fact_id in enumerate(snap.ids_at(range(snap.keys.shape[0]))):
        keys, thresholds = model[fact_id]
        matches = [j for j in range(len(keys)) if torch.equal(keys[j].to(snap.keys.dtype), snap.keys[row])]
        assert len(matches) == 1, "test premise: a fact's keys are distinct"
        out.append(gamma if thresholds is None else thresholds[matches[0]])
    return torch.tensor(out, dtype=torch.float64).float()


def test_thresholds_round_trip_through_the_file_and_the_view(tmp_path):
    keys, residuals = _vectors(5)
    path = tmp_path / "db.ndb"
    with NeuralDB(path, d1=D1, d2=D2, gamma=0.6) as db:
        assert not db.has_key_gammas and db.snapshot().gammas.shape == (0,)
        db.add(keys[0], residuals[0], "a", extra_keys=keys[4], key_gammas=torch.tensor([0.7, 0.123456789],
                                                                                         dtype=torch.float64))
        db.add(keys[1:3], residuals[1:3], ["b", "c"], key_gammas=[None, torch.tensor([-0.25])])
        assert db.has_key_gammas
        snap = db.snapshot()
        assert snap.gammas.dtype == torch.float32 and snap.gamma == 0.6 and snap.has_key_gammas
        assert snap.ids_at(range(4)) == ["a", "a", "b", "c"]
        assert snap.gammas.tolist() == _f32([0.7, 0.123456789, 0.6, -0.25])
        db.gamma = 0.8  # only the keys without thresholds of their own follow it
        assert db.snapshot().gammas.tolist() == _f32([0.7, 0.123456789, 0.8, -0.25])
        assert snap.gammas.tolist() == _f32([0.7, 0.123456789, 0.6, -0.25])  # a snapshot never changes
        assert db.snapshot().keys.data_ptr() == snap.keys.data_ptr()  # a new gamma copies no keys
        assert db.snapshot(dtype=torch.float64).gammas.tolist() == db.snapshot().gammas.tolist()
    with NeuralDB.open(path) as db:
        assert db.get("a").key_gammas.tolist() == _f32([0.7, 0.123456789])
        assert db.get("a").key_gammas.dtype == torch.float32
        assert db.get("b").key_gammas is None and db.get("c").key_gammas.tolist() == [-0.25]
        assert db.snapshot().gammas.tolist() == _f32([0.7, 0.123456789, 0.8, -0.25])
        db.upsert(keys[2], residuals[2], "c")  # thresholds not given again are dropped
        db.upsert(keys[0], residuals[0], "a", extra_keys=keys[4])
        assert not db.has_key_gammas and db.get("c").key_gammas is None
        assert db.snapshot().gammas.tolist() == _f32([0.8] * 4)
        db.upsert(keys[1], residuals[1], "b", key_gammas=torch.tensor([0.5]))
        assert db.has_key_gammas
        db.delete("b")
        assert not db.has_key_gammas


@pytest.mark.parametrize("key_gammas, error, message", [
    (torch.tensor([0.5]), ValueError, r"key_gammas of fact 'a' \(batch position 0\) must have shape \(2,\)"),
    (torch.tensor([[0.5, 0.5]]), ValueError, r"must have shape \(2,\), one threshold per key"),
    (torch.tensor([0.5, float("nan")]), ValueError, r"key threshold that is not a finite cosine in \[-1, 1\] \(key 1"),
    (torch.tensor([1.5, 0.5]), ValueError, r"not a finite cosine in \[-1, 1\] \(key 0: 1.5\)"),
    (torch.tensor([-1.0000001, 0.5], dtype=torch.float64), ValueError, "not a finite cosine"),
    (torch.tensor([1, 0]), TypeError, "must be None or a float16/bfloat16/float32/float64 tensor, got torch.int64"),
    ([[0.5, 0.5]], TypeError, "must be None or a float16/bfloat16/float32/float64 tensor, got list"),
    ([0.5, 0.5], ValueError, "got 2 key_gammas entries for 1 facts"),
])
def test_invalid_thresholds_are_refused_and_nothing_is_stored(key_gammas, error, message):
    keys, residuals = _vectors(2)
    db = NeuralDB(d1=D1, d2=D2)
    with pytest.raises(error, match=message):
        db.add(keys[0], residuals[0], "a", extra_keys=keys[1], key_gammas=key_gammas)
    with pytest.raises(error, match=message):
        db.upsert(keys[0], residuals[0], "a", extra_keys=keys[1], key_gammas=key_gammas)
    assert len(db) == 0 and db.key_rows == 0 and not db.has_key_gammas


def test_batch_thresholds_need_one_entry_per_fact():
    keys, residuals = _vectors(2)
    db = NeuralDB(d1=D1, d2=D2)
    with pytest.raises(TypeError, match="key_gammas must be None, a tensor for one fact, or a sequence"):
        db.add(keys, residuals, ["a", "b"], key_gammas=torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="got 1 key_gammas entries for 2 facts"):
        db.add(keys, residuals, ["a", "b"], key_gammas=[None])
    assert len(db) == 0


def _saved(tmp_path):
    keys, residuals = _vectors(3, seed=3)
    path = tmp_path / "db.ndb"
    with NeuralDB(path, d1=D1, d2=D2) as db:
        db.add(keys, residuals, ["a", "b", "c"], key_gammas=[None, torch.tensor([0.75]), None])
    return path


def test_the_checksum_covers_the_thresholds(tmp_path, format4_files):
    path = _saved(tmp_path)
    files = format4_files(path)
    conn = sqlite3.connect(path)
    for fact_id, slot, key_count, metadata, key_gammas, checksum in conn.execute(
            "SELECT id, slot, key_count, metadata, key_gammas, checksum FROM facts"):
        assert checksum == files.checksum(fact_id, metadata, key_gammas, files.read_slots(slot, key_count))
    assert conn.execute("SELECT key_gammas FROM facts WHERE id = 'b'").fetchone()[0] == _blob([0.75])
    flipped = bytearray(_blob([0.75]))
    flipped[0] ^= 1  # 0.75 + one ulp: a valid threshold, caught by the checksum alone
    conn.execute("UPDATE facts SET key_gammas = ? WHERE id = 'b'", (bytes(flipped),))
    conn.commit()
    conn.close()
    with pytest.raises(CorruptDatabaseError, match="fact 'b' fails its checksum"):
        NeuralDB.open(path)


def _blob(values):
    return torch.tensor(values, dtype=torch.float32).numpy().tobytes()


@pytest.mark.parametrize("key_gammas, message", [
    (_blob([float("nan")]), r"fact 'a' has a key threshold that is not a finite cosine in \[-1, 1\]"),
    (_blob([1.25]), r"fact 'a' has a key threshold that is not a finite cosine in \[-1, 1\] \(key 0: 1.25\)"),
    (_blob([0.5, 0.5]),
     r"fact 'a' has a corrupt key_gammas BLOB: 8 bytes, expected NULL or 4 bytes per key \(1 keys\)"),
    (b"", r"fact 'a' has a corrupt key_gammas BLOB: 0 bytes"),
    ("0.5", r"fact 'a' has a corrupt key_gammas BLOB: a str"),
])
def test_bad_stored_thresholds_are_refused_by_name_even_with_a_valid_checksum(tmp_path, format4_files, key_gammas,
                                                                              message):
    path = _saved(tmp_path)
    files = format4_files(path)
    row = files.row("a")
    resealed = files.checksum("a", row["metadata"], key_gammas.encode() if isinstance(key_gammas, str) else key_gammas,
                              files.read_slots(row["slot"], row["key_count"]))
    files.rewrite("a", reseal=False, key_gammas=key_gammas, checksum=resealed)
    with pytest.raises(CorruptDatabaseError, match=rf"db.ndb: {message}"):
        NeuralDB.open(path)


@pytest.mark.parametrize("version", [1, 2])
def test_older_files_migrate_with_null_thresholds(tmp_path, legacy_database, version):
    keys, residuals = _vectors(2)
    path = tmp_path / "old.ndb"
    legacy_database(path, version, [("a", keys[0], residuals[0], {}), ("b", keys[1], residuals[1], {})],
                    d1=D1, d2=D2, gamma=0.7)
    with NeuralDB.open(path) as db:
        assert db.get("a").key_gammas is None and db.get("b").key_gammas is None and not db.has_key_gammas
        assert db.snapshot().gammas.tolist() == _f32([0.7, 0.7])
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM facts WHERE key_gammas IS NULL").fetchone()[0] == 2
    conn.close()


def test_export_import_carries_thresholds_and_checks_them(tmp_path):
    keys, residuals = _vectors(3, seed=4)
    db = NeuralDB(d1=D1, d2=D2, gamma=0.55)
    db.add(keys[:2], residuals[:2], ["a", "b"], extra_keys=[keys[2], None],
           key_gammas=[torch.tensor([0.9, 0.123456789]), None])
    sidecar = db.export(tmp_path / "out.safetensors")
    document = json.loads(sidecar.read_text())
    assert document["key_gammas"] == [_f32([0.9, 0.123456789]), None]
    with NeuralDB.import_(tmp_path / "out.safetensors") as copy:
        assert copy.get("a").key_gammas.tolist() == _f32([0.9, 0.123456789]) and copy.get("b").key_gammas is None
        assert copy.snapshot().gammas.tolist() == _f32([0.9, 0.123456789, 0.55])

    def refused(message, **changes):
        sidecar.write_text(json.dumps({**document, **changes}))
        with pytest.raises(ValueError, match=message):
            NeuralDB.import_(tmp_path / "out.safetensors")

    refused(r"'key_gammas' must be a list of 2 entries \(one per id, format version 3\)", key_gammas=[None])
    refused(r"'key_gammas' must be a list of 2 entries", key_gammas=None)
    refused(r"'key_gammas' entry 0 must be null or a list of 2 numbers", key_gammas=[[0.9], None])
    refused(r"'key_gammas' entry 1 must be null or a list of 1 numbers", key_gammas=[None, ["0.5"]])
    refused(r"'key_gammas' entry 1 must be null or a list of 1 numbers", key_gammas=[None, [True]])
    refused(r"key_gammas of fact 'b' \(batch position 1\): the fact has a key threshold that is not a finite",
            key_gammas=[None, [1.5]])
    version_2 = {name: value for name, value in document.items() if name != "key_gammas"}
    sidecar.write_text(json.dumps({**version_2, "format_version": 2}))
    with NeuralDB.import_(tmp_path / "out.safetensors") as copy:  # a version 2 export has no thresholds
        assert copy.get("a").key_gammas is None and not copy.has_key_gammas


def test_refresh_follows_thresholds_and_gamma_of_another_connection(tmp_path):
    keys, residuals = _vectors(2, seed=5)
    path = tmp_path / "db.ndb"
    with NeuralDB(path, d1=D1, d2=D2, gamma=0.6) as writer, NeuralDB.open(path) as reader:
        writer.add(keys, residuals, ["a", "b"], key_gammas=[torch.tensor([0.3]), None])
        assert reader.refresh() and reader.has_key_gammas
        assert reader.snapshot().gammas.tolist() == _f32([0.3, 0.6])
        writer.gamma = 0.9
        assert reader.refresh() and reader.snapshot().gammas.tolist() == _f32([0.3, 0.9])
        writer.upsert(keys[0], residuals[0], "a")
        writer.upsert(keys[1], residuals[1], "b", key_gammas=torch.tensor([-0.5]))
        assert reader.refresh() and reader.get("a").key_gammas is None
        assert reader.snapshot().gammas.tolist() == _f32([0.9, -0.5])


def test_view_thresholds_match_a_dict_model_under_random_operations(tmp_path):
    rng = random.Random(77)
    generator = torch.Generator().manual_seed(7)
    db = NeuralDB(tmp_path / "r.ndb", d1=D1, d2=D2, gamma=0.5)
    model = {}  # id -> ((k, D1) float32 keys, list of k thresholds or None): the independent reference
    gamma = 0.5
    kept = []  # (snapshot, its thresholds cloned when taken)
    next_id = 0

    def random_fact():
        k = rng.randint(1, 3)
        thresholds = None if rng.random() < 0.4 else [round(rng.uniform(-1, 1), 6) for _ in range(k)]
        return torch.randn(k, D1, generator=generator), torch.randn(D2, generator=generator), thresholds

    def write(method, ids):
        facts = [random_fact() for _ in ids]
        method(torch.stack([keys[0] for keys, _, _ in facts]), torch.stack([residual for _, residual, _ in facts]),
               ids, extra_keys=[keys[1:] for keys, _, _ in facts],
               key_gammas=[None if t is None else torch.tensor(t, dtype=torch.float64) for _, _, t in facts])
        model.update({fact_id: (keys, t) for fact_id, (keys, _, t) in zip(ids, facts)})

    for step in range(120):
        action = rng.random()
        if action < 0.4 or not model:
            ids = [f"f{next_id + i}" for i in range(rng.randint(1, 4))]
            next_id += len(ids)
            write(db.add, ids)
        elif action < 0.65:  # replace, with the same or another number of keys
            write(db.upsert, rng.sample(sorted(model), rng.randint(1, min(3, len(model)))))
        elif action < 0.9:
            doomed = rng.sample(sorted(model), rng.randint(1, min(3, len(model))))
            db.delete(doomed)
            for fact_id in doomed:
                del model[fact_id]
        else:
            gamma = round(rng.uniform(-1, 1), 6)
            db.gamma = gamma
        if step % 7 == 0:  # a snapshot held across later changes (copy-on-write must keep it intact)
            snap = db.snapshot()
            kept.append((snap, snap.gammas.clone()))
        assert db.has_key_gammas == any(t is not None for _, t in model.values())
        for dtype in (torch.float32, torch.float64):
            snap = db.snapshot(dtype=dtype)
            assert snap.gammas.shape == (db.key_rows,) and snap.gammas.dtype == torch.float32
            assert torch.equal(snap.gammas, _expected_gammas(snap, model, gamma))
    for snap, gammas in kept:
        assert torch.equal(snap.gammas, gammas)
    with NeuralDB.open(tmp_path / "r.ndb") as reopened:  # the file holds the same thresholds
        assert torch.equal(reopened.snapshot().gammas, _expected_gammas(reopened.snapshot(), model, gamma))
