"""The on-disk format of a NeuralDB (documented in FORMAT.md): SQLite tables, pragmas, vector BLOBs.

Everything that knows SQL or byte layouts lives here; `database.py` only calls these functions.
"""

from __future__ import annotations

import json
import os
import sqlite3
from datetime import datetime, timezone
from typing import Any, Iterable

import numpy as np
import torch

FORMAT_VERSION = 1
APPLICATION_ID = 0x4E44424B  # "NDBK" in the SQLite header: marks the file as a NeuralDB.

STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

_TABLES = """
CREATE TABLE meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL               -- JSON
);
CREATE TABLE facts (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,  -- insertion order: the row order of a freshly opened view
    id       TEXT NOT NULL UNIQUE,
    rev      INTEGER NOT NULL,        -- meta.revision of the transaction that last wrote this row
    key      BLOB NOT NULL,           -- d1 values, storage dtype, little-endian
    residual BLOB NOT NULL,           -- d2 values, storage dtype, little-endian
    metadata TEXT NOT NULL            -- JSON object
);
"""


def utc_now() -> str:
    """The current time as an ISO-8601 UTC string with microseconds."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def dtype_name(dtype: torch.dtype | str) -> str:
    """The storage-dtype name ("float32", "float16", "bfloat16") of a torch dtype or name."""
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
    elif isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    else:
        raise TypeError(f"dtype must be a torch.dtype or its name, got {type(dtype).__name__}")
    if name not in STORAGE_DTYPES:
        raise ValueError(f"unsupported storage dtype {dtype!r}; supported: {', '.join(STORAGE_DTYPES)}")
    return name


def connect(path: str | os.PathLike | None) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit).

    Changes nothing in the file: call `configure_file` once it is known to be a NeuralDB.
    """
    target = ":memory:" if path is None else os.fspath(path)
    return sqlite3.connect(target, isolation_level=None, check_same_thread=False, timeout=30.0)


def configure_file(conn: sqlite3.Connection) -> None:
    """Write-ahead logging (readers run while one writer commits) and an fsync per commit, so a
    committed transaction survives a process crash or power loss."""
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")


def create(conn: sqlite3.Connection, settings: dict[str, Any]) -> None:
    """Write the tables and the `meta` rows of a new database in one transaction."""
    now = utc_now()
    rows = {"format": "neuraldb", "format_version": FORMAT_VERSION, "revision": 0,
            "created_at": now, "updated_at": now, **settings}
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
        conn.execute(f"PRAGMA user_version={FORMAT_VERSION}")
        for statement in _TABLES.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.executemany("INSERT INTO meta(name, value) VALUES (?, ?)",
                         [(name, json.dumps(value)) for name, value in rows.items()])
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def read_meta(conn: sqlite3.Connection, where: str) -> dict[str, Any]:
    """The `meta` table of an existing database, after checking it is a NeuralDB this code can read.

    `where` names the database in error messages.
    """
    try:
        application_id = conn.execute("PRAGMA application_id").fetchone()[0]
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as error:
        raise ValueError(f"{where} is not a NeuralDB database (SQLite says: {error})") from None
    if application_id != APPLICATION_ID or not {"meta", "facts"} <= tables:
        raise ValueError(f"{where} is not a NeuralDB database (SQLite application_id {application_id:#x}, "
                         f"tables {sorted(tables)})")
    meta = {name: json.loads(value) for name, value in conn.execute("SELECT name, value FROM meta")}
    version = meta.get("format_version")
    if not isinstance(version, int) or meta.get("format") != "neuraldb":
        raise ValueError(f"{where} has a corrupt meta table (format={meta.get('format')!r}, format_version={version!r})")
    if version > FORMAT_VERSION:
        raise ValueError(f"{where} uses NeuralDB format version {version}, newer than the newest this "
                         f"neuraldb_kernels reads ({FORMAT_VERSION}); upgrade neuraldb_kernels")
    return meta


def write_meta(conn: sqlite3.Connection, values: dict[str, Any]) -> None:
    """Set `meta` rows (inside the caller's transaction)."""
    conn.executemany("UPDATE meta SET value = ? WHERE name = ?",
                     [(json.dumps(value), name) for name, value in values.items()])


def next_revision(conn: sqlite3.Connection) -> int:
    """Bump and return `meta.revision`, also stamping `updated_at` (inside the caller's transaction)."""
    revision = json.loads(conn.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()[0]) + 1
    write_meta(conn, {"revision": revision, "updated_at": utc_now()})
    return revision


def encode_rows(rows: torch.Tensor) -> list[bytes]:
    """One little-endian BLOB per row of a 2-D CPU tensor already in the storage dtype."""
    raw = rows.contiguous().view(torch.uint8).numpy()
    return [row.tobytes() for row in raw]


def decode_rows(blobs: Iterable[bytes], out: torch.Tensor) -> torch.Tensor:
    """Fill the first rows of the 2-D CPU tensor `out` (width and dtype as stored) from BLOBs, one
    per row; returns `out`. ValueError on a BLOB of the wrong length or too many BLOBs."""
    width = out.shape[1] * out.element_size()
    raw = out.view(torch.uint8).numpy()
    row = 0
    for row, blob in enumerate(blobs, start=1):
        if len(blob) != width or row > len(raw):
            raise ValueError(f"corrupt vector BLOB of {len(blob)} bytes at row {row - 1}, expected {width} "
                             f"bytes and at most {len(raw)} rows")
        raw[row - 1] = np.frombuffer(blob, dtype=np.uint8)
    return out


def count_facts(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT count(*) FROM facts").fetchone()[0]


def read_facts_into(conn: sqlite3.Connection, keys: torch.Tensor, residuals: torch.Tensor) -> tuple[list[str], list[int]]:
    """One pass over all facts in insertion order: fill the first rows of the 2-D CPU `keys` and
    `residuals` buffers, return (ids, revs). Call inside a read transaction, after `count_facts`
    sized the buffers."""
    key_raw, residual_raw = keys.view(torch.uint8).numpy(), residuals.view(torch.uint8).numpy()
    ids, revs = [], []
    for row, (fact_id, rev, key, residual) in enumerate(conn.execute("SELECT id, rev, key, residual FROM facts ORDER BY seq")):
        if len(key) != key_raw.shape[1] or len(residual) != residual_raw.shape[1]:
            raise ValueError(f"corrupt vector BLOBs of fact {fact_id!r}: {len(key)} and {len(residual)} bytes, "
                             f"expected {key_raw.shape[1]} and {residual_raw.shape[1]}")
        key_raw[row] = np.frombuffer(key, dtype=np.uint8)
        residual_raw[row] = np.frombuffer(residual, dtype=np.uint8)
        ids.append(fact_id)
        revs.append(rev)
    return ids, revs
