"""`NeuralDB`: a durable, incremental store of facts (id, keys, residual, metadata) with live
retrieval views.

A fact has one residual and k >= 1 keys: its own key, plus any extra keys (other queries that
must retrieve the same residual, e.g. the Editor's bare-prompt key). Retrieval sees key rows:
a fact with k keys is k rows of every view, each with the fact's residual.

SQLite (format in FORMAT.md) is the source of truth: every add / upsert / delete call is one
transaction, committed before memory changes. In memory the database keeps the row order (row i
of every view is a key row of fact `ids[i]`) and one `ViewBuffers` per (device, dtype), the
(CPU, storage dtype) one always present and loaded in one pass at open. Other views are built
from it on first request and then kept in sync row by row.

Snapshot semantics: `view()` / `snapshot()` return tensors that never change afterwards, however
the database is mutated later (appends write outside them or into grown buffers; deletes and
updates copy-on-write while a snapshot is still in use, and work in place once it was dropped;
see view.py). A snapshot is taken under the database lock, so it never
shows a half-applied batch. Readers may keep and use it without holding any lock.

Thread safety: every public method takes one re-entrant lock; several threads may share a NeuralDB.
Several processes may open the same file: each sees the committed state at open, and `refresh()`
picks up what other processes committed since. One writing process at a time is the intended use.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sqlite3
import threading
import weakref
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from . import schema
from .facts import StoredFact, FactBatch, prepare_batch
from .exchange import read_export, write_export
from .fingerprint import ModelFingerprint, check_compatible
from .view import MIN_CAPACITY, ViewBuffers

_SQL_CHUNK = 500  # ids per "WHERE id IN (...)" query, below SQLite's bound-parameter limit
_SEARCH_CHUNK = 16384  # key rows per matrix product in search()


@dataclasses.dataclass(frozen=True)
class SearchHit:
    """One search result: the fact's id, the cosine of its key with the query, its metadata."""

    id: str
    cosine: float
    metadata: dict[str, Any]


@dataclasses.dataclass(frozen=True, eq=False)
class Snapshot:
    """A consistent, immutable retrieval view.

    keys: (m, d1), residuals: (m, d2), contiguous, on the requested device and dtype, one row per
    key (m >= the number of facts); row i is a key of fact `ids_at([i])[0]`. version: the
    database version the snapshot shows.
    """

    keys: torch.Tensor
    residuals: torch.Tensor
    version: int
    _ids: list[str] = dataclasses.field(repr=False)

    def ids_at(self, indices: torch.Tensor | Sequence[int]) -> list[str | None]:
        """Fact ids of row `indices` (e.g. the `index` output of gated_retrieve); None for -1."""
        return _ids_at(self._ids, self.keys.shape[0], indices)


def _ids_at(ids: list[str], count: int, indices: torch.Tensor | Sequence[int]) -> list[str | None]:
    values = indices.flatten().tolist() if isinstance(indices, torch.Tensor) else list(indices)
    out: list[str | None] = []
    for index in values:
        if index == -1:
            out.append(None)
        elif isinstance(index, int) and 0 <= index < count:
            out.append(ids[index])
        else:
            raise IndexError(f"row index {index!r} out of range for a view of {count} rows (or -1)")
    return out


def _check_settings(d1: Any, d2: Any, layer: Any, gamma: Any) -> None:
    for name, value in (("d1", d1), ("d2", d2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int) or layer < 0):
        raise ValueError(f"layer must be None or a non-negative int, got {layer!r}")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma):
        raise ValueError(f"gamma must be a finite float, got {gamma!r}")


def _normalise_device(device: torch.device | str | None) -> torch.device:
    device = torch.device("cpu" if device is None else device)
    if device.type != "cpu" and device.index is None:
        device = torch.empty(0, device=device).device  # the current device of that type
    return device


