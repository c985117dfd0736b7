"""A database file or an export is untrusted input: a file that is not exactly what NeuralDB
writes is refused with one clear error naming it (and the fact, for a bad row), never read into
memory as if it were fine. Also the failures around it: a held write lock, a failed COMMIT, a
read-only file, non-finite or out-of-range vectors and gamma at every entry."""

import hashlib
import json
import os
import random
import shutil
import sqlite3
import subprocess
import warnings

import pytest
import torch

import neuraldb_kernels.store.schema as schema
from neuraldb_kernels.store import CorruptDatabaseError, NeuralDB
from store_checks import reads_back_wrong_vectors

D1, D2 = 8, 4


def _vectors(n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, D1, generator=generator), torch.randn(n, D2, generator=generator)


@pytest.fixture
def saved(tmp_path):
    """A closed database of 3 facts at tmp_path/db.ndb and its facts {id: (key, residual, metadata)}."""
    keys, residuals = _vectors(3)
    path = tmp_path / "db.ndb"
    ids = ["a", "b", "c"]
    with NeuralDB(path, d1=D1, d2=D2, layer=2) as db:
        db.add(keys, residuals, ids, metadata=[{"subject": i} for i in ids])
        facts = {fact_id: (keys[i], residuals[i], db.get(fact_id).metadata) for i, fact_id in enumerate(ids)}
    return path, facts


def _sql(path, *statements):
    conn = sqlite3.connect(path)
    for statement, *parameters in statements:
        conn.execute(statement, *parameters)
    conn.commit()
    conn.close()


@pytest.mark.parametrize("statement, message", [
    ("CREATE TRIGGER planted AFTER INSERT ON facts BEGIN UPDATE facts SET residual = x'00' WHERE id = new.id; END",
     "unexpected trigger 'planted'"),
    ("CREATE TRIGGER planted BEFORE DELETE ON facts BEGIN SELECT RAISE(IGNORE); END", "unexpected trigger 'planted'"),
    ("CREATE VIEW everything AS SELECT * FROM facts", "unexpected view 'everything'"),
    ("CREATE TABLE notes(x)", "unexpected table 'notes'"),
    ("CREATE INDEX by_rev ON facts(rev)", "unexpected index 'by_rev'"),
    ("ALTER TABLE facts ADD COLUMN extra TEXT", r"table 'facts' has the columns .*'extra'"),
    ("ALTER TABLE meta RENAME COLUMN value TO content", r"table 'meta' has the columns .*'content'"),
])
def test_a_file_whose_schema_is_not_exactly_ours_is_refused(saved, statement, message):
    path, _ = saved
    _sql(path, (statement,))
    with pytest.raises(CorruptDatabaseError, match=rf"db.ndb.*{message}"):
        NeuralDB.open(path)
    with pytest.raises(CorruptDatabaseError, match=message):
        NeuralDB.open(path, readonly=True)


def test_the_connection_does_not_trust_the_schema(saved):
    path, _ = saved
    with NeuralDB.open(path) as db:
        assert db._conn.execute("PRAGMA trusted_schema").fetchone()[0] == 0


BAD_META = [
    ("d1", 0, "d1 must be a positive int, got 0"),
    ("d1", 2 ** 33, r"d1 must be a positive int, got 8589934592 \(at most 1048576\)"),
    ("d2", "4", "d2 must be a positive int, got '4'"),
    ("layer", -2, "layer must be None or a non-negative int, got -2"),
    ("layer", 1.5, "layer must be None or a non-negative int"),
    ("gamma", 1.5, r"gamma must be a finite float in \[-1, 1\]"),
    ("gamma", "NaN", r"gamma must be a finite float in \[-1, 1\]"),
    ("gamma", None, r"gamma must be a finite float"),
    ("dtype", "int8", "dtype 'int8' is not a storage dtype"),
    ("revision", -1, "revision must be a non-negative int"),
    ("created_at", 5, "created_at must be an ISO-8601 string"),
    ("fingerprint", {"model_type": "llama"}, "fingerprint is invalid"),
    ("fingerprint", [1, 2], "fingerprint is invalid"),
    ("fingerprint", {"model_type": "llama", "layer": 2, "d1": D1 + 1, "d2": D2, "weights_sha256": "ab"},
     r"fingerprint \(d1=9, d2=4, layer=2\) disagrees with the database \(d1=8, d2=4, layer=2\)"),
    ("format_version", 0, "corrupt meta table .*format_version=0"),
    ("format_version", -5, "corrupt meta table .*format_version=-5"),
    ("format", "zip", "corrupt meta table .*format='zip'"),
]


