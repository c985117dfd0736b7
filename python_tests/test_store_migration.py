"""Opening a format-1, 2 or 3 database migrates it to format 4 in one transaction: the Editor's
"edit" metadata becomes a versioned EditRecord (FORMAT.md, from 1 and 2), the vectors move from the
rows into the vector file, every fact gets its format-4 checksum, insertion order, revisions and the
AUTOINCREMENT sequence are kept; a migration that fails leaves the file byte for byte as it was and
no vector file behind. The old files are written by hand (conftest `legacy_database`)."""

import json
import sqlite3

import pytest
import torch

from neuraldb_kernels.store import FORMAT_VERSION, NeuralDB

D1, D2 = 6, 3
EDIT_KEYS = {"version", "layer", "subject_start", "subject_first_token", "target_prob", "steps", "converged",
             "bare_prompt_key", "bare_prompt_key_generic", "shares_residual_with", "hparams", "key_floors"}


def _vectors(n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, D1, generator=generator), torch.randn(n, D2, generator=generator)


LEGACY_EDIT = {"layer": 4, "target_prob": 0.93, "hparams": {"layer": 4, "gamma": 0.65}, "shares_residual_with": ["b"],
               "from_an_old_editor": True}


def _assert_format_4(path, format4_files, last_seq):
    """The file is format 4 with exactly the format-4 columns, every checksum matches FORMAT.md's
    definition over the fact's slots, and the next fact gets the seq after `last_seq`."""
    files = format4_files(path)
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == FORMAT_VERSION == 4
    assert json.loads(conn.execute("SELECT value FROM meta WHERE name = 'format_version'").fetchone()[0]) == 4
    assert [row[1] for row in conn.execute("PRAGMA table_info(facts)")] == [
        "seq", "id", "rev", "slot", "key_count", "key_gammas", "metadata", "checksum"]
    for fact_id, slot, key_count, metadata, key_gammas, checksum in conn.execute(
            "SELECT id, slot, key_count, metadata, key_gammas, checksum FROM facts"):
        assert checksum == files.checksum(fact_id, metadata, key_gammas, files.read_slots(slot, key_count))
    assert conn.execute("SELECT seq FROM facts WHERE id = 'new'").fetchone()[0] == last_seq + 1
    assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name LIKE 'facts_%'").fetchone()[0] == 0
    conn.close()
    left = {entry.name for entry in path.parent.iterdir()} - {f"{path.name}-wal", f"{path.name}-shm"}
    assert left == {path.name, f"{path.name}-vectors"}  # no temporary file left


def _delete_last(path):
    """Delete the fact with the highest seq (never to be reused); returns that seq."""
    conn = sqlite3.connect(path)
    conn.execute("DELETE FROM facts WHERE id = 'gone'")
    last_seq = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'facts'").fetchone()[0]
    conn.commit()
    conn.close()
    return last_seq


@pytest.mark.parametrize("version", [1, 2])
def test_old_databases_are_migrated_to_format_4(tmp_path, legacy_database, format4_files, version):
    keys, residuals = _vectors(6)
    path = tmp_path / "old.ndb"
    rows = [("a", keys[0], residuals[0], {"subject": "A", "edit": LEGACY_EDIT}),
            ("b", keys[1], residuals[1], {"subject": "B", "edit": {"steps": 7}}),
            ("c", keys[2], residuals[2], {"edit": "free text, not a record"}),
            ("d", keys[3], residuals[3], {"edit": {"version": 1, "layer": 2}}),
            ("e", keys[4], residuals[4], {}),
            ("gone", keys[5], residuals[5], {})]
    if version == 1:  # the Editor's second key as a row of its own
        rows.insert(1, ("a#bare", keys[5] * 2, residuals[0], {"bare_key_of": "a"}))
    legacy_database(path, version, rows, d1=D1, d2=D2)
    last_seq = _delete_last(path)

    with NeuralDB.open(path) as db:
        assert list(db) == ["a", "b", "c", "d", "e"]
        a = db.get("a").metadata["edit"]
        assert set(a) == EDIT_KEYS | {"from_an_old_editor"}
        assert a == {**{name: None for name in EDIT_KEYS}, **LEGACY_EDIT, "version": 1}
        b = db.get("b").metadata["edit"]
        assert b == {**{name: None for name in EDIT_KEYS}, "shares_residual_with": [], "steps": 7, "version": 1}
        assert db.get("c").metadata == {"edit": "free text, not a record"}
        assert db.get("d").metadata == {"edit": {"version": 1, "layer": 2}}
        assert db.get("e").metadata == {}
        expected_keys = torch.stack([keys[0], keys[5] * 2]) if version == 1 else keys[:1]
        assert torch.equal(db.get("a").keys, expected_keys) and torch.equal(db.get("e").residual, residuals[4])
        assert db.verify().corrupt == ()
        db.add(keys[5], residuals[5], "new")
    _assert_format_4(path, format4_files, last_seq)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_version_3_database_moves_its_vectors_into_the_vector_file(tmp_path, legacy_database, format4_files, dtype):
    keys, residuals = _vectors(6, seed=1)
    path = tmp_path / "old.ndb"
    rows = [("a", keys[:2], residuals[0], {"subject": "A", "edit": {"version": 1, "layer": 2}}, [0.5, 0.75]),
            ("b", keys[2], residuals[1], {"edit": {"steps": 7}}),  # not versioned: 3 -> 4 leaves metadata alone
            ("c", keys[3], residuals[2], {}, [0.25]),
            ("gone", keys[4], residuals[3], {})]
    legacy_database(path, 3, rows, d1=D1, d2=D2, dtype=dtype, gamma=0.6)
    # a leftover of a migration that crashed before its commit: replaced
    (tmp_path / "old.ndb-vectors").write_bytes(b"half a vector file")
    last_seq = _delete_last(path)
    conn = sqlite3.connect(path)
    before = conn.execute("SELECT id, rev, metadata, key_gammas FROM facts ORDER BY seq").fetchall()
    conn.close()
    storage = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    with NeuralDB.open(path) as db:
        assert list(db) == ["a", "b", "c"] and db.key_rows == 4 and db.dtype == storage
        assert torch.equal(db.get("a").keys, keys[:2].to(storage)) and torch.equal(db.get("c").residual,
                                                                                  residuals[2].to(storage))
        assert db.get("a").key_gammas.tolist() == [0.5, 0.75] and db.get("b").key_gammas is None
        assert db.get("b").metadata == {"edit": {"steps": 7}}
        snap = db.snapshot()
        assert snap.ids_at(range(4)) == ["a", "a", "b", "c"] and snap.gammas.tolist() == pytest.approx(
            [0.5, 0.75, 0.6, 0.25])
        assert torch.equal(snap.keys, keys[:4].to(storage))
        assert torch.equal(snap.residuals, residuals[[0, 0, 1, 2]].to(storage))
        assert db.verify().corrupt == ()
        db.add(keys[5], residuals[5], "new")
    _assert_format_4(path, format4_files, last_seq)
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT id, rev, metadata, key_gammas FROM facts WHERE id != 'new' ORDER BY seq"
                        ).fetchall() == before
    conn.close()
    files = format4_files(path)
    assert files.vectors.stat().st_size == 64 + 5 * files.slot_bytes  # 4 migrated key rows, then 'new'


