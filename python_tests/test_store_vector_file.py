"""Format 4 keeps a database in two files, `NAME` (SQLite) and `NAME-vectors` (the vector file):
they are created, copied and renamed together, a missing or foreign vector file is refused by
name, damage to it never yields wrong vectors silently, replaced or deleted facts leave slots that
`save` compacts away, and key-row listeners follow every change of the views."""

import json
import random
import shutil
import sqlite3

import pytest
import torch

from neuraldb_kernels.store import CorruptDatabaseError, NeuralDB
from store_checks import reads_back_wrong_vectors

D1, D2 = 8, 4
SLOT_BYTES = (D1 + D2) * 4


def _vectors(n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, D1, generator=generator), torch.randn(n, D2, generator=generator)


def _meta(path, name):
    conn = sqlite3.connect(path)
    try:
        return json.loads(conn.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()[0])
    finally:
        conn.close()


@pytest.fixture
def saved(tmp_path):
    keys, residuals = _vectors(4)
    path = tmp_path / "db.ndb"
    with NeuralDB(path, d1=D1, d2=D2) as db:
        db.add(keys, residuals, ["a", "b", "c", "d"])
    return path, keys, residuals


def test_a_missing_or_foreign_vector_file_is_refused_by_name(saved, tmp_path):
    path, _, _ = saved
    vectors = tmp_path / "db.ndb-vectors"
    vectors.rename(tmp_path / "elsewhere")
    with pytest.raises(CorruptDatabaseError, match=r"db.ndb: its vector file .*db.ndb-vectors is missing .*copy "
                                                   r"and move them together"):
        NeuralDB.open(path)
    with NeuralDB(tmp_path / "other.ndb", d1=D1, d2=D2) as other:
        other.add(*_vectors(4, seed=1), ["a", "b", "c", "d"])
    shutil.copy(tmp_path / "other.ndb-vectors", vectors)  # same sizes, another database's vectors
    with pytest.raises(CorruptDatabaseError, match=r"db.ndb-vectors is not its vector file"):
        NeuralDB.open(path, readonly=True)
    (tmp_path / "elsewhere").rename(vectors)
    with NeuralDB.open(path) as db:
        assert sorted(db) == ["a", "b", "c", "d"]


def test_a_new_database_never_takes_over_a_vector_file_left_behind(tmp_path):
    stale = tmp_path / "db.ndb-vectors"
    stale.write_bytes(b"someone's vectors")
    with pytest.raises(FileExistsError, match=r"db.ndb-vectors already exists"):
        NeuralDB(tmp_path / "db.ndb", d1=D1, d2=D2)
    assert stale.read_bytes() == b"someone's vectors" and not (tmp_path / "db.ndb").exists()


def test_both_files_renamed_or_copied_together_open_as_the_same_database(saved, tmp_path):
    path, keys, residuals = saved
    moved = tmp_path / "moved"
    moved.mkdir()
    for suffix in ("", "-vectors"):
        (tmp_path / f"db.ndb{suffix}").rename(moved / f"renamed.ndb{suffix}")
    shutil.copy(moved / "renamed.ndb", tmp_path / "copy.ndb")
    shutil.copy(moved / "renamed.ndb-vectors", tmp_path / "copy.ndb-vectors")
    for where in (moved / "renamed.ndb", tmp_path / "copy.ndb"):
        with NeuralDB.open(where) as db:
            assert torch.equal(db.snapshot().keys, keys) and torch.equal(db.get("c").residual, residuals[2])


def test_damage_to_the_vector_file_never_gives_wrong_vectors_silently(tmp_path):
    keys, residuals = _vectors(40, seed=4)
    ids = [f"fact{i}" for i in range(40)]
    path = tmp_path / "original.ndb"
    with NeuralDB(path, d1=D1, d2=D2) as db:
        db.add(keys, residuals, ids)
    vectors = tmp_path / "original.ndb-vectors"
    original = vectors.read_bytes()
    rng = random.Random(1)
    damaged = [("truncated", original[:-7]), ("a slot short", original[:-SLOT_BYTES])] + [
        (f"byte {offset}", original[:offset] + bytes([original[offset] ^ (1 << rng.randrange(8))]) + original[offset + 1:])
        for offset in rng.sample(range(len(original)), 60)]
    silent, refused = [], []
    for name, data in damaged:
        vectors.write_bytes(data)
        try:
            if reads_back_wrong_vectors(path, ids, keys, residuals):
                silent.append(name)
            continue
        except ValueError:
            refused.append(name)  # refused as corrupt: what must happen when the header or a slot is hit
    assert silent == [] and [name for name, _ in damaged if name not in refused] == []  # every byte of the file is a header or a committed slot


