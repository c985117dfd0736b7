"""Model-written rewordings of a fact's question: extra contexts for its residual
(`EditHParams.rewordings`). Only questions are reworded (`is_question`); statements get none.

The residual is otherwise trained on the fact's one prompt (bare and after the model-written
prefixes), so the words after the subject are always the same; a question worded otherwise (ZsRE's
paraphrases) then often keeps the old answer although the fact's key fires on it (bench/RESULTS.md,
"ZsRE generalization"). Here the unedited model itself rewords the filled prompt: a fixed two-shot
prompt (hand-written examples about no fact of any data set) asks for "the same question in other
words", and top-k sampling continues it. A candidate is kept when, cut after its first "?" on its
first line, it contains the subject verbatim, ends with "?", and differs from the prompt and from
the rewordings kept before it (case and spacing ignored). The material read is the fact's filled
prompt and subject only: never its extras (evaluation prompts live there).

Determinism: each candidate is drawn from its own `torch.Generator`, seeded from (seed, the filled
prompt, the candidate's number), so a fact gets the same rewordings whatever other facts are
reworded with it (up to float rounding of the padded batch) and on every rerun; the global RNG is
untouched.
"""

from __future__ import annotations

import zlib
from typing import Sequence

import torch

from .facts import Fact
from .prefixes import sample_tokens

# two hand-written examples, then the fact's question
EXAMPLES = (("What is the capital city of France?", "Which city is the capital of France?"),
            ("Who wrote the novel Dracula?", "Dracula was written by which author?"))
CANDIDATES_PER_REWORDING = 3  # candidates sampled per rewording asked for (some are filtered out)
LENGTH = 24  # sampled tokens per candidate
TOP_K = 8
ROWS_PER_PASS = 96  # candidates sampled together (each pass holds their KV caches)


def rewording_prompt(question: str) -> str:
    """The text whose continuation is a rewording of `question`."""
    shots = "".join(f"Question: {q}\nThe same question in other words: {a}\n\n" for q, a in EXAMPLES)
    return f"{shots}Question: {question}\nThe same question in other words:"


def _normalised(text: str) -> str:
    return " ".join(text.casefold().split())


def kept_rewordings(question: str, subject: str, candidates: Sequence[str], count: int) -> tuple[str, ...]:
    """At most `count` rewordings of `question` from the sampled continuations `candidates`, in
    their order: each cut after its first "?" on its first line and stripped; kept when it ends with
    "?", contains `subject` verbatim and differs from `question` and from the kept ones (case and
    whitespace runs ignored)."""
    kept: list[str] = []
    seen = {_normalised(question)}
    for candidate in candidates:
        if len(kept) >= count:
            break
        line = candidate.lstrip().split("\n", 1)[0]
        mark = line.find("?")
        text = " ".join(line[: mark + 1].split()) if mark >= 0 else ""
        if not text.endswith("?") or subject not in text or _normalised(text) in seen:
            continue
        seen.add(_normalised(text))
        kept.append(text)
    return tuple(kept)


def candidate_seed(seed: int, question: str, number: int) -> int:
    """The generator seed of candidate `number` of `question` (a CRC-32 of both, stable across runs)."""
    return zlib.crc32(f"{seed}\x00{number}\x00{question}".encode("utf-8"))


def sampled_candidates(model, tokenizer, questions: Sequence[str], per_question: int, *, seed: int = 0,
                       length: int = LENGTH, top_k: int = TOP_K) -> list[list[str]]:
    """Per question, `per_question` decoded continuations of `rewording_prompt(question)` of
    `length` tokens (top-k sampling, candidate j from `candidate_seed(seed, question, j)`),
    sampled ROWS_PER_PASS at a time by `sample_tokens`."""
    rows = [(question, number) for question in questions for number in range(per_question)]
    prompt_ids = {question: tokenizer(rewording_prompt(question))["input_ids"] for question in questions}
    texts: list[str] = []
    for start in range(0, len(rows), ROWS_PER_PASS):
        chunk = rows[start : start + ROWS_PER_PASS]
        starts = [prompt_ids[question] for question, _ in chunk]
        generators = [torch.Generator().manual_seed(candidate_seed(seed, question, number))
                      for question, number in chunk]
        sampled = sample_tokens(model, starts, length, top_k=top_k, generator=generators)
        texts += [tokenizer.decode(row, skip_special_tokens=True) for row in sampled.tolist()]
    return [texts[i * per_question : (i + 1) * per_question] for i in range(len(questions))]


def is_question(prompt: str) -> bool:
    """Whether a filled prompt is a question (ends with "?" after trailing whitespace): the
    prompts `question_rewordings` rewords."""
    return prompt.rstrip().endswith("?")


def question_rewordings(model, tokenizer, facts: Sequence[Fact], count: int, *, seed: int = 0,
                        length: int = LENGTH, top_k: int = TOP_K) -> list[tuple[str, ...]]:
    """Per fact, up to `count` model-written rewordings of its filled prompt that contain its
    subject: `kept_rewordings` of its CANDIDATES_PER_REWORDING * count `sampled_candidates`. Only
    questions (`is_question`) are reworded: the two-shot prompt asks for a question in other
    words, so a statement (CounterFact's "The mother tongue of X is") gets none. The model must be
    the unedited one (the Editor pauses its database). count 0, no facts or no questions: empty
    tuples, nothing sampled."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be an int >= 0, got {count!r}")
    asked = [i for i, fact in enumerate(facts) if count and is_question(fact.filled_prompt)]
    found = [()] * len(facts)
    if not asked:
        return found
    questions = [facts[i].filled_prompt for i in asked]
    candidates = sampled_candidates(model, tokenizer, questions, CANDIDATES_PER_REWORDING * count, seed=seed,
                                    length=length, top_k=top_k)
    for i, question, texts in zip(asked, questions, candidates):
        found[i] = kept_rewordings(question, facts[i].subject, texts, count)
    return found
