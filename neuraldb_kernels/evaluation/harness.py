"""One evaluation run: the same cases scored on the bare model and with a NeuralDB attached.

    cases = load_cases("counterfact-a.json", "counterfact", limit=100)
    report = evaluate(model, tokenizer, db, cases)          # EvaluationReport: before -> after
    print(report.table())

Cases are built from facts read with the editing package's readers (`read_facts`, `FORMATS`;
re-exported by this package), so evaluation reads the files edits are made from. CounterFact cases get
efficacy / generalization / specificity, and fluency (plus consistency when reference snippets
are given) where they carry generation prompts; ZsRE cases get teacher-forced accuracies.
Both kinds also get the strict (greedy-generation) metrics of strict.py, and, with a general-data
folder, the six general-ability tasks of general.py on a seeded subsample.
Preservation (gate fire rate, KL) is measured on the cases' own unrelated text (neighbourhood
prompts + true answers; ZsRE `loc` + `loc_ans`) unless other texts are given.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..editing.readers import read_facts
from . import counterfact, zsre
from .counterfact import CounterFactCase
from .general import general_abilities
from .preservation import preservation_metrics
from .report import EvaluationReport
from .strict import strict_metrics
from .zsre import ZsRECase

# the general-ability data shipped beside the package checkout (../shared/data/general)
SHIPPED_GENERAL_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "general"
GENERAL_LIMIT = 300  # items per task by default: a seeded subsample that a CPU scores in minutes


def default_general_data() -> Path | None:
    """../shared/data/general relative to the package checkout when that folder exists, else None."""
    return SHIPPED_GENERAL_DATA if SHIPPED_GENERAL_DATA.is_dir() else None


def general_metrics(model, tokenizer, data_dir: str | Path, *, limit: int | None = GENERAL_LIMIT, seed: int = 0,
                    batch_size: int = 16) -> dict[str, float]:
    """The six general-ability tasks (`general.general_abilities`) of `model` as it is now, as
    report metrics: general_<task> (accuracy, %), general_average (their mean) and
    lambada_perplexity; `limit` items per task drawn with `seed` (all when None)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"the general-ability data folder {data_dir} does not exist")
    scores = general_abilities(model, tokenizer, data_dir, limit=limit, seed=seed, batch_size=batch_size)
    metrics = {f"general_{task}": score.acc for task, score in scores.items()}
    metrics["general_average"] = sum(metrics.values()) / len(metrics)
    if scores.get("lambada") is not None and scores["lambada"].perplexity is not None:
        metrics["lambada_perplexity"] = scores["lambada"].perplexity
    return metrics

def cases_from_facts(facts: Sequence, *, skipped: list | None = None) -> list[CounterFactCase] | list[ZsRECase]:
    """ZsRE cases when the facts come from ZsRE (extras source "zsre"), else CounterFact cases.

    A fact that cannot be evaluated (e.g. an empty target) raises a ValueError naming it, unless
    `skipped` is a list: then it is left out and `(input index, message)` appended there.
    ValueError for an empty or mixed list, or when nothing is left.
    """
    if not facts:
        raise ValueError("no facts to evaluate")
    kinds = {fact.extras.get("source") == "zsre" for fact in facts}
    if len(kinds) > 1:
        raise ValueError("the facts mix ZsRE and CounterFact records; evaluate them separately")
    module = zsre if kinds.pop() else counterfact
    cases = []
    for i, fact in enumerate(facts):
        try:
            cases.append(module.case_from_fact(fact, i))
        except ValueError as error:
            if skipped is None:
                raise ValueError(f"{error} (leave such records out with --skip-bad / skipped=[])") from None
            skipped.append((i, str(error)))
    if not cases:
        raise ValueError(f"none of the {len(facts)} facts can be evaluated")
    return cases


def load_cases(path: str | Path, format: str | None = None, limit: int | None = None, *,
               skipped: list | None = None):
    """`cases_from_facts(read_facts(path, format, limit), skipped=skipped)`."""
    return cases_from_facts(read_facts(path, format, limit), skipped=skipped)


def model_metrics(model, tokenizer, cases, *, references: Mapping[tuple[str, str], list[str]] | None = None,
                  batch_size: int = 32, max_new_tokens: int = 100, compare: str = "sequence",
                  strict: bool = True, fluency: bool = True,
                  edited_subjects: Collection[str] | None = None) -> dict[str, float]:
    """The case metrics of `model` as it is now (bare or with whatever is attached); `compare` and
    `edited_subjects` as in `counterfact.probability_metrics` (CounterFact only); `strict`: also the
    strict_* metrics; `fluency`: also fluency / consistency where the cases allow (CounterFact only)."""
    if isinstance(cases[0], ZsRECase):
        metrics = zsre.accuracy_metrics(model, tokenizer, cases, batch_size=batch_size)
    else:
        metrics = counterfact.probability_metrics(model, tokenizer, cases, batch_size=batch_size, compare=compare,
                                                  edited_subjects=edited_subjects)
        if fluency:
            metrics.update(counterfact.generation_metrics(model, tokenizer, cases, references=references,
                                                          max_new_tokens=max_new_tokens))
    if strict:
        scores = strict_metrics(model, tokenizer, cases, batch_size=batch_size)
        metrics.update({f"strict_{name}": value for name, value in scores.as_dict().items()})
    return metrics


