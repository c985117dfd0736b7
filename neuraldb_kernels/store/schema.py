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

FORMAT_VERSION = 2
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
    key      BLOB NOT NULL,           -- k >= 1 keys of d1 values (the fact's own key first), storage dtype, LE
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


def count_key_bytes(conn: sqlite3.Connection) -> int:
    """The total size of all key BLOBs (key rows = this / bytes per key)."""
    return conn.execute("SELECT coalesce(sum(length(key)), 0) FROM facts").fetchone()[0]


def encode_keys(keys: torch.Tensor) -> bytes:
    """One key BLOB: the rows of a (k, d1) CPU tensor in the storage dtype, one after the other."""
    return keys.contiguous().view(torch.uint8).numpy().tobytes()


def decode_keys(blob: bytes, d1: int, dtype: torch.dtype, fact_id: str) -> torch.Tensor:
    """(k, d1) keys of one key BLOB; ValueError naming the fact when its length is not k whole keys."""
    width = d1 * torch.empty(0, dtype=dtype).element_size()
    if not blob or len(blob) % width:
        raise ValueError(f"corrupt key BLOB of fact {fact_id!r}: {len(blob)} bytes, expected a positive "
                         f"multiple of {width} (d1={d1} values)")
    raw = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    return raw.view(dtype).reshape(len(blob) // width, d1)


def read_facts_into(conn: sqlite3.Connection, keys: torch.Tensor,
                    residuals: torch.Tensor) -> tuple[list[str], dict[str, int]]:
    """One pass over all facts in insertion order, filling the first key rows of the 2-D CPU `keys`
    and `residuals` buffers (a fact with k keys fills k rows, each with its residual). Returns
    (the fact id of each row, {fact id: rev}). Call inside a read transaction, after
    `count_key_bytes` sized the buffers."""
    key_raw, residual_raw = keys.view(torch.uint8).numpy(), residuals.view(torch.uint8).numpy()
    width = key_raw.shape[1]
    row_ids, revs = [], {}
    query = "SELECT id, rev, key, residual FROM facts ORDER BY seq"
    for fact_id, rev, key, residual in conn.execute(query):
        count = len(key) // width
        if not key or len(key) % width or len(residual) != residual_raw.shape[1]:
            raise ValueError(f"corrupt vector BLOBs of fact {fact_id!r}: {len(key)} and {len(residual)} bytes, "
                             f"expected a positive multiple of {width} and {residual_raw.shape[1]}")
        row = len(row_ids)
        if row + count > len(key_raw):
            raise ValueError(f"the database changed while it was read (fact {fact_id!r} does not fit)")
        key_raw[row : row + count] = np.frombuffer(key, dtype=np.uint8).reshape(count, width)
        residual_raw[row : row + count] = np.frombuffer(residual, dtype=np.uint8)
        row_ids += [fact_id] * count
        revs[fact_id] = rev
    return row_ids, revs


# ------------------------------------------------------------------------------------ migration


def _migrate_1_to_2(conn: sqlite3.Connection) -> None:
    """Version 1 held one key per fact; the Editor stored a fact's second key as a row of its own,
    id "<id>#bare" with metadata bare_key_of = "<id>" and the same residual. Version 2 keys such a
    row onto its fact (appended to the fact's key BLOB) and deletes the row; other rows are kept."""
    revision = None
    for row_id, key, metadata in conn.execute("SELECT id, key, metadata FROM facts WHERE id LIKE '%#bare' "
                                              "ORDER BY seq").fetchall():
        owner = json.loads(metadata).get("bare_key_of")
        if not isinstance(owner, str) or row_id != owner + "#bare":
            continue
        found = conn.execute("SELECT key FROM facts WHERE id = ?", (owner,)).fetchone()
        if found is None or len(found[0]) != len(key):
            continue
        if revision is None:
            revision = next_revision(conn)
        conn.execute("UPDATE facts SET key = ?, rev = ? WHERE id = ?", (found[0] + key, revision, owner))
        conn.execute("DELETE FROM facts WHERE id = ?", (row_id,))


_MIGRATIONS = {1: _migrate_1_to_2}  # from version v to v + 1


def migrate(conn: sqlite3.Connection, where: str) -> None:
    """Bring an existing database to FORMAT_VERSION, in one transaction (a no-op when it is there).
    ValueError naming `where` when the file cannot be written."""
    version = None
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as error:
        raise ValueError(f"{where} cannot be opened for writing ({error})") from None
    try:
        version = json.loads(conn.execute("SELECT value FROM meta WHERE name = 'format_version'").fetchone()[0])
        if version < FORMAT_VERSION:
            for step in range(version, FORMAT_VERSION):
                _MIGRATIONS[step](conn)
            write_meta(conn, {"format_version": FORMAT_VERSION})
            conn.execute(f"PRAGMA user_version={FORMAT_VERSION}")
        conn.execute("COMMIT")
    except sqlite3.OperationalError as error:
        conn.execute("ROLLBACK")
        raise ValueError(f"{where} uses NeuralDB format version {version} and must be migrated to version "
                         f"{FORMAT_VERSION} on open, but that failed: {error}") from None
    except BaseException:
        conn.execute("ROLLBACK")
        raise
