"""General abilities: the paper's six lm-evaluation-harness tasks (MMLU, ARC-Challenge, SciQ,
CommonsenseQA, WSC273, LAMBADA), scored by lm-evaluation-harness's protocol, zero-shot.

lm-evaluation-harness is not a dependency (it cannot load these local files on an in-memory model
offline); this module implements the same protocol and reads the files in
`../shared/data/general` (see its PROVENANCE.md). Per task, as lm-eval's task configurations
define it (`lm_eval/tasks/<task>/*.yaml`):

    mmlu            "The following are multiple choice questions (with answers) about {subject}.\\n\\n"
                    "{question.strip()}\\nA. {c0}\\nB. {c1}\\nC. {c2}\\nD. {c3}\\nAnswer:",
                    choices " A" .. " D" (subject with "_" as spaces); acc
    arc_challenge   "Question: {question}\\nAnswer:", choices " {choice text}"; acc, acc_norm
    sciq            "{support.lstrip()}\\nQuestion: {question}\\nAnswer:", choices " {option}";
                    acc, acc_norm (the shipped file holds lm-eval's four options in a shuffled
                    order, which only changes which of two exactly tied choices wins)
    commonsense_qa  "Question: {question.strip()}\\nA. {t0}\\n..E. {t4}\\nAnswer:", choices " A" .. " E"; acc
    wsc273          partial evaluation: context = text up to the pronoun + option (lm-eval's
                    option normalisation: possessive "'s", lower-cased leading determiner
                    mid-sentence), continuation " " + the text after the pronoun; acc
    lambada         context = all words but the last (split on " "), target " " + last word;
                    acc = the greedy continuation is the target, perplexity = exp(-mean log P(target))

A request (context, continuation) is tokenised as lm-eval's Hugging Face model does: trailing
whitespace of the context moves to the continuation, the whole string and the context are encoded
without special tokens, and the continuation's tokens are the whole string's tokens after the
context's count; the model reads the context's own tokens followed by those. Its score is the sum of log P(token | everything before) over the continuation's
tokens (float32 log-softmax, summed in float64), and it is greedy when each of those tokens is the
argmax of its position (ties to the lowest id). For a multiple-choice item:

    acc       [argmax_i log P(choice_i) == gold]   (the first maximum on ties)
    acc_norm  [argmax_i log P(choice_i) / len(choice_i) == gold], len in characters of the choice
              without its leading space (lm-eval's `completion_len`; bytes for ASCII text)

Scores are means over items in percent, with lm-eval's standard error (sample standard deviation
over sqrt(n)). `limit` takes a seeded subsample (the same items every run for the same seed and
file); each distinct context runs through the model once and its KV cache serves all its choices.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import random
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from .scoring import _cache_name, _right_padded, context_length, model_device

TASKS = ("mmlu", "arc_challenge", "sciq", "commonsense_qa", "wsc273", "lambada")
# where each task's file lies under the general-data folder
TASK_FILES = {
    "mmlu": "mmlu/test",
    "arc_challenge": "arc_challenge/ARC-Challenge-Test.jsonl",
    "sciq": "sciq/test.csv",
    "commonsense_qa": "commonsense_qa/dev_rand_split.jsonl",
    "wsc273": "wsc273/WSCollection.xml",
    "lambada": "lambada/lambada_test.jsonl",
}
# tasks for which lm-eval reports acc_norm besides acc
ACC_NORM_TASKS = ("arc_challenge", "sciq")


@dataclasses.dataclass(frozen=True)
class ChoiceItem:
    """One multiple-choice item: one (context, continuation) request per choice, lm-eval's
    `doc_to_choice` strings (their lengths normalise acc_norm) and the gold choice's index."""

    requests: tuple[tuple[str, str], ...]
    choices: tuple[str, ...]
    gold: int


@dataclasses.dataclass(frozen=True)
class LastWordItem:
    """One LAMBADA passage: the context (all words but the last) and the target (" " + last word)."""

    context: str
    target: str


