"""Bringing a database file of an older format version to FORMAT_VERSION (FORMAT.md, "Versions
and migration"): one step per version, all applied in one transaction on open, so a failed
migration leaves the file as it was. Version 3 -> 4 moves the vectors into the vector file, which
is written beside the database under a temporary name and renamed into place just before the
transaction commits (a crash in between leaves a version-3 database, migrated again on the next
open). The store imports nothing from editing.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import torch

from . import schema
from .integrity import decode_vectors, fact_checksum, row_checksum, version3_row_problem, vector_rows_problem
from .schema import FORMAT_VERSION, CorruptDatabaseError
from .vectors import COPY_BYTES, VectorFile, fact_slots, new_vectors_id, vectors_path

# The facts table of format 3 (vector BLOBs in the rows), which 2 -> 3 creates and 3 -> 4 replaces.
_FACTS_TABLE_V3 = ("CREATE TABLE facts (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, "
                   "rev INTEGER NOT NULL, key BLOB NOT NULL, key_gammas BLOB, residual BLOB NOT NULL, "
                   "metadata TEXT NOT NULL, checksum BLOB NOT NULL)")
_FACT_COLUMNS_V3 = "id, rev, key, residual, metadata, checksum, key_gammas"

# Metadata["edit"] as the Editor writes it, schema version 1 (FORMAT.md, "EditRecord"): every key
# always present; these are the values a migrated record gets for the keys it lacks.
EDIT_RECORD_VERSION = 1
EDIT_RECORD_DEFAULTS: dict[str, Any] = {
    "layer": None, "subject_start": None, "subject_first_token": None, "target_prob": None, "steps": None,
    "converged": None, "bare_prompt_key": None, "bare_prompt_key_generic": None, "shares_residual_with": [],
    "hparams": None, "key_floors": None,
}


def versioned_edit_record(metadata: dict[str, Any]) -> dict[str, Any] | None:
    """The metadata with its "edit" object brought to EditRecord version 1 (missing keys added as
    their defaults, unknown keys kept), or None when there is nothing to change: no "edit", an
    "edit" that is not an object, or one that already has a "version"."""
    edit = metadata.get("edit")
    if not isinstance(edit, dict) or "version" in edit:
        return None
    defaults = {name: list(value) if isinstance(value, list) else value for name, value in EDIT_RECORD_DEFAULTS.items()}
    return {**metadata, "edit": {"version": EDIT_RECORD_VERSION, **defaults, **edit}}


def _migrate_1_to_2(conn: sqlite3.Connection, settings: dict[str, Any]) -> None:
    """Version 1 held one key per fact; the Editor stored a fact's second key as a row of its own,
    id "<id>#bare" with metadata bare_key_of = "<id>" and the same residual. Version 2 keys such a
    row onto its fact (appended to the fact's key BLOB) and deletes the row; other rows are kept."""
    revision = None
    for row_id, key, metadata in conn.execute("SELECT id, key, metadata FROM facts WHERE id LIKE '%#bare' "
                                              "ORDER BY seq").fetchall():
        try:
            owner = json.loads(metadata).get("bare_key_of")
        except (AttributeError, TypeError, ValueError, RecursionError):
            continue  # not metadata the Editor wrote: the row is kept as it is (and checked by 2 -> 3)
        if not isinstance(owner, str) or row_id != owner + "#bare":
            continue
        found = conn.execute("SELECT key FROM facts WHERE id = ?", (owner,)).fetchone()
        if found is None or len(found[0]) != len(key):
            continue
        if revision is None:
            revision = schema.next_revision(conn)
        conn.execute("UPDATE facts SET key = ?, rev = ? WHERE id = ?", (found[0] + key, revision, owner))
        conn.execute("DELETE FROM facts WHERE id = ?", (row_id,))


def _migrate_2_to_3(conn: sqlite3.Connection, settings: dict[str, Any]) -> None:
    """Version 3 versions the Editor's "edit" metadata (`versioned_edit_record`), adds a checksum
    to every row and per-key thresholds: the facts table is rebuilt with the key_gammas column (NULL
    for every row: all keys use the database's gamma) and the checksum column, keeping seq, and
    every row is checked as `open` checks it (a row that fails stops the migration)."""
    where = settings["where"]
    sequence = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'facts'").fetchone()
    conn.execute("ALTER TABLE facts RENAME TO facts_version_2")
    conn.execute(_FACTS_TABLE_V3)
    revision = None
    for seq, fact_id, rev, key, residual, text in conn.execute(
            "SELECT seq, id, rev, key, residual, metadata FROM facts_version_2 ORDER BY seq").fetchall():
        try:
            metadata = json.loads(text)
            changed = versioned_edit_record(metadata) if isinstance(metadata, dict) else None
            if changed is not None:
                text = json.dumps(changed, allow_nan=False, ensure_ascii=False)
        except (TypeError, ValueError, RecursionError) as error:
            raise CorruptDatabaseError(f"{where}: fact {fact_id!r} has metadata that cannot be read "
                                       f"({type(error).__name__}: {error})") from None
        if changed is not None:
            revision = schema.next_revision(conn) if revision is None else revision
            rev = revision
        readable = all(isinstance(value, kind) for value, kind in ((fact_id, str), (key, bytes), (residual, bytes),
                                                                   (text, str)))
        row = (fact_id, rev, key, residual, text,
               row_checksum(fact_id, key, residual, text, None) if readable else None, None)
        _checked_version3_row(row, settings)
        conn.execute(f"INSERT INTO facts(seq, {_FACT_COLUMNS_V3}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (seq, *row))
    _replace_table(conn, "facts_version_2", sequence)


def _checked_version3_row(row: tuple, settings: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The (k, d1) keys and (1, d2) residual of a format-3 row, checked as a format-3 open checked
    it; CorruptDatabaseError naming the fact if it fails."""
    dtype = schema.STORAGE_DTYPES[settings["dtype"]]
    d1, d2 = settings["d1"], settings["d2"]
    problem = version3_row_problem(row, d1, d2, torch.empty(0, dtype=dtype).element_size())
    if problem is None:
        keys, residual = decode_vectors(row[2], d1, dtype), decode_vectors(row[3], d2, dtype)
        found = vector_rows_problem(keys, residual.expand(keys.shape[0], -1), [row[0]] * keys.shape[0])
        if found is None:
            return keys, residual
        problem = found[1]
    raise CorruptDatabaseError(f"{settings['where']}: {problem}")


def _replace_table(conn: sqlite3.Connection, old: str, sequence: tuple | None) -> None:
    """Drop the renamed facts table `old` and give the new one its AUTOINCREMENT sequence."""
    conn.execute(f"DROP TABLE {old}")
    conn.execute(f"DELETE FROM sqlite_sequence WHERE name IN ('facts', '{old}')")
    if sequence is not None:
        conn.execute("INSERT INTO sqlite_sequence(name, seq) VALUES ('facts', ?)", sequence)


def _migrate_3_to_4(conn: sqlite3.Connection, settings: dict[str, Any]) -> None:
    """Version 4 keeps the vectors in the vector file: every row's keys and residual become its
    slots there (in insertion order, each checked as a format-3 open checks it), the row keeps
    seq, id, rev, key_gammas and metadata and gets slot, key_count and the format-4 checksum; meta
    gains vectors_id and vector_slots."""
    vectors: VectorFile = settings["vectors"]
    sequence = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'facts'").fetchone()
    conn.execute("ALTER TABLE facts RENAME TO facts_version_3")
    conn.execute(schema.TABLES[schema.TABLES.index("CREATE TABLE facts"):].rstrip().rstrip(";"))
    slot, pending, pending_bytes = 0, [], 0
    for seq, *row in conn.execute(f"SELECT seq, {_FACT_COLUMNS_V3} FROM facts_version_3 ORDER BY seq"):
        keys, residual = _checked_version3_row(tuple(row), settings)
        fact_id, rev, _, _, metadata, _, key_gammas = row
        slots = fact_slots(keys, residual)
        data = slots.view(torch.uint8).numpy().tobytes()
        conn.execute(f"INSERT INTO facts(seq, {schema.FACT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                     (seq, fact_id, rev, slot + sum(len(s) for s in pending), len(keys), key_gammas, metadata,
                      fact_checksum(fact_id, metadata, key_gammas, data)))
        pending.append(slots)
        pending_bytes += len(data)
        if pending_bytes >= COPY_BYTES:
            vectors.write(slot, torch.cat(pending))
            slot, pending, pending_bytes = slot + sum(len(s) for s in pending), [], 0
    if pending:
        vectors.write(slot, torch.cat(pending))
        slot += sum(len(s) for s in pending)
    _replace_table(conn, "facts_version_3", sequence)
    conn.executemany("INSERT INTO meta(name, value) VALUES (?, ?)",
                     [("vectors_id", json.dumps(settings["vectors_id"])), ("vector_slots", json.dumps(slot))])


_MIGRATIONS = {1: _migrate_1_to_2, 2: _migrate_2_to_3, 3: _migrate_3_to_4}  # from version v to v + 1


def migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Bring the existing database at `path` (checked by `schema.read_meta`) to FORMAT_VERSION in
    one transaction, writing its vector file; a no-op when it is there. ValueError naming the file
    when it cannot be written or the migration fails; the database is then unchanged (a vector
    file left beside a version-3 database by a crash is replaced on the next try)."""
    where, version, migrated = os.fspath(path), None, False
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as error:
        raise ValueError(f"{where} cannot be opened for writing ({error})") from None
    final = vectors_path(path)
    temporary = final.with_name(f"{final.name}.migrating")
    vectors = None
    try:
        meta = schema.read_meta(conn, where)  # again, inside the transaction: what is migrated is what was checked
        version = meta["format_version"]
        if version < FORMAT_VERSION:
            temporary.unlink(missing_ok=True)  # left by a migration that crashed
            vectors_id = new_vectors_id()
            vectors = VectorFile.create(temporary, d1=meta["d1"], d2=meta["d2"], dtype_name=meta["dtype"],
                                        vectors_id=vectors_id)
            for step in range(version, FORMAT_VERSION):
                _MIGRATIONS[step](conn, {**meta, "where": where, "vectors": vectors, "vectors_id": vectors_id})
            schema.write_meta(conn, {"format_version": FORMAT_VERSION})
            conn.execute(f"PRAGMA user_version={FORMAT_VERSION}")
            os.replace(temporary, final)  # synced by its writes; a stale vector file of an older version goes
            migrated = True
        conn.execute("COMMIT")
    except sqlite3.DatabaseError as error:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise ValueError(f"{where} uses NeuralDB format version {version} and must be migrated to version "
                         f"{FORMAT_VERSION} on open, but that failed: {error}") from None
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    finally:
        if vectors is not None:
            vectors.close()
        temporary.unlink(missing_ok=True)
    if migrated:
        conn.execute("VACUUM")  # the vector BLOBs left the file: give their pages back to the file system
