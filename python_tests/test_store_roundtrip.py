"""NeuralDB round trips: create at a path -> close -> open, save -> open, export -> import, in
every storage dtype. The reference is the input cast to the storage dtype by torch itself."""

import json
import sqlite3

import pytest
import torch

from neuraldb_kernels.store import FORMAT_VERSION, NeuralDB, StoredFact

D1, D2 = 24, 10
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _facts(n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, D1, generator=generator, dtype=torch.float64)
    residuals = torch.randn(n, D2, generator=generator, dtype=torch.float64)
    ids = [f"fact-{i}" for i in range(n)]
    metadata = [{"subject": f"S{i}", "prompt": "{} plays for", "target_new": "Ajax", "target_true": None,
                 "source": "test", "extra": {"case_id": i, "tags": ["a", "ü"]}} for i in range(n)]
    return keys, residuals, ids, metadata


def _rows_by_id(db, device=None, dtype=None):
    snap = db.snapshot(device, dtype)
    ids = snap.ids_at(range(len(snap.keys)))
    return {fact_id: (snap.keys[i], snap.residuals[i]) for i, fact_id in enumerate(ids)}


def _assert_same_facts(db, keys, residuals, ids, metadata, dtype):
    assert len(db) == len(ids) and set(db) == set(ids)
    rows = _rows_by_id(db)
    for i, fact_id in enumerate(ids):
        stored = db.get(fact_id)
        assert isinstance(stored, StoredFact) and stored.key.dtype == dtype
        assert torch.equal(stored.key, keys[i].to(dtype)) and torch.equal(stored.residual, residuals[i].to(dtype))
        assert torch.equal(rows[fact_id][0], keys[i].to(dtype)) and torch.equal(rows[fact_id][1], residuals[i].to(dtype))
        expected = {name: value for name, value in metadata[i].items()}
        created = stored.metadata.pop("created_at")
        assert isinstance(created, str) and created.endswith("+00:00")
        assert stored.metadata == expected


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_create_close_open_is_bit_exact(tmp_path, dtype):
    keys, residuals, ids, metadata = _facts(37)
    path = tmp_path / "facts.ndb"
    with NeuralDB(path, d1=D1, d2=D2, layer=3, gamma=0.7, dtype=dtype) as db:
        assert db.add(keys[:30], residuals[:30], ids[:30], metadata[:30]) == ids[:30]
        for i in range(30, 37):  # single facts, one transaction each
            db.add(keys[i], residuals[i], ids[i], metadata[i])
        db.delete(["fact-4", "fact-33"])
    keep = [i for i in range(37) if ids[i] not in ("fact-4", "fact-33")]
    with NeuralDB.open(path) as db:
        assert (db.d1, db.d2, db.layer, db.gamma, db.dtype) == (D1, D2, 3, 0.7, dtype)
        _assert_same_facts(db, keys[keep], residuals[keep], [ids[i] for i in keep], [metadata[i] for i in keep], dtype)
        K, R = db.view()
        assert K.is_contiguous() and R.is_contiguous() and K.shape == (35, D1) and R.shape == (35, D2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_save_copies_everything_and_never_overwrites(tmp_path, dtype):
    keys, residuals, ids, metadata = _facts(12, seed=1)
    db = NeuralDB(d1=D1, d2=D2, dtype=dtype)  # in memory
    db.add(keys, residuals, ids, metadata)
    db.save(tmp_path / "copy.ndb")
    with pytest.raises(FileExistsError, match="never overwrites"):
        db.save(tmp_path / "copy.ndb")
    with NeuralDB.open(tmp_path / "copy.ndb") as copy:
        _assert_same_facts(copy, keys, residuals, ids, metadata, dtype)
        copy.delete("fact-0")  # the copy is a working, writable database
    with NeuralDB.open(tmp_path / "copy.ndb") as copy:
        assert "fact-0" not in copy and len(copy) == 11
    assert "fact-0" in db
    db.close()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_export_import_round_trip(tmp_path, dtype):
    keys, residuals, ids, metadata = _facts(9, seed=2)
    with NeuralDB(tmp_path / "a.ndb", d1=D1, d2=D2, layer=1, gamma=0.5, dtype=dtype) as db:
        db.add(keys, residuals, ids, metadata)
        sidecar = db.export(tmp_path / "share.safetensors")
    assert sidecar == tmp_path / "share.json"
    document = json.loads(sidecar.read_text())
    assert document["format_version"] == 3 and document["ids"] == ids  # the export pair's version (FORMAT.md)
    for target in (None, tmp_path / "imported.ndb"):
        with NeuralDB.import_(tmp_path / "share.safetensors", target) as imported:
            assert (imported.layer, imported.gamma, imported.dtype) == (1, 0.5, dtype)
            _assert_same_facts(imported, keys, residuals, ids, metadata, dtype)
    with NeuralDB.open(tmp_path / "imported.ndb") as reopened:
        _assert_same_facts(reopened, keys, residuals, ids, metadata, dtype)


def test_empty_database_round_trip(tmp_path):
    with NeuralDB(tmp_path / "e.ndb", d1=D1, d2=D2) as db:
        K, R = db.view()
        assert K.shape == (0, D1) and R.shape == (0, D2) and db.search(torch.ones(D1)) == []
        db.export(tmp_path / "e.safetensors")
    with NeuralDB.open(tmp_path / "e.ndb") as db:
        assert len(db) == 0
    with NeuralDB.import_(tmp_path / "e.safetensors") as db:
        assert len(db) == 0 and db.d1 == D1


def test_file_is_a_versioned_wal_sqlite_database_and_a_vector_file(tmp_path):
    keys, residuals, ids, metadata = _facts(3)
    with NeuralDB(tmp_path / "f.ndb", d1=D1, d2=D2, dtype=torch.bfloat16) as db:
        db.add(keys, residuals, ids, metadata)
        conn = sqlite3.connect(tmp_path / "f.ndb")
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == FORMAT_VERSION
        meta = {name: json.loads(value) for name, value in conn.execute("SELECT name, value FROM meta")}
        assert meta["format_version"] == FORMAT_VERSION and meta["dtype"] == "bfloat16" and meta["vector_slots"] == 3
        slot, key_count = conn.execute("SELECT slot, key_count FROM facts WHERE id = 'fact-1'").fetchone()
        conn.close()
        vectors = (tmp_path / "f.ndb-vectors").read_bytes()
        # header: magic, file version 1, d1, d2, dtype code 3 (bfloat16), the vectors_id; 64 bytes in all
        assert vectors[:24] == b"NDBVECS\0" + b"".join(v.to_bytes(4, "little") for v in (1, D1, D2, 3))
        assert vectors[24:40] == bytes.fromhex(meta["vectors_id"]) and vectors[40:64] == bytes(24)
        assert len(vectors) == 64 + 3 * (D1 + D2) * 2 and key_count == 1
        slot_bytes = vectors[64 + slot * (D1 + D2) * 2 : 64 + (slot + 1) * (D1 + D2) * 2]
        # bfloat16 slot = the raw little-endian 2-byte words (the top half of each float32): key, then residual
        words = torch.cat([keys[1], residuals[1]]).to(torch.float32).to(torch.bfloat16).view(torch.int16).tolist()
        assert slot_bytes == b"".join((w & 0xFFFF).to_bytes(2, "little") for w in words)


def test_upsert_replaces_in_place_and_persists(tmp_path):
    keys, residuals, ids, metadata = _facts(5)
    with NeuralDB(tmp_path / "u.ndb", d1=D1, d2=D2) as db:
        db.add(keys, residuals, ids, metadata)
        row = db.snapshot().ids_at(range(5)).index("fact-2")
        new_keys, new_residuals, _, _ = _facts(2, seed=9)
        db.upsert(new_keys, new_residuals, ["fact-2", "fact-new"], [{"source": "v2"}, None])
        snap = db.snapshot()
        assert snap.ids_at([row]) == ["fact-2"] and len(db) == 6
        assert torch.equal(snap.keys[row], new_keys[0].float())
    with NeuralDB.open(tmp_path / "u.ndb") as db:
        assert torch.equal(db.get("fact-2").residual, new_residuals[0].float())
        assert db.get("fact-2").metadata["source"] == "v2" and "subject" not in db.get("fact-2").metadata
        assert torch.equal(db.get("fact-new").key, new_keys[1].float())
        assert torch.equal(db.get("fact-3").key, keys[3].float())


def test_metadata_reads_every_live_fact_without_vectors_and_only_what_this_connection_sees(tmp_path):
    keys, residuals, ids, metadata = _facts(7)
    with NeuralDB(tmp_path / "all.ndb", d1=D1, d2=D2) as db:
        db.add(keys, residuals, ids, metadata)
        db.delete(["fact-2"])
        expected = {fact_id: db.get(fact_id).metadata for fact_id in ids if fact_id != "fact-2"}
        assert all(expected[fact_id].items() >= meta.items() for fact_id, meta in zip(ids, metadata)
                   if fact_id != "fact-2")  # what was given, plus the store's created_at
        assert db.metadata() == expected and list(db.metadata()) == list(expected)  # insertion order
        more_keys, more_residuals, _, _ = _facts(1, seed=1)
        with NeuralDB.open(tmp_path / "all.ndb") as other:
            other.delete(["fact-4"])
            other.add(more_keys, more_residuals, ["late"], [{"subject": "late"}])
        assert list(db.metadata()) == [f"fact-{i}" for i in (0, 1, 3, 5, 6)]  # "late" unseen before refresh
        db.refresh()
        assert list(db.metadata()) == [f"fact-{i}" for i in (0, 1, 3, 5, 6)] + ["late"]
    with pytest.raises(ValueError, match="closed"):
        db.metadata()


def test_metadata_where_finds_facts_by_a_metadata_field(tmp_path):
    keys, residuals, ids, metadata = _facts(1203)
    for i in range(0, 1203, 3):
        metadata[i]["subject"] = "Shared"
    metadata[5]["subject"] = 'quote " and ü'
    with NeuralDB(tmp_path / "m.ndb", d1=D1, d2=D2) as db:
        db.add(keys, residuals, ids, metadata)
        shared = db.metadata_where("subject", ["Shared"])
        assert list(shared) == [f"fact-{i}" for i in range(0, 1203, 3)]  # database order
        assert shared["fact-3"]["extra"] == {"case_id": 3, "tags": ["a", "ü"]}
        wanted = [f"S{i}" for i in range(1, 1203, 3)] + ["S2", "S2", "nobody", 'quote " and ü']
        assert sorted(db.metadata_where("subject", wanted)) == sorted(
            [f"fact-{i}" for i in range(1, 1203, 3)] + ["fact-2", "fact-5"])  # > one 500-value chunk
        assert db.metadata_where("target_true", ["Ajax"]) == {} and db.metadata_where("subject", []) == {}
        db.delete(["fact-0"])
        assert "fact-0" not in db.metadata_where("subject", ["Shared"])
        for field in ("", 'a"b', 3):
            with pytest.raises(ValueError, match="field"):
                db.metadata_where(field, ["x"])
        with pytest.raises(TypeError, match="values must be"):
            db.metadata_where("subject", [None])
