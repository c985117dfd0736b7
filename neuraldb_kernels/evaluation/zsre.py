"""ZsRE evaluation (paper appendix D.2.2, as MEMIT/AlphaEdit compute it): teacher-forced top-1
token accuracy.

    efficacy        question `src`, target the new answer `alt`
    generalization  paraphrased question `rephrase`, target `alt`
    specificity     unrelated question `loc`, target its answer `loc_ans`

For one (question, answer) pair the accuracy is the share of the answer's tokens (after a leading
space) that are the model's top-1 prediction given the question and the answer's earlier tokens;
each metric is the mean over records, in percent.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from .scoring import score_targets


@dataclasses.dataclass(frozen=True)
class ZsRECase:
    """One ZsRE record: the question, its paraphrase, the new answer, and an unrelated question
    with its answer."""

    subject: str
    src: str
    rephrase: str
    alt: str
    loc: str
    loc_ans: str


def case_from_fact(fact, position: int) -> ZsRECase:
    """A `ZsRECase` from an editing `Fact` read from a ZsRE record (src = its prompt, alt = its
    target_new; rephrase, loc, loc_ans from its extras); `position` names it in errors."""
    fields = {"subject": fact.subject, "src": fact.filled_prompt, "alt": fact.target_new}
    values = {**fact.extras, **fields}
    for name in ("src", "alt", "rephrase", "loc", "loc_ans"):
        value = values.get(name)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"fact {position} (id {fact.fact_id!r}): ZsRE field {name!r} must be a "
                             f"non-empty string, got {value!r}")
        fields[name] = value
    return ZsRECase(**fields)


def accuracy_metrics(model, tokenizer, cases: Sequence[ZsRECase], *, batch_size: int = 32) -> dict[str, float]:
    """efficacy, generalization, specificity in percent, all pairs scored in one batched pass."""
    if not cases:
        raise ValueError("no ZsRE cases to evaluate")
    prompts = [c.src for c in cases] + [c.rephrase for c in cases] + [c.loc for c in cases]
    targets = [(c.alt,) for c in cases] * 2 + [(c.loc_ans,) for c in cases]
    accuracy = score_targets(model, tokenizer, prompts, targets, batch_size=batch_size).token_accuracy[:, 0]
    n = len(cases)
    return {metric: float(accuracy[i * n : (i + 1) * n].mean()) * 100.0
            for i, metric in enumerate(("efficacy", "generalization", "specificity"))}


def preservation_texts(cases: Sequence[ZsRECase]) -> list[str]:
    """Text the edits must leave alone: every unrelated question followed by its answer."""
    return [f"{c.loc} {c.loc_ans}" for c in cases]