@dataclasses.dataclass(frozen=True)
class TaskScore:
    """One task's scores over `items` items, in percent; acc_norm only where lm-eval reports it,
    perplexity only for LAMBADA. acc_stderr: the standard error of acc, percent points."""

    task: str
    items: int
    acc: float
    acc_stderr: float
    acc_norm: float | None = None
    perplexity: float | None = None


@dataclasses.dataclass(frozen=True)
class ContinuationScores:
    """Scores of n (context, continuation) requests, in input order.

    log_prob: (n,) float64 nats, summed over the continuation's tokens. is_greedy: (n,) bool.
    n_tokens: (n,) int64, the continuation's token count.
    """

    log_prob: torch.Tensor
    is_greedy: torch.Tensor
    n_tokens: torch.Tensor


# ------------------------------------------------------------------------------------- readers


def _existing(path: Path, task: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{task}: {path} does not exist; expected the general-ability data laid out as "
                                f"<data_dir>/{TASK_FILES[task]} (see ../shared/data/general/PROVENANCE.md)")
    return path


def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _csv_rows(path: Path, columns: Sequence[str]) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; header is {reader.fieldnames}")
        return list(reader)


def _letters(n: int) -> tuple[str, ...]:
    return tuple("ABCDE"[:n])


def _lettered_item(context: str, gold: int, n: int) -> ChoiceItem:
    """An item whose choices are the letters " A", " B", ... after `context`."""
    letters = _letters(n)
    return ChoiceItem(tuple((context, " " + letter) for letter in letters), letters, gold)


def _gold_index(labels: Sequence[str], key: str, where: str) -> int:
    if key not in labels:
        raise ValueError(f"{where}: answer key {key!r} is not one of the labels {list(labels)}")
    return list(labels).index(key)


def read_mmlu(directory: Path) -> list[ChoiceItem]:
    """MMLU test items of every subject (`directory`/<subject>_test.csv, subjects in sorted order)."""
    directory = _existing(Path(directory), "mmlu")
    files = sorted(directory.glob("*_test.csv"))
    if not files:
        raise FileNotFoundError(f"mmlu: no <subject>_test.csv files in {directory}")
    items = []
    for path in files:
        subject = path.name[: -len("_test.csv")].replace("_", " ")
        header = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
        for r, row in enumerate(_csv_rows(path, ("question", "choice0", "choice1", "choice2", "choice3", "answer"))):
            if row["answer"] not in ("0", "1", "2", "3"):
                raise ValueError(f"{path} row {r + 1}: answer must be 0-3, got {row['answer']!r}")
            options = "".join(f"\n{letter}. {row[f'choice{i}']}" for i, letter in enumerate(_letters(4)))
            items.append(_lettered_item(f"{header}{row['question'].strip()}{options}\nAnswer:", int(row["answer"]), 4))
    return items


def read_arc_challenge(path: Path) -> list[ChoiceItem]:
    """ARC-Challenge test items from AI2's jsonl (question.stem, question.choices, answerKey)."""
    items = []
    for r, record in enumerate(_jsonl(_existing(Path(path), "arc_challenge"))):
        choices = record["question"]["choices"]
        texts = tuple(c["text"] for c in choices)
        gold = _gold_index([c["label"] for c in choices], record["answerKey"], f"{path} line {r + 1}")
        context = f"Question: {record['question']['stem']}\nAnswer:"
        items.append(ChoiceItem(tuple((context, " " + t) for t in texts), texts, gold))
    return items


def read_sciq(path: Path) -> list[ChoiceItem]:
    """SciQ test items from the shipped CSV (question, context = support, options A-D, answer letter)."""
    items = []
    path = _existing(Path(path), "sciq")
    for r, row in enumerate(_csv_rows(path, ("question", "context", "A", "B", "C", "D", "answer"))):
        texts = tuple(row[letter] for letter in _letters(4))
        gold = _gold_index(_letters(4), row["answer"], f"{path} row {r + 1}")
        context = f"{row['context'].lstrip()}\nQuestion: {row['question']}\nAnswer:"
        items.append(ChoiceItem(tuple((context, " " + t) for t in texts), texts, gold))
    return items