class NeuralDB:
    """A database of facts for one edited layer: keys (d1), residuals (d2), metadata.

    `NeuralDB(path=None, *, d1, d2, layer=None, gamma=0.65, dtype=torch.float32, fingerprint=None)`
    creates a database (in memory when `path` is None; FileExistsError if `path` exists);
    `NeuralDB.open(path)` opens one. Storage dtype: float32, float16 or bfloat16.
    """

    def __init__(self, path: str | os.PathLike | None = None, *, d1: int, d2: int, layer: int | None = None,
                 gamma: float = 0.65, dtype: torch.dtype | str = torch.float32,
                 fingerprint: ModelFingerprint | None = None):
        _check_settings(d1, d2, layer, gamma)
        name = schema.dtype_name(dtype)
        if fingerprint is not None:
            layer = self._fingerprint_layer(fingerprint, d1, d2, layer)
        if path is not None and os.path.lexists(path):
            raise FileExistsError(f"{os.fspath(path)} already exists; open an existing database with NeuralDB.open")
        conn = schema.connect(path)
        try:
            if path is not None:
                schema.configure_file(conn)
            schema.create(conn, {"d1": d1, "d2": d2, "layer": layer, "gamma": float(gamma), "dtype": name,
                                 "fingerprint": None if fingerprint is None else dataclasses.asdict(fingerprint)})
        except BaseException:
            conn.close()
            raise
        self._attach(conn, path)

    @classmethod
    def open(cls, path: str | os.PathLike, *, fingerprint: ModelFingerprint | None = None,
             allow_weight_mismatch: bool = False) -> "NeuralDB":
        """Open the database at `path`; with `fingerprint`, run `check_fingerprint` on it first."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no NeuralDB database at {os.fspath(path)}")
        conn = schema.connect(path)
        try:
            meta = schema.read_meta(conn, os.fspath(path))  # checks it is a NeuralDB before changing anything
            schema.configure_file(conn)
            if meta["format_version"] < schema.FORMAT_VERSION:
                schema.migrate(conn, os.fspath(path))
        except BaseException:
            conn.close()
            raise
        db = cls.__new__(cls)
        db._attach(conn, path)
        if fingerprint is not None:
            try:
                db.check_fingerprint(fingerprint, allow_weight_mismatch=allow_weight_mismatch)
            except BaseException:
                db.close()
                raise
        return db

    # -- state ---------------------------------------------------------------------------------

    def _attach(self, conn: sqlite3.Connection, path: str | os.PathLike | None) -> None:
        """Read settings and all rows of `conn` in one read transaction and build the CPU view."""
        self._conn = conn
        self._path = None if path is None else Path(path)
        self._lock = threading.RLock()
        self._closed = False
        self._version = 0
        try:
            conn.execute("BEGIN")
            try:
                self._load_meta(schema.read_meta(conn, str(path) if path is not None else "database"))
                count = schema.count_key_bytes(conn) // (self._d1 * self._dtype.itemsize)
                capacity = max(MIN_CAPACITY, 2 * count)  # untouched rows cost no memory until used
                keys = torch.empty((capacity, self._d1), dtype=self._dtype)
                residuals = torch.empty((capacity, self._d2), dtype=self._dtype)
                self._ids, self._rev_of = schema.read_facts_into(conn, keys, residuals)
                self._data_version = conn.execute("PRAGMA data_version").fetchone()[0]
            finally:
                conn.execute("COMMIT")
        except BaseException:
            conn.close()
            raise
        self._rows_of: dict[str, list[int]] = {}  # a fact's view rows, its own key's first
        for row, fact_id in enumerate(self._ids):
            self._rows_of.setdefault(fact_id, []).append(row)
        self._id_readers: weakref.WeakSet[Snapshot] = weakref.WeakSet()  # live snapshots sharing self._ids
        self._master_key = (torch.device("cpu"), self._dtype)
        self._views: dict[tuple[torch.device, torch.dtype], ViewBuffers] = {
            self._master_key: ViewBuffers(keys, residuals, count)}

    def _load_meta(self, meta: dict[str, Any]) -> None:
        self._d1, self._d2, self._layer, self._gamma = meta["d1"], meta["d2"], meta["layer"], meta["gamma"]
        self._dtype = schema.STORAGE_DTYPES[schema.dtype_name(meta["dtype"])]
        self._fingerprint = None if meta["fingerprint"] is None else ModelFingerprint(**meta["fingerprint"])
        self._created_at = meta["created_at"]

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("this NeuralDB is closed")

    @property
    def path(self) -> Path | None:
        """The database file, or None for an in-memory database."""
        return self._path

    @property
    def d1(self) -> int:
        return self._d1

    @property
    def d2(self) -> int:
        return self._d2

    @property
    def layer(self) -> int | None:
        return self._layer

    @property
    def dtype(self) -> torch.dtype:
        """The storage dtype of keys and residuals."""
        return self._dtype

    @property
    def fingerprint(self) -> ModelFingerprint | None:
        return self._fingerprint

    @property
    def created_at(self) -> str:
        return self._created_at

    @property
    def version(self) -> int:
        """Counter of applied mutations since this object was opened; a snapshot carries the one it shows."""
        return self._version

    @property
    def gamma(self) -> float:
        """The retrieval gate threshold (cosine)."""
        return self._gamma

    @gamma.setter
    def gamma(self, value: float) -> None:
        _check_settings(self._d1, self._d2, self._layer, value)
        with self._lock:
            self._check_open()
            self._transaction(lambda: schema.write_meta(self._conn, {"gamma": float(value)}))
            self._gamma = float(value)

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        where = "memory" if self._path is None else str(self._path)
        return (f"NeuralDB({where}, facts={len(self._rows_of)}, d1={self._d1}, d2={self._d2}, layer={self._layer}, "
                f"gamma={self._gamma}, dtype={schema.dtype_name(self._dtype)}{', closed' if self._closed else ''})")

    # -- fingerprint ---------------------------------------------------------------------------

    @staticmethod
    def _fingerprint_layer(fingerprint: ModelFingerprint, d1: int, d2: int, layer: int | None) -> int:
        if not isinstance(fingerprint, ModelFingerprint):
            raise TypeError(f"fingerprint must be a ModelFingerprint, got {type(fingerprint).__name__}")
        if (fingerprint.d1, fingerprint.d2) != (d1, d2) or layer not in (None, fingerprint.layer):
            raise ValueError(f"model fingerprint [{fingerprint.describe()}] does not match the database "
                             f"(d1={d1}, d2={d2}, layer={layer})")
        return fingerprint.layer

    def set_fingerprint(self, fingerprint: ModelFingerprint) -> None:
        """Record the model fingerprint (and its layer) of a database that has none yet."""
        with self._lock:
            self._check_open()
            if self._fingerprint is not None:
                raise ValueError(f"the database already has a model fingerprint [{self._fingerprint.describe()}]")
            layer = self._fingerprint_layer(fingerprint, self._d1, self._d2, self._layer)
            self._transaction(lambda: schema.write_meta(
                self._conn, {"fingerprint": dataclasses.asdict(fingerprint), "layer": layer}))
            self._fingerprint, self._layer = fingerprint, layer

    def check_fingerprint(self, fingerprint: ModelFingerprint, *, allow_weight_mismatch: bool = False) -> None:
        """Check that the database suits the model with `fingerprint`.

        ValueError (naming both) when model type, layer or dimensions differ;
        `FingerprintMismatchWarning` when only the weight hash differs, unless `allow_weight_mismatch`.
        A database without a fingerprint is checked on d1, d2 and layer only.
        """
        if not isinstance(fingerprint, ModelFingerprint):
            raise TypeError(f"fingerprint must be a ModelFingerprint, got {type(fingerprint).__name__}")
        if self._fingerprint is None:
            self._fingerprint_layer(fingerprint, self._d1, self._d2, self._layer)
        else:
            check_compatible(self._fingerprint, fingerprint, allow_weight_mismatch=allow_weight_mismatch)

    # -- writing -------------------------------------------------------------------------------

    def _transaction(self, body) -> Any:
        """Run `body()` in one IMMEDIATE transaction: committed entirely or rolled back."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            result = body()
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        return result

    def _reserve(self, extra: int) -> None:
        """Make room in every view before committing, so applying a commit cannot fail on memory."""
        for buffers in self._views.values():
            buffers.reserve(extra)

    def _insert_rows(self, batch: FactBatch, fact_keys: list[torch.Tensor], *, upsert: bool) -> int:
        revision = schema.next_revision(self._conn)
        conflict = (" ON CONFLICT(id) DO UPDATE SET rev = excluded.rev, key = excluded.key, "
                    "residual = excluded.residual, metadata = excluded.metadata") if upsert else ""
        key_blobs = [schema.encode_keys(keys) for keys in fact_keys]
        self._conn.executemany(
            "INSERT INTO facts(id, rev, key, residual, metadata) VALUES (?, ?, ?, ?, ?)" + conflict,
            zip(batch.ids, [revision] * len(batch), key_blobs, schema.encode_rows(batch.residuals), batch.metadata_json))
        return revision

    def add(self, keys: torch.Tensor, residuals: torch.Tensor, ids: str | Sequence[str] | None = None,
            metadata: dict[str, Any] | Sequence[dict[str, Any] | None] | None = None, *,
            extra_keys: torch.Tensor | Sequence[torch.Tensor | None] | None = None) -> list[str]:
        """Add one fact (keys (d1,), residuals (d2,)) or a batch ((n, d1), (n, d2)) in one transaction.

        ids: None (generated uuid4 hex), or one str / n distinct str not yet in the database.
        metadata: None, a mapping, or n mappings (see `StoredFact`); created_at is filled in when absent.
        extra_keys: more keys per fact that retrieve its residual: for one fact a (d1,) / (j, d1)
        tensor, for a batch n entries, each None or such a tensor.
        Returns the ids. On any error nothing is stored.
        """
        batch = prepare_batch(keys, residuals, ids, metadata, d1=self._d1, d2=self._d2, dtype=self._dtype,
                              extra_keys=extra_keys)
        with self._lock:
            self._check_open()
            existing = [fact_id for fact_id in batch.ids if fact_id in self._rows_of]
            if existing:
                raise ValueError(f"{len(existing)} id(s) already in the database, e.g. {existing[0]!r}; "
                                 f"use upsert to replace facts")
            self._add_batch(batch)
        return batch.ids

    def _add_batch(self, batch: FactBatch) -> None:
        fact_keys = [batch.fact_keys(i) for i in range(len(batch))]
        self._reserve(sum(len(k) for k in fact_keys))
        try:
            revision = self._transaction(lambda: self._insert_rows(batch, fact_keys, upsert=False))
        except sqlite3.IntegrityError as error:
            raise ValueError(f"an id of the batch is already in the database file, written by another "
                             f"connection (call refresh()): {error}") from None
        self._apply_append(batch.ids, [revision] * len(batch), fact_keys, batch.residuals)

    def upsert(self, keys: torch.Tensor, residuals: torch.Tensor, ids: str | Sequence[str],
               metadata: dict[str, Any] | Sequence[dict[str, Any] | None] | None = None, *,
               extra_keys: torch.Tensor | Sequence[torch.Tensor | None] | None = None) -> list[str]:
        """Like `add`, but facts whose id exists are replaced (keys, residual and metadata: extra
        keys not given again are dropped). A replaced fact keeps its rows in the views when its
        number of keys is unchanged. ids are required. One transaction; on any error nothing changes."""
        if ids is None:
            raise ValueError("upsert needs the ids of the facts to insert or replace")
        batch = prepare_batch(keys, residuals, ids, metadata, d1=self._d1, d2=self._d2, dtype=self._dtype,
                              extra_keys=extra_keys)
        fact_keys = [batch.fact_keys(i) for i in range(len(batch))]
        with self._lock:
            self._check_open()
            existing = [i for i, fact_id in enumerate(batch.ids) if fact_id in self._rows_of]
            new = [i for i, fact_id in enumerate(batch.ids) if fact_id not in self._rows_of]
            self._reserve(self._rows_to_append(batch.ids, fact_keys))
            revision = self._transaction(lambda: self._insert_rows(batch, fact_keys, upsert=True))
            self._apply_overwrite([batch.ids[i] for i in existing], [revision] * len(existing),
                                  [fact_keys[i] for i in existing], batch.residuals[existing])
            self._apply_append([batch.ids[i] for i in new], [revision] * len(new),
                               [fact_keys[i] for i in new], batch.residuals[new])
        return batch.ids

    def ids_to_delete(self, ids: str | Sequence[str], *, missing_ok: bool = False) -> list[str]:
        """The ids of `ids` that `delete` would delete now, after the checks it makes (TypeError
        for a non-str id, ValueError for a repeated one, KeyError for a missing one unless
        `missing_ok`); changes nothing."""
        if isinstance(ids, str):
            ids = [ids]
        elif not isinstance(ids, Sequence):
            raise TypeError(f"ids must be a str or a sequence of str, got {type(ids).__name__}")
        ids = list(ids)
        for i, fact_id in enumerate(ids):
            if not isinstance(fact_id, str):
                raise TypeError(f"id at position {i} must be a str, got {fact_id!r}")
        if len(set(ids)) != len(ids):
            raise ValueError("duplicate ids in the batch to delete (an id is given twice)")
        with self._lock:
            self._check_open()
            missing = [fact_id for fact_id in ids if fact_id not in self._rows_of]
            if missing and not missing_ok:
                raise KeyError(f"{len(missing)} id(s) not in the database, e.g. {missing[0]!r} "
                               f"(pass missing_ok=True to ignore missing ids)")
            return [fact_id for fact_id in ids if fact_id in self._rows_of]

    def delete(self, ids: str | Sequence[str], *, missing_ok: bool = False) -> list[str]:
        """Delete one fact or a batch in one transaction; returns the ids actually deleted.

        A missing id is a KeyError (and nothing is deleted) unless `missing_ok`; see `ids_to_delete`.
        Views shrink by swap-remove: the last rows move into the holes of the facts' key rows.
        """
        with self._lock:
            present = self.ids_to_delete(ids, missing_ok=missing_ok)
            if not present:
                return []

            def delete_rows() -> None:
                schema.next_revision(self._conn)
                self._conn.executemany("DELETE FROM facts WHERE id = ?", [(fact_id,) for fact_id in present])

            self._transaction(delete_rows)
            self._apply_remove(present)
        return present

    # -- applying committed changes to memory ---------------------------------------------------

    def _unshare_ids(self) -> None:
        """Copy the row -> id list before rewriting it if a live snapshot shares it."""
        if len(self._id_readers):
            self._ids = list(self._ids)
            self._id_readers = weakref.WeakSet()

    def _rows_to_append(self, ids: list[str], fact_keys: list[torch.Tensor]) -> int:
        """The view rows that writing these facts appends: new facts, and replaced facts whose
        number of keys changes (`_apply_overwrite` moves those)."""
        return sum(len(keys) for fact_id, keys in zip(ids, fact_keys)
                   if len(self._rows_of.get(fact_id, ())) != len(keys))

    def _apply_append(self, ids: list[str], revs: list[int], fact_keys: list[torch.Tensor],
                      residuals: torch.Tensor) -> None:
        """Append facts: fact i's (k_i, d1) keys as k_i rows, each with residuals[i]."""
        if not ids:
            return
        for fact_id, rev, keys in zip(ids, revs, fact_keys):
            start = len(self._ids)
            self._rows_of[fact_id] = list(range(start, start + len(keys)))
            self._ids += [fact_id] * len(keys)  # rows beyond every snapshot's count: no copy needed
            self._rev_of[fact_id] = rev
        counts = torch.tensor([len(keys) for keys in fact_keys])
        rows = torch.cat(fact_keys), residuals.repeat_interleave(counts, dim=0)
        for buffers in self._views.values():
            buffers.append(*rows)
        self._version += 1

    def _apply_overwrite(self, ids: list[str], revs: list[int], fact_keys: list[torch.Tensor],
                         residuals: torch.Tensor) -> None:
        """Replace facts in place where their number of keys is unchanged; the others are removed
        and appended anew (`_reserve` must have made room)."""
        same = [i for i, fact_id in enumerate(ids) if len(self._rows_of[fact_id]) == len(fact_keys[i])]
        if same:
            rows = torch.tensor([row for i in same for row in self._rows_of[ids[i]]], dtype=torch.int64)
            counts = torch.tensor([len(fact_keys[i]) for i in same])
            keys = torch.cat([fact_keys[i] for i in same])
            for buffers in self._views.values():
                buffers.overwrite(rows, keys, residuals[same].repeat_interleave(counts, dim=0))
            self._rev_of.update((ids[i], revs[i]) for i in same)
            self._version += 1
        kept = set(same)
        moved = [i for i in range(len(ids)) if i not in kept]
        if moved:
            self._apply_remove([ids[i] for i in moved])
            self._apply_append([ids[i] for i in moved], [revs[i] for i in moved], [fact_keys[i] for i in moved],
                               residuals[moved])

    def _apply_remove(self, ids: list[str]) -> None:
        """Swap-remove: the surviving rows at the end move into the holes of removed rows below the new count."""
        if not ids:
            return
        self._unshare_ids()
        removed = set()
        for fact_id in ids:
            removed.update(self._rows_of.pop(fact_id))
            del self._rev_of[fact_id]
        count = len(self._ids) - len(removed)
        holes = sorted(row for row in removed if row < count)
        movers = [row for row in range(count, len(self._ids)) if row not in removed]
        for hole, mover in zip(holes, movers):
            fact_id = self._ids[mover]
            self._ids[hole] = fact_id
            rows = self._rows_of[fact_id]
            rows[rows.index(mover)] = hole
        del self._ids[count:]
        sources = torch.tensor(movers, dtype=torch.int64)
        targets = torch.tensor(holes, dtype=torch.int64)
        for buffers in self._views.values():
            buffers.move_and_truncate(sources, targets, count)
        self._version += 1

    # -- reading -------------------------------------------------------------------------------

    def __len__(self) -> int:
        """The number of facts (see `key_rows` for the rows retrieval scans)."""
        return len(self._rows_of)

    @property
    def key_rows(self) -> int:
        """The number of key rows of every view: the facts' keys, extra keys included."""
        return len(self._ids)

    def __contains__(self, fact_id: object) -> bool:
        return fact_id in self._rows_of

    def __iter__(self) -> Iterator[str]:
        """The fact ids as of the start of the iteration (each once)."""
        with self._lock:
            return iter(list(self._rows_of))

    def get(self, fact_id: str) -> StoredFact:
        """The fact with this id, read from the database file; KeyError if absent."""
        with self._lock:
            self._check_open()
            if fact_id not in self._rows_of:
                raise KeyError(f"no fact with id {fact_id!r}")
            row = self._conn.execute("SELECT key, residual, metadata FROM facts WHERE id = ?", (fact_id,)).fetchone()
        if row is None:
            raise KeyError(f"fact {fact_id!r} was deleted by another connection; call refresh()")
        return StoredFact(fact_id, schema.decode_keys(row[0], self._d1, self._dtype, fact_id),
                          schema.decode_rows([row[1]], torch.empty((1, self._d2), dtype=self._dtype))[0],
                          json.loads(row[2]))

    def facts(self) -> Iterator[StoredFact]:
        """Every fact (see `get`), as of the start of the iteration."""
        for fact_id in iter(self):
            if fact_id in self._rows_of:
                yield self.get(fact_id)

    def ids_at(self, indices: torch.Tensor | Sequence[int]) -> list[str | None]:
        """Fact ids of view rows `indices` in the CURRENT state (None for -1). To map the output of a
        retrieval over an earlier view exactly, use that view's `snapshot().ids_at`."""
        with self._lock:
            return _ids_at(self._ids, len(self._ids), indices)

    def snapshot(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Snapshot:
        """An immutable view (K, R, row → id, version) on `device` (default CPU) in `dtype`
        (default the storage dtype). The (device, dtype) buffers are built on first request and kept
        in sync afterwards; `clear_views` frees them."""
        device = _normalise_device(device)
        dtype = self._dtype if dtype is None else dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"view dtype must be a floating torch.dtype, got {dtype!r}")
        with self._lock:
            self._check_open()
            buffers = self._views.get((device, dtype))
            if buffers is None:
                keys, residuals = self._views[self._master_key].snapshot()
                buffers = ViewBuffers.copy_of(keys.to(device, dtype), residuals.to(device, dtype))
                self._views[(device, dtype)] = buffers
            keys, residuals = buffers.snapshot()
            snap = Snapshot(keys, residuals, self._version, self._ids)
            self._id_readers.add(snap)
            return snap

    def view(self, device: torch.device | str | None = None,
             dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(K (m, d1), R (m, d2)) for gated_retrieve: `snapshot(device, dtype)` without the ids."""
        snap = self.snapshot(device, dtype)
        return snap.keys, snap.residuals

    def clear_views(self) -> None:
        """Free every cached view except the CPU one in the storage dtype (snapshots stay valid)."""
        with self._lock:
            self._views = {self._master_key: self._views[self._master_key]}

    def search(self, q: torch.Tensor, k: int = 5) -> list[SearchHit]:
        """The `k` facts whose keys have the highest cosine with the query `q` (d1,), best first
        (a fact with several keys counts with its best; ties: lower view row first); cosines
        computed in float32 from the stored keys."""
        if not isinstance(q, torch.Tensor) or not q.dtype.is_floating_point:
            raise TypeError(f"q must be a floating torch.Tensor, got {type(q).__name__}")
        if q.shape != (self._d1,):
            raise ValueError(f"q must have shape ({self._d1},), got {tuple(q.shape)}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        query = q.detach().to("cpu", torch.float32)
        if not torch.isfinite(query).all() or not query.any():
            raise ValueError("q must be finite with a non-zero norm")
        query = query / query.norm()
        snap = self.snapshot()
        scores = torch.empty(snap.keys.shape[0])
        for start in range(0, snap.keys.shape[0], _SEARCH_CHUNK):
            chunk = snap.keys[start : start + _SEARCH_CHUNK].float()
            scores[start : start + chunk.shape[0]] = (chunk @ query) / chunk.norm(dim=1)
        ids, best = [], []
        for row in torch.sort(scores, descending=True, stable=True).indices.tolist():
            fact_id = snap.ids_at([row])[0]
            if fact_id not in ids:
                ids.append(fact_id)
                best.append(float(scores[row]))
                if len(ids) == k:
                    break
        metadata = self._metadata_of(ids)
        return [SearchHit(fact_id, score, metadata[fact_id]) for fact_id, score in zip(ids, best)]

    def metadata_where(self, field: str, values: Iterable[str | int | float]) -> dict[str, dict[str, Any]]:
        """{id: metadata} of the facts whose metadata[field] equals one of `values` (JSON strings or
        numbers), read from the database file (one scan per 500 values)."""
        if not isinstance(field, str) or not field or '"' in field:
            raise ValueError(f"field must be a non-empty str without '\"', got {field!r}")
        values = list(dict.fromkeys(values))
        for value in values:
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise TypeError(f"values must be str, int or float, got {value!r}")
        found: dict[str, dict[str, Any]] = {}
        with self._lock:
            self._check_open()
            for start in range(0, len(values), _SQL_CHUNK):
                chunk = values[start : start + _SQL_CHUNK]
                query = (f"SELECT id, metadata FROM facts WHERE json_extract(metadata, ?) "
                         f"IN ({','.join('?' * len(chunk))}) ORDER BY seq")
                found.update((fact_id, json.loads(text))
                             for fact_id, text in self._conn.execute(query, [f'$."{field}"', *chunk]))
        return found

    def _metadata_of(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        with self._lock:
            self._check_open()
            for start in range(0, len(ids), _SQL_CHUNK):
                chunk = ids[start : start + _SQL_CHUNK]
                query = f"SELECT id, metadata FROM facts WHERE id IN ({','.join('?' * len(chunk))})"
                found.update((fact_id, json.loads(text)) for fact_id, text in self._conn.execute(query, chunk))
        missing = [fact_id for fact_id in ids if fact_id not in found]
        if missing:
            raise KeyError(f"fact {missing[0]!r} was deleted by another connection; call refresh()")
        return found

    # -- other processes -----------------------------------------------------------------------

    def refresh(self) -> bool:
        """Apply what other connections committed since this one last looked; True if anything changed."""
        with self._lock:
            self._check_open()
            self._conn.execute("BEGIN")
            try:
                data_version = self._conn.execute("PRAGMA data_version").fetchone()[0]
                if data_version == self._data_version:
                    return False
                self._data_version = data_version
                self._load_meta(schema.read_meta(self._conn, str(self._path)))
                on_disk = dict(self._conn.execute("SELECT id, rev FROM facts"))
                removed = [fact_id for fact_id in self._rows_of if fact_id not in on_disk]
                written = [fact_id for fact_id, rev in on_disk.items() if self._rev_of.get(fact_id) != rev]
                rows: dict[str, tuple[bytes, bytes]] = {}
                for start in range(0, len(written), _SQL_CHUNK):
                    chunk = written[start : start + _SQL_CHUNK]
                    query = f"SELECT id, key, residual FROM facts WHERE id IN ({','.join('?' * len(chunk))})"
                    rows.update((fact_id, (key, residual)) for fact_id, key, residual in self._conn.execute(query, chunk))
            finally:
                self._conn.execute("COMMIT")
            updated = [fact_id for fact_id in written if fact_id in self._rows_of]
            new = [fact_id for fact_id in written if fact_id not in self._rows_of]

            def decoded(ids: list[str]) -> tuple[list[torch.Tensor], torch.Tensor]:
                keys = [schema.decode_keys(rows[i][0], self._d1, self._dtype, i) for i in ids]
                residuals = schema.decode_rows((rows[i][1] for i in ids),
                                               torch.empty((len(ids), self._d2), dtype=self._dtype))
                return keys, residuals

            updated_rows, new_rows = decoded(updated), decoded(new)
            self._apply_remove(removed)
            self._reserve(self._rows_to_append(updated + new, updated_rows[0] + new_rows[0]))
            self._apply_overwrite(updated, [on_disk[i] for i in updated], *updated_rows)
            self._apply_append(new, [on_disk[i] for i in new], *new_rows)
            return bool(removed or written)

    # -- copies --------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write a complete, consistent copy of the database to `path` (FileExistsError if it exists)."""
        path = Path(path)
        if os.path.lexists(path):
            raise FileExistsError(f"{path} already exists; NeuralDB.save never overwrites")
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            with self._lock:
                self._check_open()
                target = sqlite3.connect(temporary, isolation_level=None)
                try:
                    self._conn.backup(target)
                    target.execute("PRAGMA journal_mode=WAL")
                finally:
                    target.close()
            os.link(temporary, path)  # fails instead of overwriting a file created meanwhile
        finally:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{temporary}{suffix}").unlink(missing_ok=True)

    def export(self, file: str | os.PathLike) -> Path:
        """Write `file` (.safetensors: "keys" (r, d1), every fact's keys in turn, and "residuals"
        (m, d2), one per fact, in the storage dtype) and its sidecar `file` with suffix .json (ids,
        key counts, metadata, settings, format version, the safetensors file's SHA-256). Returns
        the sidecar path. Never overwrites."""
        with self._lock:
            self._check_open()
            snap = self.snapshot()
            ids = list(self._rows_of)
            rows = [list(self._rows_of[fact_id]) for fact_id in ids]
            metadata = self._metadata_of(ids)
        key_rows = torch.tensor([row for fact_rows in rows for row in fact_rows], dtype=torch.int64)
        first_rows = torch.tensor([fact_rows[0] for fact_rows in rows], dtype=torch.int64)
        settings = {"d1": self._d1, "d2": self._d2, "layer": self._layer, "gamma": self._gamma,
                    "dtype": schema.dtype_name(self._dtype),
                    "fingerprint": None if self._fingerprint is None else dataclasses.asdict(self._fingerprint)}
        return write_export(Path(file), snap.keys[key_rows], snap.residuals[first_rows],
                            [len(fact_rows) for fact_rows in rows], ids, [metadata[i] for i in ids], settings)

    @classmethod
    def import_(cls, file: str | os.PathLike, path: str | os.PathLike | None = None) -> "NeuralDB":
        """Create a database (in memory, or at `path`) from an export written by `export`, after
        validating both files completely."""
        settings, keys, residuals, key_counts, ids, metadata = read_export(Path(file))
        starts = [0]
        for count in key_counts[:-1]:
            starts.append(starts[-1] + count)
        batch = prepare_batch(keys[starts] if ids else keys, residuals, ids, metadata, d1=settings["d1"],
                              d2=settings["d2"], dtype=schema.STORAGE_DTYPES[settings["dtype"]],
                              extra_keys=[keys[start + 1 : start + count] for start, count in zip(starts, key_counts)])
        fingerprint = None if settings["fingerprint"] is None else ModelFingerprint(**settings["fingerprint"])
        db = cls(path, d1=settings["d1"], d2=settings["d2"], layer=settings["layer"], gamma=settings["gamma"],
                 dtype=settings["dtype"], fingerprint=fingerprint)
        try:
            with db._lock:
                db._add_batch(batch)
        except BaseException:
            db.close()
            if path is not None:
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{os.fspath(path)}{suffix}").unlink(missing_ok=True)
            raise
        return db

    # -- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the database file and free the views (snapshots already taken stay valid)."""
        with self._lock:
            if not self._closed:
                self._conn.close()
                self._views.clear()
                self._closed = True

    def __enter__(self) -> "NeuralDB":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
