"""Facts with several keys (format version 2): an extra key retrieves its fact's residual, search
counts a fact once with its best key, export/import and other connections keep every key, and a
version-1 database whose Editor wrote second keys as "<id>#bare" rows is migrated on open."""

import json
import sqlite3

import pytest
import torch

import neuraldb_kernels.store.migrations as migrations
import neuraldb_kernels.store.schema as schema
from neuraldb_kernels import gated_retrieve
from neuraldb_kernels.store import FORMAT_VERSION, NeuralDB

D1, D2 = 8, 4


def _facts(n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(n, D1, generator=generator, dtype=torch.float64),
            torch.randn(n, D2, generator=generator, dtype=torch.float64))


def test_an_extra_key_retrieves_its_facts_residual():
    keys, residuals = _facts(3)
    extra = torch.randn(2, D1, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    db = NeuralDB(d1=D1, d2=D2)
    db.add(keys, residuals, ["a", "b", "c"], extra_keys=[None, extra, None])
    assert len(db) == 3 and db.key_rows == 5 and sorted(db) == ["a", "b", "c"]
    snap = db.snapshot(dtype=torch.float64)
    for query, owner in ((keys[0], "a"), (extra[0], "b"), (extra[1], "b"), (keys[2], "c")):
        out, index, score = gated_retrieve(query.unsqueeze(0), snap.keys, snap.residuals, 0.999, return_index=True)
        assert snap.ids_at(index) == [owner]
        assert torch.equal(out[0], residuals[["a", "b", "c"].index(owner)].float().double())
    stored = db.get("b")
    assert stored.keys.shape == (3, D1) and torch.equal(stored.key, keys[1].float())
    assert torch.equal(stored.keys[1:], extra.float())
    db.delete("b")
    assert db.key_rows == 2 and db.snapshot().ids_at(range(2)) == ["a", "c"]


def test_search_ranks_facts_by_their_best_key():
    keys, residuals = _facts(30, seed=1)
    extra = [torch.randn(i % 3, D1, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
             for i in range(30)]
    db = NeuralDB(d1=D1, d2=D2)
    ids = [f"f{i}" for i in range(30)]
    db.add(keys, residuals, ids, extra_keys=extra)
    q = torch.randn(D1, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    best = []
    for i in range(30):
        every = torch.cat([keys[i : i + 1], extra[i]]).float().double()
        best.append(float(((every @ q) / (every.norm(dim=1) * q.norm())).max()))
    order = sorted(range(30), key=lambda i: -best[i])
    hits = db.search(q.float(), k=7)
    assert [hit.id for hit in hits] == [ids[i] for i in order[:7]]  # each fact once
    assert [hit.cosine for hit in hits] == pytest.approx([best[i] for i in order[:7]], abs=1e-6)


def test_export_and_import_keep_every_key(tmp_path):
    keys, residuals = _facts(4, seed=2)
    extra = [None, torch.ones(2, D1), None, -torch.ones(1, D1)]
    db = NeuralDB(d1=D1, d2=D2, dtype=torch.float16)
    db.add(keys, residuals, ["a", "b", "c", "d"], extra_keys=extra, metadata=[{"subject": s} for s in "abcd"])
    db.delete("a")  # the view rows are no longer in insertion order
    sidecar = db.export(tmp_path / "out.safetensors")
    assert json.loads(sidecar.read_text())["key_counts"] == [3, 1, 2]
    imported = NeuralDB.import_(tmp_path / "out.safetensors")
    assert len(imported) == 3 and imported.key_rows == 6
    for fact_id in ("b", "c", "d"):
        original, copy = db.get(fact_id), imported.get(fact_id)
        assert torch.equal(original.keys, copy.keys) and torch.equal(original.residual, copy.residual)
        assert copy.metadata["subject"] == fact_id


def test_a_version_1_export_imports_with_one_key_per_fact(tmp_path):
    keys, residuals = _facts(2, seed=3)
    db = NeuralDB(d1=D1, d2=D2)
    db.add(keys, residuals, ["a", "b"])
    sidecar = db.export(tmp_path / "v1.safetensors")
    document = json.loads(sidecar.read_text())
    del document["key_counts"]
    sidecar.write_text(json.dumps({**document, "format_version": 1}))
    imported = NeuralDB.import_(tmp_path / "v1.safetensors")
    assert imported.key_rows == 2 and torch.equal(imported.get("b").keys, keys[1:].float())


def test_refresh_follows_key_count_changes_of_another_connection(tmp_path):
    keys, residuals = _facts(3, seed=4)
    writer = NeuralDB(tmp_path / "db.ndb", d1=D1, d2=D2)
    writer.add(keys, residuals, ["a", "b", "c"])
    reader = NeuralDB.open(tmp_path / "db.ndb")
    writer.upsert(keys[:2], residuals[:2], ["a", "b"], extra_keys=[torch.ones(2, D1), None])  # a: 1 -> 3 keys
    writer.add(keys[2], residuals[2], "d", extra_keys=torch.ones(D1))
    assert reader.refresh()
    assert len(reader) == 4 and reader.key_rows == 7
    writer.upsert(keys[0], residuals[0], "a")  # a: 3 -> 1 key
    writer.delete("d")
    assert reader.refresh()
    assert reader.key_rows == 3 and sorted(reader.snapshot().ids_at(range(3))) == ["a", "b", "c"]
    for fact_id in "abc":
        assert torch.equal(reader.get(fact_id).keys, writer.get(fact_id).keys)


def test_version_1_bare_key_rows_become_extra_keys_on_open(tmp_path, legacy_database):
    keys, _ = _facts(5, seed=5)
    path = tmp_path / "v1.ndb"
    residual = torch.ones(D2)
    legacy_database(path, 1, [
        ("a", keys[0], residual, {"subject": "A"}),
        ("a#bare", keys[1], residual, {"subject": "A", "bare_key_of": "a"}),
        ("b", keys[2], residual, {}),
        ("lost#bare", keys[3], residual, {"bare_key_of": "lost"}),  # its fact is gone: kept as it is
        ("c#bare", keys[4], residual, {}),  # not written by the Editor: kept as it is
    ], d1=D1, d2=D2)
    with NeuralDB.open(path) as db:
        assert sorted(db) == ["a", "b", "c#bare", "lost#bare"] and db.key_rows == 5
        assert torch.equal(db.get("a").keys, keys[:2].float())
        assert db.get("a").metadata == {"subject": "A"}
        snap = db.snapshot()
        out, index, _ = gated_retrieve(keys[1:2].float(), snap.keys, snap.residuals, 0.999, return_index=True)
        assert snap.ids_at(index) == ["a"]
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == FORMAT_VERSION == 4
    assert json.loads(conn.execute("SELECT value FROM meta WHERE name = 'format_version'").fetchone()[0]) == 4
    conn.close()


def test_a_failed_migration_changes_nothing(tmp_path, monkeypatch, legacy_database):
    keys, _ = _facts(2, seed=6)
    path = tmp_path / "v1.ndb"
    legacy_database(path, 1, [("a", keys[0], torch.ones(D2), {}), ("a#bare", keys[1], torch.ones(D2), {"bare_key_of": "a"})],
                    d1=D1, d2=D2)

    def failing(conn, settings):
        conn.execute("DELETE FROM facts WHERE id = 'a#bare'")  # a first change, then the failure
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setitem(migrations._MIGRATIONS, 1, failing)
    with pytest.raises(ValueError, match=r"format version 1 and must be migrated to version 4 on open"):
        NeuralDB.open(path)
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM facts").fetchone()[0] == 2  # rolled back
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    conn.close()
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["v1.ndb"]  # no vector file left behind


def test_an_old_database_another_connection_is_writing_is_not_migrated(tmp_path, monkeypatch, legacy_database):
    keys, _ = _facts(2, seed=8)
    path = tmp_path / "busy.ndb"
    legacy_database(path, 1, [("a", keys[0], torch.ones(D2), {}), ("a#bare", keys[1], torch.ones(D2), {"bare_key_of": "a"})],
                    d1=D1, d2=D2)
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # another process in the middle of a write
    monkeypatch.setattr(schema, "connect", lambda target, **options: sqlite3.connect(  # waits 0.05 s for the lock, not 30
        target, isolation_level=None, check_same_thread=False, timeout=0.05))
    with pytest.raises(ValueError, match=r"busy.ndb cannot be opened for writing \(database is locked\)"):
        NeuralDB.open(path)
    writer.execute("ROLLBACK")
    writer.close()
    with NeuralDB.open(path) as db:  # untouched until then: migrated now
        assert list(db) == ["a"] and torch.equal(db.get("a").keys, keys.float())


@pytest.mark.parametrize("extra, error, message", [
    ([None], ValueError, "got 1 extra_keys entries for 2 facts"),
    (torch.ones(2, D1), TypeError, "extra_keys must be None, a tensor for one fact, or a sequence"),
    ([None, torch.ones(2, D1 + 1)], ValueError, r"extra keys of fact 'b' \(batch position 1\) must have shape"),
    ([None, torch.ones(1, 2, D1)], ValueError, r"must have shape \(8,\) or \(j, 8\), got \(1, 2, 8\)"),
    ([[1.0] * D1, None], TypeError, "extra keys of fact 'a' .* must be a torch.Tensor"),
    ([None, torch.full((1, D1), float("nan"))], ValueError, "extra key 0 of fact 'b' .* contains NaN or Inf"),
    ([torch.zeros(D1), None], ValueError, "extra key 0 of fact 'a' .* has zero norm"),
    ([torch.ones(D1, dtype=torch.int64), None], TypeError, "must be a float16/bfloat16/float32/float64 tensor"),
])
def test_bad_extra_keys_are_refused_and_nothing_is_stored(extra, error, message):
    keys, residuals = _facts(2, seed=7)
    db = NeuralDB(d1=D1, d2=D2)
    with pytest.raises(error, match=message):
        db.add(keys, residuals, ["a", "b"], extra_keys=extra)
    with pytest.raises(error, match=message):
        db.upsert(keys, residuals, ["a", "b"], extra_keys=extra)
    assert len(db) == 0 and db.key_rows == 0


def test_corrupt_slot_pointers_and_vector_files_are_refused_on_open(tmp_path, format4_files):
    keys, residuals = _facts(2, seed=8)
    path = tmp_path / "db.ndb"
    NeuralDB(path, d1=D1, d2=D2).add(keys, residuals, ["a", "b"])
    files = format4_files(path)
    original_row, original_vectors = files.row("b"), files.vectors.read_bytes()

    def opened_with(**change):
        """Open after rewriting fact b (see `Format4Files.rewrite`), then restore both files."""
        files.rewrite("b", **change)
        try:
            return NeuralDB.open(path)
        finally:
            files.rewrite("b", reseal=False, **{name: original_row[name] for name in ("slot", "key_count", "checksum")})
            files.vectors.write_bytes(original_vectors)
            conn = sqlite3.connect(path)
            conn.execute("UPDATE meta SET value = '2' WHERE name = 'vector_slots'")
            conn.commit()
            conn.close()

    for change, message in (({"key_count": 0}, "points at slots 1 to 0"), ({"slot": -1}, "points at slots -1 to -1"),
                            ({"slot": 2}, "points at slots 2 to 2 of the vector file, outside the 2 slots in use"),
                            ({"key_count": "one"}, "has columns of the wrong types")):
        with pytest.raises(ValueError, match=rf"db.ndb: fact 'b' {message}"):
            opened_with(reseal=False, **change)
    with pytest.raises(ValueError, match=r"db.ndb: fact 'b' fails its checksum"):
        opened_with(slot=0, reseal=False)  # a's slot: the checksum binds a fact to its own vectors
    two_keys = files.slot_bytes_of(keys[1].repeat(2, 1), residuals[1])
    with pytest.raises(ValueError, match=r"db.ndb: fact 'b' fails its checksum"):
        opened_with(slots=two_keys, reseal=False)
    with opened_with(slots=two_keys) as db:  # two whole keys, checksum matching: a fact with an extra key
        snap = db.snapshot()
        assert db.key_rows == 3 and snap.ids_at(range(3)) == ["a", "b", "b"]
        assert torch.equal(snap.keys[1:], keys[1].float().repeat(2, 1))
    files.vectors.write_bytes(original_vectors[:-1])  # the last slot cut short
    with pytest.raises(ValueError, match=r"db.ndb-vectors is truncated"):
        NeuralDB.open(path)
    files.vectors.write_bytes(original_vectors)
    with NeuralDB.open(path) as db:  # restored: the original rows open again
        assert db.key_rows == 2 and torch.equal(db.snapshot().keys, keys.float())
