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


def decode_rows(blobs: Iterable[bytes], width: int, dtype: torch.dtype, count: int) -> torch.Tensor:
    """Stack `count` BLOBs of `width` values each into a (count, width) CPU tensor of `dtype`."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    out = torch.empty((count, width), dtype=dtype)
    raw = out.view(torch.uint8).numpy()
    filled = 0
    for filled, blob in enumerate(blobs, start=1):
        if len(blob) != width * itemsize:
            raise ValueError(f"corrupt vector BLOB of {len(blob)} bytes, expected {width * itemsize}")
        raw[filled - 1] = np.frombuffer(blob, dtype=np.uint8)
    if filled != count:
        raise ValueError(f"expected {count} vector BLOBs, read {filled}")
    return out
