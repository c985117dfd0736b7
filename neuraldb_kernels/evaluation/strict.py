"""Strict generation metric: do edits hold when the model generates freely?

Teacher-forced probability metrics (counterfact.py, zsre.py) compare target probabilities; here
the model decodes greedily (no teacher forcing, KV cache) from each test prompt, and a test
succeeds when the generated continuation starts with the expected answer:

    efficacy        the edit prompt continues with the new target
    generalization  each paraphrase prompt continues with the new target
    specificity     each neighbourhood / unrelated prompt still continues with its true answer

"Starts with" compares normalised text: whitespace runs collapse to one space, leading and
trailing whitespace go, case folds; and when the answer ends in a letter or digit, the next
generated character must not be one ("Paris" matches "Paris, France" but not "Parisian").
Each metric is the mean over cases of the share of the case's tests won, in percent (as the
probability metrics aggregate), over the cases that have such prompts.

Generation: prompts tokenised with the tokenizer's special tokens (as scoring.py does),
left-padded batches of `batch_size`, `max_new_tokens` = the answer's token count (with a leading
space) + 1, so that the boundary after the answer is seen; decoding stops early at EOS.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from .counterfact import CounterFactCase
from .scoring import model_device
from .zsre import ZsRECase

STRICT_METRICS = ("efficacy", "generalization", "specificity")


@dataclasses.dataclass(frozen=True)
class StrictScores:
    """Strict (generated-text) metrics in percent, None where no case has such prompts; `cases`
    the number of cases, `tests` the number of prompts decoded per metric."""

    efficacy: float | None
    generalization: float | None
    specificity: float | None
    cases: int
    tests: dict[str, int]

    def as_dict(self) -> dict[str, float]:
        """The metrics that were measured, {name: percent}."""
        return {m: getattr(self, m) for m in STRICT_METRICS if getattr(self, m) is not None}


def normalise(text: str) -> str:
    """`text` with whitespace runs collapsed to one space, stripped and case-folded."""
    return " ".join(text.split()).casefold()


def starts_with_answer(generated: str, answer: str) -> bool:
    """Whether the normalised `generated` text begins with the normalised `answer`, ending at a
    word boundary when the answer ends in a letter or digit (see the module docstring)."""
    text, wanted = normalise(generated), normalise(answer)
    if not wanted:
        raise ValueError(f"answer must contain non-whitespace text, got {answer!r}")
    if not text.startswith(wanted):
        return False
    return not (wanted[-1].isalnum() and len(text) > len(wanted) and text[len(wanted)].isalnum())


def _tests(case, where: str) -> list[tuple[str, str, str]]:
    """(metric, prompt, expected answer) for every test of a CounterFact or ZsRE case."""
    if isinstance(case, CounterFactCase):
        tests = [("efficacy", case.prompt, case.target_new)]
        tests += [("generalization", p, case.target_new) for p in case.paraphrase_prompts]
        tests += [("specificity", p, true) for p, true in case.neighborhood]
        return tests
    if isinstance(case, ZsRECase):
        return [("efficacy", case.src, case.alt), ("generalization", case.rephrase, case.alt),
                ("specificity", case.loc, case.loc_ans)]
    raise TypeError(f"{where}: expected a CounterFactCase or ZsRECase, got {type(case).__name__}")


@torch.no_grad()
def greedy_continuations(model, tokenizer, prompts: Sequence[str], max_new_tokens: Sequence[int], *,
                         batch_size: int = 32) -> list[str]:
    """The greedy continuation (new text only, special tokens dropped) of each prompt, up to its
    `max_new_tokens` tokens; prompts of similar length share left-padded batches."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if len(prompts) != len(max_new_tokens):
        raise ValueError(f"got {len(prompts)} prompts but {len(max_new_tokens)} token budgets")
    encoded = []
    for prompt in prompts:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
        encoded.append(list(tokenizer(prompt)["input_ids"]))
    device = model_device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.int64)
        for r, i in enumerate(rows):
            input_ids[r, width - len(encoded[i]):] = torch.tensor(encoded[i])
            attention_mask[r, width - len(encoded[i]):] = 1
        budget = max(max_new_tokens[i] for i in rows)
        output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                do_sample=False, num_beams=1, max_new_tokens=budget, pad_token_id=pad_id,
                                use_cache=True)
        for r, i in enumerate(rows):
            texts[i] = tokenizer.decode(output[r, width : width + max_new_tokens[i]].cpu(), skip_special_tokens=True)
    return texts


def strict_metrics(model, tokenizer, cases: Sequence[CounterFactCase] | Sequence[ZsRECase], *,
                   batch_size: int = 32) -> StrictScores:
    """Strict efficacy, generalization and specificity (see the module docstring) of `model` (a
    Hugging Face causal LM, attached or not) on CounterFact or ZsRE cases; all prompts decoded
    in one batched pass."""
    if not cases:
        raise ValueError("no cases to evaluate")
    metrics, owners, prompts, answers = [], [], [], []
    for c, case in enumerate(cases):
        for metric, prompt, answer in _tests(case, f"case {c}"):
            if not isinstance(answer, str) or not answer.strip():
                raise ValueError(f"case {c}: the {metric} answer must be a non-empty string, got {answer!r}")
            metrics.append(metric)
            owners.append(c)
            prompts.append(prompt)
            answers.append(answer)
    budgets = [len(tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"]) + 1 for answer in answers]
    generated = greedy_continuations(model, tokenizer, prompts, budgets, batch_size=batch_size)
    hits = torch.tensor([float(starts_with_answer(g, a)) for g, a in zip(generated, answers)], dtype=torch.float64)
    owner = torch.tensor(owners)
    result: dict[str, float | None] = {}
    counts: dict[str, int] = {}
    for metric in STRICT_METRICS:
        tests = torch.tensor([t for t, name in enumerate(metrics) if name == metric], dtype=torch.long)
        counts[metric] = len(tests)
        if not len(tests):
            result[metric] = None
            continue
        wins = torch.zeros(len(cases), dtype=torch.float64).index_add_(0, owner[tests], hits[tests])
        per_case = wins / torch.bincount(owner[tests], minlength=len(cases)).double()  # NaN: no such prompts
        result[metric] = float(per_case.nanmean()) * 100.0
    return StrictScores(**result, cases=len(cases), tests=counts)
