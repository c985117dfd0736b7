"""CounterFact evaluation (paper appendix D.2.1, ROME/MEMIT): efficacy, generalization and
specificity as probability comparisons, plus fluency and consistency on generated text.

For a case with subject s, new object o* (target_new) and true object o (target_true):

    efficacy        [P(o* | prompt) > P(o | prompt)]
    generalization  mean over paraphrase prompts of [P(o* | p) > P(o | p)]
    specificity     mean over neighbourhood prompts n (other subjects, true answer o_n) of
                    [P(o_n | n) > P(o* | n)]
    specificity_unedited_subjects
                    the same over the neighbourhood prompts that name no edited subject (given
                    `edited_subjects`, whole words): once many facts are stored, some neighbourhood
                    prompts are about a subject that is itself edited ("What sport does Hank Aaron
                    play?" with Hank Aaron in the database), where an edit that fires is doing its
                    job or applies the subject's other edited relation; this metric leaves them out

P is the probability of the target's whole token sequence (see scoring.py), so multi-token
targets compare as wholes (compare="sequence", the default). compare="token_mean" compares the
mean per-token log-probability instead: the convention of ROME/MEMIT's evaluation code, and so of
the published tables built on it (ROME, MEMIT, AlphaEdit, NeuralDB); use it to compare with them.
Each metric is the mean over cases (of the per-case mean) in percent.
Fluency (fluency.py) and consistency (consistency.py) use the generation prompts, which only the
original-format records carry.

Cases are built from the editing package's `Fact`s (its readers put a record's test prompts in
`Fact.extras`), so the evaluation reads exactly the files the editor reads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch

from .consistency import TfidfModel, consistency
from .fluency import FLUENCY_SCALE, fluency, generate_texts
from .scoring import score_targets


@dataclasses.dataclass(frozen=True)
class CounterFactCase:
    """One CounterFact test case.

    prompt: the edit prompt with the subject filled in. neighborhood: (prompt, true answer) pairs
    of other subjects. relation_id / target_new_id: keys into reference snippets (original
    format only, else None).
    """

    case_id: Any
    subject: str
    prompt: str
    target_new: str
    target_true: str
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood: tuple[tuple[str, str], ...] = ()
    generation_prompts: tuple[str, ...] = ()
    relation_id: str | None = None
    target_new_id: str | None = None


def _texts(extras: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    values = extras.get(key, [])
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, list) or not all(isinstance(v, str) and v.strip() for v in values):
        raise ValueError(f"{where}: {key!r} must be a non-empty string or a list of them, got {values!r}")
    return tuple(values)


def case_from_fact(fact, position: int) -> CounterFactCase:
    """A `CounterFactCase` from an editing `Fact` read from a CounterFact record (or JSONL with the
    same extras); `position` names it in errors. The test prompts come from `fact.extras`:
    rephrase_prompt / paraphrase_prompts, locality_prompt + locality_ground_truth /
    neighborhood_prompts (whose true answer is target_true), generation_prompts, and
    relation_id + target_new_id for consistency."""
    extras = fact.extras
    where = f"fact {position} (id {fact.fact_id!r})"
    for name in ("prompt", "target_new", "target_true"):
        value = getattr(fact, name)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{where}: CounterFact metrics need a non-empty {name}, got {value!r}")
    paraphrases = _texts(extras, "rephrase_prompt", where) + _texts(extras, "paraphrase_prompts", where)
    neighbours = [(p, fact.target_true) for p in _texts(extras, "neighborhood_prompts", where)]
    local = _texts(extras, "locality_prompt", where)
    if local:
        answers = _texts(extras, "locality_ground_truth", where)
        if len(answers) != len(local):
            raise ValueError(f"{where}: {len(local)} locality prompt(s) but {len(answers)} locality_ground_truth")
        neighbours += list(zip(local, answers))
    return CounterFactCase(
        case_id=extras.get("case_id", fact.fact_id), subject=fact.subject, prompt=fact.filled_prompt,
        target_new=fact.target_new, target_true=fact.target_true, paraphrase_prompts=paraphrases,
        neighborhood=tuple(neighbours), generation_prompts=_texts(extras, "generation_prompts", where),
        relation_id=extras.get("relation_id"), target_new_id=extras.get("target_new_id"))


COMPARISONS = ("sequence", "token_mean")
PROBABILITY_METRICS = ("efficacy", "generalization", "specificity")
UNEDITED_SUBJECTS_METRIC = "specificity_unedited_subjects"


def _is_word_character(character: str) -> bool:
    return character.isalnum() or character == "_"


def names_a_subject(text: str, subjects: frozenset[str] | set[str], longest: int | None = None) -> bool:
    """Whether `text` contains one of `subjects` as whole words (case-sensitive; neither neighbour
    of the match is a letter, digit or underscore, like regex's (?<!\\w)subject(?!\\w)). `longest`:
    the longest subject's length in characters (computed when None)."""
    if not subjects:
        return False
    longest = max(map(len, subjects)) if longest is None else longest
    starts = [i for i in range(len(text)) if i == 0 or not _is_word_character(text[i - 1])]
    ends = {j for j in range(1, len(text) + 1) if j == len(text) or not _is_word_character(text[j])}
    return any(text[i:j] in subjects for i in starts for j in range(i + 1, min(len(text), i + longest) + 1)
               if j in ends)


def stored_subjects(db) -> set[str]:
    """The subjects (metadata "subject") of the facts stored in `db`, for `edited_subjects`."""
    return {metadata["subject"] for metadata in db.metadata().values() if isinstance(metadata.get("subject"), str)}


def case_scores(model, tokenizer, cases: Sequence[CounterFactCase], *,
                batch_size: int = 32, compare: str = "sequence",
                edited_subjects: Collection[str] | None = None) -> dict[str, torch.Tensor]:
    """Per case, the share of its tests won, for each of PROBABILITY_METRICS that some case has
    prompts for: (n_cases,) float64 in [0, 1], NaN for a case without such prompts. All pairs are
    scored in one batched pass. compare: "sequence" (whole-target log-probabilities) or
    "token_mean" (mean per-token log-probabilities, ROME's convention). edited_subjects: the
    subjects of the edited facts (e.g. a database's); given, UNEDITED_SUBJECTS_METRIC is added (its
    specificity tests whose prompt names none of them, see `names_a_subject`)."""
    if compare not in COMPARISONS:
        raise ValueError(f"compare must be one of {COMPARISONS}, got {compare!r}")
    if not cases:
        raise ValueError("no CounterFact cases to evaluate")
    prompts: list[str] = []
    pairs: list[tuple[str, str]] = []  # (the target that must win, the one it must beat)
    metrics: list[str] = []  # per test: its metric
    owners: list[int] = []  # per test: its case
    for c, case in enumerate(cases):
        tests = [("efficacy", case.prompt, case.target_new, case.target_true)]
        tests += [("generalization", p, case.target_new, case.target_true) for p in case.paraphrase_prompts]
        tests += [("specificity", p, true, case.target_new) for p, true in case.neighborhood]
        for metric, prompt, winner, loser in tests:
            metrics.append(metric)
            owners.append(c)
            prompts.append(prompt)
            pairs.append((winner, loser))
    scored = score_targets(model, tokenizer, prompts, pairs, batch_size=batch_size)
    scores = scored.log_prob if compare == "sequence" else scored.log_prob / scored.n_tokens
    hits = (scores[:, 0] > scores[:, 1]).double()
    names = PROBABILITY_METRICS
    source = list(range(len(prompts)))  # per test: the scored pair it reads
    if edited_subjects is not None:
        subjects = frozenset(edited_subjects)
        longest = max(map(len, subjects), default=0)
        for t in range(len(prompts)):
            if metrics[t] == "specificity" and not names_a_subject(prompts[t], subjects, longest):
                metrics.append(UNEDITED_SUBJECTS_METRIC)
                owners.append(owners[t])
                source.append(t)
        names += (UNEDITED_SUBJECTS_METRIC,)
    hits = hits[source]
    result: dict[str, torch.Tensor] = {}
    for metric in names:
        tests = torch.tensor([t for t, name in enumerate(metrics) if name == metric], dtype=torch.long)
        if len(tests):
            owner = torch.tensor(owners)[tests]
            wins = torch.zeros(len(cases), dtype=torch.float64).index_add_(0, owner, hits[tests])
            counts = torch.bincount(owner, minlength=len(cases)).double()
            result[metric] = wins / counts  # 0 / 0 = NaN: the case has no such prompts
    return result


def metrics_from_case_scores(scores: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Percent: each metric's mean over the cases that have it (the NaN-free entries)."""
    return {metric: float(values.nanmean()) * 100.0 for metric, values in scores.items()}


def probability_metrics(model, tokenizer, cases: Sequence[CounterFactCase], *,
                        batch_size: int = 32, compare: str = "sequence",
                        edited_subjects: Collection[str] | None = None) -> dict[str, float]:
    """efficacy, generalization, specificity (and with `edited_subjects`
    specificity_unedited_subjects) in percent: the mean over cases of the share of their tests won
    (a key is absent when no case has such prompts); see `case_scores`."""
    return metrics_from_case_scores(case_scores(model, tokenizer, cases, batch_size=batch_size, compare=compare,
                                                edited_subjects=edited_subjects))


def generation_metrics(model, tokenizer, cases: Sequence[CounterFactCase], *,
                       references: Mapping[tuple[str, str], list[str]] | None = None,
                       max_new_tokens: int = 100, seed: int = 0, batch_size: int = 16) -> dict[str, float]:
    """fluency (x100, ROME's scale) over the cases with generation prompts, and consistency
    (percent) over those of them whose (relation_id, target_new_id) has reference texts.
    Empty when no case has generation prompts; no consistency without `references`."""
    with_prompts = [case for case in cases if case.generation_prompts]
    if not with_prompts:
        return {}
    texts = generate_texts(model, tokenizer, [p for case in with_prompts for p in case.generation_prompts],
                           max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size)
    per_case: list[list[str]] = []
    start = 0
    for case in with_prompts:
        per_case.append(texts[start : start + len(case.generation_prompts)])
        start += len(case.generation_prompts)
    result = {"fluency": sum(fluency(t) for t in per_case) / len(per_case) * FLUENCY_SCALE}
    if references:
        tfidf = TfidfModel(text for snippets in references.values() for text in snippets)
        scored = [consistency(tfidf, generated, references[(case.relation_id, case.target_new_id)])
                  for case, generated in zip(with_prompts, per_case)
                  if (case.relation_id, case.target_new_id) in references]
        if scored:
            result["consistency"] = sum(scored) / len(scored) * 100.0
    return result


def preservation_texts(cases: Sequence[CounterFactCase]) -> list[str]:
    """Text the edits must leave alone: every neighbourhood prompt followed by its true answer."""
    return [f"{prompt} {true}" for case in cases for prompt, true in case.neighborhood]
