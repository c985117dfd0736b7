"""Per-key gate thresholds, calibrated from queries that must fire a key and queries that must not.

A query fires a key row when the row is its best match and their cosine exceeds the row's
threshold (ops.gated_retrieve). For each key row the Editor collects:

- positives: the queries that must fire it: the down-projection inputs at the subject's last
  token in each of the fact's own contexts (the bare prompt and each model-written-prefix
  context, the queries its averaged key is made of), and the subject read after other stored or
  edited prompts' openings ("other wordings", `calibration_rows`: a paraphrase puts the subject
  after other words), each assigned to the fact's key row it is closest to (a fact with an extra
  bare-prompt key splits them between its two rows);
- negatives: queries that must not fire it, from allowed material only: every token of text the
  model writes itself (the model-written prefixes and `EditHParams.calibration_texts` longer
  model-written texts), the positives or stored keys of the other facts that do not share its
  residual, and optionally names near its subject (`near_subjects`, off by default: measured, they
  cost more generalization than the specificity they buy). Never an evaluation's paraphrase or
  neighbourhood prompts: no function here takes them.

The rule, per key row with min positive cosine `floor` (stored in the fact's EditRecord as
`key_floors`) and max negative cosine `worst`:

    threshold = max(gamma, min((worst + floor) / 2, floor - margin))

i.e. halfway between the closest query that must not fire it and the farthest one that must
(unseen text of either kind is as likely to land on either side), never below the database's
gamma, and at least `margin` below the floor so that every own context and wording fires. A
generic bare-prompt key (editing.keys.bare_prompt_keys: a query read where the subject opens the
text, alike for every opening) is an exact-match key: only text opening with the same words gives
its query, anything else near it opens with another entity, so its threshold is the highest the
floor allows, max(gamma, floor - margin). When
`worst + margin > floor - margin` the two requirements conflict; the fact keeps working (the
threshold is `floor - margin`, or gamma if that is higher) and the key counts as a conflict in the
EditReport (`threshold_conflicts`).

Incrementally (`raised_thresholds`), a batch of new facts raises the thresholds of stored keys
that the new facts' positives (and near-subject names) would pass (one matrix product against the
stored keys), by the same rule with the highest such cosine as `worst`, never lowered; a stored
fact without floors (computed without calibration) is left alone until `neuraldb db calibrate`
recomputes it. Removing facts leaves the remaining keys' thresholds as they are: a threshold
raised against a removed fact is only more selective than needed, never wrong. Stored facts'
own wordings are not recomputed when facts are added (their floors stay as stored); `db calibrate`
recomputes everything, the other facts' wordings included, from the stored facts' subjects and
prompts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import weakref
from typing import Optional, Sequence

import torch

from .prefixes import SEED_WORDS, sample_tokens
from .tokens import subject_last_token

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


def near_subjects(subject: str, pool: Sequence[str], count: int) -> list[str]:
    """Up to `count` names that look like `subject` but name other entities: its first word swapped
    for the first word of another multi-word name of `pool` ("Michel Rocard" -> "Yves Rocard"), its
    last word for another's last word ("Renault 4" -> "Renault Clio"), and a last word that is a
    number changed by one ("Renault 4" -> "Renault 3", "Renault 5"). Names in `pool` and the subject
    itself are left out (they are facts, not negatives). The swapped words are chosen by a hash of
    (subject, word), so the choice does not depend on the order of `pool` or on a random state."""
    words = subject.split()
    if count <= 0 or len(words) < 2:
        return []
    taken = {" ".join(name.split()) for name in pool} | {" ".join(words)}
    names = [name.split() for name in pool]
    firsts = {w[0] for w in names if len(w) >= 2} - {words[0]}
    lasts = {w[-1] for w in names if len(w) >= 2} - {words[-1]}

    numbered = []
    if words[-1].isdigit():
        number = int(words[-1])
        numbered = [" ".join([*words[:-1], str(n)]) for n in (number + 1, number - 1) if n >= 0]
    first_swaps = [" ".join([first, *words[1:]]) for first in _hash_ranked(subject, firsts, count)]
    last_swaps = [" ".join([*words[:-1], last]) for last in _hash_ranked(subject, lasts, count)]
    alternating = [name for pair in itertools.zip_longest(first_swaps, last_swaps) for name in pair if name]
    found = []
    for name in [*numbered, *alternating]:
        if name not in taken and name not in found:
            found.append(name)
    return found[:count]


@dataclasses.dataclass(frozen=True)
class CalibrationRows:
    """Token rows to read queries from: positives at `positive_positions`, each owned by the fact
    `positive_owner[i]` (an index into the facts they were built for), must fire their owner's
    keys; negatives (at `negative_positions`) and every token of `opening_rows` name other
    entities and must fire no key."""

    positive_rows: list[list[int]]
    positive_positions: list[int]
    positive_owner: list[int]
    negative_rows: list[list[int]]
    negative_positions: list[int]
    opening_rows: list[list[int]]


def _hash_ranked(subject: str, candidates, count: int) -> list[str]:
    return sorted(candidates, key=lambda item: hashlib.sha256(f"{subject}\0{item}".encode()).digest())[:count]


def calibration_rows(tokenizer, facts: Sequence, prefixes: Sequence[str], pool_subjects: Sequence[str],
                     pool_heads: Sequence[str], *, near_subjects_per_fact: int,
                     heads_per_fact: int) -> CalibrationRows:
    """The queries beyond a fact's own contexts that calibrate its keys, from allowed material only
    (the facts' subjects and prompts, the stored facts' subjects and prompts, the model-written
    prefixes):

    - negatives: `near_subjects_per_fact` names near each fact's subject (`near_subjects` over
      `pool_subjects`) read where the subject stands in each of its contexts, cut after the name (a
      query there depends only on the words before it, which is what a similar entity's text shares
      with the fact's), and the same names alone at the start of a text, every token (keys read
      near a text's start, e.g. a prompt that opens with the subject, see few words before them);
    - positives: the subject read after `heads_per_fact` other prompt openings of `pool_heads`
      (the text before the subject in stored prompts, e.g. "The mother tongue of "): the subject in
      other wording, as a paraphrase puts it, which the fact's keys must keep firing on.
    """
    rows = CalibrationRows([], [], [], [], [], [])
    for owner, fact in enumerate(facts):
        prompt = fact.filled_prompt
        start, _ = fact.subject_span
        for name in near_subjects(fact.subject, pool_subjects, near_subjects_per_fact):
            for prefix in ("", *prefixes):
                text = prefix + prompt[:start] + name
                ids, last = subject_last_token(tokenizer, text, (len(prefix) + start, len(text)))
                rows.negative_rows.append(ids)
                rows.negative_positions.append(last)
            rows.opening_rows.append(list(tokenizer(name)["input_ids"]))
        own_head = prompt[:start]
        for head in _hash_ranked(fact.subject, sorted(set(pool_heads) - {own_head}), heads_per_fact):
            text = head + fact.subject
            ids, last = subject_last_token(tokenizer, text, (len(head), len(text)))
            rows.positive_rows.append(ids)
            rows.positive_positions.append(last)
            rows.positive_owner.append(owner)
    return rows


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
                         gamma: float, margin: float, exact: Optional[torch.Tensor] = None) -> KeyThresholds:
    """Thresholds of key rows `keys` (k, d1) by the rule of this module.

    key_unit (k,) int64: the residual-sharing unit of each row's fact. positives (p, d1) with
    positive_row (p,) int64: the row each must fire. negatives (n, d1) with negative_unit (n,)
    int64: the unit a negative belongs to (-1: none, e.g. general text); a negative is ignored
    for the rows of its own unit. gamma: the lowest threshold; margin: the clearance in cosine.
    exact (k,) bool: the exact-match rows (generic bare-prompt keys), at floor - margin.
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
    middle, allowed = (worst + floors) / 2, floors - margin
    if exact is not None:
        middle = torch.where(exact, allowed, middle)
    gammas = torch.clamp(torch.minimum(middle, allowed), min=gamma, max=1.0)
    return KeyThresholds(gammas.float(), floors.float(), (worst + margin > allowed) & (worst + margin > gamma))


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
    """A stored fact's thresholds (keys (k, d1), gammas (k,)) raised to halfway between the highest
    of `positives` (p, d1) that passes them and floors[i], capped at floors[i] - margin and never
    lowered; None when nothing changes or the fact has no floors (not calibrated: left alone)."""
    if floors is None:
        return None
    scores = _unit(positives) @ _unit(keys).T
    passing = torch.where(scores > gammas.view(1, -1), scores, torch.tensor(-2.0)).max(dim=0).values
    middle, allowed = (passing + floors) / 2, floors - margin
    raised = torch.maximum(gammas, torch.clamp(torch.minimum(middle, allowed), max=1.0))
    if torch.equal(raised, gammas):
        return None
    # the raise leaves a passing query above the threshold only when it is capped at floor - margin
    return RaisedThresholds(raised.float(), bool(((passing > -2.0) & (passing + margin > allowed)).any()))


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
