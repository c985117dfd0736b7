"""Random prefixes the model writes itself (paper Eq. 20-21; ROME/MEMIT "context templates"), and
the batched top-k sampler behind them and behind calibration's model-written texts.

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

from ..integration import hf_compat
from .prefill import prefill

SEED_WORDS = ("The", "Therefore", "Because", "I", "You", "It", "We", "In", "A", "This")

_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


@torch.no_grad()
def sample_tokens(model, starts: Sequence[Sequence[int]], length: int, *, top_k: int,
                  generator: torch.Generator | Sequence[torch.Generator]) -> torch.Tensor:
    """(n, length) int64 CPU: `length` tokens sampled after each of the n token rows `starts`.

    Each token is drawn from the softmax of the model's top_k next-token logits with
    `torch.multinomial`: one call over all n rows per step from `generator`, or, given n
    generators, row i's from generator[i] (its texts then depend on its own generator only).
    All rows run as one batch with a KV cache: the starts but their last tokens are prefilled
    (`prefill.prefill`: an opening several starts share is computed once, rows of unequal lengths
    left-padded and masked, positions counted from their own first token), then one
    single-token forward per step. The model runs in eval mode; its training flag is restored
    afterwards.
    """
    if not starts or not all(len(row) for row in starts):
        raise ValueError("sample_tokens needs at least one start row, none of them empty")
    if not isinstance(generator, torch.Generator) and len(generator) != len(starts):
        raise ValueError(f"sample_tokens got {len(generator)} generators for {len(starts)} rows")
    device = next(model.parameters()).device
    keyword = hf_compat.cache_keyword(model)
    was_training = model.training
    model.eval()
    sampled = []
    try:
        # every token but the last of each start is prefilled (shared openings once); the first
        # step runs the last tokens, so logits are computed at the sampled positions only
        cached = prefill(model.base_model, [list(row[:-1]) for row in starts], pad_id=0)
        step = torch.tensor([[row[-1]] for row in starts], device=device)
        inputs, past = {}, None
        if cached is not None:
            past = hf_compat.cache_from_layers(model, cached.layers)
            inputs = {"attention_mask": torch.cat([cached.mask, torch.ones_like(step)], dim=1),
                      "position_ids": torch.tensor([[len(row) - 1] for row in starts], device=device)}
        for _ in range(length):
            output = model(input_ids=step, use_cache=True, **inputs, **({keyword: past} if past is not None else {}))
            past = hf_compat.output_cache(output)
            top = torch.topk(output.logits[:, -1].float(), top_k)
            probs = torch.softmax(top.values, dim=-1).cpu()
            if isinstance(generator, torch.Generator):
                choice = torch.multinomial(probs, 1, generator=generator)
            else:
                choice = torch.stack([torch.multinomial(row, 1, generator=g) for row, g in zip(probs, generator)])
            step = top.indices.gather(1, choice.to(device))
            sampled.append(step)
            if cached is not None:
                mask = torch.cat([inputs["attention_mask"], torch.ones_like(step)], dim=1)
                inputs = {"attention_mask": mask, "position_ids": inputs["position_ids"][:, -1:] + 1}
    finally:
        model.train(was_training)
    return torch.cat(sampled, dim=1).cpu()


def row_streams(seed: int, rows: int, draws: int, top_k: int) -> list[torch.Generator]:
    """`rows` generators that split one stream seeded with `seed`: generator i starts where
    `draws` top-k multinomial draws of each earlier row end (a draw consumes the same generator
    state whatever its probabilities), so rows sampled together draw what rows sampled one after
    the other would."""
    stream = torch.Generator().manual_seed(seed)
    generators = []
    for _ in range(rows):
        row = torch.Generator()
        row.set_state(stream.get_state())
        generators.append(row)
        for _ in range(draws):
            torch.multinomial(torch.ones(top_k), 1, generator=stream)
    return generators


def generate_prefixes(model, tokenizer, *, count: int = 5, length: int = 10, seed: int = 0,
                      top_k: int = 5, seed_words: Sequence[str] = SEED_WORDS) -> tuple[str, ...]:
    """`count` prefixes "<seed word + `length` sampled tokens>. " (cached per model and settings).

    Prefix i starts from seed_words[i % len(seed_words)] (tokenised with the tokenizer's special
    tokens); all are sampled together by `sample_tokens`, prefix i from `row_streams`' generator
    i: the draws of one seeded stream, prefix after prefix (the prefixes earlier versions sampled
    one at a time, so stored facts keep their contexts).
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
        words = [seed_words[index % len(seed_words)] for index in range(count)]
        prefixes = []
        if words:
            starts = [tokenizer(word, add_special_tokens=True)["input_ids"] for word in words]
            sampled = sample_tokens(model, starts, length, top_k=top_k,
                                    generator=row_streams(seed, len(words), length, top_k))
            for word, row in zip(words, sampled.tolist()):
                text = word + tokenizer.decode(row, skip_special_tokens=True)
                prefixes.append(" ".join(text.replace("{", " ").replace("}", " ").split()) + ". ")
        cached[settings] = tuple(prefixes)
    return cached[settings]
