"""Attach a NeuralDB to a model: a forward hook on one layer's FFN down-projection adds the gated
retrieval to that projection's output, for every token (paper Eq. 11-12):

    y = down_proj(x) + gated_retrieve(x, K, R, gamma)       x: (..., d1) the projection's input

gamma: the database's per-key thresholds (`Snapshot.gammas`, one float32 per row of K) when any
fact has thresholds of its own, else the database's gamma as a number; a `gamma=` given to
`attach` overrides both, as one number for every key.

The module itself is never replaced or modified: `detach()` removes the hook and the model is
exactly what it was. Where no gate fires the projection's output is returned as is (selected with
`torch.where`, not by adding zeros), so an empty database or a closed gate is bit-identical to the
bare model.

Live database: every forward reads the database's version and, when it changed since the last
forward (or the device or dtype did), takes a fresh `db.snapshot(device, dtype)` (the store keeps
one buffer per device and dtype in sync and a snapshot is a slice of it, so this costs
microseconds); otherwise it reuses the last one, which is immutable and still shows the database.
So adds, deletes, threshold and gamma changes apply at the next forward. Per-key thresholds are
checked once per snapshot (ValueError at the forward when one is outside [-1, 1]). The snapshot
follows the layer: the projection input's device, and the projection output's dtype (keys may use
`key_dtype`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator, List, Optional

import torch

from ..ops import KeyIndex, gated_retrieve
from ..ops.contract import check_gamma, check_key_gamma_values
from ..ops.dispatch import resolve_backend
from ..ops.gated_retrieve import gated_retrieve_prechecked
from ..distributed import ShardedNeuralDB
from ..ops.key_index import format_name
from ..store import NeuralDB, Snapshot
from .architectures import check_layer, locate_down_proj, num_layers
from .fingerprint import model_fingerprint

_KEY_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class Firing:
    """One token where a fact fired in the last forward pass.

    batch, position: the token's row and position in that forward's input (in `generate()` with a
    KV cache, each decoding step is a forward over the new token only, at position 0).
    fact_id: the fired fact; score: the cosine of the token's key with the fact's key (above that
    key's threshold).
    """

    batch: int
    position: int
    fact_id: str
    score: float


@dataclasses.dataclass(frozen=True)
class ForwardRecord:
    """What the retrieval saw in one forward pass.

    index: int64, the input's leading shape (batch, seq): the fired row of `snapshot`, -1 where no
    gate fired. score: float32, same shape: the best cosine (fired or not; -inf with no facts).
    snapshot: the database view the retrieval read (maps rows to fact ids).
    """

    index: torch.Tensor
    score: torch.Tensor
    snapshot: Snapshot


@dataclasses.dataclass(frozen=True)
class ForwardViews:
    """What the hook retrieves from, for one database version, device and residual dtype.

    snapshot: the view with residuals in `dtype` on `device`; keys: the view with the keys in the
    attachment's key_dtype (`snapshot` itself when the dtypes agree); gate: the gamma argument of
    the retrieval (a number, or keys.gammas, checked to lie in [-1, 1]).
    """

    device: torch.device
    dtype: torch.dtype
    snapshot: Snapshot
    keys: Snapshot
    gate: float | torch.Tensor


class Attachment:
    """A NeuralDB hooked into one layer of a model; returned by `attach`.

    Attributes: model, db, layer, module (the hooked down-projection), backend, key_dtype.
    `gamma` is the scalar gate: the one given to `attach`, which every key then uses, else the
    database's current gamma, which the keys without thresholds of their own use (the others use
    theirs, `db.snapshot().gammas`).
    After a forward pass, `last` holds its `ForwardRecord` and `fired()` lists its `Firing`s
    (`last` keeps that forward's database snapshot alive until the next forward or `detach`).
    `detach()` (or leaving a `with attach(...)` block) removes the hook; `with attachment.paused():`
    runs the bare model for the duration of the block.
    """

    def __init__(self, model, db, layer, module, gamma, backend, key_dtype, key_format=None):
        self.model = model
        self.key_format = key_format
        self.db = db
        self.layer = layer
        self.module = module
        self.backend = backend
        self.key_dtype = key_dtype
        self._gamma = gamma
        self._paused = False
        self.last: Optional[ForwardRecord] = None
        self._current: Optional[ForwardViews] = None  # the last forward's views, reused while the database is unchanged
        self._hook = module.register_forward_hook(self._add_retrieval)

    @property
    def gamma(self) -> float:
        return self.db.gamma if self._gamma is None else self._gamma

    @property
    def attached(self) -> bool:
        return self._hook is not None

    def detach(self) -> None:
        """Remove the hook; the model is then exactly as before `attach`. Detaching again does nothing."""
        if self._hook is None:
            return
        self._hook.remove()
        self._hook = None
        self.last = None
        self._current = None

    @property
    def is_paused(self) -> bool:
        return self._paused

    @contextlib.contextmanager
    def paused(self) -> Iterator["Attachment"]:
        """Within the block the hooked module's output is left as is (the model computes exactly
        what the bare model does, `fired()` is empty); retrieval is back on exit, also after an
        error, unless `detach()` was called meanwhile. Blocks may nest."""
        was_paused, self._paused = self._paused, True
        self.last = None
        try:
            yield self
        finally:
            self._paused = was_paused
            self.last = None

    def __enter__(self) -> "Attachment":
        return self

    def __exit__(self, *exc_info) -> None:
        self.detach()

    def __repr__(self) -> str:
        state = ("paused" if self._paused else "attached") if self.attached else "detached"
        return (f"Attachment({state}, layer={self.layer}, module={type(self.module).__name__}, "
                f"facts={len(self.db)}, gamma={self.gamma}, backend={self.backend!r})")

    @torch.compiler.disable
    def _retrieve(self, hidden: torch.Tensor, dtype: torch.dtype):
        """(retrieved (..., d2) in `dtype`, index (...)) for the projection input `hidden` (..., d1).

        Runs eagerly under torch.compile (it takes the database lock and reads Python state), as
        one graph break per forward at the hooked layer; the rest of the model compiles.
        """
        views = self._forward_views(hidden.device, dtype)
        keys = self._keys_for(views.keys)
        if isinstance(views.gate, torch.Tensor) and not isinstance(keys, KeyIndex):
            # per-key thresholds of an immutable snapshot: checked once, when it was taken
            retrieved, index, score = gated_retrieve_prechecked(hidden, keys, views.snapshot.residuals, views.gate,
                                                                backend=self.backend)
        else:
            retrieved, index, score = gated_retrieve(hidden, keys, views.snapshot.residuals, views.gate,
                                                     backend=self.backend, return_index=True)
        self.last = ForwardRecord(index, score, views.snapshot)
        return retrieved, index

    def _forward_views(self, device: torch.device, dtype: torch.dtype) -> ForwardViews:
        """The `ForwardViews` of the database's current version on `device` with residuals in
        `dtype`: the last forward's while the database version, device and dtype are unchanged
        (snapshots are immutable, so they still show the database), else new ones from `_views`,
        their per-key thresholds checked (ValueError outside [-1, 1]) before they are kept."""
        views = self._current
        if (views is not None and views.snapshot.version == self.db.version and views.device == device
                and views.dtype == dtype and not self.db.closed):
            return views
        snapshot, keys = self._views(device, dtype)
        gate = self._gate(keys)
        if isinstance(gate, torch.Tensor):
            check_key_gamma_values(gate)
        self._current = ForwardViews(device, dtype, snapshot, keys, gate)
        return self._current

    def _views(self, device: torch.device, dtype: torch.dtype):
        """(snapshot with residuals in `dtype`, snapshot with keys in `key_dtype`) of one database
        version on `device` (one snapshot twice when the dtypes agree)."""
        snapshot = keys = self.db.snapshot(device, dtype)
        if self.key_dtype is not None and self.key_dtype != dtype:
            keys = self.db.snapshot(device, self.key_dtype)
            while keys.version != snapshot.version:  # a writer came between the two snapshots
                snapshot = self.db.snapshot(device, dtype)
                keys = self.db.snapshot(device, self.key_dtype)
        return snapshot, keys

    def _gate(self, keys: Snapshot):
        """The gamma argument of the retrieval over `keys`: the attach-time number, else the facts'
        per-key thresholds where some fact has them, else the database's number."""
        if self._gamma is not None:
            return self._gamma
        return keys.gammas if keys.has_key_gammas else keys.gamma

    def _keys_for(self, keys: Snapshot):
        """The snapshot's keys, or with key_format set the database's KeyIndex of them, which the
        store keeps in sync with its view (`NeuralDB.key_index`: O(1) per forward, O(d1) per row
        the database adds or replaces)."""
        if self.key_format is None:
            return keys.keys
        return self.db.key_index(keys, self.key_format)

    def _add_retrieval(self, module, args, output):
        if self._paused:
            return None  # the output stays as the module computed it
        retrieved, index = self._retrieve(args[0], output.dtype)
        return torch.where((index >= 0).unsqueeze(-1), output + retrieved, output)

    def fired(self) -> List[Firing]:
        """The tokens where a fact fired in the last forward pass, in (batch, position) order.

        Ids are resolved here, from the snapshot that forward read, so they are right even if the
        database changed since. Inputs with more than two leading dims are flattened to (batch, -1).
        """
        return [] if self.last is None else firings(self.last, self.last.snapshot.ids_at)


