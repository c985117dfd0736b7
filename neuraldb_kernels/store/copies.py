"""`NeuralDB.save`: a consistent copy of a database as a new pair of files (the SQLite file and
its vector file), compacted on the way: the copy's vector file holds exactly the slots of the facts
in effect, in insertion order, and a fresh vectors_id binds the two new files to each other.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from pathlib import Path

from . import schema
from .vectors import VectorFile, new_vectors_id, vectors_path


def _runs(rows: list[tuple[str, int, int]]) -> list[tuple[int, int]]:
    """The (first slot, count) runs covering the facts' slots in row order, adjacent ones merged."""
    runs: list[list[int]] = []
    for _, slot, count in rows:
        if runs and runs[-1][0] + runs[-1][1] == slot:
            runs[-1][1] += count
        else:
            runs.append([slot, count])
    return [(first, count) for first, count in runs]


def copy_database(conn: sqlite3.Connection, vectors: VectorFile, path: Path, where: str) -> None:
    """Write a compacted copy of the committed state of the database of `conn` and `vectors` to
    `path` and its vector file (FileExistsError if either exists). Both are written under
    temporary names beside `path` and hard-linked into place, the vector file first, so that no
    file created meanwhile is overwritten and a crash leaves no half-written database at `path`."""
    final_vectors = vectors_path(path)
    for target in (path, final_vectors):
        if os.path.lexists(target):
            raise FileExistsError(f"{target} already exists; NeuralDB.save never overwrites")
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with schema.sqlite_errors(os.fspath(path)):
            conn.execute("BEGIN")  # one committed state for the rows, the slots and the SQLite pages
            try:
                meta = schema.read_meta(conn, where)
                rows = conn.execute("SELECT id, slot, key_count FROM facts ORDER BY seq").fetchall()
                vectors_id = new_vectors_id()
                copy = VectorFile.create(vectors_path(temporary), d1=meta["d1"], d2=meta["d2"],
                                         dtype_name=meta["dtype"], vectors_id=vectors_id)
                try:
                    vectors.copy_to(copy, _runs(rows))
                finally:
                    copy.close()
                target = sqlite3.connect(temporary, isolation_level=None)
                try:
                    conn.backup(target)
                finally:
                    target.close()
            finally:
                conn.execute("COMMIT")
            target = schema.connect(temporary)
            try:
                schema.configure_file(target)
                target.execute("BEGIN IMMEDIATE")
                slots, slot = [], 0
                for fact_id, _, count in rows:
                    slots.append((slot, fact_id))
                    slot += count
                target.executemany("UPDATE facts SET slot = ? WHERE id = ?", slots)
                target.executemany("UPDATE meta SET value = ? WHERE name = ?",
                                   [(json.dumps(vectors_id), "vectors_id"), (json.dumps(slot), "vector_slots")])
                target.execute("COMMIT")
            finally:
                target.close()
        os.link(vectors_path(temporary), final_vectors)
        try:
            os.link(temporary, path)
        except BaseException:
            final_vectors.unlink()
            raise
    finally:
        schema.remove_database_files(temporary)