@pytest.mark.parametrize("name, value, message", BAD_META, ids=[f"{n}={v!r}" for n, v, _ in BAD_META])
def test_every_meta_value_is_checked(saved, name, value, message):
    path, _ = saved
    text = "NaN" if value == "NaN" else json.dumps(value)
    _sql(path, ("UPDATE meta SET value = ? WHERE name = ?", (text, name)))
    with pytest.raises(CorruptDatabaseError, match=message):
        NeuralDB.open(path)


def test_unknown_missing_or_unparsable_meta_rows_are_refused(saved):
    path, _ = saved
    _sql(path, ("INSERT INTO meta VALUES ('owner', '\"me\"')",))
    with pytest.raises(CorruptDatabaseError, match=r"meta rows \['owner'\] are unknown"):
        NeuralDB.open(path)
    _sql(path, ("DELETE FROM meta WHERE name IN ('owner', 'gamma')",))
    with pytest.raises(CorruptDatabaseError, match=r"\['gamma'\] are missing"):
        NeuralDB.open(path)
    _sql(path, ("INSERT INTO meta VALUES ('gamma', ?)", ("[" * 100_000,)))
    with pytest.raises(CorruptDatabaseError, match="corrupt meta table"):
        NeuralDB.open(path)
    _sql(path, ("UPDATE meta SET value = '0.5' WHERE name = 'gamma'",), ("PRAGMA user_version=2",))
    with pytest.raises(CorruptDatabaseError, match="user_version 2 disagrees with meta.format_version 4"):
        NeuralDB.open(path)


def _reseal(path, fact_id, format4_files, key=None, residual=None, metadata=None):
    """Rewrite a fact's keys (a list of d1 values per key), residual (d2 values) or metadata text
    and give it a matching checksum (as a careful forger would)."""
    files = format4_files(path)
    keys, stored_residual = files.vectors_of(fact_id)
    if key is not None:
        keys = torch.tensor(key, dtype=torch.float32).reshape(-1, D1)
    slots = files.slot_bytes_of(keys, stored_residual if residual is None else torch.tensor(residual))
    files.rewrite(fact_id, slots=slots, **({} if metadata is None else {"metadata": metadata}))


@pytest.mark.parametrize("columns, message", [
    ({"residual": [1.0, float("nan"), 0.0, 0.0]}, "fact 'b' has a residual that contains NaN or Inf"),
    ({"key": [float("inf")] + [1.0] * (D1 - 1)}, "fact 'b' has a key that contains NaN or Inf"),
    ({"key": [1.0] * D1 + [1e-30] * D1}, "fact 'b' has a key that has a norm that under- or overflows float32"),
    ({"key": [1e25] * D1}, "fact 'b' has a key that has a norm that under- or overflows float32"),
    ({"key": [0.0] * D1}, "fact 'b' has a key that has zero norm"),
    ({"metadata": "[1, 2]"}, "fact 'b' has metadata that is a JSON list, not an object"),
    ({"metadata": "{"}, "fact 'b' has metadata that is not valid JSON"),
    ({"metadata": '{"a": NaN}'}, "fact 'b' has metadata that is not valid JSON"),  # JSON has no NaN
])
def test_rows_with_bad_values_are_refused_by_name_even_with_a_valid_checksum(saved, format4_files, columns, message):
    path, _ = saved
    _reseal(path, "b", format4_files, **columns)
    with pytest.raises(CorruptDatabaseError, match=rf"db.ndb: {message}"):
        NeuralDB.open(path)


