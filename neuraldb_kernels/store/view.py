"""Row buffers of the views of a NeuralDB: `ViewBuffers` holds one (device, dtype) view, contiguous
K (m, d1), R (m, d2) and the float32 gate threshold of every key row (m,); `KeyCodeBuffers` holds
the compressed codes of one view's keys in one code format (ops/key_index.py), row for row with
its K; `ViewSet` holds the views and codes of one database. Both kinds are `RowBuffers`.

Capacity doubles on growth, so appends are amortised O(d) per row; deletes move the last rows
into the holes (swap-remove), O(d) per deleted row. Snapshots handed out are `K[:m]`, `R[:m]`
(thresholds `gammas[:m]`; a key index's codes and bounds `codes[:m]`...) slices of the buffers
and must never change afterwards:
- appends write rows >= m, outside every earlier snapshot, or into freshly grown buffers;
- in-place rewrites (updates; deletes, which move rows and free rows for later appends; a new
  database gamma) first copy each buffer (copy-on-write) that a snapshot handed out since the
  last copy may still use: some tensor other than the buffer still uses the buffer's storage (a
  snapshot, or any view of one). That copy costs no more than one retrieval over the live snapshot, so it is paid
  for by the reader; once readers dropped their snapshots, updates and deletes are O(d) in place.
  (Storage use counts come from torch's `_storage_Use_Count`; without it every rewrite after a
  snapshot copies, which is always safe.)
As for any tensor, a CUDA kernel still reading a dropped snapshot is ordered before later
rewrites only when the writer uses the same CUDA stream as the reader.
Not thread-safe by itself: the owning NeuralDB serialises every call under its lock.
"""

from __future__ import annotations

from typing import Optional, Protocol

import torch

from ..ops.key_index import EncodedRows, KeyIndex, encode_rows

MIN_CAPACITY = 16

_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _storage_use_count(tensor: torch.Tensor) -> int:
    storage = tensor.untyped_storage()  # held: the count must be read while the storage is alive
    return _use_count(storage._cdata)


_UNSHARED_USE_COUNT = None if _use_count is None else _storage_use_count(torch.empty(1))


def _storage_in_use_elsewhere(buffer: torch.Tensor) -> bool:
    """Whether tensors other than `buffer` use its storage (True when torch cannot tell)."""
    if _use_count is None:
        return True
    return _storage_use_count(buffer) > _UNSHARED_USE_COUNT


