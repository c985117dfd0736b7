"""Teacher-forced scoring of multi-token targets after prompts, batched with padding.

A (prompt, target) pair is scored as the token sequence prompt_ids + target_ids, where
target_ids tokenise the target with one leading space when the prompt does not already end in
whitespace (" English" after "... is", as ROME/MEMIT score CounterFact and ZsRE). Target token j
is predicted from the logits at position len(prompt_ids) + j - 1. For every pair this gives

    log_prob        sum over the target tokens of log P(token | everything before it), nats;
                    so exp(log_prob) = P(target | prompt) over the whole token sequence
    correct_tokens  how many target tokens are the argmax of their position's distribution
                    (teacher-forced top-1, ties to the lowest token id)
    n_tokens        the number of target tokens

Prompts are sorted by length and run in right-padded batches of `batch_size`, each prompt once
for all its candidate targets (see `score_targets`); log-softmax in float32.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence

import torch


@dataclasses.dataclass(frozen=True)
class TargetScores:
    """Scores of k candidate targets for each of n prompts, in input order.

    log_prob: (n, k) float64, nats. correct_tokens, n_tokens: (n, k) int64.
    """

    log_prob: torch.Tensor
    correct_tokens: torch.Tensor
    n_tokens: torch.Tensor

    @property
    def token_accuracy(self) -> torch.Tensor:
        """(n, k) float64: the share of each target's tokens that are teacher-forced top-1, in [0, 1]."""
        return self.correct_tokens.double() / self.n_tokens.double()


def encode_pair(tokenizer, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """(prompt token ids, target token ids): the prompt with the tokenizer's special tokens, the
    target without, after one leading space unless the prompt ends in whitespace."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
    if not isinstance(target, str) or not target.strip():
        raise ValueError(f"target must be a non-empty string, got {target!r} (prompt {prompt!r})")
    target = target.strip()
    if not prompt[-1].isspace():
        target = " " + target
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    target_ids = list(tokenizer(target, add_special_tokens=False)["input_ids"])
    if not prompt_ids:
        raise ValueError(f"prompt {prompt!r} tokenises to no tokens")
    return prompt_ids, target_ids


def context_length(model) -> int | None:
    """The model's context length from its config (max_position_embeddings / n_positions), or None."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def model_device(model) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    parameter = next(model.parameters(), None)
    return torch.device("cpu") if parameter is None else parameter.device


def _check_inputs(prompts: Sequence[str], targets: Sequence[Sequence[str]], batch_size: int) -> int:
    """k, the number of candidate targets per prompt."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if len(prompts) != len(targets):
        raise ValueError(f"got {len(prompts)} prompts but {len(targets)} target lists")
    if not prompts:
        raise ValueError("no prompts to score")
    for i, candidates in enumerate(targets):
        if isinstance(candidates, str) or not isinstance(candidates, Sequence) or not candidates:
            raise TypeError(f"targets[{i}] must be a non-empty sequence of target strings, got {candidates!r}")
        if len(candidates) != len(targets[0]):
            raise ValueError(f"every prompt needs the same number of targets: targets[0] has {len(targets[0])}, "
                             f"targets[{i}] has {len(candidates)}")
    return len(targets[0])


def _cache_name(model) -> str:
    """The forward argument (and output field) carrying the KV cache: "cache" from transformers
    5.x on, "past_key_values" before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _right_padded(rows: list[list[int]], width: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), both (len(rows), width) int64, rows left-aligned."""
    ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = torch.tensor(row, dtype=torch.int64)
        mask[r, : len(row)] = 1
    return ids, mask


@torch.no_grad()
def score_targets(model, tokenizer, prompts: Sequence[str], targets: Sequence[Sequence[str]], *,
                  batch_size: int = 32) -> TargetScores:
    """Teacher-forced scores (see the module docstring) of the k candidate targets `targets[i]`
    after `prompts[i]` (k the same for every prompt).

    Each batch of prompts runs once; its KV cache is repeated k times and the candidates' tokens
    after the first run as one continuation (positions and padding masked explicitly), so a prompt
    is not recomputed per candidate. model: a Hugging Face causal LM (eval mode) whose forward
    takes `logits_to_keep` and `past_key_values`; whatever is attached to it takes part.
    tokenizer: its tokenizer. A prompt + target longer than the model's context is a ValueError.
    """
    k = _check_inputs(prompts, targets, batch_size)
    encoded = []
    limit = context_length(model)
    for i, (prompt, candidates) in enumerate(zip(prompts, targets)):
        pairs = [encode_pair(tokenizer, prompt, target) for target in candidates]
        longest = max(len(p) + len(t) for p, t in pairs)
        if limit is not None and longest > limit:
            raise ValueError(f"prompt {i} ({prompt!r}) with its longest target has {longest} tokens, "
                             f"more than the model's context of {limit}")
        encoded.append((pairs[0][0], [t for _, t in pairs]))
    n = len(encoded)
    log_prob = torch.zeros((n, k), dtype=torch.float64)
    correct = torch.zeros((n, k), dtype=torch.int64)
    n_tokens = torch.tensor([[len(t) for t in cands] for _, cands in encoded], dtype=torch.int64)
    device = model_device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(n), key=lambda i: len(encoded[i][0]))
    for start in range(0, n, batch_size):
        rows = order[start : start + batch_size]
        prompt_ids = [encoded[i][0] for i in rows]
        lengths = torch.tensor([len(p) for p in prompt_ids])
        ids, prompt_mask = _right_padded(prompt_ids, int(lengths.max()), pad_id)
        # the last prompt position predicts every candidate's first token
        first = int(lengths.min()) - 1
        out = model(input_ids=ids.to(device), attention_mask=prompt_mask.to(device), use_cache=True,
                    logits_to_keep=torch.arange(first, int(lengths.max()), device=device))
        head = torch.log_softmax(out.logits.float(), dim=-1)[torch.arange(len(rows)), lengths - 1 - first].cpu()
        # candidates' later tokens: one continuation of the cache repeated k times, row r*k + c
        candidates = [cand for i in rows for cand in encoded[i][1]]
        width = max(len(cand) for cand in candidates) - 1
        if width > 0:
            cont_ids, cont_mask = _right_padded([cand[:-1] for cand in candidates], width, pad_id)
            cache_name = _cache_name(model)
            cache = getattr(out, cache_name)
            cache.batch_repeat_interleave(k)
            positions = lengths.repeat_interleave(k).unsqueeze(1) + torch.arange(width)
            mask = torch.cat([prompt_mask.repeat_interleave(k, dim=0), cont_mask], dim=1)
            tail = model(input_ids=cont_ids.to(device), attention_mask=mask.to(device),
                         position_ids=positions.to(device), use_cache=True, **{cache_name: cache}).logits
            tail = torch.log_softmax(tail.float(), dim=-1).cpu()
        del out
        for r, i in enumerate(rows):
            for c, cand in enumerate(encoded[i][1]):
                # position j's distribution predicts token j: the head for j = 0, the tail after
                dists = head[r].unsqueeze(0)
                if len(cand) > 1:
                    dists = torch.cat([dists, tail[r * k + c, : len(cand) - 1]])
                wanted = torch.tensor(cand)
                log_prob[i, c] = dists[torch.arange(len(cand)), wanted].double().sum()
                correct[i, c] = (dists.argmax(dim=-1) == wanted).sum()
    return TargetScores(log_prob, correct, n_tokens)
