"""Reading the committed state of a database file into memory: the full load at open and the
incremental changes `refresh` applies (what other connections committed since). Every row read is
checked (`integrity`); a corrupt one is refused by its fact's id. Call these inside a read
transaction, so that what is read is one committed state.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from typing import Any

import numpy as np
import torch

from . import schema
from .integrity import stored_problem, vector_rows_problem, verified_vectors
from .schema import CorruptDatabaseError
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


def load_all(conn: sqlite3.Connection, d1: int, d2: int, dtype: torch.dtype, where: str) -> Loaded:
    """Read and check every fact row (checksums and BLOB lengths row by row, vector values in one
    pass over the buffers at the end)."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    count = schema.count_key_bytes(conn) // (d1 * itemsize)
    capacity = max(MIN_CAPACITY, 2 * count)  # untouched rows cost no memory until used
    keys = torch.empty((capacity, d1), dtype=dtype)
    residuals = torch.empty((capacity, d2), dtype=dtype)
    key_gammas = torch.full((capacity,), float("nan"))
    key_raw, residual_raw = keys.view(torch.uint8).numpy(), residuals.view(torch.uint8).numpy()
    gamma_raw = key_gammas.view(torch.uint8).numpy().reshape(capacity, 4)
    row_ids: list[str] = []
    revs: dict[str, int] = {}
    with_key_gammas: list[str] = []
    for row in schema.fact_rows(conn):
        problem = stored_problem(row, d1, d2, itemsize)
        if problem:
            raise CorruptDatabaseError(f"{where}: {problem}")
        fact_id, rev, key, residual = row[:4]
        start, rows = len(row_ids), len(key) // (d1 * itemsize)
        if start + rows > count:
            raise CorruptDatabaseError(f"{where}: the database changed while it was read "
                                       f"(fact {fact_id!r} does not fit)")
        key_raw[start : start + rows] = np.frombuffer(key, dtype=np.uint8).reshape(rows, -1)
        residual_raw[start : start + rows] = np.frombuffer(residual, dtype=np.uint8)
        if row[6] is not None:
            gamma_raw[start : start + rows] = np.frombuffer(row[6], dtype=np.uint8).reshape(rows, 4)
            with_key_gammas.append(fact_id)
        row_ids += [fact_id] * rows
        revs[fact_id] = rev
    found = vector_rows_problem(keys[: len(row_ids)], residuals[: len(row_ids)], row_ids)
    if found:
        raise CorruptDatabaseError(f"{where}: {found[1]}")
    return Loaded(keys, residuals, key_gammas, len(row_ids), row_ids, revs, with_key_gammas)


@dataclasses.dataclass(frozen=True)
class Changes:
    """What other connections committed: the new `meta`, the ids of removed facts, and the facts
    written (new or rewritten) with their rev, (k, d1) keys, (1, d2) residual and (k,) float32
    thresholds (None: the database's gamma)."""

    meta: dict[str, Any]
    removed: list[str]
    written: list[tuple[str, int, torch.Tensor, torch.Tensor, torch.Tensor | None]]


def read_changes(conn: sqlite3.Connection, revs: dict[str, int], d1: int, d2: int, dtype: torch.dtype,
                 where: str) -> Changes:
    """The changes between the facts in memory ({fact id: rev}) and the file."""
    meta = schema.read_meta(conn, where)
    if (meta["d1"], meta["d2"], schema.STORAGE_DTYPES[meta["dtype"]]) != (d1, d2, dtype):
        raise CorruptDatabaseError(f"{where}: d1, d2 or dtype changed on disk ({meta['d1']}, {meta['d2']}, "
                                   f"{meta['dtype']}); they are fixed when a database is created")
    on_disk = dict(conn.execute("SELECT id, rev FROM facts"))
    removed = [fact_id for fact_id in revs if fact_id not in on_disk]
    written_ids = [fact_id for fact_id, rev in on_disk.items() if revs.get(fact_id) != rev]
    rows = {row[0]: row for row in schema.fact_rows(conn, written_ids)}
    written = [(fact_id, rows[fact_id][1], *verified_vectors(rows[fact_id], d1, d2, dtype, where))
               for fact_id in written_ids]  # in insertion order, as a fresh open would append them
    return Changes(meta, removed, written)