class RowBuffers:
    """Named buffers (the names in `_NAMES`, set by the subclass; same device, capacity rows each)
    whose first `count` rows are live: growth by doubling, copy-on-write of the buffers a handed-out
    slice may still use, and swap-remove. Subclasses write rows; this class moves them."""

    _NAMES: tuple[str, ...] = ()

    def __init__(self, count: int):
        self.count = count
        self._shared = False  # True once a slice was handed out since the last copy

    @property
    def capacity(self) -> int:
        return getattr(self, self._NAMES[0]).shape[0]

    @staticmethod
    def _grown(rows: torch.Tensor, capacity: int) -> torch.Tensor:
        buffer = torch.empty((capacity, *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
        buffer[: rows.shape[0]].copy_(rows)
        return buffer

    def _live_rows(self) -> tuple[torch.Tensor, ...]:
        """The first `count` rows of every buffer, in `_NAMES` order, marked as handed out."""
        self._shared = True
        return tuple(getattr(self, name)[: self.count] for name in self._NAMES)

    def reserve(self, extra: int) -> None:
        """Grow capacity (doubling) so that `extra` more rows fit; earlier buffers stay untouched."""
        needed = self.count + extra
        if needed <= self.capacity:
            return
        capacity = max(needed, 2 * self.capacity)
        for name in self._NAMES:
            setattr(self, name, self._grown(getattr(self, name)[: self.count], capacity))
        self._shared = False

    def _unshare(self, names: Optional[tuple[str, ...]] = None) -> None:
        """Copy each of the buffers `names` (default all) whose storage a slice handed out may still
        use, before rewriting it in place (all of them: no handed-out slice shares any buffer then)."""
        names = self._NAMES if names is None else names
        if self._shared:
            for name in names:
                buffer = getattr(self, name)
                if _storage_in_use_elsewhere(buffer):
                    setattr(self, name, self._grown(buffer[: self.count], self.capacity))
            self._shared = names != self._NAMES

    def _append_rows(self, values: tuple[torch.Tensor, ...]) -> None:
        """Write one tensor per buffer (in `_NAMES` order, n rows each) as rows m .. m + n - 1;
        `reserve` made room."""
        n = values[0].shape[0]
        for name, rows in zip(self._NAMES, values):
            getattr(self, name)[self.count : self.count + n].copy_(rows)
        self.count += n

    def _overwrite_rows(self, rows: torch.Tensor, values: tuple[torch.Tensor, ...]) -> None:
        """Write one tensor per buffer (in `_NAMES` order) at int64 indices `rows` (all < m)."""
        self._unshare()
        rows = rows.to(getattr(self, self._NAMES[0]).device)
        for name, rows_values in zip(self._NAMES, values):
            buffer = getattr(self, name)
            buffer.index_copy_(0, rows, rows_values.to(buffer.device, buffer.dtype))

    def move_and_truncate(self, sources: torch.Tensor, targets: torch.Tensor, count: int) -> None:
        """Copy rows `sources` onto rows `targets` (int64, equal length), then keep the first `count`."""
        self._unshare()  # rows >= count will be rewritten by later appends: a snapshot may still show them
        if sources.numel():
            device = getattr(self, self._NAMES[0]).device
            sources, targets = sources.to(device), targets.to(device)
            for name in self._NAMES:
                buffer = getattr(self, name)
                buffer.index_copy_(0, targets, buffer.index_select(0, sources))
        self.count = count


class ViewBuffers(RowBuffers):
    """K, R and per-key gate thresholds of one view, in buffers with spare capacity.

    Per row: the key (d1), the residual (d2), whether the row uses the database's gamma (bool: its
    fact has no thresholds of its own) and its threshold (float32: its own, or the database's
    gamma for the rows that use it), so a snapshot hands the op thresholds aligned with K.
    """

    _NAMES = ("_keys", "_residuals", "_gammas", "_defaults")

    def __init__(self, keys: torch.Tensor, residuals: torch.Tensor, gammas: torch.Tensor, defaults: torch.Tensor,
                 count: int):
        """Adopt (capacity, d1) / (capacity, d2) buffers (same device and dtype), a (capacity,) float32
        threshold buffer and a (capacity,) bool "uses the database's gamma" buffer on that device,
        whose first `count` rows are the view."""
        super().__init__(count)
        self._keys, self._residuals, self._gammas, self._defaults = keys, residuals, gammas, defaults

    @classmethod
    def copy_of(cls, keys: torch.Tensor, residuals: torch.Tensor, gammas: torch.Tensor,
                defaults: torch.Tensor) -> "ViewBuffers":
        """Buffers holding copies of the (m, d1) `keys`, (m, d2) `residuals`, (m,) `gammas` and `defaults`."""
        capacity = max(MIN_CAPACITY, keys.shape[0])
        return cls(*(cls._grown(rows, capacity) for rows in (keys, residuals, gammas, defaults)), keys.shape[0])

    def snapshot(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(K[:m], R[:m], gammas[:m]): contiguous views that later mutations never change."""
        return self._live_rows()[:3]

    def shows(self, keys: torch.Tensor) -> bool:
        """Whether `keys` (a live tensor) is this view's current K[:m]: same buffer, same row count
        (every change since a snapshot either adds rows or, the snapshot being alive, copied K)."""
        return keys.data_ptr() == self._keys.data_ptr() and keys.shape == self._keys[: self.count].shape

    def key_rows(self, rows) -> torch.Tensor:
        """The keys (in this view's device and dtype) at a slice or int64 row indices."""
        return self._keys[rows] if isinstance(rows, slice) else self._keys.index_select(0, rows.to(self._keys.device))

    def rows_using_default(self) -> torch.Tensor:
        """(m,) bool: the rows whose threshold is the database's gamma (a copy)."""
        return self._defaults[: self.count].clone()

    def _resolved(self, key_gammas: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(thresholds, uses-default mask) on this view's device for (n,) float32 `key_gammas`,
        NaN meaning the database's gamma `gamma`."""
        key_gammas = key_gammas.to(self._gammas.device, torch.float32)
        defaults = torch.isnan(key_gammas)
        return torch.where(defaults, torch.tensor(gamma, dtype=torch.float32), key_gammas), defaults

    def append(self, keys: torch.Tensor, residuals: torch.Tensor, key_gammas: torch.Tensor, gamma: float) -> None:
        """Append rows (any device/dtype, converted here), with (n,) float32 thresholds (NaN: the
        database's gamma `gamma`); `reserve` must have made room."""
        self._append_rows((keys, residuals, *self._resolved(key_gammas, gamma)))

    def overwrite(self, rows: torch.Tensor, keys: torch.Tensor, residuals: torch.Tensor, key_gammas: torch.Tensor,
                  gamma: float) -> None:
        """Replace the rows at int64 indices `rows` (all < m) with `keys` / `residuals` / thresholds
        (as for `append`)."""
        self._overwrite_rows(rows, (keys, residuals, *self._resolved(key_gammas, gamma)))

    def set_default_gamma(self, gamma: float) -> None:
        """Give the rows that use the database's gamma the new value `gamma`."""
        self._unshare(("_gammas",))  # K and R stay shared: only the thresholds are rewritten
        self._gammas[: self.count].masked_fill_(self._defaults[: self.count], gamma)


class KeyCodeBuffers(RowBuffers):
    """The compressed codes of one view's keys in one code format, row i encoding the view's key
    row i exactly as `KeyIndex.from_keys` encodes it: codes (capacity, d1 padded to 64) int8 or
    float8_e4m3fn, and per row the float32 scale, error bound and norm bound (ops/key_index.py),
    on the view's device. Appends and replacements encode only the rows written (O(d1) each)."""

    _NAMES = ("_codes", "_scale", "_error", "_norm")

    def __init__(self, keys: torch.Tensor, fmt: str, capacity: int):
        """Buffers of `capacity` rows holding the codes of a view's `keys` K[:m] in format `fmt`
        (encoded straight into them: no second copy of the codes)."""
        super().__init__(keys.shape[0])
        self.format = fmt
        encoded = encode_rows(keys, fmt, capacity)
        self._codes, self._scale, self._error, self._norm = encoded.codes, encoded.scale, encoded.error, encoded.norm

    def index(self, keys: torch.Tensor) -> KeyIndex:
        """A KeyIndex over `keys`, the view's current K[:m], whose codes are the first m rows of
        these buffers (shared, not copied: later rewrites copy first)."""
        return KeyIndex(keys, EncodedRows(*self._live_rows()), self.format, keys.device, None)

    def append(self, keys: torch.Tensor) -> None:
        """Encode (n, d1) `keys` (the view's new rows) as rows m .. m + n - 1; `reserve` made room."""
        encoded = encode_rows(keys, self.format)
        self._append_rows((encoded.codes, encoded.scale, encoded.error, encoded.norm))

    def overwrite(self, rows: torch.Tensor, keys: torch.Tensor) -> None:
        """Encode (len(rows), d1) `keys` (the view's rewritten rows) at int64 indices `rows`."""
        encoded = encode_rows(keys, self.format)
        self._overwrite_rows(rows, (encoded.codes, encoded.scale, encoded.error, encoded.norm))


class KeyRowsListener(Protocol):
    """Told of every change to the key rows of a database's views, right after it is applied, so
    that a structure indexed by view row (a compressed key index, e.g.) stays in sync incrementally:
    row i is the same key row in every view. The methods are those of `ViewBuffers` (and of a key
    index with the same row semantics). Keys are CPU tensors in the storage dtype. Calls come under
    the database's lock, in the order of the changes; a listener must not call the database."""

    def append(self, keys: torch.Tensor) -> None:
        """(n, d1) `keys` became rows m .. m + n - 1 (m: the row count before)."""

    def overwrite(self, rows: torch.Tensor, keys: torch.Tensor) -> None:
        """The rows at int64 indices `rows` (all < m) now hold (len(rows), d1) `keys`."""

    def move_and_truncate(self, sources: torch.Tensor, targets: torch.Tensor, count: int) -> None:
        """Swap-remove: row sources[i] was copied onto row targets[i] (int64, equal lengths), then
        the rows were truncated to the first `count`."""


class ViewSet:
    """One `ViewBuffers` per (device, dtype): the (CPU, storage dtype) one, from which the others
    are built on first request, always present; one `KeyCodeBuffers` per (device, dtype, code
    format) requested, built from that view on first request. Every change is applied to all of
    them (codes after their view, from the view's rows) and then told to the `listeners` (see
    `KeyRowsListener`). `gamma`: the database's gamma, the threshold of the rows whose fact has
    none of its own."""

    def __init__(self, master: ViewBuffers, dtype: torch.dtype, gamma: float):
        self.master_key = (torch.device("cpu"), dtype)
        self.buffers: dict[tuple[torch.device, torch.dtype], ViewBuffers] = {self.master_key: master}
        self.codes: dict[tuple[torch.device, torch.dtype, str], KeyCodeBuffers] = {}
        self.gamma = gamma
        self.listeners: list[KeyRowsListener] = []

    def snapshot(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(K[:m], R[:m] on `device` in `dtype`, float32 thresholds (m,) on `device`), building those
        buffers from the CPU ones if needed."""
        buffers = self.buffers.get((device, dtype))
        if buffers is None:
            master = self.buffers[self.master_key]
            keys, residuals, gammas = master.snapshot()
            buffers = ViewBuffers.copy_of(keys.to(device, dtype), residuals.to(device, dtype), gammas.to(device),
                                          master.rows_using_default().to(device))
            self.buffers[(device, dtype)] = buffers
        return buffers.snapshot()

    def key_index(self, keys: torch.Tensor, fmt: str) -> Optional[KeyIndex]:
        """The KeyIndex in code format `fmt` of the view whose current K[:m] is `keys` (a snapshot's
        keys), its codes built on first request (O(m)) and kept in sync afterwards; None when
        `keys` is not the current K of a view (the keys changed since, or the view was freed)."""
        view = self.buffers.get((keys.device, keys.dtype))
        if view is None or not view.shows(keys):
            return None
        codes = self.codes.get((keys.device, keys.dtype, fmt))
        if codes is None:
            codes = KeyCodeBuffers(keys, fmt, view.capacity)
            self.codes[(keys.device, keys.dtype, fmt)] = codes
        return codes.index(keys)

    def _codes_with_views(self):
        """(code buffers, their view) pairs."""
        return [(codes, self.buffers[device, dtype]) for (device, dtype, _), codes in self.codes.items()]

    def reserve(self, extra: int) -> None:
        """Make room for `extra` rows in every view and its codes, so applying a committed change
        cannot fail on memory (but for the scratch of encoding the written rows)."""
        for buffers in (*self.buffers.values(), *self.codes.values()):
            buffers.reserve(extra)

    def append(self, keys: torch.Tensor, residuals: torch.Tensor, key_gammas: torch.Tensor) -> None:
        for buffers in self.buffers.values():
            buffers.append(keys, residuals, key_gammas, self.gamma)
        for codes, view in self._codes_with_views():
            codes.append(view.key_rows(slice(codes.count, view.count)))
        for listener in self.listeners:
            listener.append(keys)

    def overwrite(self, rows: torch.Tensor, keys: torch.Tensor, residuals: torch.Tensor,
                  key_gammas: torch.Tensor) -> None:
        for buffers in self.buffers.values():
            buffers.overwrite(rows, keys, residuals, key_gammas, self.gamma)
        for codes, view in self._codes_with_views():
            codes.overwrite(rows, view.key_rows(rows))
        for listener in self.listeners:
            listener.overwrite(rows, keys)

    def set_default_gamma(self, gamma: float) -> None:
        """The database's gamma changed: rewrite the thresholds of the rows that use it."""
        for buffers in self.buffers.values():
            buffers.set_default_gamma(gamma)
        self.gamma = gamma

    def move_and_truncate(self, sources: torch.Tensor, targets: torch.Tensor, count: int) -> None:
        for buffers in (*self.buffers.values(), *self.codes.values()):
            buffers.move_and_truncate(sources, targets, count)
        for listener in self.listeners:
            listener.move_and_truncate(sources, targets, count)

    def clear(self) -> None:
        """Free every view but the CPU one in the storage dtype, and every key index's codes."""
        self.buffers = {self.master_key: self.buffers[self.master_key]}
        self.codes.clear()

    def close(self) -> None:
        self.buffers.clear()
        self.codes.clear()
