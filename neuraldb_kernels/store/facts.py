"""Facts as the store sees them, and the validation of a batch before anything is written.

A batch is checked completely (shapes, dtypes, finiteness, key norms, key thresholds, ids,
metadata) before the database is touched, so a bad fact rejects the whole batch and nothing is stored.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .schema import utc_now

METADATA_FIELDS = ("subject", "prompt", "target_new", "target_true", "source", "created_at")
_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclasses.dataclass(frozen=True)
class StoredFact:
    """One stored fact.

    id: stable string id. keys: (k, d1) CPU tensor, k >= 1: the fact's own key first, then any
    extra keys (other queries that retrieve the same residual); residual: (d2,) CPU tensor; both
    in the database's storage dtype. metadata: subject, prompt, target_new, target_true, source,
    created_at (ISO-8601 UTC) where given, plus any JSON-serialisable extras. key_gammas: None
    (every key uses the database's gamma) or a (k,) float32 CPU tensor, the gate threshold of
    each key (a cosine in [-1, 1]).
    """

    id: str
    keys: torch.Tensor
    residual: torch.Tensor
    metadata: dict[str, Any]
    key_gammas: torch.Tensor | None = None

    @property
    def key(self) -> torch.Tensor:
        """(d1,): the fact's own key, `keys[0]`."""
        return self.keys[0]


@dataclasses.dataclass(frozen=True)
class FactBatch:
    """A validated batch: n ids, (n, d1) keys, n (j_i, d1) extra keys (j_i >= 0) and (n, d2)
    residuals on CPU in the storage dtype, n metadata dicts (created_at filled in) and their JSON
    texts, and n key thresholds: None (the database's gamma) or (1 + j_i,) float32 CPU."""

    ids: list[str]
    keys: torch.Tensor
    extra_keys: list[torch.Tensor]
    residuals: torch.Tensor
    metadata: list[dict[str, Any]]
    metadata_json: list[str]
    key_gammas: list[torch.Tensor | None]

    def __len__(self) -> int:
        return len(self.ids)

    def fact_keys(self, i: int) -> torch.Tensor:
        """(1 + j_i, d1): fact i's key followed by its extra keys."""
        return torch.cat([self.keys[i : i + 1], self.extra_keys[i]])


def _rows(name: str, values: Any, width: int, dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
    """`values` as a (n, width) CPU tensor of the storage dtype, and whether it was one vector."""
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(values).__name__}")
    if values.dtype not in _INPUT_DTYPES:
        raise TypeError(f"{name} must be a float16/bfloat16/float32/float64 tensor, got {values.dtype}")
    single = values.dim() == 1
    if values.dim() not in (1, 2) or values.shape[-1] != width:
        raise ValueError(f"{name} must have shape ({width},) for one fact or (n, {width}) for a batch, "
                         f"got {tuple(values.shape)}")
    rows = values.detach().reshape(-1, width).to(device="cpu", dtype=dtype).contiguous()
    return rows, single


def _position(i: int, fact_id: str) -> str:
    return f"fact {fact_id!r} (batch position {i})"


def vector_problem(rows: torch.Tensor, *, keys: bool) -> tuple[int, str, int] | None:
    """The first bad row of a (n, width) tensor in the storage dtype, why it is bad, and how many
    rows share that problem; None when all are fine. Every row must be finite; a key row must also
    have a squared norm that is a normal float32 number (the op's cosines are taken in float32:
    a zero norm, or one that under- or overflows there, makes the cosine undefined)."""
    values = rows.float()
    squared = torch.linalg.vecdot(values, values)  # one pass; NaN or Inf in a row makes its sum non-finite
    tiny = torch.finfo(torch.float32).tiny
    if torch.isfinite(squared).all() and (not keys or bool((squared >= tiny).all())):
        return None
    nonfinite = (~torch.isfinite(rows).all(dim=1)).nonzero().flatten().tolist()
    if nonfinite:
        dtype = str(rows.dtype).removeprefix("torch.")
        return nonfinite[0], f"contains NaN or Inf (in storage dtype {dtype})", len(nonfinite)
    if not keys:
        return None  # finite values whose squared sum overflows: a residual needs no norm
    zero = (rows == 0).all(dim=1).nonzero().flatten().tolist()
    if zero:
        return zero[0], "has zero norm (cosine undefined)", len(zero)
    out_of_range = (~(torch.isfinite(squared) & (squared >= tiny))).nonzero().flatten().tolist()
    i = out_of_range[0]
    return i, (f"has a norm that under- or overflows float32 (squared norm {float(rows[i].double().square().sum()):.3g}; "
               f"cosine undefined)"), len(out_of_range)


def key_gammas_problem(key_gammas: Sequence[float]) -> str | None:
    """Why k key thresholds are invalid (each must be a finite cosine in [-1, 1]), or None."""
    for j, value in enumerate(key_gammas):
        if not -1.0 <= value <= 1.0:  # False for NaN too
            return f"has a key threshold that is not a finite cosine in [-1, 1] (key {j}: {value!r})"
    return None


def _check_rows(rows: torch.Tensor, label: Any, *, keys: bool) -> None:
    """ValueError naming `label(i)` for the first bad row of `rows` (see `vector_problem`)."""
    problem = vector_problem(rows, keys=keys)
    if problem:
        i, why, count = problem
        raise ValueError(f"{label(i)} {why}; {count} such row(s) in the batch")


def _ids(ids: Any, n: int, single: bool) -> list[str]:
    if ids is None:
        return [uuid.uuid4().hex for _ in range(n)]
    if isinstance(ids, str):
        ids = [ids]
    elif not isinstance(ids, Sequence):
        raise TypeError(f"ids must be a str or a sequence of str, got {type(ids).__name__}")
    ids = list(ids)
    if len(ids) != n:
        raise ValueError(f"got {len(ids)} ids for {n} facts")
    seen: dict[str, int] = {}
    for i, fact_id in enumerate(ids):
        if not isinstance(fact_id, str) or not fact_id:
            raise TypeError(f"id at batch position {i} must be a non-empty str, got {fact_id!r}")
        if fact_id in seen:
            raise ValueError(f"duplicate id {fact_id!r} in the batch (positions {seen[fact_id]} and {i})")
        seen[fact_id] = i
    return ids


def _metadata(metadata: Any, ids: list[str], single: bool) -> tuple[list[dict[str, Any]], list[str]]:
    n = len(ids)
    if metadata is None:
        entries: list[Any] = [None] * n
    elif isinstance(metadata, Mapping):
        if not single and n != 1:
            raise ValueError(f"metadata is one mapping but the batch has {n} facts; pass a list of mappings")
        entries = [metadata]
    elif isinstance(metadata, Sequence) and not isinstance(metadata, (str, bytes)):
        entries = list(metadata)
        if len(entries) != n:
            raise ValueError(f"got {len(entries)} metadata entries for {n} facts")
    else:
        raise TypeError(f"metadata must be a mapping, a sequence of mappings or None, got {type(metadata).__name__}")
    now = utc_now()
    dicts, texts = [], []
    for i, entry in enumerate(entries):
        where = _position(i, ids[i])
        if entry is None:
            entry = {}
        if not isinstance(entry, Mapping):
            raise TypeError(f"metadata of {where} must be a mapping or None, got {type(entry).__name__}")
        for name, value in entry.items():
            if not isinstance(name, str):
                raise TypeError(f"metadata of {where} has a non-str field name {name!r}")
            if name in METADATA_FIELDS and value is not None and not isinstance(value, str):
                raise TypeError(f"metadata field {name!r} of {where} must be a str or None, got {type(value).__name__}")
        fields = dict(entry)
        fields.setdefault("created_at", now)
        try:
            texts.append(json.dumps(fields, allow_nan=False, ensure_ascii=False))
        except (TypeError, ValueError) as error:
            raise ValueError(f"metadata of {where} is not JSON-serialisable: {error}") from None
        dicts.append(json.loads(texts[-1]))
    return dicts, texts


def _per_fact(name: str, value: Any, ids: list[str], single: bool) -> list[Any]:
    """An optional per-fact argument as one entry (None or a tensor) per fact: None for all, a tensor
    for a single fact, or a sequence of entries."""
    if value is None:
        return [None] * len(ids)
    if single and isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, torch.Tensor) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be None, a tensor for one fact, or a sequence with one entry (None or "
                        f"a tensor) per fact, got {type(value).__name__}")
    if len(value) != len(ids):
        raise ValueError(f"got {len(value)} {name} entries for {len(ids)} facts")
    return list(value)