def read_commonsense_qa(path: Path) -> list[ChoiceItem]:
    """CommonsenseQA validation items (HF tau/commonsense_qa records, five choices)."""
    items = []
    for r, record in enumerate(_jsonl(_existing(Path(path), "commonsense_qa"))):
        labels, texts = record["choices"]["label"], record["choices"]["text"]
        if list(labels) != list(_letters(5)) or len(texts) != 5:
            raise ValueError(f"{path} line {r + 1}: expected five choices labelled A-E, got {labels}")
        options = "".join(f"\n{letter}. {text}" for letter, text in zip(labels, texts))
        context = f"Question: {record['question'].strip()}{options}\nAnswer:"
        items.append(_lettered_item(context, _gold_index(labels, record["answerKey"], f"{path} line {r + 1}"), 5))
    return items


_CAPITALISED_DETERMINERS = ("A", "An", "The", "She", "He", "It", "They", "My", "His", "Her", "Their")


def _wsc_option(option: str, text: str, pronoun: str, pronoun_loc: int) -> str:
    """lm-eval's option normalisation for partial evaluation (see the module docstring)."""
    if pronoun.lower() in ("my", "his", "her", "our", "their"):
        option += "'s"
    first = option.split()[0]
    start_of_sentence = text[pronoun_loc - 2] == "."  # Python indexing, as lm-eval (wraps at 0)
    if not start_of_sentence and first in _CAPITALISED_DETERMINERS:
        return option.replace(first, first.lower())
    return option


def read_wsc273(path: Path) -> list[ChoiceItem]:
    """WSC273: the first 273 schemas of the Winograd Schema Collection XML, built as HF's
    `winograd_wsc` (whitespace collapsed; text = txt1 + pronoun + txt2) and lm-eval's wsc273."""
    root = ElementTree.parse(_existing(Path(path), "wsc273")).getroot()
    schemas = list(root)[:273]
    if len(schemas) < 273:
        raise ValueError(f"{path}: WSC273 needs 273 schemas, the file holds {len(schemas)}")

    def clean(text: str | None) -> str:
        return " ".join((text or "").split())

    items = []
    for schema in schemas:
        node = schema.find("text")
        left, right, pronoun = clean(node.findtext("txt1")), clean(node.findtext("txt2")), clean(node.findtext("pron"))
        text = " ".join([left, pronoun, right]).strip().replace("  ", " ")
        pronoun_loc = len(left) + 1 if left else 0
        options = [_wsc_option(clean(a.text), text, pronoun, pronoun_loc) for a in schema.find("answers").findall("answer")]
        label = int("B" in clean(schema.findtext("correctAnswer")))
        continuation = " " + text[pronoun_loc + len(pronoun):]
        contexts = tuple(text[:pronoun_loc] + option for option in options)
        items.append(ChoiceItem(tuple((c, continuation) for c in contexts), contexts, label))
    return items


def read_lambada(path: Path) -> list[LastWordItem]:
    """LAMBADA (OpenAI) passages: context = every word but the last, target = " " + the last word."""
    items = []
    for r, record in enumerate(_jsonl(_existing(Path(path), "lambada"))):
        words = record["text"].split(" ")
        if len(words) < 2:
            raise ValueError(f"{path} line {r + 1}: a passage needs at least two words")
        items.append(LastWordItem(" ".join(words[:-1]), " " + words[-1]))
    return items


_READERS = {"mmlu": read_mmlu, "arc_challenge": read_arc_challenge, "sciq": read_sciq,
            "commonsense_qa": read_commonsense_qa, "wsc273": read_wsc273, "lambada": read_lambada}


def read_task(task: str, data_dir: Path) -> list[ChoiceItem] | list[LastWordItem]:
    """Every item of `task` (one of TASKS) from the general-data folder `data_dir`."""
    if task not in _READERS:
        raise ValueError(f"unknown task {task!r}; the tasks are {TASKS}")
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"the general-ability data folder {data_dir} does not exist "
                                f"(expected ../shared/data/general)")
    return _READERS[task](data_dir / TASK_FILES[task])


