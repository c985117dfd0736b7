"""`NeuralDB`: a durable, incremental store of facts (id, keys, residual, metadata) with live
retrieval views; the transactional front over the modules that do the work.

A fact has one residual and k >= 1 keys: its own key, plus any extra keys (other queries that
must retrieve the same residual, e.g. the Editor's bare-prompt key). Retrieval sees key rows:
a fact with k keys is k rows of every view, each with the fact's residual. Each key row has a
gate threshold: the fact's own for that key (`key_gammas`), or the database's `gamma` when the
fact has none; snapshots carry them as `Snapshot.gammas`, aligned with K.

The files are the source of truth (format in FORMAT.md): SQLite (schema.py; older versions migrated
by migrations.py) holds ids, settings, metadata, thresholds and pointers into the vector file
(vectors.py: `NAME-vectors`, append-only slots of key + residual, synced before the rows that use
them commit). Every add / upsert / delete call is one transaction, committed before memory changes
(memory.py): the row order (rows.py: row i of every view is a key row of fact `ids[i]`,
swap-remove on delete) and one view per (device, dtype) (view.py, which also keeps the codes of
the compressed key indexes `key_index` hands out and tells key-row listeners of every change),
the (CPU, storage dtype) one loaded in bulk at open (sync.py, which also reads what `refresh` applies). Every fact read from the files is
checked (integrity.py); `search` is search.py, export / import exchange.py, `save` copies.py.

Snapshot semantics: `view()` / `snapshot()` return tensors that never change afterwards, however
the database is mutated later (see view.py). A snapshot is taken under the database lock, so it
never shows a half-applied batch. Readers may keep and use it without holding any lock.

Thread safety: every public method takes one re-entrant lock; several threads may share a NeuralDB.
Several processes may open the same file: each sees the committed state at open, and `refresh()`
picks up what other processes committed since. One writing process at a time is the intended use.

A database is untrusted input: `open` checks the schema is exactly ours, every meta value, the
vector file's header and every fact (checksum, slot ranges, finite values, key norms) and refuses a
corrupt fact by its id.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from ..ops.key_index import KeyIndex, format_name, fp8_unsupported_reason
from . import schema, sync
from .copies import copy_database
from .exchange import read_import, write_export
from .facts import FactBatch, StoredFact, prepare_batch
from .fingerprint import ModelFingerprint, check_compatible
from .integrity import IntegrityReport, fact_checksum, verified_fact, verify_rows
from .migrations import migrate
from .memory import LiveFacts
from .rows import ids_at
from .search import top_facts
from .vectors import VectorFile, fact_slots, new_vectors_id, vectors_path
from .view import KeyRowsListener

_T = TypeVar("_T")


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
    key (m >= the number of facts); row i is a key of fact `ids_at([i])[0]`. gammas: (m,) float32
    on the same device, the gate threshold of each key row: its fact's own threshold for that key,
    else `gamma`, the database's gamma when the snapshot was taken. has_key_gammas: whether any
    fact has thresholds of its own (when not, every entry of `gammas` is `gamma`). version: the
    database version the snapshot shows.
    """

    keys: torch.Tensor
    residuals: torch.Tensor
    gammas: torch.Tensor
    gamma: float
    has_key_gammas: bool
    version: int
    _ids: list[str] = dataclasses.field(repr=False)

    def ids_at(self, indices: torch.Tensor | Sequence[int]) -> list[str | None]:
        """Fact ids of row `indices` (e.g. the `index` output of gated_retrieve); None for -1."""
        return ids_at(self._ids, self.keys.shape[0], indices)


def _check_settings(d1: Any, d2: Any, layer: Any, gamma: Any) -> None:
    problem = schema.settings_problem(d1, d2, layer, gamma)
    if problem:
        raise ValueError(problem)


def _normalise_device(device: torch.device | str | None) -> torch.device:
    device = torch.device("cpu" if device is None else device)
    if device.type != "cpu" and device.index is None:
        device = torch.empty(0, device=device).device  # the current device of that type
    return device


