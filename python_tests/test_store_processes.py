"""NeuralDB across processes: a writer killed with SIGKILL in the middle of a transaction leaves
exactly the committed facts and an intact file; another process reads what was committed and
`refresh()` picks up later commits."""

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
import torch

from neuraldb_kernels.store import NeuralDB

D1, D2 = 64, 16

# The writer process: single-fact transactions, then optionally one big batch. Before each add it
# prints "begin <ids>", after the add returned "commit".
WRITER = r"""
import sys, time, torch
from neuraldb_kernels.store import NeuralDB

def encoded(numbers, d1, d2):
    numbers = torch.as_tensor(numbers, dtype=torch.float32).reshape(-1, 1)
    return (numbers + 1) + torch.arange(d1) / 8, -(numbers + 1) - torch.arange(d2) / 8

path, small, big, d1, d2 = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
if sys.argv[6] == "pause":  # the big batch stops once its vectors are written and synced, before its rows commit
    from neuraldb_kernels.store.vectors import VectorFile
    write = VectorFile.write
    def paused(self, slot, slots):
        write(self, slot, slots)
        if len(slots) > 1:
            print("vectors written", flush=True)
            time.sleep(600)
    VectorFile.write = paused
db = NeuralDB.open(path)
for i in range(small):
    print(f"begin s{i}", flush=True)
    keys, residuals = encoded([i], d1, d2)
    db.add(keys[0], residuals[0], f"s{i}")
    print("commit", flush=True)
if big:
    keys, residuals = encoded(range(100000, 100000 + big), d1, d2)
    ids = [f"b{100000 + j}" for j in range(big)]
    print("begin " + ",".join(ids), flush=True)
    db.add(keys, residuals, ids)
    print("commit", flush=True)
time.sleep(600)
"""


def _number(fact_id):
    return int(fact_id[1:])


def _encoded(numbers):
    numbers = torch.as_tensor(numbers, dtype=torch.float32).reshape(-1, 1)
    return (numbers + 1) + torch.arange(D1) / 8, -(numbers + 1) - torch.arange(D2) / 8


class Writer:
    """The writer process and what it reported: begun batches and committed ids, in order."""

    def __init__(self, path, small, big, *, pause=False):
        source = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {**os.environ, "PYTHONPATH": source + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "PYTHONWARNINGS": "ignore"}
        self.process = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(small), str(big), str(D1), str(D2),
                                         "pause" if pause else "run"], stdout=subprocess.PIPE, text=True, env=env)
        self.begun, self.committed, self.lock = [], set(), threading.Lock()
        self.vectors_written = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.process.stdout:
            with self.lock:
                if line.startswith("begin "):
                    self.begun.append(line.split()[1].split(","))
                elif line.strip() == "commit":
                    self.committed.update(self.begun[-1])
                elif line.strip() == "vectors written":
                    self.vectors_written.set()

    def state(self):
        with self.lock:
            return set(self.committed), [list(batch) for batch in self.begun]

    def wait_for_commits(self, count, timeout=180):
        deadline = time.monotonic() + timeout
        while len(self.state()[0]) < count:
            assert self.process.poll() is None, "the writer process died"
            assert time.monotonic() < deadline, "the writer process is too slow"
            time.sleep(0.01)

    def kill(self):
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.thread.join(timeout=10)