def _repeated_prompts(cases) -> int:
    """How many cases share their (subject, prompt) with a later case that has another target."""
    last_target = {}
    repeated = 0
    for case in reversed(cases):
        key = (case.subject, case.prompt)
        repeated += key in last_target and last_target[key] != case.target_new
        last_target.setdefault(key, case.target_new)
    return repeated


def _notes(cases, references, metrics: Mapping[str, float]) -> tuple[str, ...]:
    if isinstance(cases[0], ZsRECase):
        return ()
    notes = []
    repeated = _repeated_prompts(cases)
    if repeated:
        notes.append(f"{repeated} cases repeat the subject and prompt of a later case with another target: "
                     f"an edit keeps one target per subject and prompt (the last), so these count as misses")
    if "fluency" not in metrics:
        notes.append("fluency: not computed, the cases have no generation prompts "
                     "(only original-format CounterFact records carry them)")
    if "consistency" not in metrics:
        why = ("no reference texts given (ROME's attribute_snippets.json; the shared data has none)"
               if not references else "no case has reference texts for its (relation_id, target_new_id)")
        notes.append(f"consistency: not computable, {why}")
    return tuple(notes)


def evaluate(model, tokenizer, db, cases, *, attach_options: Mapping[str, Any] | None = None,
             references: Mapping[tuple[str, str], list[str]] | None = None,
             unrelated_texts: Sequence[str] | None = None, batch_size: int = 32, max_new_tokens: int = 100,
             compare: str = "sequence", strict: bool = True, general_data: str | Path | None = None,
             general_limit: int | None = GENERAL_LIMIT, general_seed: int = 0,
             log: Callable[[str], None] | None = None) -> EvaluationReport:
    """Score `cases` on the bare `model`, then with `db` attached (`attach(model, db,
    **attach_options)`, detached afterwards), then preservation on `unrelated_texts` (default: the
    cases' own unrelated text). `compare`: see `counterfact.probability_metrics`; the database's
    subjects (metadata "subject") give specificity_unedited_subjects; `strict`: also the strict
    generation metrics; `general_data`: a general-data folder, whose six tasks are then
    scored before and after on `general_limit` items each (seeded by `general_seed`). `log`
    receives one progress line per phase."""
    from ..integration import attach

    if not cases:
        raise ValueError("no cases to evaluate")
    options = dict(attach_options or {})
    say = log or (lambda line: None)
    started = time.perf_counter()
    if general_data is not None and not Path(general_data).is_dir():
        raise FileNotFoundError(f"the general-ability data folder {general_data} does not exist")

    edited_subjects = counterfact.stored_subjects(db)

    def score() -> dict[str, float]:
        metrics = model_metrics(model, tokenizer, cases, references=references, batch_size=batch_size,
                                max_new_tokens=max_new_tokens, compare=compare, strict=strict,
                                edited_subjects=edited_subjects)
        if general_data is not None:
            metrics.update(general_metrics(model, tokenizer, general_data, limit=general_limit, seed=general_seed))
        return metrics

    before = score()
    say(f"unedited model scored in {time.perf_counter() - started:.1f} s")
    started = time.perf_counter()
    with attach(model, db, **options):
        after = score()
    say(f"edited model scored in {time.perf_counter() - started:.1f} s")
    if unrelated_texts is None:
        module = zsre if isinstance(cases[0], ZsRECase) else counterfact
        unrelated_texts = module.preservation_texts(cases)
    notes = list(_notes(cases, references, after))
    if compare != "sequence" and not isinstance(cases[0], ZsRECase):
        notes.append("efficacy, generalization, specificity compare mean per-token log-probabilities "
                     "(ROME/MEMIT's convention), not whole-target probabilities")
    if unrelated_texts:
        started = time.perf_counter()
        after.update(preservation_metrics(model, tokenizer, db, unrelated_texts, attach_options=options,
                                          batch_size=max(1, batch_size // 2)))
        before.update({"gate_fire_rate": 0.0, "kl": 0.0})
        say(f"preservation measured on {len(unrelated_texts)} texts in {time.perf_counter() - started:.1f} s")
    else:
        notes.append("gate_fire_rate, kl: not computed, no unrelated text (give some)")
    return EvaluationReport(n_facts=len(db), n_cases=len(cases), before=before, after=after, notes=tuple(notes))
