"""Row buffers of the views of a NeuralDB: `ViewBuffers` holds one (device, dtype) view, contiguous
K (m, d1) and R (m, d2); `ViewSet` holds the views of one database.

Capacity doubles on growth, so appends are amortised O(d) per row; deletes move the last rows
into the holes (swap-remove), O(d) per deleted row. Snapshots handed out are `K[:m]`, `R[:m]`
slices of the buffers and must never change afterwards:
- appends write rows >= m, outside every earlier snapshot, or into freshly grown buffers;
- in-place rewrites (updates; deletes, which move rows and free rows for later appends) first
  copy the buffers (copy-on-write) if a snapshot handed out since the last copy may still be in
  use: some tensor other than the buffer still uses the buffer's storage (a snapshot, or any
  view of one). That copy costs no more than one retrieval over the live snapshot, so it is paid
  for by the reader; once readers dropped their snapshots, updates and deletes are O(d) in place.
  (Storage use counts come from torch's `_storage_Use_Count`; without it every rewrite after a
  snapshot copies, which is always safe.)
As for any tensor, a CUDA kernel still reading a dropped snapshot is ordered before later
rewrites only when the writer uses the same CUDA stream as the reader.
Not thread-safe by itself: the owning NeuralDB serialises every call under its lock.
"""

from __future__ import annotations

import torch

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


class ViewBuffers:
    """K and R rows of one view, in buffers with spare capacity."""

    def __init__(self, keys: torch.Tensor, residuals: torch.Tensor, count: int):
        """Adopt (capacity, d1) / (capacity, d2) buffers (same device and dtype) whose first `count`
        rows are the view."""
        self._keys, self._residuals, self.count = keys, residuals, count
        self._shared = False

    @classmethod
    def copy_of(cls, keys: torch.Tensor, residuals: torch.Tensor) -> "ViewBuffers":
        """Buffers holding copies of the (m, d1) `keys` and (m, d2) `residuals`."""
        capacity = max(MIN_CAPACITY, keys.shape[0])
        return cls(cls._grown(keys, capacity), cls._grown(residuals, capacity), keys.shape[0])

    @property
    def capacity(self) -> int:
        return self._keys.shape[0]

    @staticmethod
    def _grown(rows: torch.Tensor, capacity: int) -> torch.Tensor:
        buffer = torch.empty((capacity, rows.shape[1]), dtype=rows.dtype, device=rows.device)
        buffer[: rows.shape[0]].copy_(rows)
        return buffer

    def snapshot(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(K[:m], R[:m]): contiguous views that later mutations never change."""
        self._shared = True
        return self._keys[: self.count], self._residuals[: self.count]

    def reserve(self, extra: int) -> None:
        """Grow capacity (doubling) so that `extra` more rows fit; earlier buffers stay untouched."""
        needed = self.count + extra
        if needed <= self.capacity:
            return
        capacity = max(needed, 2 * self.capacity)
        self._keys = self._grown(self._keys[: self.count], capacity)
        self._residuals = self._grown(self._residuals[: self.count], capacity)
        self._shared = False

    def append(self, keys: torch.Tensor, residuals: torch.Tensor) -> None:
        """Append rows (any device/dtype, converted here); `reserve` must have made room."""
        n = keys.shape[0]
        self._keys[self.count : self.count + n].copy_(keys)
        self._residuals[self.count : self.count + n].copy_(residuals)
        self.count += n

    def _unshare(self) -> None:
        if self._shared and (_storage_in_use_elsewhere(self._keys) or _storage_in_use_elsewhere(self._residuals)):
            self._keys = self._grown(self._keys[: self.count], self.capacity)
            self._residuals = self._grown(self._residuals[: self.count], self.capacity)
        self._shared = False

    def overwrite(self, rows: torch.Tensor, keys: torch.Tensor, residuals: torch.Tensor) -> None:
        """Replace the rows at int64 indices `rows` (all < m) with `keys` / `residuals`."""
        self._unshare()
        rows = rows.to(self._keys.device)
        self._keys.index_copy_(0, rows, keys.to(self._keys.device, self._keys.dtype))
        self._residuals.index_copy_(0, rows, residuals.to(self._residuals.device, self._residuals.dtype))

    def move_and_truncate(self, sources: torch.Tensor, targets: torch.Tensor, count: int) -> None:
        """Copy rows `sources` onto rows `targets` (int64, equal length), then keep the first `count`."""
        self._unshare()  # rows >= count will be rewritten by later appends: a snapshot may still show them
        if sources.numel():
            sources = sources.to(self._keys.device)
            targets = targets.to(self._keys.device)
            self._keys.index_copy_(0, targets, self._keys.index_select(0, sources))
            self._residuals.index_copy_(0, targets, self._residuals.index_select(0, sources))
        self.count = count


class ViewSet:
    """One `ViewBuffers` per (device, dtype): the (CPU, storage dtype) one, from which the others
    are built on first request, always present; every change is applied to all of them."""

    def __init__(self, master: ViewBuffers, dtype: torch.dtype):
        self.master_key = (torch.device("cpu"), dtype)
        self.buffers: dict[tuple[torch.device, torch.dtype], ViewBuffers] = {self.master_key: master}

    def snapshot(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(K[:m], R[:m]) on `device` in `dtype`, building those buffers from the CPU ones if needed."""
        buffers = self.buffers.get((device, dtype))
        if buffers is None:
            keys, residuals = self.buffers[self.master_key].snapshot()
            buffers = ViewBuffers.copy_of(keys.to(device, dtype), residuals.to(device, dtype))
            self.buffers[(device, dtype)] = buffers
        return buffers.snapshot()

    def reserve(self, extra: int) -> None:
        """Make room for `extra` rows in every view, so applying a committed change cannot fail on memory."""
        for buffers in self.buffers.values():
            buffers.reserve(extra)

    def append(self, keys: torch.Tensor, residuals: torch.Tensor) -> None:
        for buffers in self.buffers.values():
            buffers.append(keys, residuals)

    def overwrite(self, rows: torch.Tensor, keys: torch.Tensor, residuals: torch.Tensor) -> None:
        for buffers in self.buffers.values():
            buffers.overwrite(rows, keys, residuals)

    def move_and_truncate(self, sources: torch.Tensor, targets: torch.Tensor, count: int) -> None:
        for buffers in self.buffers.values():
            buffers.move_and_truncate(sources, targets, count)

    def clear(self) -> None:
        """Free every view but the CPU one in the storage dtype."""
        self.buffers = {self.master_key: self.buffers[self.master_key]}

    def close(self) -> None:
        self.buffers.clear()