def test_a_row_changed_after_open_is_refused_by_get_refresh_and_verify(saved, format4_files):
    path, facts = saved
    files = format4_files(path)
    with NeuralDB.open(path) as db, NeuralDB(path.with_name("other.ndb"), d1=D1, d2=D2) as unrelated:
        assert db.verify().checked == 3 and db.verify().corrupt == () and unrelated.verify().checked == 0
        keys, _ = files.vectors_of("c")
        damaged = files.slot_bytes_of(keys, torch.full((D2,), 9.0))
        with open(files.vectors, "r+b") as stream:  # c's slot overwritten in place
            stream.seek(files.HEADER + files.row("c")["slot"] * files.slot_bytes)
            stream.write(damaged)
        _sql(path, ("UPDATE meta SET value = '99' WHERE name = 'revision'",))
        assert db.verify().corrupt == ("c",)
        with pytest.raises(CorruptDatabaseError, match="fact 'c' fails its checksum"):
            db.get("c")
        _sql(path, ("UPDATE facts SET rev = 99 WHERE id = 'c'",))
        with pytest.raises(CorruptDatabaseError, match="fact 'c' fails its checksum"):
            db.refresh()
        assert torch.equal(db.get("a").residual, facts["a"][1])  # the sound rows still read


def test_truncation_and_bit_flips_never_give_wrong_vectors_silently(tmp_path):
    keys, residuals = _vectors(60, seed=4)
    ids = [f"fact{i}" for i in range(60)]
    original = tmp_path / "original.ndb"
    with NeuralDB(original, d1=D1, d2=D2) as db:
        db.add(keys, residuals, ids, metadata=[{"subject": f"s{i}"} for i in range(60)])
    size = original.stat().st_size
    rng = random.Random(0)
    damaged = [("truncated", lambda data: data[:-160])] + [
        (f"byte {offset}", lambda data, offset=offset: data[:offset] + bytes([data[offset] ^ 0x5A]) + data[offset + 1:])
        for offset in rng.sample(range(100, size), 60)]
    silent = []
    for name, damage in damaged:
        path = tmp_path / "damaged.ndb"
        path.write_bytes(damage(original.read_bytes()))
        try:
            if reads_back_wrong_vectors(path, ids, keys, residuals):
                silent.append(name)
        except (ValueError, OSError):
            pass  # refused with a store error: what must happen when a row is hit
        path.unlink()
    assert silent == []


def test_non_finite_and_out_of_range_keys_are_refused_by_add_upsert_and_import(tmp_path):
    db = NeuralDB(d1=D1, d2=D2)
    for key, message in ((torch.full((D1,), 1e-30), "under- or overflows float32"),
                         (torch.full((D1,), 1e25), "under- or overflows float32"),
                         (torch.full((D1,), float("nan")), "contains NaN or Inf")):
        with pytest.raises(ValueError, match=rf"key of fact 'x' \(batch position 0\) (has a norm that )?{message}"):
            db.add(key, torch.ones(D2), "x")
        with pytest.raises(ValueError, match=message):
            db.upsert(torch.ones(D1), torch.ones(D2), "x", extra_keys=key)
    assert len(db) == 0
    source = NeuralDB(d1=D1, d2=D2)
    source.add(torch.ones(D1), torch.ones(D2), "x")
    sidecar = source.export(tmp_path / "out.safetensors")
    from safetensors.torch import save_file
    (tmp_path / "out.safetensors").unlink()
    save_file({"keys": torch.full((1, D1), 1e25), "residuals": torch.ones(1, D2)}, str(tmp_path / "out.safetensors"))
    document = json.loads(sidecar.read_text())
    document["safetensors_sha256"] = hashlib.sha256((tmp_path / "out.safetensors").read_bytes()).hexdigest()
    sidecar.write_text(json.dumps(document))
    with pytest.raises(ValueError, match="key of fact 'x' .* under- or overflows float32"):
        NeuralDB.import_(tmp_path / "out.safetensors")


