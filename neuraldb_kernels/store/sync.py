"""Reading the committed state of a database into memory: the full load at open and the
incremental changes `refresh` applies (what other connections committed since). Every fact read is
checked (`integrity`); a corrupt one is refused by its id. Call these inside a read transaction, so
that what is read is one committed state (the vector slots committed rows use never change).
"""

from __future__ import annotations

import dataclasses
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from . import schema
from .integrity import checksum_problem, header_crc, row_problem, slots_crc, vector_rows_problem, verified_fact
from .schema import CorruptDatabaseError
from .vectors import HEADER_BYTES, VectorFile
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


CHUNK_ROWS = 4096  # facts checked and copied per task of the bulk load


@dataclasses.dataclass
class _Facts:
    """The SQLite side of every fact, read row by row: ids, revs, slots and key counts, the CRC of
    each row's SQLite parts and its stored checksum (ints), and the key thresholds of the facts
    with their own (view row of the first key, BLOB)."""

    ids: list[str] = dataclasses.field(default_factory=list)
    revs: list[int] = dataclasses.field(default_factory=list)
    slots: list[int] = dataclasses.field(default_factory=list)
    counts: list[int] = dataclasses.field(default_factory=list)
    header_crcs: list[int] = dataclasses.field(default_factory=list)
    checksums: list[int] = dataclasses.field(default_factory=list)
    key_gammas: list[tuple[int, bytes]] = dataclasses.field(default_factory=list)
    with_key_gammas: list[str] = dataclasses.field(default_factory=list)


def _read_rows(conn: sqlite3.Connection, vector_slots: int, where: str) -> _Facts:
    """Every fact row, checked on its own (`row_problem`; metadata judged by SQLite's JSON parser)."""
    facts, rows = _Facts(), 0
    for row in schema.fact_rows_for_load(conn):
        fact_id, rev, slot, key_count, key_gammas, metadata, checksum, metadata_is_object = row
        problem = row_problem(row[:7], vector_slots, bool(metadata_is_object))
        if problem:
            raise CorruptDatabaseError(f"{where}: {problem}")
        facts.ids.append(fact_id)
        facts.revs.append(rev)
        facts.slots.append(slot)
        facts.counts.append(key_count)
        facts.header_crcs.append(header_crc(fact_id, metadata, key_gammas))
        facts.checksums.append(int.from_bytes(checksum, "little"))
        if key_gammas is not None:
            facts.key_gammas.append((rows, key_gammas))
            facts.with_key_gammas.append(fact_id)
        rows += key_count
    return facts


def load_all(conn: sqlite3.Connection, vectors: VectorFile, vector_slots: int, where: str) -> Loaded:
    """Read and check every fact: the SQLite rows one by one (`_read_rows`), then the slots in bulk
    from the mapped vector file, in chunks of view rows spread over threads (zlib and torch release
    the GIL): each fact's checksum, the copy into the view buffers, finite values and key norms.
    A refused fact is the first in insertion order that fails."""
    d1, d2, dtype = vectors.d1, vectors.d2, vectors.dtype
    facts = _read_rows(conn, vector_slots, where)
    counts = torch.tensor(facts.counts, dtype=torch.int64)
    count = int(counts.sum())
    capacity = max(MIN_CAPACITY, 2 * count)  # untouched rows cost no memory until used
    keys = torch.empty((capacity, d1), dtype=dtype)
    residuals = torch.empty((capacity, d2), dtype=dtype)
    key_gammas = torch.full((capacity,), float("nan"))
    for row, blob in facts.key_gammas:
        key_gammas[row : row + len(blob) // 4] = torch.frombuffer(bytearray(blob), dtype=torch.float32)
    first_rows = torch.cumsum(counts, 0) - counts
    # the slot of every view row: its fact's first slot plus the key's position in the fact
    slot_of_row = (torch.tensor(facts.slots, dtype=torch.int64).repeat_interleave(counts)
                   + torch.arange(count) - first_rows.repeat_interleave(counts))
    row_ids = facts.ids if count == len(facts.ids) else [
        fact_id for fact_id, k in zip(facts.ids, facts.counts) for _ in range(k)]
    fact_starts = list(range(0, len(facts.ids), CHUNK_ROWS))
    if not fact_starts:
        return Loaded(keys, residuals, key_gammas, 0, [], {}, [])
    with vectors.mapped(vector_slots) as (mapping, slots):
        raw = memoryview(mapping)
        slot_bytes = vectors.slot_bytes

        def load(start: int) -> tuple[int, str] | None:
            """Check and copy facts start.. start + CHUNK_ROWS: (first bad fact, why) or None."""
            stop = min(start + CHUNK_ROWS, len(facts.ids))
            for f in range(start, stop):
                begin = HEADER_BYTES + facts.slots[f] * slot_bytes
                if slots_crc(facts.header_crcs[f], raw[begin : begin + facts.counts[f] * slot_bytes]) != \
                        facts.checksums[f]:
                    return f, checksum_problem(facts.ids[f])
            rows = slice(int(first_rows[start]), int(first_rows[stop - 1] + counts[stop - 1]))
            chunk_slots = slot_of_row[rows]
            first = int(chunk_slots[0])
            if int(chunk_slots[-1]) - first == len(chunk_slots) - 1 and bool((chunk_slots.diff() == 1).all()):
                chunk = slots[first : first + len(chunk_slots)]  # stored in view order: no gather
            else:
                chunk = slots.index_select(0, chunk_slots)
            keys[rows].copy_(chunk[:, :d1])
            residuals[rows].copy_(chunk[:, d1:])
            found = vector_rows_problem(keys[rows], residuals[rows], row_ids[rows])
            return None if found is None else (facts.ids.index(found[0], start), found[1])

        with ThreadPoolExecutor(max_workers=torch.get_num_threads()) as pool:
            problems = [problem for problem in pool.map(load, fact_starts) if problem is not None]
        del raw, slots
    if problems:
        raise CorruptDatabaseError(f"{where}: {min(problems)[1]}")
    return Loaded(keys, residuals, key_gammas, count, list(row_ids), dict(zip(facts.ids, facts.revs)),
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
