"""Reading the committed state of a database into memory: the full load at open and the
incremental changes `refresh` applies (what other connections committed since). Every fact read is
checked (`integrity`); a corrupt one is refused by its id. Call these inside a read transaction, so
that what is read is one committed state (the vector slots committed rows use never change).
"""

from __future__ import annotations

import ctypes
import dataclasses
import sqlite3
import sys
import threading
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from . import schema
from .integrity import checksum_problem, row_problem, vector_rows_problem, verified_fact
from .schema import CorruptDatabaseError
from .vectors import VectorFile
from .view import MIN_CAPACITY


@dataclasses.dataclass(frozen=True)
class Loaded:
    """All facts of a file: `keys` (capacity, d1) and `residuals` (capacity, d2) CPU buffers in the
    storage dtype whose first `count` rows are the key rows in insertion order (a fact with k keys
    fills k rows, each with its residual), `key_gammas` (capacity,) float32, the threshold of each
    row (NaN where its fact has none: the database's gamma), the fact id of each row, {fact id:
    rev}, and the ids of the facts with thresholds of their own."""

    keys: torch.Tensor
    residuals: torch.Tensor
    key_gammas: torch.Tensor
    count: int
    row_ids: list[str]
    revs: dict[str, int]
    with_key_gammas: list[str]


CHUNK_FACTS = 256  # facts read, checked and copied per task of the bulk load (~2 MB at SmolLM2 sizes)


@dataclasses.dataclass
class _Facts:
    """The SQLite side of every fact, as `load_all` reads the rows: ids, revs, slots and key
    counts, the CRC-32 of each fact's header and its stored checksum (ints), the key_gammas BLOBs of
    the facts with thresholds of their own with their first view row, and their ids."""

    ids: list[str] = dataclasses.field(default_factory=list)
    revs: list[int] = dataclasses.field(default_factory=list)
    slots: list[int] = dataclasses.field(default_factory=list)
    counts: list[int] = dataclasses.field(default_factory=list)
    header_crcs: list[int] = dataclasses.field(default_factory=list)
    checksums: list[int] = dataclasses.field(default_factory=list)
    key_gammas: list[tuple[int, bytes]] = dataclasses.field(default_factory=list)
    with_key_gammas: list[str] = dataclasses.field(default_factory=list)


def _first_row_problem(conn: sqlite3.Connection, vector_slots: int) -> tuple[int, str]:
    """(position in insertion order, why) of the first row that fails `row_problem`, once SQLite's
    checks or the threshold values found one (or, where Python's JSON parser accepts what SQLite's
    refused, the first row SQLite refused)."""
    for position, row in enumerate(schema.fact_rows(conn)):
        problem = row_problem(row, vector_slots)
        if problem:
            return position, problem
    for position, (fact_id, sound) in enumerate(conn.execute(
            f"SELECT id, coalesce({schema.SOUND_ROW_SQL}, 0) FROM facts ORDER BY seq", {"vector_slots": vector_slots})):
        if not sound:
            return position, f"fact {fact_id!r} fails the checks of its row"
    return 0, "the database changed while it was read"