class NeuralDB:
    """A database of facts for one edited layer: keys (d1), residuals (d2), metadata.

    `NeuralDB(path=None, *, d1, d2, layer=None, gamma=0.65, dtype=torch.float32, fingerprint=None)`
    creates a database (in memory when `path` is None; FileExistsError if `path` exists);
    `NeuralDB.open(path)` opens one; `NeuralDB.for_model(model)` creates one sized for a model.
    Storage dtype: float32, float16 or bfloat16. gamma: the gate threshold, a cosine in [-1, 1].
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
        if path is not None and os.path.lexists(vectors_path(path)):
            raise FileExistsError(f"{vectors_path(path)} already exists (the vector file of another database, or "
                                  f"one left behind): move it away to create a database at {os.fspath(path)}")
        vectors_id = new_vectors_id()
        vectors = VectorFile.create(None if path is None else vectors_path(path), d1=d1, d2=d2, dtype_name=name,
                                    vectors_id=vectors_id)
        try:
            with schema.sqlite_errors("database" if path is None else os.fspath(path)):
                conn = schema.connect(path)
                try:
                    if path is not None:
                        schema.configure_file(conn)
                    fingerprint_json = None if fingerprint is None else dataclasses.asdict(fingerprint)
                    schema.create(conn, {"d1": d1, "d2": d2, "layer": layer, "gamma": float(gamma), "dtype": name,
                                         "fingerprint": fingerprint_json, "vectors_id": vectors_id, "vector_slots": 0})
                except BaseException:
                    conn.close()
                    if path is not None:
                        schema.remove_database_files(path)
                    raise
        except BaseException:
            vectors.close()
            raise
        self._attach(conn, path, readonly=False, vectors=vectors)

    @classmethod
    def open(cls, path: str | os.PathLike, *, readonly: bool = False, fingerprint: ModelFingerprint | None = None,
             allow_weight_mismatch: bool = False) -> "NeuralDB":
        """Open the database at `path`; with `fingerprint`, run `check_fingerprint` on it first.

        The file is checked completely (FORMAT.md, "Validation on open"): CorruptDatabaseError (a
        ValueError naming the file and, for a bad row, the fact) if anything is not as NeuralDB
        writes it. An older format version is migrated in one transaction (unless `readonly`).
        readonly: never write the file (works on read-only files, directories and mounts); add,
        upsert, delete, the gamma setter and set_fingerprint then raise PermissionError.
        """
        where = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no NeuralDB database at {where}")
        with schema.sqlite_errors(where):
            conn = schema.connect(path, readonly=readonly)
            try:
                try:
                    meta = schema.read_meta(conn, where)  # checks it is a NeuralDB before changing anything
                except sqlite3.OperationalError:
                    if not readonly:
                        raise
                    # no -wal/-shm files and no right to create them (a read-only directory or medium):
                    # read the file as immutable, which needs neither
                    conn.close()
                    conn = schema.connect(path, readonly=True, immutable=True)
                    meta = schema.read_meta(conn, where)
                if readonly:
                    if meta["format_version"] < schema.FORMAT_VERSION:
                        raise ValueError(f"{where} uses NeuralDB format version {meta['format_version']}; open it "
                                         f"once without readonly=True to migrate it to version {schema.FORMAT_VERSION}")
                else:
                    schema.configure_file(conn)
                    if meta["format_version"] < schema.FORMAT_VERSION:
                        migrate(conn, Path(path))
            except BaseException:
                conn.close()
                raise
        db = cls.__new__(cls)
        db._attach(conn, path, readonly=readonly)
        if fingerprint is not None:
            try:
                db.check_fingerprint(fingerprint, allow_weight_mismatch=allow_weight_mismatch)
            except BaseException:
                db.close()
                raise
        return db

    @classmethod
    def for_model(cls, model: torch.nn.Module, *, layer: int | None = None, gamma: float | None = None,
                  path: str | os.PathLike | None = None, module_path: str | None = None,
                  dtype: torch.dtype | str = torch.float32) -> "NeuralDB":
        """A new database for `model`: d1, d2 from its down-projection at `layer`, the model
        fingerprint recorded, layer and gamma from the model's editing preset where not given
        (`editing.hparams.preset_for`; gamma 0.65 when the preset has none). module_path: the
        down-projection's path for models outside the built-in table (see `integration.attach`)."""
        # imported here: the store never needs a model library unless asked to inspect a model
        from ..editing.hparams import preset_for
        from ..integration import down_proj_dims, model_fingerprint

        preset = preset_for(model, module_path)
        layer = preset["layer"] if layer is None else layer
        gamma = preset.get("gamma", 0.65) if gamma is None else gamma
        _check_settings(1, 1, layer, gamma)
        d1, d2 = down_proj_dims(model, layer, module_path)
        return cls(path, d1=d1, d2=d2, layer=layer, gamma=gamma, dtype=dtype,
                   fingerprint=model_fingerprint(model, layer, module_path))

    # -- state ---------------------------------------------------------------------------------

    def _attach(self, conn: sqlite3.Connection, path: str | os.PathLike | None, *, readonly: bool,
                vectors: VectorFile | None = None) -> None:
        """Read settings and all facts in one read transaction and build the CPU view; `vectors`:
        the vector file of a database just created (else the one beside `path` is opened)."""
        self._conn = conn
        self._path = None if path is None else Path(path)
        self._where = "database" if path is None else os.fspath(path)
        self._readonly = readonly
        self._lock = threading.RLock()
        self._closed = False
        self._vectors = vectors
        try:
            with schema.sqlite_errors(self._where):
                conn.execute("BEGIN")
                try:
                    meta = schema.read_meta(conn, self._where)
                    self._load_meta(meta)
                    if self._vectors is None:
                        self._vectors = VectorFile.open(vectors_path(path), d1=self._d1, d2=self._d2,
                                                        dtype_name=meta["dtype"], vectors_id=meta["vectors_id"],
                                                        readonly=readonly, database=self._where)
                    loaded = sync.load_all(conn, self._vectors, meta["vector_slots"], self._where)
                    self._data_version = conn.execute("PRAGMA data_version").fetchone()[0]
                finally:
                    conn.execute("COMMIT")
        except BaseException:
            conn.close()
            if self._vectors is not None:
                self._vectors.close()
            raise
        self._live = LiveFacts(loaded, self._dtype, self._gamma)

    def _load_meta(self, meta: dict[str, Any]) -> None:
        self._d1, self._d2, self._layer, self._gamma = meta["d1"], meta["d2"], meta["layer"], meta["gamma"]
        self._dtype = schema.STORAGE_DTYPES[meta["dtype"]]
        self._fingerprint = None if meta["fingerprint"] is None else ModelFingerprint(**meta["fingerprint"])
        self._created_at = meta["created_at"]

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("this NeuralDB is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if self._readonly:
            raise PermissionError(f"{self._where} was opened with readonly=True; open it without to change it")

    @property
    def path(self) -> Path | None:
        """The database file, or None for an in-memory database."""
        return self._path

    @property
    def readonly(self) -> bool:
        return self._readonly

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
        return self._live.version

    @property
    def gamma(self) -> float:
        """The retrieval gate threshold (cosine, in [-1, 1]) of every key without a threshold of its
        own (see `key_gammas` of `add`); setting it changes those keys' thresholds in every view."""
        return self._gamma

    @gamma.setter
    def gamma(self, value: float) -> None:
        _check_settings(self._d1, self._d2, self._layer, value)
        with self._lock:
            self._check_writable()
            self._transaction(lambda: schema.write_meta(self._conn, {"gamma": float(value)}))
            self._gamma = float(value)
            self._live.set_default_gamma(self._gamma)

    @property
    def has_key_gammas(self) -> bool:
        """Whether any fact has per-key thresholds of its own (else every key uses `gamma`)."""
        return bool(self._live.with_key_gammas)

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        where = "memory" if self._path is None else str(self._path)
        return (f"NeuralDB({where}, facts={len(self)}, d1={self._d1}, d2={self._d2}, layer={self._layer}, "
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
            self._check_writable()
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

    def _transaction(self, body: Callable[[], _T]) -> _T:
        """Run `body()` in one IMMEDIATE transaction: committed entirely or rolled back. The error
        raised is the one that stopped it (a failed COMMIT, e.g. a full disk, included)."""
        with schema.sqlite_errors(self._where):
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                result = body()
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:  # SQLite already rolled back after some failed COMMITs
                    try:
                        self._conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass  # the original error says what went wrong; this one would hide it
                raise
        return result

    def _insert_rows(self, batch: FactBatch, fact_keys: list[torch.Tensor], *, upsert: bool) -> int:
        """Write the batch's rows (inside the write transaction): new slots appended to the vector
        file at `vector_slots` and synced before the rows that point at them; a replaced fact whose
        slots would be byte for byte the same keeps its slots."""
        revision = schema.next_revision(self._conn)
        first = json.loads(self._conn.execute("SELECT value FROM meta WHERE name = 'vector_slots'").fetchone()[0])
        stored = schema.slots_of(self._conn, batch.ids) if upsert else {}
        slots = [fact_slots(keys, batch.residuals[i]) for i, keys in enumerate(fact_keys)]
        data = [fact.contiguous().view(torch.uint8).numpy().tobytes() for fact in slots]
        positions, appended, end = [], [], first
        for fact_id, fact, blob in zip(batch.ids, slots, data):
            slot, count = stored.get(fact_id, (None, 0))
            if slot is not None and count == len(fact) and self._vectors.read_bytes(slot, count) == blob:
                positions.append(slot)
            else:
                positions.append(end)
                appended.append(fact)
                end += len(fact)
        if appended:
            self._vectors.write(first, torch.cat(appended))
            schema.write_meta(self._conn, {"vector_slots": end})
        gamma_blobs = [schema.encode_key_gammas(gammas) for gammas in batch.key_gammas]
        checksums = [fact_checksum(*row) for row in zip(batch.ids, batch.metadata_json, gamma_blobs, data)]
        schema.write_facts(self._conn, zip(batch.ids, [revision] * len(batch), positions,
                                           [len(keys) for keys in fact_keys], gamma_blobs, batch.metadata_json,
                                           checksums), replace=upsert)
        return revision

    def add(self, keys: torch.Tensor, residuals: torch.Tensor, ids: str | Sequence[str] | None = None,
            metadata: dict[str, Any] | Sequence[dict[str, Any] | None] | None = None, *,
            extra_keys: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
            key_gammas: torch.Tensor | Sequence[torch.Tensor | None] | None = None) -> list[str]:
        """Add one fact (keys (d1,), residuals (d2,)) or a batch ((n, d1), (n, d2)) in one transaction.

        ids: None (generated uuid4 hex), or one str / n distinct str not yet in the database.
        metadata: None, a mapping, or n mappings (see `StoredFact`); created_at is filled in when absent.
        extra_keys: more keys per fact that retrieve its residual: for one fact a (d1,) / (j, d1)
        tensor, for a batch n entries, each None or such a tensor.
        key_gammas: the gate threshold of each key (a cosine in [-1, 1], stored as float32): None
        (every key uses the database's `gamma`, also after it changes); for one fact a (1 + j,)
        tensor, its own key's first; for a batch n entries, each None or such a tensor.
        Returns the ids. On any error nothing is stored.
        """
        batch = prepare_batch(keys, residuals, ids, metadata, d1=self._d1, d2=self._d2, dtype=self._dtype,
                              extra_keys=extra_keys, key_gammas=key_gammas)
        with self._lock:
            self._check_writable()
            existing = [fact_id for fact_id in batch.ids if fact_id in self._live]
            if existing:
                raise ValueError(f"{len(existing)} id(s) already in the database, e.g. {existing[0]!r}; "
                                 f"use upsert to replace facts")
            self._add_batch(batch)
        return batch.ids

    def _add_batch(self, batch: FactBatch) -> None:
        fact_keys = [batch.fact_keys(i) for i in range(len(batch))]
        self._live.reserve(batch.ids, fact_keys)
        try:
            revision = self._transaction(lambda: self._insert_rows(batch, fact_keys, upsert=False))
        except sqlite3.IntegrityError as error:
            raise ValueError(f"an id of the batch is already in the database file, written by another "
                             f"connection (call refresh()): {error}") from None
        self._live.append(batch.ids, [revision] * len(batch), fact_keys, batch.residuals, batch.key_gammas)

    def upsert(self, keys: torch.Tensor, residuals: torch.Tensor, ids: str | Sequence[str],
               metadata: dict[str, Any] | Sequence[dict[str, Any] | None] | None = None, *,
               extra_keys: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
               key_gammas: torch.Tensor | Sequence[torch.Tensor | None] | None = None) -> list[str]:
        """Like `add`, but facts whose id exists are replaced (keys, residual, metadata and key
        thresholds: extra keys or thresholds not given again are dropped). A replaced fact keeps its
        rows in the views when its number of keys is unchanged. ids are required. One transaction; on any error nothing changes."""
        if ids is None:
            raise ValueError("upsert needs the ids of the facts to insert or replace")
        batch = prepare_batch(keys, residuals, ids, metadata, d1=self._d1, d2=self._d2, dtype=self._dtype,
                              extra_keys=extra_keys, key_gammas=key_gammas)
        fact_keys = [batch.fact_keys(i) for i in range(len(batch))]
        with self._lock:
            self._check_writable()
            self._live.reserve(batch.ids, fact_keys)
            revision = self._transaction(lambda: self._insert_rows(batch, fact_keys, upsert=True))
            self._live.write(batch.ids, [revision] * len(batch), fact_keys, batch.residuals, batch.key_gammas)
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
            missing = [fact_id for fact_id in ids if fact_id not in self._live]
            if missing and not missing_ok:
                raise KeyError(f"{len(missing)} id(s) not in the database, e.g. {missing[0]!r} "
                               f"(pass missing_ok=True to ignore missing ids)")
            return [fact_id for fact_id in ids if fact_id in self._live]

    def delete(self, ids: str | Sequence[str], *, missing_ok: bool = False) -> list[str]:
        """Delete one fact or a batch in one transaction; returns the ids actually deleted.

        A missing id is a KeyError (and nothing is deleted) unless `missing_ok`; see `ids_to_delete`.
        Views shrink by swap-remove: the last rows move into the holes of the facts' key rows.
        """
        with self._lock:
            present = self.ids_to_delete(ids, missing_ok=missing_ok)
            if not present:
                return []
            self._check_writable()

            self._transaction(lambda: schema.delete_facts(self._conn, present))
            self._live.remove(present)
        return present

    # -- reading -------------------------------------------------------------------------------

    def __len__(self) -> int:
        """The number of facts (see `key_rows` for the rows retrieval scans)."""
        return len(self._live.rows)

    @property
    def key_rows(self) -> int:
        """The number of key rows of every view: the facts' keys, extra keys included."""
        return self._live.rows.row_count

    def __contains__(self, fact_id: object) -> bool:
        return fact_id in self._live

    def __iter__(self) -> Iterator[str]:
        """The fact ids as of the start of the iteration (each once)."""
        with self._lock:
            return iter(list(self._live.rows.rows_of))

    def get(self, fact_id: str) -> StoredFact:
        """The fact with this id, read from the database file and checked; KeyError if absent."""
        with self._lock:
            self._check_open()
            if fact_id not in self._live:
                raise KeyError(f"no fact with id {fact_id!r}")
            with schema.sqlite_errors(self._where):
                row = next(schema.fact_rows(self._conn, [fact_id]), None)
            if row is None:
                raise KeyError(f"fact {fact_id!r} was deleted by another connection; call refresh()")
            keys, residual, key_gammas = verified_fact(row, self._vectors, self._vectors.slot_count(), self._where)
        return StoredFact(fact_id, keys, residual[0], json.loads(row[5]), key_gammas)

    def facts(self) -> Iterator[StoredFact]:
        """Every fact (see `get`), as of the start of the iteration."""
        for fact_id in iter(self):
            if fact_id in self._live:
                yield self.get(fact_id)

    def ids_at(self, indices: torch.Tensor | Sequence[int]) -> list[str | None]:
        """Fact ids of view rows `indices` in the CURRENT state (None for -1). To map the output of a
        retrieval over an earlier view exactly, use that view's `snapshot().ids_at`."""
        with self._lock:
            return ids_at(self._live.rows.ids, self._live.rows.row_count, indices)

    def snapshot(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Snapshot:
        """An immutable view (K, R, the float32 threshold of every key row, row → id, version) on
        `device` (default CPU), K and R in `dtype` (default the storage dtype). The (device,
        dtype) buffers are built on first request and kept in sync afterwards; `clear_views` frees
        them."""
        device = _normalise_device(device)
        dtype = self._dtype if dtype is None else dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"view dtype must be a floating torch.dtype, got {dtype!r}")
        with self._lock:
            self._check_open()
            keys, residuals, gammas = self._live.views.snapshot(device, dtype)
            snap = Snapshot(keys, residuals, gammas, self._gamma, bool(self._live.with_key_gammas), self._live.version,
                            self._live.rows.ids)
            self._live.rows.share_ids(snap)
            return snap

    def view(self, device: torch.device | str | None = None,
             dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(K (m, d1), R (m, d2)) for gated_retrieve: `snapshot(device, dtype)` without the ids
        and thresholds (`snapshot().gammas` are the per-key thresholds aligned with K)."""
        snap = self.snapshot(device, dtype)
        return snap.keys, snap.residuals

    def key_index(self, snapshot: Snapshot, key_format: str | torch.dtype = "int8") -> KeyIndex:
        """The compressed key index of `snapshot`'s keys (ops/key_index.py: codes in `key_format`,
        "int8" or "fp8_e4m3" / torch.int8 or torch.float8_e4m3fn), for `gated_retrieve(q, index,
        snapshot.residuals, gamma)`: row i encodes `snapshot.keys[i]`, and `index.keys` is
        `snapshot.keys` itself. The store keeps the codes of each (device, key dtype, format)
        requested in sync with that view (built on first request, O(m); then O(d1) per row added
        or replaced, swap-remove on delete, copy-on-write like the views), so while the snapshot's
        keys are current this is O(1); for keys that changed since (or a view freed by
        `clear_views`) the index is built from `snapshot.keys` (O(m)). Either way it equals
        `KeyIndex.from_keys(snapshot.keys, codes=key_format)` and never changes afterwards.
        ValueError for an unknown format, or fp8_e4m3 codes where the keys' device has no fp8."""
        if not isinstance(snapshot, Snapshot):
            raise TypeError(f"snapshot must be a Snapshot of this database, got {type(snapshot).__name__}")
        fmt = format_name(key_format)
        if fmt == "fp8_e4m3" and fp8_unsupported_reason(snapshot.keys.device) is not None:
            raise ValueError(f"key_index: {fp8_unsupported_reason(snapshot.keys.device)}")
        with self._lock:
            self._check_open()
            index = self._live.views.key_index(snapshot.keys, fmt)
        return KeyIndex.from_keys(snapshot.keys, codes=fmt) if index is None else index

    def add_key_listener(self, listener: KeyRowsListener) -> None:
        """Keep `listener`, which starts with no rows, in sync with the key rows of the views (see
        `KeyRowsListener`): it is first given the current rows (`append` of all m keys, CPU, storage
        dtype), then every append, replacement and swap-remove as it happens (adds, upserts,
        deletes, refresh). The hook for a structure indexed by view row, such as a compressed key
        index with the same append / overwrite / move_and_truncate semantics."""
        with self._lock:
            self._check_open()
            listener.append(self.snapshot().keys)
            self._live.views.listeners.append(listener)

    def remove_key_listener(self, listener: KeyRowsListener) -> None:
        """Stop telling `listener` of changes (ValueError if it was not added)."""
        with self._lock:
            self._live.views.listeners.remove(listener)

    def clear_views(self) -> None:
        """Free every cached view except the CPU one in the storage dtype (snapshots stay valid)."""
        with self._lock:
            self._live.views.clear()

    def search(self, q: torch.Tensor, k: int = 5) -> list[SearchHit]:
        """The `k` facts whose keys have the highest cosine with the query `q` (d1,), best first
        (a fact with several keys counts with its best; ties: lower view row first); cosines
        computed in float32 from the stored keys by the op's reference backend. One consistent state: the facts, their scores and
        their metadata are read under the lock, so a concurrent delete cannot tear the answer."""
        if not isinstance(q, torch.Tensor) or not q.dtype.is_floating_point:
            raise TypeError(f"q must be a floating torch.Tensor, got {type(q).__name__}")
        if q.shape != (self._d1,):
            raise ValueError(f"q must have shape ({self._d1},), got {tuple(q.shape)}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        query = q.detach().to("cpu", torch.float32)
        if not torch.isfinite(query).all() or not query.any():
            raise ValueError("q must be finite with a non-zero norm")
        with self._lock:
            snap = self.snapshot()
            best = top_facts(snap.keys, snap._ids, query, k)
            metadata = self._metadata_of([fact_id for fact_id, _ in best])
        return [SearchHit(fact_id, score, metadata[fact_id]) for fact_id, score in best]

    def metadata_where(self, field: str, values: Iterable[str | int | float]) -> dict[str, dict[str, Any]]:
        """{id: metadata} of the facts whose metadata[field] equals one of `values` (JSON strings or
        numbers), read from the database file (one scan per 500 values, see `schema.metadata_where`)."""
        if not isinstance(field, str) or not field or '"' in field:
            raise ValueError(f"field must be a non-empty str without '\"', got {field!r}")
        values = list(dict.fromkeys(values))
        for value in values:
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise TypeError(f"values must be str, int or float, got {value!r}")
        with self._lock, schema.sqlite_errors(self._where):
            self._check_open()
            return {fact_id: json.loads(text) for fact_id, text in schema.metadata_where(self._conn, field, values)}

    def metadata(self) -> dict[str, dict[str, Any]]:
        """{id: metadata} of every fact this connection sees that the file still holds (`refresh()`
        first to see other connections' writes), in insertion order: one read of the metadata
        column, no vectors (cheaper than `facts()` when only metadata is needed)."""
        with self._lock, schema.sqlite_errors(self._where):
            self._check_open()
            return {fact_id: json.loads(text) for fact_id, text in schema.all_metadata(self._conn)
                    if fact_id in self._live}

    def _metadata_of(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        with self._lock, schema.sqlite_errors(self._where):
            self._check_open()
            found = {fact_id: json.loads(text) for fact_id, text in schema.metadata_of(self._conn, ids)}
        missing = [fact_id for fact_id in ids if fact_id not in found]
        if missing:
            raise KeyError(f"fact {missing[0]!r} was deleted by another connection; call refresh()")
        return found

    def verify(self) -> IntegrityReport:
        """Check every fact row of the file (checksum, BLOB lengths, metadata, finite values, key
        norms) in one read transaction; the ids of those that fail, in insertion order."""
        with self._lock, schema.sqlite_errors(self._where):
            self._check_open()
            self._conn.execute("BEGIN")
            try:
                vector_slots = schema.read_meta(self._conn, self._where)["vector_slots"]
                return verify_rows(schema.fact_rows(self._conn), self._vectors, vector_slots)
            finally:
                self._conn.execute("COMMIT")

    # -- other processes -----------------------------------------------------------------------

    def refresh(self) -> bool:
        """Apply what other connections committed since this one last looked (facts, their key
        thresholds, the database's gamma); True if any fact or the gamma changed."""
        with self._lock, schema.sqlite_errors(self._where):
            self._check_open()
            self._conn.execute("BEGIN")
            try:
                data_version = self._conn.execute("PRAGMA data_version").fetchone()[0]
                if data_version == self._data_version:
                    return False
                changes = sync.read_changes(self._conn, self._live.rows.rev_of, self._vectors, self._where)
            finally:
                self._conn.execute("COMMIT")
            self._data_version = data_version
            gamma = self._gamma
            self._load_meta(changes.meta)
            self._live.set_default_gamma(self._gamma)
            self._live.remove(changes.removed)
            ids = [fact_id for fact_id, *_ in changes.written]
            fact_keys = [keys for _, _, keys, _, _ in changes.written]
            self._live.reserve(ids, fact_keys)
            residuals = (torch.cat([residual for _, _, _, residual, _ in changes.written]) if ids
                         else torch.empty((0, self._d2), dtype=self._dtype))
            self._live.write(ids, [rev for _, rev, *_ in changes.written], fact_keys, residuals,
                             [gammas for *_, gammas in changes.written])
            return bool(changes.removed or ids or gamma != self._gamma)

    # -- copies --------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write a complete, consistent copy of the database to `path` and its vector file
        (FileExistsError if either exists); the copy's vector file holds only the facts in effect
        (compacted)."""
        with self._lock:
            self._check_open()
            copy_database(self._conn, self._vectors, Path(path), self._where)

    def export(self, file: str | os.PathLike) -> Path:
        """Write `file` (.safetensors: "keys" (r, d1), every fact's keys in turn, and "residuals"
        (m, d2), one per fact, in the storage dtype) and its sidecar `file` with suffix .json (ids,
        key counts, key thresholds, metadata, settings, format version, the safetensors file's
        SHA-256). Returns the sidecar path. Never overwrites."""
        with self._lock:
            self._check_open()
            snap = self.snapshot()
            ids, rows = self._live.export_rows()
            with_key_gammas = set(self._live.with_key_gammas)
            metadata = self._metadata_of(ids)
        key_rows = torch.tensor([row for fact_rows in rows for row in fact_rows], dtype=torch.int64)
        first_rows = torch.tensor([fact_rows[0] for fact_rows in rows], dtype=torch.int64)
        settings = {"d1": self._d1, "d2": self._d2, "layer": self._layer, "gamma": self._gamma,
                    "dtype": schema.dtype_name(self._dtype),
                    "fingerprint": None if self._fingerprint is None else dataclasses.asdict(self._fingerprint)}
        key_gammas = [snap.gammas[fact_rows].tolist() if fact_id in with_key_gammas else None
                      for fact_id, fact_rows in zip(ids, rows)]
        return write_export(Path(file), snap.keys[key_rows], snap.residuals[first_rows],
                            [len(fact_rows) for fact_rows in rows], ids, [metadata[i] for i in ids], key_gammas,
                            settings)

    @classmethod
    def import_(cls, file: str | os.PathLike, path: str | os.PathLike | None = None) -> "NeuralDB":
        """Create a database (in memory, or at `path`) from an export written by `export`, after
        validating both files completely."""
        settings, batch = read_import(Path(file))
        fingerprint = None if settings["fingerprint"] is None else ModelFingerprint(**settings["fingerprint"])
        db = cls(path, d1=settings["d1"], d2=settings["d2"], layer=settings["layer"], gamma=settings["gamma"],
                 dtype=settings["dtype"], fingerprint=fingerprint)
        try:
            with db._lock:
                db._add_batch(batch)
        except BaseException:
            db.close()
            if path is not None:
                schema.remove_database_files(path)
            raise
        return db

    # -- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the database file and free the views (snapshots already taken stay valid)."""
        with self._lock:
            if not self._closed:
                self._conn.close()
                self._vectors.close()
                self._live.views.close()
                self._closed = True

    def __enter__(self) -> "NeuralDB":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