def _extra_keys(extra_keys: Any, ids: list[str], single: bool, d1: int, dtype: torch.dtype) -> list[torch.Tensor]:
    out = []
    for i, entry in enumerate(_per_fact("extra_keys", extra_keys, ids, single)):
        if entry is None:
            out.append(torch.empty((0, d1), dtype=dtype))
            continue
        where = f"extra keys of {_position(i, ids[i])}"
        if isinstance(entry, torch.Tensor) and (entry.dim() not in (1, 2) or entry.shape[-1] != d1):
            raise ValueError(f"{where} must have shape ({d1},) or (j, {d1}), got {tuple(entry.shape)}")
        rows, _ = _rows(where, entry, d1, dtype)
        _check_rows(rows, lambda j: f"extra key {j} of {_position(i, ids[i])}", keys=True)
        out.append(rows)
    return out


def _key_gammas(key_gammas: Any, ids: list[str], single: bool, key_counts: list[int]) -> list[torch.Tensor | None]:
    out: list[torch.Tensor | None] = []
    for i, (entry, count) in enumerate(zip(_per_fact("key_gammas", key_gammas, ids, single), key_counts)):
        where = f"key_gammas of {_position(i, ids[i])}"
        if entry is None:
            out.append(None)
            continue
        if not isinstance(entry, torch.Tensor) or entry.dtype not in _INPUT_DTYPES:
            raise TypeError(f"{where} must be None or a float16/bfloat16/float32/float64 tensor, got "
                            f"{entry.dtype if isinstance(entry, torch.Tensor) else type(entry).__name__}")
        if tuple(entry.shape) != (count,):
            raise ValueError(f"{where} must have shape ({count},), one threshold per key (the fact has {count}), "
                             f"got {tuple(entry.shape)}")
        values = entry.detach().to("cpu", torch.float64)
        problem = key_gammas_problem(values.tolist())
        if problem:
            raise ValueError(f"{where}: the fact {problem}")
        out.append(values.to(torch.float32))
    return out