def firings(record: ForwardRecord, ids_at: Callable[[torch.Tensor], List[str]]) -> List[Firing]:
    """The `Firing`s of one forward's `record`, in (batch, position) order; `ids_at(rows)` maps the
    fired rows (int64, CPU, in that order) to fact ids. Inputs with more than two leading dims are
    flattened to (batch, -1)."""
    rows = record.index.shape[0] if record.index.dim() >= 2 else 1
    index = record.index.reshape(rows, -1)
    score = record.score.reshape(rows, -1)
    where = (index >= 0).nonzero().tolist()
    ids = ids_at(index[index >= 0].cpu())
    values = score[index >= 0].tolist()
    return [Firing(b, t, fact_id, value) for (b, t), fact_id, value in zip(where, ids, values)]


def attachment_on(module: torch.nn.Module) -> Optional[Attachment]:
    """The Attachment hooked on `module`, or None (found among the module's own forward hooks)."""
    for hook in module._forward_hooks.values():
        owner = getattr(hook, "__self__", None)
        if isinstance(owner, Attachment):
            return owner
    return None


def attach(
    model: torch.nn.Module,
    db: NeuralDB | ShardedNeuralDB,
    layer: Optional[int] = None,
    gamma: Optional[float] = None,
    *,
    module_path: Optional[str] = None,
    backend: str = "auto",
    key_dtype: Optional[torch.dtype] = None,
    key_format: Optional[str] = None,
    allow_weight_mismatch: bool = False,
    process_group=None,
    exchange: Optional[str] = None,
    graph_safe: bool = False,
    capacity: Optional[int] = None,
) -> Attachment:
    """Hook NeuralDB `db` into decoder layer `layer` of `model`; returns the `Attachment`.

    model: a Hugging Face model of a supported type (see architectures.SUPPORTED_MODEL_TYPES), or
        any model with `module_path` ("....{layer}....", the path to the FFN down-projection).
    layer: decoder layer index; default `db.layer` (one of the two must be set).
    gamma: gate threshold in [-1, 1] for every key, overriding the database's gamma and any
        per-key thresholds; default: the database's, read at every forward (each key's own
        threshold where its fact has them, `db.gamma` for the others).
    backend: `gated_retrieve` backend ("auto", "cpu", "torch", "triton", "cuda").
    key_dtype: dtype of the keys handed to the retrieval (float32/float16/bfloat16); default the
        model's. Residuals always take the projection output's dtype.
    key_format: None (scan the full-precision keys) or a KeyIndex code format ("int8", or
        "fp8_e4m3" on GPUs with fp8; ops/key_index.py): the retrieval scans the codes and rescores certified
        candidates exactly, so every output is the same; the database keeps the codes in sync with
        its facts (`NeuralDB.key_index`).
    allow_weight_mismatch: silence the warning when the database was built for other weights.
    process_group, exchange: for a `ShardedNeuralDB` only (the model replicated on every rank;
        see integration/distributed_attach.py): the group of the retrieval collectives (default:
        the database's) and how fired residuals travel ("allreduce" or "gather").
    graph_safe: return a `GraphSafeAttachment` (integration/graph_safe.py): the hook retrieves from
        fixed device buffers that `sync()` refills from the database, so torch.compile(fullgraph=True)
        and CUDA graphs capture it; capacity: the key rows those buffers reserve (they grow by
        doubling). Not with key_format or a ShardedNeuralDB.

    Errors: unsupported model type, bad module path, layer out of range or missing, gamma outside
    [-1, 1], a database whose d1/d2/layer/model type do not match the model (ValueError), a layer
    already attached (ValueError: detach the other attachment first).
    """
    if graph_safe and (key_format is not None or isinstance(db, ShardedNeuralDB)):
        raise ValueError("graph_safe=True scans the full-precision keys of a NeuralDB: not with key_format "
                         "or a ShardedNeuralDB")
    if capacity is not None and not graph_safe:
        raise ValueError("capacity applies to graph_safe=True only")
    if isinstance(db, ShardedNeuralDB):
        if key_format is not None:
            raise ValueError("key_format applies to a NeuralDB, not to a ShardedNeuralDB")
        from .distributed_attach import attach_sharded  # imported here: it builds on this module

        return attach_sharded(model, db, layer, gamma, module_path=module_path, backend=backend, key_dtype=key_dtype,
                              allow_weight_mismatch=allow_weight_mismatch, process_group=process_group,
                              exchange=exchange)
    if process_group is not None or exchange is not None:
        raise ValueError("process_group and exchange apply to a ShardedNeuralDB only")
    if not isinstance(db, NeuralDB):
        raise TypeError(f"db must be a NeuralDB or a ShardedNeuralDB, got {type(db).__name__}")
    layer, module, gamma = hook_target(model, db, layer, gamma, module_path=module_path, backend=backend,
                                       key_dtype=key_dtype, key_format=key_format,
                                       allow_weight_mismatch=allow_weight_mismatch)
    if graph_safe:
        from .graph_safe import GraphSafeAttachment  # imported here: it builds on this module

        return GraphSafeAttachment(model, db, layer, module, gamma, backend, key_dtype, capacity)
    return Attachment(model, db, layer, module, gamma, backend, key_dtype, key_format)