@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("bad_row, message", [
    (("b", torch.ones(D1), torch.full((D2,), float("nan")), {}), r"fact 'b' has a residual that contains NaN or Inf"),
    (("b", torch.full((D1,), 1e-30), torch.ones(D2), {}), r"fact 'b' has a key that has a norm that under- or overflows"),
    (("b", torch.ones(D1), torch.ones(D2), {"edit": {"steps": 1}}), None),  # made unreadable below
])
def test_a_failed_migration_leaves_the_file_untouched(tmp_path, legacy_database, bad_row, message, version):
    keys, residuals = _vectors(1)
    path = tmp_path / "old.ndb"
    legacy_database(path, version, [("a", keys[0], residuals[0], {"edit": {"steps": 3}}), bad_row], d1=D1, d2=D2)
    if message is None and version == 3:  # changed after its checksum was computed
        conn = sqlite3.connect(path)
        conn.execute("UPDATE facts SET metadata = '{\"edit\": {' WHERE id = 'b'")
        conn.commit()
        conn.close()
        message = r"fact 'b' fails its checksum"
    if message is None:
        conn = sqlite3.connect(path)
        conn.execute("UPDATE facts SET metadata = '{\"edit\": {' WHERE id = 'b'")
        conn.commit()
        conn.close()
        message = r"fact 'b' has metadata that cannot be read"
    before = path.read_bytes()
    with pytest.raises(ValueError, match=message):
        NeuralDB.open(path)
    assert path.read_bytes() == before
    assert not (tmp_path / "old.ndb-vectors").exists() and not (tmp_path / "old.ndb-vectors.migrating").exists()


@pytest.mark.parametrize("version", [2, 3])
def test_a_read_only_open_does_not_migrate(tmp_path, legacy_database, version):
    keys, residuals = _vectors(1)
    path = tmp_path / "old.ndb"
    legacy_database(path, version, [("a", keys[0], residuals[0], {})], d1=D1, d2=D2)
    before = path.read_bytes()
    with pytest.raises(ValueError, match=rf"format version {version}; open it once without readonly=True to migrate"):
        NeuralDB.open(path, readonly=True)
    assert path.read_bytes() == before and not (tmp_path / "old.ndb-vectors").exists()


def test_a_version_1_row_with_unreadable_metadata_stops_the_migration(tmp_path, legacy_database):
    keys, residuals = _vectors(2)
    path = tmp_path / "old.ndb"
    legacy_database(path, 1, [("a", keys[0], residuals[0], {}), ("a#bare", keys[1], residuals[0], {})], d1=D1, d2=D2)
    conn = sqlite3.connect(path)
    conn.execute("UPDATE facts SET metadata = '[' WHERE id = 'a#bare'")
    conn.commit()
    conn.close()
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"old.ndb: fact 'a#bare' has metadata that cannot be read"):
        NeuralDB.open(path)
    assert path.read_bytes() == before
