"""`EditReport`: what one `Editor.edit` / `Editor.update` call did, returned as a value."""

from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class SkippedFact:
    """A fact left out (on_error="skip"): its input index, its id when it has one, and why."""

    index: int
    fact_id: Optional[str]
    reason: str


@dataclasses.dataclass(frozen=True)
class EditReport:
    """The outcome of one edit or update call.

    ids: the given facts' ids in input order (skipped facts left out; a repeated fact appears at
        each of its positions).
    computed: ids whose rows were written, in commit order (given facts and companions).
    companions: stored facts of the same subjects recomputed with the given ones (shared residual).
    already_stored: given ids not redone because they were stored with the same target_new.
    skipped: facts left out, in input order. superseded: (earlier input index, later index) where
        a later fact with the same id replaced an earlier one.
    first_token_subjects: computed ids keyed at the prompt's first token (see `Editor.edit`).
    not_converged: computed ids whose target probability stayed below stop_prob.
    threshold_conflicts: ids of facts (computed ones, and stored ones whose thresholds were raised)
        with a key whose negatives asked for a threshold above its floor - gate_margin: it was
        set to that cap (the fact keeps firing on its own contexts), see editing.calibration.
    raised_thresholds: stored facts not in this call whose key thresholds were raised because a
        computed fact's contexts would have fired them.
    seconds: wall-clock seconds per stage: "prefixes" (prefixes, rewordings and tokenisation), "keys" (keys
        and generic queries), "residuals", "store", and "total" (the whole call).
    """

    ids: tuple[str, ...]
    computed: tuple[str, ...]
    companions: tuple[str, ...]
    already_stored: tuple[str, ...]
    skipped: tuple[SkippedFact, ...]
    superseded: tuple[tuple[int, int], ...]
    first_token_subjects: tuple[str, ...]
    not_converged: tuple[str, ...]
    seconds: dict[str, float]
    threshold_conflicts: tuple[str, ...] = ()
    raised_thresholds: tuple[str, ...] = ()
