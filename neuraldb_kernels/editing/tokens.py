"""Facts as token ids: the contexts an edit is computed under, the subject's last token in each,
and the target tokens.

For a fact and prefixes x_1..x_N (see `prefixes.py`) the contexts are the bare filled prompt and
x_j + filled prompt (Eq. 20-21). The key position is the LAST token of the subject, found from the
tokenizer's character offsets, so subjects in mid-sentence and BPE merges at the subject's edges
(a token that straddles the boundary counts as part of the subject) are handled. The target is
tokenised on its own with a leading space (" " + target_new), as ROME and MEMIT do.

Optionally a fact also carries model-written rewordings of its prompt (editing.rewordings), each
tokenised bare (no prefix) with its subject's last token: contexts for the residual only; keys and
calibration read `contexts` alone.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from .facts import Fact, FactError, _describe, quoted

KL_TEMPLATE = "{} is a"


@dataclasses.dataclass(frozen=True)
class EditTokens:
    """One fact, tokenised.

    contexts: token ids of the bare prompt and of each prefix + prompt (N + 1 lists).
    subject_last: index of the subject's last token in each context.
    target: token ids of " " + target_new (>= 1).
    kl_ids / kl_subject_last: "{subject} is a" and its subject's last token (the KL anchor).
    reworded / reworded_subject_last: token ids of each rewording of the prompt (no prefix) and the
        index of the subject's last token (its last occurrence) in it: extra residual contexts.
    """

    contexts: tuple[tuple[int, ...], ...]
    subject_last: tuple[int, ...]
    target: tuple[int, ...]
    kl_ids: tuple[int, ...]
    kl_subject_last: int
    reworded: tuple[tuple[int, ...], ...] = ()
    reworded_subject_last: tuple[int, ...] = ()


def _require_fast(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"{type(tokenizer).__name__} is not a fast tokenizer: locating the subject needs "
                        "character offsets (return_offsets_mapping); load the tokenizer with use_fast=True")


def subject_last_token(tokenizer, text: str, span: tuple[int, int]) -> tuple[list[int], int]:
    """(token ids of `text`, index of the last token overlapping the character span `span`).

    The span is narrowed to exclude whitespace at its edges. Special tokens (zero-width offsets)
    never match. A ValueError when no token overlaps (e.g. an empty span).
    """
    _require_fast(tokenizer)
    start, end = span
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    if start >= end:
        raise ValueError(f"empty subject span {span} in {quoted(text)}")
    encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
    last = None
    for index, (a, b) in enumerate(encoded["offset_mapping"]):
        if a < b and a < end and b > start:
            last = index
    if last is None:
        raise ValueError(f"no token of {quoted(text)} overlaps the subject at characters {start}..{end}")
    return list(encoded["input_ids"]), last


def target_ids(tokenizer, target: str) -> list[int]:
    """Token ids of " " + target (no special tokens)."""
    return list(tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"])


def tokenize_fact(tokenizer, fact: Fact, prefixes: Sequence[str], *, index: int = 0,
                  max_length: Optional[int] = None, kl_template: str = KL_TEMPLATE,
                  rewordings: Sequence[str] = ()) -> EditTokens:
    """`fact` tokenised under the bare prompt and every prefix, and each of `rewordings` (texts
    that contain the subject) alone; a FactError naming the fact when its subject cannot be located
    or its longest context + target exceeds `max_length` tokens."""
    where = _describe(index, fact)
    prompt = fact.filled_prompt
    start, end = fact.subject_span
    contexts, positions = [], []
    try:
        for prefix in ("", *prefixes):
            ids, last = subject_last_token(tokenizer, prefix + prompt, (len(prefix) + start, len(prefix) + end))
            contexts.append(tuple(ids))
            positions.append(last)
        kl_text = kl_template.replace("{}", fact.subject.strip())
        kl_start = kl_template.index("{}")
        kl_ids, kl_last = subject_last_token(tokenizer, kl_text, (kl_start, kl_start + len(fact.subject.strip())))
        reworded, reworded_last = [], []
        for text in rewordings:
            at = text.rfind(fact.subject)
            if at < 0:
                raise ValueError(f"the rewording {quoted(text)} does not contain the subject")
            ids, last = subject_last_token(tokenizer, text, (at, at + len(fact.subject)))
            reworded.append(tuple(ids))
            reworded_last.append(last)
    except ValueError as error:
        raise FactError(f"{where}: {error}") from None
    target = target_ids(tokenizer, fact.target_new)
    if not target:
        raise FactError(f"{where}: target_new {quoted(fact.target_new)} tokenises to nothing")
    longest = max(len(ids) for ids in (*contexts, *reworded)) + len(target)
    if max_length is not None and longest > max_length:
        raise FactError(f"{where}: the prompt with its longest prefix and the target is {longest} tokens, "
                        f"longer than the model's context of {max_length} tokens")
    return EditTokens(contexts=tuple(contexts), subject_last=tuple(positions), target=tuple(target),
                      kl_ids=tuple(kl_ids), kl_subject_last=kl_last, reworded=tuple(reworded),
                      reworded_subject_last=tuple(reworded_last))


def model_context_length(model) -> Optional[int]:
    """The model's context length in tokens (config.max_position_embeddings / n_positions), or None."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