def test_gamma_outside_minus_one_to_one_is_refused_everywhere(tmp_path):
    for gamma in (1.5, -1.01, float("inf")):
        with pytest.raises(ValueError, match=r"gamma must be a finite float in \[-1, 1\]"):
            NeuralDB(d1=D1, d2=D2, gamma=gamma)
    db = NeuralDB(tmp_path / "g.ndb", d1=D1, d2=D2, gamma=-1.0)
    with pytest.raises(ValueError, match=r"gamma must be a finite float in \[-1, 1\]"):
        db.gamma = 1.0001
    db.gamma = 1.0
    assert db.gamma == 1.0
    sidecar = db.export(tmp_path / "g.safetensors")
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "gamma": 2.0}))
    with pytest.raises(ValueError, match=r"invalid settings: gamma must be a finite float in \[-1, 1\]"):
        NeuralDB.import_(tmp_path / "g.safetensors")


def test_imports_bound_every_declared_size_by_the_bytes_present(tmp_path):
    db = NeuralDB(d1=D1, d2=D2)
    db.add(*_vectors(2), ["a", "b"])
    sidecar = db.export(tmp_path / "out.safetensors")
    document = json.loads(sidecar.read_text())

    def refused(message, **changes):
        sidecar.write_text(json.dumps({**document, **changes}))
        with pytest.raises(ValueError, match=message):
            NeuralDB.import_(tmp_path / "out.safetensors")

    refused(r"d1 must be a positive int, got 8589934592", d1=2 ** 33)
    refused(r"d2 must be a positive int, got 0", d2=0)
    refused(r"tensor 'keys' is torch.float32 \(2, 8\), the sidecar describes torch.float32 \(2000000001, 8\)",
            key_counts=[1, 2_000_000_000])
    for version in (0, -5, True, "3"):
        refused(rf"format_version {version!r}; this neuraldb_kernels reads up to 3 \(from 1\)", format_version=version)
    sidecar.write_text("[" * 200_000)
    with pytest.raises(ValueError, match="is not valid JSON: RecursionError"):
        NeuralDB.import_(tmp_path / "out.safetensors")


def test_an_older_export_gets_versioned_edit_records(tmp_path):
    db = NeuralDB(d1=D1, d2=D2)
    db.add(*_vectors(2), ["a", "b"], metadata=[{"edit": {"steps": 4}}, {"edit": {"version": 1, "steps": 2}}])
    sidecar = db.export(tmp_path / "out.safetensors")
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "format_version": 2}))
    imported = NeuralDB.import_(tmp_path / "out.safetensors")
    edit = imported.get("a").metadata["edit"]
    assert edit["version"] == 1 and edit["steps"] == 4 and edit["shares_residual_with"] == [] and edit["layer"] is None
    assert imported.get("b").metadata["edit"] == {"version": 1, "steps": 2}


def test_a_held_write_lock_is_one_clear_error(saved, monkeypatch):
    path, _ = saved
    monkeypatch.setattr(schema, "BUSY_TIMEOUT_S", 0.05)
    db = NeuralDB.open(path)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        for write in (lambda: db.add(torch.ones(D1), torch.ones(D2), "z"), lambda: db.delete("a"),
                      lambda: setattr(db, "gamma", 0.5)):
            with pytest.raises(OSError, match=r"db.ndb: another connection holds the write lock \(waited 0.05 s"):
                write()
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert sorted(db) == ["a", "b", "c"] and db.gamma == 0.65
    db.add(torch.ones(D1), torch.ones(D2), "z")
    db.close()


class _CommitFails:
    """A connection whose COMMIT fails after SQLite rolled the transaction back itself, as it does
    when the disk is full."""

    def __init__(self, conn):
        self._conn = conn

    def __getattr__(self, name):
        return getattr(self._conn, name)

    def execute(self, statement, *args):
        if statement == "COMMIT":
            self._conn.execute("ROLLBACK")
            raise sqlite3.OperationalError("database or disk is full")
        return self._conn.execute(statement, *args)