def test_upserts_keep_unchanged_slots_and_save_compacts_the_copy(saved, tmp_path):
    path, keys, residuals = saved
    new_keys, new_residuals = _vectors(2, seed=9)
    with NeuralDB.open(path) as db:
        db.upsert(keys[1], residuals[1], "b", key_gammas=torch.tensor([0.8]))  # thresholds only: same slot
        assert _meta(path, "vector_slots") == 4
        db.upsert(new_keys[0], new_residuals[0], "c")  # new vectors: appended
        db.add(new_keys[1], new_residuals[1], "e", extra_keys=new_keys[0])
        db.delete("a")
        assert _meta(path, "vector_slots") == 7 and (tmp_path / "db.ndb-vectors").stat().st_size == 64 + 7 * SLOT_BYTES
        expected = {fact_id: db.get(fact_id) for fact_id in db}
        with pytest.raises(FileExistsError, match="never overwrites"):
            db.save(path)
        (tmp_path / "copy.ndb-vectors").write_bytes(b"")
        with pytest.raises(FileExistsError, match="copy.ndb-vectors already exists"):
            db.save(tmp_path / "copy.ndb")
        (tmp_path / "copy.ndb-vectors").unlink()
        db.save(tmp_path / "copy.ndb")
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["copy.ndb", "copy.ndb-vectors", "db.ndb",
                                                                   "db.ndb-vectors"]
    assert (tmp_path / "copy.ndb-vectors").stat().st_size == 64 + 5 * SLOT_BYTES  # b, c, d, e's two keys
    assert _meta(tmp_path / "copy.ndb", "vector_slots") == 5
    assert _meta(tmp_path / "copy.ndb", "vectors_id") != _meta(path, "vectors_id")
    with NeuralDB.open(tmp_path / "copy.ndb") as copy:
        assert list(copy) == list(expected) and copy.verify().corrupt == ()
        for fact_id, fact in expected.items():
            stored = copy.get(fact_id)
            assert torch.equal(stored.keys, fact.keys) and torch.equal(stored.residual, fact.residual)
            assert stored.metadata == fact.metadata and (stored.key_gammas is None) == (fact.key_gammas is None)
        assert copy.get("b").key_gammas.tolist() == [pytest.approx(0.8)]


class Mirror:
    """A key-row listener that keeps a plain list of rows (what a compressed key index would index)."""

    def __init__(self):
        self.rows = []

    def append(self, keys):
        self.rows += [row.clone() for row in keys]

    def overwrite(self, rows, keys):
        for row, key in zip(rows.tolist(), keys):
            self.rows[row] = key.clone()

    def move_and_truncate(self, sources, targets, count):
        for source, target in zip(sources.tolist(), targets.tolist()):
            self.rows[target] = self.rows[source]
        del self.rows[count:]


def _assert_mirrors(mirror, db, keys_of):
    """The mirror holds, row by row, the stored keys of the fact each view row belongs to."""
    ids = db.snapshot().ids_at(range(db.key_rows))
    assert len(mirror.rows) == len(ids)
    expected = {}
    for row, fact_id in enumerate(ids):
        position = expected.setdefault(fact_id, 0)
        assert torch.equal(mirror.rows[row], keys_of[fact_id][position]), (row, fact_id)
        expected[fact_id] += 1


def test_key_row_listeners_follow_adds_upserts_deletes_and_refresh(saved):
    path, keys, residuals = saved
    new_keys, new_residuals = _vectors(3, seed=11)
    writer, reader = NeuralDB.open(path), NeuralDB.open(path)
    mirror, other = Mirror(), Mirror()
    writer.add_key_listener(mirror)
    reader.add_key_listener(other)
    keys_of = {fact_id: keys[i : i + 1] for i, fact_id in enumerate("abcd")}
    _assert_mirrors(mirror, writer, keys_of)
    writer.add(new_keys[0], new_residuals[0], "e", extra_keys=new_keys[1:3])
    keys_of["e"] = new_keys
    writer.upsert(new_keys[2], residuals[1], "b")  # same number of keys: replaced in place
    keys_of["b"] = new_keys[2:3]
    writer.upsert(keys[0], residuals[0], "a", extra_keys=new_keys[0])  # 1 -> 2 keys: moved to the end
    keys_of["a"] = torch.stack([keys[0], new_keys[0]])
    writer.delete(["c", "e"])
    del keys_of["c"], keys_of["e"]
    _assert_mirrors(mirror, writer, keys_of)
    assert reader.refresh()
    _assert_mirrors(other, reader, keys_of)
    writer.remove_key_listener(mirror)
    writer.delete("d")
    assert len(mirror.rows) == 4  # no longer told
    with pytest.raises(ValueError):
        writer.remove_key_listener(mirror)
    writer.close()
    reader.close()


def test_an_opened_database_deletes_in_place_once_its_snapshots_are_dropped(tmp_path):
    """Open's view buffers (large: advised into huge pages) must count as unshared when no snapshot
    uses them, or every delete after a retrieval would copy the whole view."""
    generator = torch.Generator().manual_seed(3)
    keys, residuals = torch.randn(1200, 1024, generator=generator), torch.randn(1200, 256, generator=generator)
    with NeuralDB(tmp_path / "big.ndb", d1=1024, d2=256) as db:
        db.add(keys, residuals, [f"f{i}" for i in range(1200)])
    with NeuralDB.open(tmp_path / "big.ndb") as db:
        snap_keys, _ = db.view()
        pointer = snap_keys.data_ptr()
        del snap_keys
        db.delete("f0")
        after, _ = db.view()
        assert after.data_ptr() == pointer  # rewritten in place, no copy-on-write
        assert torch.equal(after[0], keys[1199]) and after.shape[0] == 1199  # the last row moved into the hole
