"""The SQLite side of a NeuralDB (documented in FORMAT.md): tables, pragmas, meta rows, the SQL
that reads and writes fact rows, and the checks that a file is exactly ours before anything is read
from it. Everything that knows SQL lives here (and in migrations.py for older versions); the vector
file's byte layout is vectors.py.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sqlite3
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from .fingerprint import ModelFingerprint

FORMAT_VERSION = 4
APPLICATION_ID = 0x4E44424B  # "NDBK" in the SQLite header: marks the file as a NeuralDB.
MAX_DIM = 1 << 20  # largest d1 / d2 accepted: bounds what a crafted file can make us allocate

STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

TABLES = """
CREATE TABLE meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL               -- JSON
);
CREATE TABLE facts (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,  -- insertion order: the row order of a freshly opened view
    id       TEXT NOT NULL UNIQUE,
    rev      INTEGER NOT NULL,        -- meta.revision of the transaction that last wrote this row
    slot     INTEGER NOT NULL,        -- first of the fact's slots in the vector file (vectors.py)
    key_count INTEGER NOT NULL,       -- k >= 1: its keys, one slot each (the fact's own key first)
    key_gammas BLOB,                  -- NULL (every key uses meta.gamma) or k float32 LE thresholds, one per key
    metadata TEXT NOT NULL,           -- JSON object
    checksum BLOB NOT NULL            -- integrity.fact_checksum of (id, metadata, key_gammas, the fact's slots)
);
"""

# The exact schema, per format version: (type, name, table) of every sqlite_master entry, and the
# (name, declared type, not null, default, primary key position, hidden) of every column.
_OBJECTS = {("table", "meta", "meta"), ("index", "sqlite_autoindex_meta_1", "meta"),
            ("table", "facts", "facts"), ("index", "sqlite_autoindex_facts_1", "facts"),
            ("table", "sqlite_sequence", "sqlite_sequence")}
_META_COLUMNS = [("name", "TEXT", 0, None, 1, 0), ("value", "TEXT", 1, None, 0, 0)]
_FACT_COLUMNS_V2 = [("seq", "INTEGER", 0, None, 1, 0), ("id", "TEXT", 1, None, 0, 0), ("rev", "INTEGER", 1, None, 0, 0),
                    ("key", "BLOB", 1, None, 0, 0), ("residual", "BLOB", 1, None, 0, 0),
                    ("metadata", "TEXT", 1, None, 0, 0)]
_FACT_COLUMNS = {1: _FACT_COLUMNS_V2, 2: _FACT_COLUMNS_V2,
                 3: [*_FACT_COLUMNS_V2[:4], ("key_gammas", "BLOB", 0, None, 0, 0), *_FACT_COLUMNS_V2[4:],
                     ("checksum", "BLOB", 1, None, 0, 0)],
                 4: [*_FACT_COLUMNS_V2[:3], ("slot", "INTEGER", 1, None, 0, 0), ("key_count", "INTEGER", 1, None, 0, 0),
                     ("key_gammas", "BLOB", 0, None, 0, 0), ("metadata", "TEXT", 1, None, 0, 0),
                     ("checksum", "BLOB", 1, None, 0, 0)]}
_META_NAMES_V3 = frozenset({"format", "format_version", "d1", "d2", "layer", "gamma", "dtype", "fingerprint",
                            "revision", "created_at", "updated_at"})
# format 4 adds the vector file's id (binds the pair of files) and the slots in use (the next write's first slot)
META_NAMES = {1: _META_NAMES_V3, 2: _META_NAMES_V3, 3: _META_NAMES_V3,
              4: _META_NAMES_V3 | {"vectors_id", "vector_slots"}}


BUSY_TIMEOUT_S = 30.0  # how long a connection waits for another one's write lock


class CorruptDatabaseError(ValueError):
    """The file is not a NeuralDB this code can trust, or one of its rows fails its checks."""


class DatabaseUnavailableError(OSError):
    """SQLite could not read or write the file: another connection held the write lock past
    BUSY_TIMEOUT_S, the disk is full, an I/O error, a read-only file or medium."""


@contextlib.contextmanager
def sqlite_errors(where: str) -> Iterator[None]:
    """Translate SQLite's exceptions into one-line store errors naming the file `where`:
    DatabaseUnavailableError (an OSError) for what the environment caused, CorruptDatabaseError (a
    ValueError) for a damaged file. IntegrityError (a constraint, e.g. a duplicate id) passes through."""
    try:
        yield
    except sqlite3.IntegrityError:
        raise
    except sqlite3.OperationalError as error:
        if "locked" in str(error) or "busy" in str(error):
            raise DatabaseUnavailableError(f"{where}: another connection holds the write lock (waited "
                                           f"{BUSY_TIMEOUT_S:g} s; SQLite says: {error})") from error
        raise DatabaseUnavailableError(f"{where}: {error}") from error
    except sqlite3.DatabaseError as error:
        raise CorruptDatabaseError(f"{where} is damaged or not a NeuralDB database (SQLite says: {error})") from error


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


def settings_problem(d1: Any, d2: Any, layer: Any, gamma: Any) -> str | None:
    """Why these database settings are invalid, or None: d1, d2 ints in [1, MAX_DIM], layer None or
    an int >= 0, gamma a finite number in [-1, 1] (a cosine threshold)."""
    for name, value in (("d1", d1), ("d2", d2)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_DIM:
            return f"{name} must be a positive int, got {value!r} (at most {MAX_DIM})"
    if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int) or layer < 0):
        return f"layer must be None or a non-negative int, got {layer!r}"
    if (isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma)
            or not -1.0 <= gamma <= 1.0):
        return f"gamma must be a finite float in [-1, 1] (a cosine threshold), got {gamma!r}"
    return None


def connect(path: str | os.PathLike | None, *, readonly: bool = False, immutable: bool = False) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit) that trusts nothing in the file's
    schema (`trusted_schema=OFF`: no SQL functions run from triggers, views or defaults).

    readonly: the file is opened with SQLite's mode=ro (nothing is ever written); immutable: also
    without locks or WAL files, for a file on a read-only medium. Changes nothing in the file: call
    `configure_file` once it is known to be a NeuralDB.
    """
    if path is None:
        target, uri = ":memory:", False
    elif readonly:
        query = "mode=ro&immutable=1" if immutable else "mode=ro"
        target, uri = f"{Path(path).absolute().as_uri()}?{query}", True
    else:
        target, uri = os.fspath(path), False
    conn = sqlite3.connect(target, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_S,
                           uri=uri)
    conn.execute("PRAGMA trusted_schema=OFF")
    return conn


def configure_file(conn: sqlite3.Connection) -> None:
    """Write-ahead logging (readers run while one writer commits) and an fsync per commit, so a
    committed transaction survives a process crash or power loss."""
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")


def create_tables(conn: sqlite3.Connection) -> None:
    """Create the format-3 tables (inside the caller's transaction)."""
    for statement in TABLES.split(";"):
        if statement.strip():
            conn.execute(statement)


def create(conn: sqlite3.Connection, settings: dict[str, Any]) -> None:
    """Write the tables and the `meta` rows of a new database in one transaction."""
    now = utc_now()
    rows = {"format": "neuraldb", "format_version": FORMAT_VERSION, "revision": 0,
            "created_at": now, "updated_at": now, **settings}
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
        conn.execute(f"PRAGMA user_version={FORMAT_VERSION}")
        create_tables(conn)
        conn.executemany("INSERT INTO meta(name, value) VALUES (?, ?)",
                         [(name, json.dumps(value)) for name, value in rows.items()])
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _columns(conn: sqlite3.Connection, table: str) -> list[tuple]:
    return [(name, kind.upper(), notnull, default, pk, hidden)
            for _, name, kind, notnull, default, pk, hidden in conn.execute(f"PRAGMA table_xinfo({table})")]


def _check_objects(conn: sqlite3.Connection, where: str) -> None:
    """CorruptDatabaseError unless the tables and indexes are exactly ours (no triggers, views or
    other tables) and `meta` has exactly its columns."""
    objects = {tuple(row) for row in conn.execute("SELECT type, name, tbl_name FROM sqlite_master")}
    if objects != _OBJECTS:
        unexpected = sorted(f"{kind} {name!r}" for kind, name, _ in objects - _OBJECTS)
        missing = sorted(f"{kind} {name!r}" for kind, name, _ in _OBJECTS - objects)
        raise CorruptDatabaseError(f"{where} does not have the NeuralDB schema: unexpected "
                                   f"{', '.join(unexpected) or 'nothing'}; missing {', '.join(missing) or 'nothing'}")
    _check_columns(conn, where, "meta", _META_COLUMNS, "any")


def _check_columns(conn: sqlite3.Connection, where: str, table: str, expected: list[tuple], version: Any) -> None:
    columns = _columns(conn, table)
    if columns != expected:
        raise CorruptDatabaseError(f"{where}: table {table!r} has the columns {columns}, a NeuralDB of format "
                                   f"version {version} has {expected}")


def _meta_problem(meta: dict[str, Any], version: int) -> str | None:
    """Why the settings in `meta` (of a file of format `version`) are invalid, or None."""
    names = META_NAMES[version]
    if set(meta) != names:
        return (f"meta rows {sorted(set(meta) - names)} are unknown / {sorted(names - set(meta))} "
                f"are missing")
    problem = settings_problem(meta["d1"], meta["d2"], meta["layer"], meta["gamma"])
    if problem:
        return problem
    if meta["dtype"] not in STORAGE_DTYPES:
        return f"dtype {meta['dtype']!r} is not a storage dtype ({', '.join(STORAGE_DTYPES)})"
    revision = meta["revision"]
    if isinstance(revision, bool) or not isinstance(revision, int) or revision < 0:
        return f"revision must be a non-negative int, got {revision!r}"
    for name in ("created_at", "updated_at"):
        if not isinstance(meta[name], str):
            return f"{name} must be an ISO-8601 string, got {meta[name]!r}"
    if version >= 4:
        slots, vectors_id = meta["vector_slots"], meta["vectors_id"]
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 0:
            return f"vector_slots must be a non-negative int, got {slots!r}"
        if not isinstance(vectors_id, str) or len(vectors_id) != 32 or vectors_id.strip("0123456789abcdef"):
            return f"vectors_id must be 32 lowercase hex digits, got {vectors_id!r}"
    fingerprint = meta["fingerprint"]
    if fingerprint is not None:
        try:
            parsed = ModelFingerprint.from_json(json.dumps(fingerprint))
        except (TypeError, ValueError) as error:
            return f"fingerprint is invalid: {error}"
        if (parsed.d1, parsed.d2, parsed.layer) != (meta["d1"], meta["d2"], meta["layer"]):
            return (f"fingerprint (d1={parsed.d1}, d2={parsed.d2}, layer={parsed.layer}) disagrees with the database "
                    f"(d1={meta['d1']}, d2={meta['d2']}, layer={meta['layer']})")
    return None


def read_meta(conn: sqlite3.Connection, where: str) -> dict[str, Any]:
    """The `meta` table of an existing database, after checking that it is a NeuralDB this code can
    read: application id, the exact schema of its format version, and every meta value.

    `where` names the database in error messages (CorruptDatabaseError, a ValueError).
    """
    try:
        application_id = conn.execute("PRAGMA application_id").fetchone()[0]
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.OperationalError:
        raise  # could not read the file (locked, unreadable): not a verdict on its content
    except sqlite3.DatabaseError as error:
        raise CorruptDatabaseError(f"{where} is not a NeuralDB database (SQLite says: {error})") from None
    if application_id != APPLICATION_ID or not {"meta", "facts"} <= tables:
        raise CorruptDatabaseError(f"{where} is not a NeuralDB database (SQLite application_id "
                                   f"{application_id:#x}, tables {sorted(tables)})")
    _check_objects(conn, where)
    try:
        rows = conn.execute("SELECT name, value FROM meta").fetchall()
        meta = {name: json.loads(value) for name, value in rows}
    except (sqlite3.DatabaseError, TypeError, ValueError, RecursionError) as error:
        raise CorruptDatabaseError(f"{where} has a corrupt meta table ({type(error).__name__}: {error})") from None
    version = meta.get("format_version")
    if meta.get("format") != "neuraldb" or isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CorruptDatabaseError(f"{where} has a corrupt meta table (format={meta.get('format')!r}, "
                                   f"format_version={version!r})")
    if version > FORMAT_VERSION:
        raise ValueError(f"{where} uses NeuralDB format version {version}, newer than the newest this "
                         f"neuraldb_kernels reads ({FORMAT_VERSION}); upgrade neuraldb_kernels")
    user_version = conn.execute("PRAGMA user_version").fetchone()[0]
    if user_version != version:
        raise CorruptDatabaseError(f"{where}: the SQLite user_version {user_version} disagrees with "
                                   f"meta.format_version {version}")
    _check_columns(conn, where, "facts", _FACT_COLUMNS[version], version)
    problem = _meta_problem(meta, version)
    if problem:
        raise CorruptDatabaseError(f"{where} has an invalid meta table: {problem}")
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


def encode_key_gammas(key_gammas: torch.Tensor | None) -> bytes | None:
    """The key_gammas BLOB of a fact: None (NULL) or its (k,) float32 thresholds, little-endian."""
    if key_gammas is None:
        return None
    return key_gammas.to(torch.float32).contiguous().view(torch.uint8).numpy().tobytes()


def count_key_rows(conn: sqlite3.Connection) -> int:
    """The number of key rows of all facts (the rows of a view)."""
    return conn.execute("SELECT coalesce(sum(key_count), 0) FROM facts").fetchone()[0]


# The row tuple `integrity` checks: (id, rev, slot, key_count, key_gammas, metadata, checksum).
FACT_COLUMNS = "id, rev, slot, key_count, key_gammas, metadata, checksum"
SQL_CHUNK = 500  # values per "IN (...)" query, below SQLite's bound-parameter limit


def _chunks(values: list[Any]) -> Iterator[tuple[list[Any], str]]:
    """`values` in chunks of SQL_CHUNK, each with its "?,?,..." placeholder list."""
    for start in range(0, len(values), SQL_CHUNK):
        part = values[start : start + SQL_CHUNK]
        yield part, ",".join("?" * len(part))


def fact_rows(conn: sqlite3.Connection, ids: Iterable[str] | None = None) -> Iterator[tuple]:
    """(id, rev, slot, key_count, key_gammas, metadata, checksum) of every fact in insertion order,
    or of the facts `ids`."""
    if ids is None:
        yield from conn.execute(f"SELECT {FACT_COLUMNS} FROM facts ORDER BY seq")
        return
    for part, marks in _chunks(list(ids)):
        yield from conn.execute(f"SELECT {FACT_COLUMNS} FROM facts WHERE id IN ({marks})", part)


# `integrity.fact_header` built by SQLite, and whether a row is sound on its own (column types, slots
# within the :vector_slots in use, the key_gammas length, metadata a JSON object by SQLite's strict
# parser): open checks a million rows in C and explains only a row that fails (`integrity.row_problem`).
FACT_HEADER_SQL = ("CAST(length(CAST(id AS BLOB)) || ':' || CAST(id AS BLOB) || length(CAST(metadata AS BLOB)) || ':' "
                   "|| CAST(metadata AS BLOB) || coalesce(length(key_gammas), 0) || ':' || coalesce(key_gammas, x'') "
                   "AS BLOB)")
SOUND_ROW_SQL = ("typeof(id) = 'text' AND typeof(rev) = 'integer' AND typeof(slot) = 'integer' "
                  "AND typeof(key_count) = 'integer' AND typeof(metadata) = 'text' AND typeof(checksum) = 'blob' "
                  "AND length(checksum) = 4 AND slot >= 0 AND key_count >= 1 AND slot + key_count <= :vector_slots "
                  "AND (key_gammas IS NULL OR (typeof(key_gammas) = 'blob' AND length(key_gammas) = 4 * key_count)) "
                  "AND CASE WHEN json_valid(metadata) THEN json_type(metadata) = 'object' ELSE 0 END")


def fact_rows_for_load(conn: sqlite3.Connection, vector_slots: int) -> sqlite3.Cursor:
    """(id, rev, slot, key_count, key_gammas, fact header, checksum, sound) of every fact in
    insertion order: the header as `integrity.fact_header`, sound 1 when the row passes every check
    that needs no slots (see `SOUND_ROW_SQL`) and its key_gammas values are still to be checked."""
    return conn.execute(f"SELECT id, rev, slot, key_count, key_gammas, {FACT_HEADER_SQL}, checksum, "
                        f"coalesce({SOUND_ROW_SQL}, 0) FROM facts ORDER BY seq", {"vector_slots": vector_slots})


def write_facts(conn: sqlite3.Connection, rows: Iterable[tuple], *, replace: bool) -> None:
    """Insert (id, rev, slot, key_count, key_gammas, metadata, checksum) rows (inside the caller's
    transaction); replace: a row whose id exists is rewritten, keeping its seq (else that is an IntegrityError)."""
    conflict = (" ON CONFLICT(id) DO UPDATE SET rev = excluded.rev, slot = excluded.slot, "
                "key_count = excluded.key_count, key_gammas = excluded.key_gammas, metadata = excluded.metadata, "
                "checksum = excluded.checksum") if replace else ""
    conn.executemany(f"INSERT INTO facts({FACT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?){conflict}", rows)


def slots_of(conn: sqlite3.Connection, ids: list[str]) -> dict[str, tuple[int, int]]:
    """{id: (slot, key_count)} of the facts `ids` that exist."""
    found: dict[str, tuple[int, int]] = {}
    for part, marks in _chunks(ids):
        found.update((fact_id, (slot, count)) for fact_id, slot, count in conn.execute(
            f"SELECT id, slot, key_count FROM facts WHERE id IN ({marks})", part))
    return found


def delete_facts(conn: sqlite3.Connection, ids: list[str]) -> None:
    """Delete the facts `ids` as one revision (inside the caller's transaction)."""
    next_revision(conn)
    conn.executemany("DELETE FROM facts WHERE id = ?", [(fact_id,) for fact_id in ids])


def metadata_of(conn: sqlite3.Connection, ids: list[str]) -> Iterator[tuple[str, str]]:
    """(id, metadata JSON text) of the facts `ids` that exist."""
    for part, marks in _chunks(ids):
        yield from conn.execute(f"SELECT id, metadata FROM facts WHERE id IN ({marks})", part)


def all_metadata(conn: sqlite3.Connection) -> Iterator[tuple[str, str]]:
    """(id, metadata JSON text) of every fact, in insertion order (no vector is read)."""
    yield from conn.execute("SELECT id, metadata FROM facts ORDER BY seq")


def metadata_where(conn: sqlite3.Connection, field: str, values: list[Any]) -> Iterator[tuple[str, str]]:
    """(id, metadata JSON text) of the facts whose metadata[field] is one of `values` (str or
    numbers; `field` holds no '"'), in insertion order within each chunk of values."""
    for part, marks in _chunks(values):
        yield from conn.execute(f"SELECT id, metadata FROM facts WHERE json_extract(metadata, ?) IN ({marks}) "
                                f"ORDER BY seq", [f'$."{field}"', *part])


def database_files(path: str | os.PathLike) -> list[Path]:
    """Every file that belongs to the database at `path`: the SQLite file, its vector file
    (`-vectors`, format 4) and SQLite's write-ahead log and shared-memory index (`-wal`, `-shm`).
    A copy or a rename must take the first two together (or use `NeuralDB.save`)."""
    return [Path(f"{os.fspath(path)}{suffix}") for suffix in ("", VECTORS_SUFFIX, "-wal", "-shm")]


VECTORS_SUFFIX = "-vectors"


def remove_database_files(path: str | os.PathLike) -> None:
    """Delete a database file and its companions (see `database_files`), where present."""
    for file in database_files(path):
        file.unlink(missing_ok=True)