def _assert_consistent(db):
    """Every view row holds the vectors of the id it maps to, and get() agrees."""
    snap = db.snapshot()
    ids = snap.ids_at(range(len(snap.keys)))
    keys, residuals = _encoded([_number(fact_id) for fact_id in ids])
    assert torch.equal(snap.keys, keys) and torch.equal(snap.residuals, residuals)
    for fact_id in ids[:: max(1, len(ids) // 50)]:
        assert torch.equal(db.get(fact_id).key, _encoded([_number(fact_id)])[0][0])


def _assert_committed_state(db, committed, begun):
    """The database holds every committed id, and beyond them at most the whole last begun batch."""
    stored = set(db)
    assert committed <= stored
    extra = stored - committed
    assert not extra or extra == set(begun[-1]), f"{len(extra)} uncommitted facts are visible"


def _integrity_ok(path):
    conn = sqlite3.connect(path)
    try:
        return conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        conn.close()


@pytest.fixture
def path(tmp_path):
    path = tmp_path / "shared.ndb"
    NeuralDB(path, d1=D1, d2=D2).close()
    return path


def test_reader_process_sees_committed_facts_and_refreshes_then_writer_is_killed(path):
    writer = Writer(path, small=1_000_000, big=0)
    try:
        writer.wait_for_commits(20)
        committed_before = writer.state()[0]
        reader = NeuralDB.open(path)  # another process writes meanwhile
        writer.wait_for_commits(len(writer.state()[0]) + 2)  # every "begin" of a fact committed before open is read
        committed, begun = writer.state()
        seen = set(reader)
        assert committed_before <= seen <= {fact_id for batch in begun for fact_id in batch}
        assert len(seen) >= 20
        _assert_consistent(reader)
        writer.wait_for_commits(len(seen) + 30)
        version = reader.version
        assert reader.refresh()
        assert len(reader) >= len(seen) + 30 and reader.version > version and seen <= set(reader)
        _assert_consistent(reader)
        reader.close()
    finally:
        writer.kill()  # in the middle of single-fact transactions
    committed, begun = writer.state()
    assert _integrity_ok(path)
    with NeuralDB.open(path) as db:
        _assert_committed_state(db, committed, begun)
        _assert_consistent(db)


def test_kill_in_the_middle_of_a_big_batch_keeps_exactly_the_committed_facts(path):
    wal = f"{path}-wal"
    writer = Writer(path, small=30, big=60_000)
    try:
        writer.wait_for_commits(30)
        deadline = time.monotonic() + 180
        while len(writer.state()[1]) < 31:  # the big batch has begun (validation, encoding, then SQL)
            assert time.monotonic() < deadline and writer.process.poll() is None
            time.sleep(0.001)
        wal_at_begin = os.path.getsize(wal)
        while os.path.getsize(wal) < wal_at_begin + (4 << 20):  # its transaction is writing pages
            assert time.monotonic() < deadline and writer.process.poll() is None
            time.sleep(0.001)
    finally:
        writer.kill()
    committed, begun = writer.state()
    assert len(committed) == 30 and len(begun[-1]) == 60_000
    assert _integrity_ok(path)
    with NeuralDB.open(path) as db:
        assert set(db) == committed  # the killed transaction left nothing behind
        _assert_consistent(db)


def test_kill_after_a_batch_wrote_its_vectors_and_before_its_rows_commit_keeps_the_committed_facts(path):
    vectors, slot_bytes = f"{path}-vectors", (D1 + D2) * 4
    writer = Writer(path, small=30, big=60_000, pause=True)
    try:
        assert writer.vectors_written.wait(timeout=180), "the writer process is too slow"
    finally:
        writer.kill()
    committed, begun = writer.state()
    assert len(committed) == 30 and len(begun[-1]) == 60_000
    # the batch's slots are on disk past the 30 committed facts' ones, referenced by no committed row
    assert _integrity_ok(path) and os.path.getsize(vectors) == 64 + (30 + 60_000) * slot_bytes
    with NeuralDB.open(path) as db:
        assert set(db) == committed  # slots past vector_slots are never read
        _assert_consistent(db)
        db.add(*_encoded([999]), ["s999"])
    conn = sqlite3.connect(path)
    # the next write overwrote the unreferenced slots: its fact is the 31st slot
    assert conn.execute("SELECT slot FROM facts WHERE id = 's999'").fetchone()[0] == 30
    assert conn.execute("SELECT value FROM meta WHERE name = 'vector_slots'").fetchone()[0] == "31"
    conn.close()
    with NeuralDB.open(path) as db:
        assert set(db) == committed | {"s999"}
        _assert_consistent(db)


def test_refresh_applies_adds_upserts_deletes_and_settings_of_another_connection(path):
    writer, reader = NeuralDB.open(path), NeuralDB.open(path)
    assert not reader.refresh()
    writer.add(*_encoded(range(10)), [f"s{i}" for i in range(10)])
    reader.view(dtype=torch.float64)  # a cached view that refresh must keep in sync as well
    assert reader.refresh() and set(reader) == set(writer)
    writer.delete(["s2", "s9"])
    writer.upsert(*_encoded([55, 56]), ["s3", "s11"])
    writer.gamma = 0.9
    assert reader.refresh() and not reader.refresh()
    assert set(reader) == set(writer) and reader.gamma == 0.9
    expected = {fact_id: writer.get(fact_id) for fact_id in writer}
    for dtype in (torch.float32, torch.float64):
        snap = reader.snapshot(dtype=dtype)
        for row, fact_id in enumerate(snap.ids_at(range(len(snap.keys)))):
            assert torch.equal(snap.keys[row], expected[fact_id].key.to(dtype))
            assert torch.equal(snap.residuals[row], expected[fact_id].residual.to(dtype))
    writer.close()
    reader.close()
