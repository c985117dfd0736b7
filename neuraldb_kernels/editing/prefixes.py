"""Random prefixes the model writes itself (paper Eq. 20-21; ROME/MEMIT "context templates").

Keys and residuals are averaged over the bare prompt and N prefixes, so that an edit does not
depend on the prompt starting the text. Each prefix is a short continuation, sampled by the model
from a seed word with top-k sampling and a fixed seed, followed by ". ". They are generated once per
(model, settings) and cached in memory; sampling uses its own `torch.Generator`, so the global RNG
is untouched and a rerun (e.g. resuming an interrupted edit) gets the same prefixes.
"""

from __future__ import annotations

import weakref
from typing import Sequence

import torch

SEED_WORDS = ("The", "Therefore", "Because", "I", "You", "It", "We", "In", "A", "This")

_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


@torch.no_grad()
def _sample_continuation(model, tokenizer, seed_word: str, length: int, top_k: int,
                         generator: torch.Generator) -> str:
    """`seed_word` followed by `length` tokens sampled from the model's top-k next-token distribution."""
    device = next(model.parameters()).device
    ids = torch.tensor([tokenizer(seed_word, add_special_tokens=True)["input_ids"]], device=device)
    prompt_length = ids.shape[1]
    for _ in range(length):
        logits = model(input_ids=ids).logits[0, -1].float()
        top = torch.topk(logits, top_k)
        probs = torch.softmax(top.values, dim=-1).cpu()
        choice = top.indices[torch.multinomial(probs, 1, generator=generator).item()]
        ids = torch.cat([ids, choice.view(1, 1)], dim=1)
    text = tokenizer.decode(ids[0, prompt_length:], skip_special_tokens=True)
    return seed_word + text


def generate_prefixes(model, tokenizer, *, count: int = 5, length: int = 10, seed: int = 0,
                      top_k: int = 5, seed_words: Sequence[str] = SEED_WORDS) -> tuple[str, ...]:
    """`count` prefixes "<seed word + `length` sampled tokens>. " (cached per model and settings).

    The model must be unedited when this first runs for a setting (the Editor guarantees it).
    Braces are replaced by spaces and whitespace runs (newlines included) collapsed to one space.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be an int >= 0, got {count!r}")
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be an int >= 1, got {length!r}")
    settings = (count, length, seed, top_k, tuple(seed_words))
    cached = _CACHE.setdefault(model, {})
    if settings not in cached:
        generator = torch.Generator().manual_seed(seed)
        was_training = model.training
        model.eval()
        try:
            prefixes = []
            for index in range(count):
                text = _sample_continuation(model, tokenizer, seed_words[index % len(seed_words)], length,
                                            top_k, generator)
                text = " ".join(text.replace("{", " ").replace("}", " ").split())
                prefixes.append(text + ". ")
        finally:
            model.train(was_training)
        cached[settings] = tuple(prefixes)
    return cached[settings]