def prepare_batch(keys: Any, residuals: Any, ids: Any, metadata: Any, *,
                  d1: int, d2: int, dtype: torch.dtype, extra_keys: Any = None, key_gammas: Any = None) -> FactBatch:
    """Validate one fact or a batch and convert it to the storage layout.

    keys: (d1,) or (n, d1); residuals: (d2,) or (n, d2); any float dtype and device. ids: None
    (fresh uuid4 hex ids), a str, or n str. metadata: None, a mapping, or n mappings/None.
    extra_keys: more keys per fact (other queries that retrieve the same residual): None; for one
    fact a (d1,) / (j, d1) tensor; for a batch n entries, each None or such a tensor.
    Raises TypeError/ValueError naming the problem and the fact's id and batch position.
    """
    key_rows, key_single = _rows("keys", keys, d1, dtype)
    residual_rows, residual_single = _rows("residuals", residuals, d2, dtype)
    if key_single != residual_single or key_rows.shape[0] != residual_rows.shape[0]:
        raise ValueError(f"keys {tuple(keys.shape)} and residuals {tuple(residuals.shape)} describe "
                         f"different numbers of facts")
    fact_ids = _ids(ids, key_rows.shape[0], key_single)
    _check_rows(key_rows, lambda i: f"key of {_position(i, fact_ids[i])}", keys=True)
    _check_rows(residual_rows, lambda i: f"residual of {_position(i, fact_ids[i])}", keys=False)
    extra = _extra_keys(extra_keys, fact_ids, key_single, d1, dtype)
    gammas = _key_gammas(key_gammas, fact_ids, key_single, [1 + len(rows) for rows in extra])
    dicts, texts = _metadata(metadata, fact_ids, key_single)
    return FactBatch(fact_ids, key_rows, extra, residual_rows, dicts, texts, gammas)
