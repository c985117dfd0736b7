"""Per-key gate thresholds, calibrated from queries that must fire a key and queries that must not.

A query fires a key row when the row is its best match and their cosine exceeds the row's
threshold (ops.gated_retrieve). For each key row the Editor collects:

- positives: the queries that must fire it: the down-projection inputs at the subject's last
  token in each of the fact's own contexts (the bare prompt and each model-written-prefix
  context, the queries its averaged key is made of), each assigned to the fact's key row it is
  closest to (a fact with an extra bare-prompt key splits them between its two rows);
- negatives: queries that must not fire it, from allowed material only: every token of text the
  model writes itself (the model-written prefixes and `EditHParams.calibration_texts` longer
  model-written texts), and the positives or stored keys of the other facts that do not share
  its residual. Never an evaluation's paraphrase or neighbourhood prompts: no function here
  takes them.

The rule, per key row with min positive cosine `floor` (stored in the fact's EditRecord as
`key_floors`) and max negative cosine `worst`:

    threshold = max(gamma, min(worst + margin, floor - margin))

i.e. above every negative by `margin` and never below the database's gamma, but never so high
that one of the fact's own contexts stops firing. When `worst + margin > floor - margin` the two
requirements conflict; the fact keeps working (the threshold is `floor - margin`, or gamma if
that is higher) and the key counts as a conflict in the EditReport (`threshold_conflicts`).

Incrementally (`raised_thresholds`), a batch of new facts raises the thresholds of stored keys
that the new facts' positives would pass (one matrix product of the new positives against the
stored keys), to the highest such cosine + margin, capped at the stored key's floor - margin; a
stored fact without floors (computed without calibration) is left alone until `neuraldb db
calibrate` recomputes it. Removing facts leaves the remaining keys' thresholds as they are: a
threshold raised against a removed fact is only more selective than needed, never wrong.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Optional

import torch

from .prefixes import SEED_WORDS, sample_tokens

_SCORES = 1 << 24  # elements of one score matrix (64 MiB of float32): products are chunked to this
# model -> {(count, length, seed, top_k): texts}: every edit call of an Editor asks for the same texts
_TEXTS: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def _rows_per_chunk(columns: int) -> int:
    return max(1, _SCORES // max(columns, 1))


@torch.no_grad()
def model_written_texts(model, tokenizer, *, count: int, length: int, seed: int, top_k: int = 5) -> list[str]:
    """`count` texts of `length` tokens the model samples (top-k, its own torch.Generator seeded
    with `seed`, the global RNG untouched) from the first token of SEED_WORDS in turn, all in one
    batch with a KV cache: seconds where the prefixes' one-at-a-time sampler would take minutes.
    Cached per model and settings like the prefixes (the model must be unedited at the first call)."""
    if count == 0:
        return []
    cached = _TEXTS.setdefault(model, {})
    settings = (count, length, seed, top_k)
    if settings not in cached:
        cached[settings] = _sample_texts(model, tokenizer, count, length, seed, top_k)
    return list(cached[settings])


def _sample_texts(model, tokenizer, count: int, length: int, seed: int, top_k: int) -> tuple[str, ...]:
    starts = [tokenizer(SEED_WORDS[i % len(SEED_WORDS)])["input_ids"] for i in range(count)]
    width = min(len(row) for row in starts)  # the seed words' shortest encoding (one token, or BOS + one)
    starts = [row[:width] for row in starts]
    sampled = sample_tokens(model, starts, length, top_k=top_k, generator=torch.Generator().manual_seed(seed))
    return tuple(tokenizer.decode(start + row, skip_special_tokens=True)
                 for start, row in zip(starts, sampled.tolist()))


@dataclasses.dataclass(frozen=True)
class KeyThresholds:
    """Calibrated thresholds of k key rows: gammas (k,) float32, floors (k,) float32 (min positive
    cosine; 1.0 for a row that no positive is assigned to) and conflicts (k,) bool (the negatives
    asked for more than floor - margin)."""

    gammas: torch.Tensor
    floors: torch.Tensor
    conflicts: torch.Tensor


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def nearest_rows(queries: torch.Tensor, query_fact: torch.Tensor, keys: torch.Tensor,
                 key_fact: torch.Tensor) -> torch.Tensor:
    """(p,) int64: for each query (p, d1) of fact query_fact[i], the index into `keys` (k, d1) of its
    fact's best-matching key row (key_fact (k,) names each row's fact)."""
    scores = _unit(queries) @ _unit(keys).T
    scores = scores.masked_fill(query_fact.view(-1, 1) != key_fact.view(1, -1), float("-inf"))
    return scores.argmax(dim=1)


def calibrate_thresholds(keys: torch.Tensor, key_unit: torch.Tensor, positives: torch.Tensor,
                         positive_row: torch.Tensor, negatives: torch.Tensor, negative_unit: torch.Tensor, *,
                         gamma: float, margin: float) -> KeyThresholds:
    """Thresholds of key rows `keys` (k, d1) by the rule of this module.

    key_unit (k,) int64: the residual-sharing unit of each row's fact. positives (p, d1) with
    positive_row (p,) int64: the row each must fire. negatives (n, d1) with negative_unit (n,)
    int64: the unit a negative belongs to (-1: none, e.g. general text); a negative is ignored
    for the rows of its own unit. gamma: the lowest threshold; margin: the clearance in cosine.
    """
    k = keys.shape[0]
    unit_keys = _unit(keys)
    own = (_unit(positives) * unit_keys[positive_row]).sum(dim=1)
    floors = torch.ones(k).scatter_reduce(0, positive_row, own, reduce="amin", include_self=True)
    worst = torch.full((k,), -1.0)
    unit_negatives = _unit(negatives)
    chunk = _rows_per_chunk(len(negatives))
    for start in range(0, k, chunk):
        rows = slice(start, start + chunk)
        scores = unit_keys[rows] @ unit_negatives.T
        scores = scores.masked_fill(key_unit[rows].view(-1, 1) == negative_unit.view(1, -1), -1.0)
        if scores.shape[1]:
            worst[rows] = scores.max(dim=1).values
    wanted, allowed = worst + margin, floors - margin
    gammas = torch.clamp(torch.minimum(wanted, allowed), min=gamma, max=1.0)
    return KeyThresholds(gammas.float(), floors.float(), (wanted > allowed) & (wanted > gamma))


@dataclasses.dataclass(frozen=True)
class RaisedThresholds:
    """New thresholds for a stored fact's keys: gammas (k,) float32, and whether a key was capped at
    its floor - margin (a conflict: some new positive still passes it)."""

    gammas: torch.Tensor
    conflict: bool


def colliding_rows(positives: torch.Tensor, keys: torch.Tensor, gammas: torch.Tensor) -> torch.Tensor:
    """(r,) int64: the rows of `keys` (m, d1) with thresholds `gammas` (m,) that at least one of
    `positives` (p, d1) passes (cosine > threshold): one matrix product, chunked over the queries."""
    hit = torch.zeros(keys.shape[0], dtype=torch.bool)
    unit_keys = _unit(keys)
    chunk = _rows_per_chunk(len(keys))
    for start in range(0, positives.shape[0], chunk):
        scores = _unit(positives[start : start + chunk]) @ unit_keys.T
        hit |= (scores > gammas.view(1, -1)).any(dim=0)
    return hit.nonzero().flatten()


def raised_thresholds(positives: torch.Tensor, keys: torch.Tensor, gammas: torch.Tensor,
                      floors: Optional[torch.Tensor], *, margin: float) -> Optional[RaisedThresholds]:
    """A stored fact's thresholds (keys (k, d1), gammas (k,)) raised above every one of
    `positives` (p, d1) that passes them (+ margin), each capped at floors[i] - margin and never
    lowered; None when nothing changes or the fact has no floors (not calibrated: left alone)."""
    if floors is None:
        return None
    scores = _unit(positives) @ _unit(keys).T
    passing = torch.where(scores > gammas.view(1, -1), scores, torch.tensor(-2.0)).max(dim=0).values
    wanted, allowed = passing + margin, floors - margin
    raised = torch.maximum(gammas, torch.clamp(torch.minimum(wanted, allowed), max=1.0))
    if torch.equal(raised, gammas):
        return None
    return RaisedThresholds(raised.float(), bool(((passing > -2.0) & (wanted > allowed)).any()))


@dataclasses.dataclass(frozen=True)
class Recalibration:
    """What `Editor.calibrate` (`neuraldb db calibrate`) did.

    facts, keys: how many facts and key rows were calibrated. changed: ids of facts whose
    thresholds changed. conflicts: ids of facts with a key whose negatives asked for more than its
    floor - margin. skipped: ids of facts without an Editor record (not recomputable), left as
    they were. mean_before, mean_after: mean threshold over the calibrated key rows. seconds: wall time.
    """

    facts: int
    keys: int
    changed: tuple[str, ...]
    conflicts: tuple[str, ...]
    skipped: tuple[str, ...]
    mean_before: float
    mean_after: float
    seconds: float
