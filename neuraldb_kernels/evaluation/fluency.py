"""Fluency: the weighted n-gram entropy of generated text (paper Eq. 16, ROME's "GE").

For one text with word n-gram frequency distributions g_2 and g_3 (relative frequencies),

    H_n = -sum_k g_n(k) log2 g_n(k)            (bits)
    fluency(text) = mean(2/3 * H_2, 4/3 * H_3) = H_2 / 3 + 2 * H_3 / 3

and a set of texts scores the arithmetic mean over texts. This is ROME's `n_gram_entropy` (the
weighted terms averaged; Eq. 16 prints the weighted sum with a sign slip); the paper's tables show
it times 100 (e.g. 626.6), which `FLUENCY_SCALE` applies in reports. Repetitive text scores low.

Words: runs of letters/digits (with inner apostrophes) and single punctuation marks, an
approximation of NLTK's `word_tokenize` used by ROME (NLTK is not a dependency here).

Generation: `generate_texts` samples continuations as ROME does (top-k = 5 sampling, 100 new
tokens), with a fixed seed so that a bare and an edited model draw the same random numbers and
texts differ only where the edits change the distributions.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import torch

FLUENCY_SCALE = 100.0
_WORD = re.compile(r"\w+(?:'\w+)*|[^\w\s]")


def words(text: str) -> list[str]:
    """`text` split into words and punctuation marks (see the module docstring)."""
    return _WORD.findall(text)


def ngram_entropy(tokens: Sequence[str], n: int) -> float:
    """Entropy in bits of the relative frequencies of the n-grams of `tokens` (0 with none)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    counts = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values())


def text_fluency(text: str) -> float:
    """mean(2/3 * H_2, 4/3 * H_3) of one text's words, in bits (not scaled)."""
    tokens = words(text)
    return (2 / 3 * ngram_entropy(tokens, 2) + 4 / 3 * ngram_entropy(tokens, 3)) / 2


def fluency(texts: Sequence[str]) -> float:
    """Mean `text_fluency` over `texts`, in bits (not scaled); ValueError when there are none."""
    if not texts:
        raise ValueError("fluency needs at least one text")
    return sum(text_fluency(text) for text in texts) / len(texts)


@torch.no_grad()
def generate_texts(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 100, top_k: int = 5,
                   seed: int = 0, batch_size: int = 16) -> list[str]:
    """Prompt + sampled continuation for every prompt (left-padded batches, top-k sampling).

    Each batch reseeds torch's generator with `seed` + its index, so the texts do not depend on
    what ran before. Returns the decoded texts without special tokens.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    for prompt in prompts:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"generation prompt must be a non-empty string, got {prompt!r}")
    parameter = next(model.parameters())
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts: list[str] = []
    for batch_index, start in enumerate(range(0, len(prompts), batch_size)):
        encoded = [list(tokenizer(p)["input_ids"]) for p in prompts[start : start + batch_size]]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.int64)
        attention_mask = torch.zeros((len(encoded), width), dtype=torch.int64)
        for r, ids in enumerate(encoded):
            input_ids[r, width - len(ids):] = torch.tensor(ids)
            attention_mask[r, width - len(ids):] = 1
        torch.manual_seed(seed + batch_index)
        output = model.generate(input_ids=input_ids.to(parameter.device),
                                attention_mask=attention_mask.to(parameter.device),
                                do_sample=True, top_k=top_k, top_p=1.0, temperature=1.0,
                                max_new_tokens=max_new_tokens, pad_token_id=pad_id)
        texts.extend(tokenizer.decode(row[width - len(ids):], skip_special_tokens=True)
                     for row, ids in zip(output.cpu(), encoded))
    return texts