def _empty(rows: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised (rows, width) CPU buffer (torch.empty), advised into transparent huge pages
    where the system grants them on request, so that filling it takes 512x fewer page faults."""
    buffer = torch.empty((rows, width), dtype=dtype)
    start = -buffer.data_ptr() % HUGE_PAGE_BYTES  # the whole huge pages inside the buffer
    length = (buffer.numel() * buffer.element_size() - start) // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
    if length > 0 and _madvise is not None:
        _madvise(ctypes.c_void_p(buffer.data_ptr() + start), ctypes.c_size_t(length), MADV_HUGEPAGE)  # a hint only
    return buffer


HUGE_PAGE_BYTES = 2 << 20
MADV_HUGEPAGE = 14  # <sys/mman.h> on Linux
_madvise = getattr(ctypes.CDLL(None), "madvise", None) if sys.platform.startswith("linux") else None


def load_all(conn: sqlite3.Connection, vectors: VectorFile, vector_slots: int, where: str) -> Loaded:
    """Read and check every fact. The SQLite rows are read one by one here, checked by SQLite
    (`schema.fact_rows_for_load`; key threshold values here); every CHUNK_FACTS of them, a task on
    one of torch.get_num_threads() threads (reads, zlib and torch release the GIL) reads their slots
    into a small buffer, checks each fact's checksum, copies the slots into the view buffers and
    checks finite values and key norms, while the rows that follow are read. A refused fact is the
    first in insertion order that fails."""
    d1, d2, dtype = vectors.d1, vectors.d2, vectors.dtype
    count = schema.count_key_rows(conn)
    capacity = max(MIN_CAPACITY, 2 * count)  # untouched rows cost no memory until used
    keys, residuals = _empty(capacity, d1, dtype), _empty(capacity, d2, dtype)
    facts, first_rows, row_ids, slot_bytes, scratch = _Facts(), [], [], vectors.slot_bytes, threading.local()

    def load(start: int, stop: int) -> tuple[int, str] | None:
        """Check and copy facts start .. stop - 1: (first bad fact, why) or None."""
        rows = slice(first_rows[start], first_rows[stop - 1] + facts.counts[stop - 1])
        size = (rows.stop - rows.start) * slot_bytes
        if len(getattr(scratch, "buffer", b"")) < size:
            scratch.buffer = bytearray(size)
        view = memoryview(scratch.buffer)[:size]
        if all(facts.slots[f + 1] == facts.slots[f] + facts.counts[f] for f in range(start, stop - 1)):
            vectors.read_into(facts.slots[start], rows.stop - rows.start, view)  # stored in insertion order
        else:
            for f in range(start, stop):
                offset = (first_rows[f] - rows.start) * slot_bytes
                vectors.read_into(facts.slots[f], facts.counts[f], view[offset : offset + facts.counts[f] * slot_bytes])
        offset = 0
        for f in range(start, stop):
            end = offset + facts.counts[f] * slot_bytes
            if zlib.crc32(view[offset:end], facts.header_crcs[f]) != facts.checksums[f]:
                return f, checksum_problem(facts.ids[f])
            offset = end
        chunk = torch.frombuffer(scratch.buffer, dtype=torch.uint8, count=size).view(dtype).reshape(-1, d1 + d2)
        keys[rows].copy_(chunk[:, :d1])
        residuals[rows].copy_(chunk[:, d1:])
        found = vector_rows_problem(keys[rows], residuals[rows], row_ids[rows])
        return None if found is None else (facts.ids.index(found[0], start), found[1])

    def first_problem(tasks: list[Future], *more: tuple[int, str]) -> CorruptDatabaseError:
        found = [problem for problem in (task.result() for task in tasks) if problem] + list(more)
        return CorruptDatabaseError(f"{where}: {min(found)[1]}")

    tasks: list[Future] = []  # a task's own error (a truncated vector file) names the file itself
    with ThreadPoolExecutor(max_workers=torch.get_num_threads()) as pool:
        for fact_id, rev, slot, key_count, key_gammas, header, checksum, sound in schema.fact_rows_for_load(
                conn, vector_slots):
            if not sound or len(row_ids) + key_count > count:
                raise first_problem(tasks, _first_row_problem(conn, vector_slots))
            first_rows.append(len(row_ids))
            facts.ids.append(fact_id)
            facts.revs.append(rev)
            facts.slots.append(slot)
            facts.counts.append(key_count)
            facts.header_crcs.append(zlib.crc32(header))
            facts.checksums.append(int.from_bytes(checksum, "little"))
            if key_gammas is not None:
                facts.key_gammas.append((len(row_ids), key_gammas))
                facts.with_key_gammas.append(fact_id)
            row_ids += [fact_id] * key_count
            if len(facts.ids) % CHUNK_FACTS == 0:
                tasks.append(pool.submit(load, len(facts.ids) - CHUNK_FACTS, len(facts.ids)))
        if len(facts.ids) % CHUNK_FACTS:
            tasks.append(pool.submit(load, len(facts.ids) - len(facts.ids) % CHUNK_FACTS, len(facts.ids)))
        if any(task.result() for task in tasks):
            raise first_problem(tasks)
    key_gammas = torch.full((capacity,), float("nan"))
    if facts.key_gammas:
        values = torch.frombuffer(bytearray(b"".join(blob for _, blob in facts.key_gammas)), dtype=torch.float32)
        if not bool(((values >= -1.0) & (values <= 1.0)).all()):  # False for NaN too
            raise CorruptDatabaseError(f"{where}: {_first_row_problem(conn, vector_slots)[1]}")
        for row, blob in facts.key_gammas:
            key_gammas[row : row + len(blob) // 4] = torch.frombuffer(bytearray(blob), dtype=torch.float32)
    return Loaded(keys, residuals, key_gammas, len(row_ids), row_ids, dict(zip(facts.ids, facts.revs)),
                  facts.with_key_gammas)


@dataclasses.dataclass(frozen=True)
class Changes:
    """What other connections committed: the new `meta`, the ids of removed facts, and the facts
    written (new or rewritten) with their rev, (k, d1) keys, (1, d2) residual and (k,) float32
    thresholds (None: the database's gamma)."""

    meta: dict[str, Any]
    removed: list[str]
    written: list[tuple[str, int, torch.Tensor, torch.Tensor, torch.Tensor | None]]


def read_changes(conn: sqlite3.Connection, revs: dict[str, int], vectors: VectorFile, where: str) -> Changes:
    """The changes between the facts in memory ({fact id: rev}) and the files."""
    meta = schema.read_meta(conn, where)
    if (meta["d1"], meta["d2"], schema.STORAGE_DTYPES[meta["dtype"]]) != (vectors.d1, vectors.d2, vectors.dtype):
        raise CorruptDatabaseError(f"{where}: d1, d2 or dtype changed on disk ({meta['d1']}, {meta['d2']}, "
                                   f"{meta['dtype']}); they are fixed when a database is created")
    on_disk = dict(conn.execute("SELECT id, rev FROM facts"))
    removed = [fact_id for fact_id in revs if fact_id not in on_disk]
    written_ids = [fact_id for fact_id, rev in on_disk.items() if revs.get(fact_id) != rev]
    rows = {row[0]: row for row in schema.fact_rows(conn, written_ids)}
    written = [(fact_id, rows[fact_id][1], *verified_fact(rows[fact_id], vectors, meta["vector_slots"], where))
               for fact_id in written_ids]  # in insertion order, as a fresh open would append them
    return Changes(meta, removed, written)
