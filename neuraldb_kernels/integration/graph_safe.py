"""A graph-safe attachment: the retrieval hook as tensor operations over fixed device buffers, so
that `torch.compile(model, fullgraph=True)` traces it with no graph break and a CUDA graph (by
hand, or `torch.compile(mode="reduce-overhead")`) captures it.

    attachment = attach(model, db, graph_safe=True)    # buffers filled from the database
    compiled = torch.compile(model, mode="reduce-overhead")
    compiled.generate(...)                              # or replay a captured decode step
    db.add(...); db.delete(...); db.gamma = 0.8         # the hook does not see these yet
    attachment.sync()                                   # now it does (outside any capture)

Per forward the hook runs one `gated_retrieve` over the buffers and selects `output + retrieved`
where a gate fired (`torch.where`: a closed gate leaves the output bit-identical), with no host
synchronisation, no Python decision on tensor values, no database lock or snapshot and no
per-call check of the threshold values (they are checked at `sync`); `last`/`fired()` are not
recorded (that would read device values on the host).

Buffers, on the down-projection's device: keys (capacity, d1) in `key_dtype` (default the
layer's dtype), residuals (capacity, d2) in the layer's dtype, thresholds (capacity,) float32.
Rows [0, m) hold the database's m key rows in snapshot order; rows [m, capacity) are padding:
NaN keys, which the op never lets win (their cosine counts as -inf), zero residuals and
threshold 1. So padding never fires, and with no facts at all every token gets index -1 and the
model is bit-identical to the bare one.

`sync()` is the only place the database is read. When the database version (adds, deletes,
threshold and gamma changes all count) or the layer's device or dtype changed since the last
sync, it takes one snapshot, checks its thresholds once (each in [-1, 1]) and copies it into the
buffers in place, on the current stream: captured graphs and compiled code read the new facts
from the same memory, without re-capturing or recompiling. When m outgrows the capacity the
buffers are reallocated at double the capacity (until m fits; `SyncReport.reallocated`): a CUDA
graph captured by hand must then be re-captured; torch.compile re-traces by itself (the buffers
are marked as static addresses, guarded by identity) and "reduce-overhead" records new graphs.
Pass `capacity=` to `attach` to reserve rows up front. Memory: the buffers are a second device
copy of the facts next to the store's device view (which the store keeps up to date row by row,
so that a sync is one device-to-device copy).

When to sync: facts written after the last `sync()` are invisible to the model until the next.
Call it before each `generate` (or each decode step of your own loop), on the stream that runs
the model, never while a graph is being captured and never concurrently with a forward pass.
It costs one integer comparison when nothing changed. `paused()` is a Python flag as in
`Attachment`: torch.compile guards on it (one more compilation per state), a graph captured by
hand keeps the state it was captured in. The layer must compute in its weights' dtype (no
autocast around it): the buffers take the dtype of the down-projection's weights.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

import torch

from ..ops.contract import check_key_gamma_values
from ..ops.gated_retrieve import gated_retrieve_prechecked
from .attach import Attachment, Firing

PADDING_THRESHOLD = 1.0  # any valid threshold would do: padding keys never win the argmax


@dataclasses.dataclass(frozen=True)
class SyncReport:
    """What one `GraphSafeAttachment.sync()` did.

    version: the database version the buffers now hold. rows: m, the database's key rows the
    buffers hold (a fact has one or more; rows past m are padding). capacity: rows of the buffers. copied: whether the buffers
    were rewritten (False when the database and the layer were unchanged). reallocated: whether
    new buffers replaced the old ones (first sync, capacity growth, a new device or dtype):
    captured CUDA graphs must then be re-captured.
    """

    version: int
    rows: int
    capacity: int
    copied: bool
    reallocated: bool


@dataclasses.dataclass(frozen=True)
class RetrievalBuffers:
    """The fixed device buffers the graph-safe hook retrieves from (see the module docstring):
    keys (capacity, d1), residuals (capacity, d2), thresholds (capacity,) float32, one device."""

    keys: torch.Tensor
    residuals: torch.Tensor
    thresholds: torch.Tensor

    @property
    def capacity(self) -> int:
        return self.keys.shape[0]

    @classmethod
    def allocate(cls, capacity: int, d1: int, d2: int, device: torch.device, key_dtype: torch.dtype,
                 dtype: torch.dtype) -> "RetrievalBuffers":
        """All-padding buffers of `capacity` rows, marked as static addresses for torch.compile
        (no copy into cudagraph-owned inputs per replay; a new buffer fails the identity guard)."""
        buffers = cls(torch.full((capacity, d1), float("nan"), dtype=key_dtype, device=device),
                      torch.zeros((capacity, d2), dtype=dtype, device=device),
                      torch.full((capacity,), PADDING_THRESHOLD, dtype=torch.float32, device=device))
        for tensor in (buffers.keys, buffers.residuals, buffers.thresholds):
            torch._dynamo.mark_static_address(tensor)
        return buffers

    def fill(self, keys: torch.Tensor, residuals: torch.Tensor, thresholds: torch.Tensor, padded_from: int) -> None:
        """Copy m rows into rows [0, m) in place and pad rows [m, padded_from) (the rows live
        before; those after are padding already)."""
        m = keys.shape[0]
        self.keys[:m].copy_(keys)
        self.residuals[:m].copy_(residuals)
        self.thresholds[:m].copy_(thresholds)
        if padded_from > m:
            self.keys[m:padded_from].fill_(float("nan"))
            self.residuals[m:padded_from].zero_()
            self.thresholds[m:padded_from].fill_(PADDING_THRESHOLD)


def grown_capacity(capacity: int, rows: int) -> int:
    """`capacity` doubled until it holds `rows` (unchanged when it does already; at least 1)."""
    capacity = max(1, capacity)
    while capacity < rows:
        capacity *= 2
    return capacity


def layer_layout(module: torch.nn.Module, key_dtype: Optional[torch.dtype]) -> Tuple[torch.device, torch.dtype, torch.dtype]:
    """(device, residual dtype, key dtype) of the buffers for the down-projection `module`: its
    first floating-point parameter's device and dtype, keys in `key_dtype` when set; ValueError
    for a module without one."""
    weight = next((p for p in module.parameters() if p.is_floating_point()), None)
    if weight is None:
        raise ValueError(f"graph_safe=True needs the down-projection ({type(module).__name__}) to have "
                         "floating-point parameters: their device and dtype are the buffers'")
    return weight.device, weight.dtype, key_dtype or weight.dtype


class GraphSafeAttachment(Attachment):
    """An `Attachment` whose hook is CUDA-graph safe; returned by `attach(..., graph_safe=True)`.

    Reads the database only in `sync()` (called once by `attach`); see the module docstring.
    `buffers` are the current `RetrievalBuffers`, `synced` the last `SyncReport`, `stale` whether
    the database changed since. `fired()` raises: use an attachment without graph_safe to see
    which facts fire.
    """

    def __init__(self, model, db, layer, module, gamma, backend, key_dtype, capacity: Optional[int] = None):
        if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1):
            raise ValueError(f"capacity must be a positive int (key rows to reserve), got {capacity!r}")
        self.buffers: Optional[RetrievalBuffers] = None
        self.synced: Optional[SyncReport] = None
        self._reserved = capacity or 1
        self._layout: Optional[Tuple[torch.device, torch.dtype, torch.dtype]] = None
        layer_layout(module, key_dtype)  # ValueError before hooking
        super().__init__(model, db, layer, module, gamma, backend, key_dtype)
        try:
            self.sync()
        except BaseException:
            self.detach()
            raise

    @property
    def stale(self) -> bool:
        """True when the database changed since the last sync (the model does not see it yet)."""
        return self.synced is None or self.db.version != self.synced.version

    def sync(self) -> SyncReport:
        """Copy the database's current state into the buffers when it or the layer changed since
        the last sync (see the module docstring); ValueError, leaving the buffers as they were,
        when a threshold is outside [-1, 1]. Call it outside any graph capture."""
        if not self.attached:
            raise RuntimeError("sync() on a detached attachment: attach again")
        layout = layer_layout(self.module, self.key_dtype)
        if not self.stale and layout == self._layout:
            self.synced = dataclasses.replace(self.synced, copied=False, reallocated=False)
            return self.synced
        device, dtype, key_dtype = layout
        snapshot, keys = self._views(device, dtype)
        m = keys.keys.shape[0]
        thresholds = keys.gammas if self._gamma is None else torch.full_like(keys.gammas, self._gamma)
        check_key_gamma_values(thresholds)
        old = self.buffers
        capacity = grown_capacity(self._reserved if old is None else old.capacity, m)
        reallocated = old is None or layout != self._layout or capacity != old.capacity
        if reallocated:
            self.buffers = RetrievalBuffers.allocate(capacity, self.db.d1, self.db.d2, device, key_dtype, dtype)
            live_before = 0
        else:
            live_before = self.synced.rows
        self.buffers.fill(keys.keys, snapshot.residuals, thresholds, padded_from=live_before)
        self._layout = layout
        self.synced = SyncReport(snapshot.version, m, capacity, True, reallocated)
        return self.synced

    def _retrieve(self, hidden: torch.Tensor, dtype: torch.dtype):
        """`Attachment._retrieve` over the synced buffers: traced, not a graph break, and no record."""
        buffers = self.buffers
        if dtype != buffers.residuals.dtype or hidden.device != buffers.residuals.device:
            raise RuntimeError(
                f"the layer's output is {dtype} on {hidden.device}, the synced buffers are "
                f"{buffers.residuals.dtype} on {buffers.residuals.device}: call sync() after moving the model "
                "(under autocast, which computes in another dtype than the weights, use attach without graph_safe)")
        retrieved, index, _ = gated_retrieve_prechecked(hidden, buffers.keys, buffers.residuals, buffers.thresholds,
                                                        backend=self.backend)
        return retrieved, index

    def detach(self) -> None:
        """Remove the hook and free the buffers (see `Attachment.detach`)."""
        super().detach()
        self.buffers = None

    def fired(self) -> List[Firing]:
        raise RuntimeError("a graph-safe attachment does not record firings (that would read device values on "
                           "the host at every step); attach without graph_safe=True to see which facts fire")

    def __repr__(self) -> str:
        state = ("paused" if self._paused else "attached") if self.attached else "detached"
        synced = "never" if self.synced is None else f"{self.synced.rows} rows of version {self.synced.version}"
        capacity = None if self.buffers is None else self.buffers.capacity
        return (f"GraphSafeAttachment({state}, layer={self.layer}, module={type(self.module).__name__}, "
                f"synced={synced}, stale={self.stale}, capacity={capacity}, backend={self.backend!r})")
