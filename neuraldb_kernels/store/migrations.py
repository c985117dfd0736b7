"""Bringing a database file of an older format version to FORMAT_VERSION (FORMAT.md, "Versions
and migration"): one step per version, all applied in one transaction on open, so a failed
migration leaves the file as it was. Pure SQL and JSON: the store imports nothing from editing.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

import torch

from . import schema
from .integrity import decode_vectors, row_checksum, stored_problem, vector_rows_problem
from .schema import FORMAT_VERSION, CorruptDatabaseError

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
    dtype = schema.STORAGE_DTYPES[settings["dtype"]]
    where = settings["where"]
    itemsize = torch.empty(0, dtype=dtype).element_size()
    sequence = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'facts'").fetchone()
    conn.execute("ALTER TABLE facts RENAME TO facts_version_2")
    conn.execute(schema.TABLES[schema.TABLES.index("CREATE TABLE facts"):].rstrip().rstrip(";"))
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
        problem = stored_problem(row, settings["d1"], settings["d2"], itemsize)  # checked as open checks it
        if problem is None:
            found = vector_rows_problem(decode_vectors(key, settings["d1"], dtype),
                                        decode_vectors(residual, settings["d2"], dtype),
                                        [fact_id] * (len(key) // (settings["d1"] * itemsize)))
            problem = None if found is None else found[1]
        if problem is not None:
            raise CorruptDatabaseError(f"{where}: {problem}")
        conn.execute(f"INSERT INTO facts(seq, {schema.FACT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (seq, *row))
    conn.execute("DROP TABLE facts_version_2")
    conn.execute("DELETE FROM sqlite_sequence WHERE name IN ('facts', 'facts_version_2')")
    if sequence is not None:
        conn.execute("INSERT INTO sqlite_sequence(name, seq) VALUES ('facts', ?)", sequence)


_MIGRATIONS = {1: _migrate_1_to_2, 2: _migrate_2_to_3}  # from version v to v + 1


def migrate(conn: sqlite3.Connection, where: str) -> None:
    """Bring an existing database (checked by `schema.read_meta`) to FORMAT_VERSION in one
    transaction; a no-op when it is there. ValueError naming `where` when the file cannot be
    written or the migration fails; the file is then unchanged."""
    version = None
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as error:
        raise ValueError(f"{where} cannot be opened for writing ({error})") from None
    try:
        meta = schema.read_meta(conn, where)  # again, inside the transaction: what is migrated is what was checked
        version = meta["format_version"]
        if version < FORMAT_VERSION:
            for step in range(version, FORMAT_VERSION):
                _MIGRATIONS[step](conn, {**meta, "where": where})
            schema.write_meta(conn, {"format_version": FORMAT_VERSION})
            conn.execute(f"PRAGMA user_version={FORMAT_VERSION}")
        conn.execute("COMMIT")
    except sqlite3.DatabaseError as error:
        conn.execute("ROLLBACK")
        raise ValueError(f"{where} uses NeuralDB format version {version} and must be migrated to version "
                         f"{FORMAT_VERSION} on open, but that failed: {error}") from None
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