def test_a_failed_commit_reports_its_own_error(saved):
    path, _ = saved
    db = NeuralDB.open(path)
    db._conn = _CommitFails(db._conn)
    with pytest.raises(OSError, match=r"db.ndb: database or disk is full"):
        db.add(torch.ones(D1), torch.ones(D2), "z")
    assert "z" not in db and db.key_rows == 3
    db._conn = db._conn._conn
    db.close()
    with NeuralDB.open(path) as reopened:
        assert sorted(reopened) == ["a", "b", "c"]


@pytest.fixture
def mount_point(tmp_path):
    """A fresh 2 MiB tmpfs (skipped where this process may not mount one); unmounted afterwards."""
    point = tmp_path / "mnt"
    point.mkdir()
    if shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(point)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN)")
    yield point
    subprocess.run(["umount", "-l", str(point)], check=True)


def test_a_full_disk_is_one_clear_error_and_keeps_what_was_committed(mount_point):
    path = mount_point / "full.ndb"
    db = NeuralDB(path, d1=1024, d2=256)
    written, error = [], None
    generator = torch.Generator().manual_seed(0)
    for i in range(1000):
        try:
            db.add(torch.randn(8, 1024, generator=generator), torch.randn(8, 256, generator=generator),
                   [f"f{i}.{j}" for j in range(8)])
        except OSError as raised:
            error = raised
            break
        written += [f"f{i}.{j}" for j in range(8)]
    assert error is not None and "full" in str(error) and str(path) in str(error)
    assert "cannot rollback" not in str(error)
    assert sorted(db) == sorted(written)
    db.close()
    (mount_point / "ballast").unlink(missing_ok=True)
    with NeuralDB.open(path, readonly=True) as reopened:
        assert sorted(reopened) == sorted(written)


def test_a_database_on_a_read_only_mount_opens_read_only(mount_point):
    path = mount_point / "ro.ndb"
    keys, residuals = _vectors(3, seed=5)
    with NeuralDB(path, d1=D1, d2=D2) as db:
        db.add(keys, residuals, ["a", "b", "c"], metadata=[{"subject": s} for s in "abc"])
    subprocess.run(["mount", "-o", "remount,ro", str(mount_point)], check=True)
    with NeuralDB.open(path, readonly=True) as db:
        assert db.readonly and sorted(db) == ["a", "b", "c"]
        assert torch.equal(db.get("b").residual, residuals[1])
        assert [hit.id for hit in db.search(keys[2], k=1)] == ["c"]
        assert db.verify().corrupt == ()
        for write in (lambda: db.add(keys[0], residuals[0], "d"), lambda: db.delete("a"),
                      lambda: setattr(db, "gamma", 0.1)):
            with pytest.raises(PermissionError, match="ro.ndb was opened with readonly=True"):
                write()
    assert sorted(os.listdir(mount_point)) == ["ro.ndb", "ro.ndb-vectors"]  # no -wal / -shm made


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads and writes regardless of permissions")
def test_a_database_in_a_read_only_directory_opens_read_only(tmp_path):
    directory = tmp_path / "shared"
    directory.mkdir()
    with NeuralDB(directory / "db.ndb", d1=D1, d2=D2) as db:
        db.add(*_vectors(2), ["a", "b"])
    (directory / "db.ndb").chmod(0o444)
    directory.chmod(0o555)
    try:
        with NeuralDB.open(directory / "db.ndb", readonly=True) as db:
            assert sorted(db) == ["a", "b"]
    finally:
        directory.chmod(0o755)


def test_a_read_only_open_writes_nothing(saved):
    path, _ = saved
    before = path.read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with NeuralDB.open(path, readonly=True) as db:
            assert sorted(db) == ["a", "b", "c"]
            with pytest.raises(PermissionError, match="opened with readonly=True"):
                db.set_fingerprint(None)
    assert path.read_bytes() == before