def hook_target(model, db, layer, gamma, *, module_path, backend, key_dtype, allow_weight_mismatch,
                key_format=None):
    """The checks `attach` makes before hooking (see there); returns (layer, the down-projection
    module, gamma as a float or None). `db` is a NeuralDB or a ShardedNeuralDB."""
    if layer is None:
        layer = db.layer
        if layer is None:
            raise ValueError(
                f"no layer to attach to: the database has none and layer= was not given "
                f"(the model has {num_layers(model, module_path)} decoder layers)")
    check_layer(model, layer, module_path)
    if gamma is not None:
        gamma = check_gamma(gamma)
    if key_dtype is not None and key_dtype not in _KEY_DTYPES:
        raise TypeError(f"key_dtype must be one of {_KEY_DTYPES} or None, got {key_dtype!r}")
    if key_format is not None:
        format_name(key_format)  # ValueError naming the formats
    module = locate_down_proj(model, layer, module_path)
    weight = next(module.parameters(), None)
    if weight is not None:
        resolve_backend(backend, weight.device, (weight.dtype,))
    db.check_fingerprint(model_fingerprint(model, layer, module_path), allow_weight_mismatch=allow_weight_mismatch)
    other = attachment_on(module)
    if other is not None:
        raise ValueError(
            f"layer {layer} ({type(module).__name__}) already has a NeuralDB attached ({other!r}); "
            "detach it first")
    return layer, module, gamma