def subsample(items: Sequence, limit: int | None, seed: int) -> list:
    """`limit` items drawn without replacement by a `seed`ed generator, in file order (all when
    `limit` is None or not below the count)."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    if limit is None or limit >= len(items):
        return list(items)
    return [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), limit))]


# ------------------------------------------------------------------------------------- scoring


def encode_request(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval's Hugging Face model tokenises a request (see
    the module docstring)."""
    if not isinstance(context, str) or not context.strip():
        raise ValueError(f"context must be a non-empty string, got {context!r}")
    if not isinstance(continuation, str) or not continuation:
        raise ValueError(f"continuation must be a non-empty string, got {continuation!r} (context {context[-60:]!r})")
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = list(tokenizer(context + continuation, add_special_tokens=False)["input_ids"])
    context_ids = list(tokenizer(context, add_special_tokens=False)["input_ids"])
    if len(context_ids) >= len(whole):
        raise ValueError(f"continuation {continuation!r} adds no tokens after its context {context[-60:]!r}")
    return context_ids, whole[len(context_ids):]


@torch.no_grad()
def score_continuations(model, tokenizer, requests: Sequence[tuple[str, str]], *,
                        batch_size: int = 16) -> ContinuationScores:
    """lm-eval's log-likelihood (see the module docstring) of every (context, continuation).

    Distinct contexts run once each, sorted by length in right-padded batches of `batch_size`;
    the batch's KV cache is then gathered once per request and the continuations' later tokens
    run after it (positions and padding masked explicitly). model: a Hugging Face causal LM whose
    forward takes `logits_to_keep` and a KV cache; whatever is attached to it takes part.
    A request longer than the model's context is a ValueError.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not requests:
        raise ValueError("no requests to score")
    limit = context_length(model)
    contexts: dict[tuple[int, ...], int] = {}
    owners: list[list[int]] = []  # per distinct context: its requests
    continuations: list[list[int]] = []
    for r, (context, continuation) in enumerate(requests):
        context_ids, continuation_ids = encode_request(tokenizer, context, continuation)
        if limit is not None and len(context_ids) + len(continuation_ids) - 1 > limit:
            raise ValueError(f"request {r} has {len(context_ids) + len(continuation_ids)} tokens, more than the "
                             f"model's context of {limit}")
        owner = contexts.setdefault(tuple(context_ids), len(contexts))
        if owner == len(owners):
            owners.append([])
        owners[owner].append(r)
        continuations.append(continuation_ids)
    distinct = list(contexts)
    log_prob = torch.zeros(len(requests), dtype=torch.float64)
    greedy = torch.zeros(len(requests), dtype=torch.bool)
    device = model_device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(distinct)), key=lambda c: len(distinct[c]))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        lengths = torch.tensor([len(distinct[c]) for c in rows])
        ids, context_mask = _right_padded([list(distinct[c]) for c in rows], int(lengths.max()), pad_id)
        first = int(lengths.min()) - 1  # the last context position predicts each continuation's first token
        out = model(input_ids=ids.to(device), attention_mask=context_mask.to(device), use_cache=True,
                    logits_to_keep=torch.arange(first, int(lengths.max()), device=device))
        head = torch.log_softmax(out.logits.float(), dim=-1)[torch.arange(len(rows)), lengths - 1 - first].cpu()
        batch_requests = [(row, r) for row, c in enumerate(rows) for r in owners[c]]
        width = max(len(continuations[r]) for _, r in batch_requests) - 1
        if width > 0:
            # every request's later tokens after its own copy of its context's cache
            select = torch.tensor([row for row, _ in batch_requests])
            tail_ids, tail_mask = _right_padded([continuations[r][:-1] for _, r in batch_requests], width, pad_id)
            cache_name = _cache_name(model)
            cache = getattr(out, cache_name)
            cache.batch_select_indices(select.to(device))
            positions = lengths[select].unsqueeze(1) + torch.arange(width)
            mask = torch.cat([context_mask[select], tail_mask], dim=1)
            tail = model(input_ids=tail_ids.to(device), attention_mask=mask.to(device),
                         position_ids=positions.to(device), use_cache=True, **{cache_name: cache}).logits
            tail = torch.log_softmax(tail.float(), dim=-1).cpu()
        del out
        for k, (row, r) in enumerate(batch_requests):
            wanted = torch.tensor(continuations[r])
            dists = head[row].unsqueeze(0)
            if len(wanted) > 1:
                dists = torch.cat([dists, tail[k, : len(wanted) - 1]])
            log_prob[r] = dists[torch.arange(len(wanted)), wanted].double().sum()
            greedy[r] = bool((dists.argmax(dim=-1) == wanted).all())
    n_tokens = torch.tensor([len(c) for c in continuations], dtype=torch.int64)
    return ContinuationScores(log_prob, greedy, n_tokens)


# ---------------------------------------------------------------------------------- aggregation


def _percent_and_stderr(hits: torch.Tensor) -> tuple[float, float]:
    """Mean of 0/1 `hits` in percent and its standard error (sample std / sqrt(n)), percent points."""
    n = hits.numel()
    stderr = float(hits.std(correction=1)) / math.sqrt(n) if n > 1 else float("nan")
    return float(hits.mean()) * 100.0, stderr * 100.0


def choice_scores(task: str, items: Sequence[ChoiceItem], log_prob: torch.Tensor) -> TaskScore:
    """acc (and acc_norm for ACC_NORM_TASKS) of multiple-choice `items` from the log-likelihoods
    of their requests, `log_prob` (float, the requests of all items flattened in order)."""
    expected = sum(len(item.requests) for item in items)
    if log_prob.shape != (expected,):
        raise ValueError(f"{task}: expected {expected} log-likelihoods for {len(items)} items, got {tuple(log_prob.shape)}")
    acc, acc_norm = [], []
    start = 0
    for item in items:
        scores = log_prob[start : start + len(item.requests)].double()
        start += len(item.requests)
        lengths = torch.tensor([float(len(choice)) for choice in item.choices], dtype=torch.float64)
        acc.append(float(int(scores.argmax()) == item.gold))
        acc_norm.append(float(int((scores / lengths).argmax()) == item.gold))
    mean, stderr = _percent_and_stderr(torch.tensor(acc, dtype=torch.float64))
    norm = float(torch.tensor(acc_norm, dtype=torch.float64).mean()) * 100.0 if task in ACC_NORM_TASKS else None
    return TaskScore(task, len(items), mean, stderr, acc_norm=norm)


def last_word_scores(items: Sequence[LastWordItem], scores: ContinuationScores) -> TaskScore:
    """LAMBADA's acc (greedy continuation == target) and perplexity exp(-mean log P(target))."""
    if scores.log_prob.shape != (len(items),):
        raise ValueError(f"lambada: expected {len(items)} scores, got {tuple(scores.log_prob.shape)}")
    mean, stderr = _percent_and_stderr(scores.is_greedy.double())
    return TaskScore("lambada", len(items), mean, stderr, perplexity=math.exp(-float(scores.log_prob.mean())))


def score_task(model, tokenizer, task: str, items: Sequence[ChoiceItem] | Sequence[LastWordItem], *,
               batch_size: int = 16) -> TaskScore:
    """`task`'s scores of `model` on `items` (as `read_task` returns them)."""
    if not items:
        raise ValueError(f"{task}: no items to score")
    if task == "lambada":
        requests = [(item.context, item.target) for item in items]
        return last_word_scores(items, score_continuations(model, tokenizer, requests, batch_size=batch_size))
    requests = [request for item in items for request in item.requests]
    scores = score_continuations(model, tokenizer, requests, batch_size=batch_size)
    return choice_scores(task, items, scores.log_prob)


def general_abilities(model, tokenizer, data_dir: Path, *, tasks: Iterable[str] = TASKS, limit: int | None = None,
                      seed: int = 0, batch_size: int = 16) -> dict[str, TaskScore]:
    """Each of `tasks` scored on `model` (a Hugging Face causal LM in eval mode, attached or
    not): a `seed`ed subsample of `limit` items per task (all items when None), read from the
    general-data folder `data_dir` (../shared/data/general). Returns {task: TaskScore} in the
    order given."""
    tasks = list(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"unknown or no tasks {unknown or tasks}; choose from {TASKS}")
    return {task: score_task(model, tokenizer, task, subsample(read_task(task, data_dir), limit, seed),
                             batch_size=batch_size)
            for task in tasks}
