"""KV caches of many token rows at once, each opening that rows share computed once.

The Editor runs the model over many rows that open alike: the five contexts of every fact that
start with the same model-written prefix, the candidates of one rewording prompt (and the two-shot
examples every rewording prompt opens with). `prefill` returns the per-layer keys/values of such
rows as if each had run alone, but computes a shared opening once (`shared_head_lengths`), each
row's remaining tokens after its opening's cache, and all of it in chunks of rows of similar length
(`length_chunks`) so that little padding is computed. Openings are prefilled the same way, so
nested sharing (the rewording prompts' common examples under each prompt's candidates) is found
too. The model is causal, so this equals one forward per row up to float rounding.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

from ..integration import hf_compat

CHUNK_TOKENS = 4096  # padded tokens per forward


def shared_head_lengths(rows: Sequence[Sequence[int]], least: int = 2) -> list[int]:
    """Per token list of `rows`, the length of the longest opening it shares with another list,
    at most its own length - 1 (a row keeps a token of its own), or 0 when that is below `least`.
    Rows with one head (the same opening tokens) can share its keys/values."""
    order = sorted(range(len(rows)), key=lambda i: list(rows[i]))

    def common(a, b) -> int:
        count = 0
        for x, y in zip(a, b):
            if x != y:
                break
            count += 1
        return count

    shared = [common(rows[order[k]], rows[order[k + 1]]) for k in range(len(order) - 1)]
    heads = [0] * len(rows)
    for k, i in enumerate(order):
        best = max(shared[k - 1] if k else 0, shared[k] if k < len(shared) else 0)
        best = min(best, len(rows[i]) - 1)
        heads[i] = best if best >= least else 0
    return heads


def pad_right(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (n, L) int64, attention mask (n, L) int64) of right-padded token rows."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids.to(device), mask.to(device)


def length_chunks(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices of `lengths` (all > 0) in chunks of similar length: in order of length, a row joins
    the current chunk while the chunk's padded tokens (count x longest) stay within `budget` and
    within 1.25x its real tokens (one row alone may exceed `budget`)."""
    chunks: list[list[int]] = []
    real = 0
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        padded = (len(chunks[-1]) + 1) * lengths[i] if chunks else 0
        if chunks and padded <= budget and padded <= 1.25 * (real + lengths[i]):
            chunks[-1].append(i)
            real += lengths[i]
        else:
            chunks.append([i])
            real = lengths[i]
    return chunks


@dataclasses.dataclass(frozen=True)
class Prefilled:
    """layers: per decoder layer (keys, values), each (rows, heads, width, head_dim), every row
    left-padded to the longest (width tokens), padded positions zero (masked out, but never NaN);
    mask: (rows, width) int64, 1 at a row's tokens."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    mask: torch.Tensor


@torch.no_grad()
def prefill(base, rows: Sequence[Sequence[int]], *, pad_id: int) -> Optional[Prefilled]:
    """The KV cache of the token rows `rows` (see the module doc; row i's tokens at positions
    0..len - 1), run on `base` (a transformers base model, e.g. `model.base_model`), or None when
    every row is empty. Empty rows get no real position."""
    width = max((len(row) for row in rows), default=0)
    if width == 0:
        return None
    device = next(base.parameters()).device
    present = [i for i, row in enumerate(rows) if row]
    heads = shared_head_lengths([rows[i] for i in present])
    openings = sorted({tuple(rows[i][:h]) for i, h in zip(present, heads) if h})
    group = {opening: g for g, opening in enumerate(openings)}
    opening_of = torch.tensor([group.get(tuple(rows[i][:h]), 0) for i, h in zip(present, heads)],
                              dtype=torch.long, device=device)
    past = past_mask = None
    span = 0
    if openings:
        past = prefill(base, [list(opening) for opening in openings], pad_id=pad_id)
        span = past.mask.shape[1]
        past_mask = past.mask[opening_of] * torch.tensor(heads, device=device).gt(0).unsqueeze(1)
    rest, rest_mask = _forward_rows(base, [rows[i][h:] for i, h in zip(present, heads)], heads, pad_id,
                                    None if past is None else past.layers, past_mask, opening_of)
    # slot 0 is zeros (padded positions), then every opening's (left-padded) positions, then every
    # row's rest (right-padded); where[i, p]: the slot of row i's position p in the left-padded cache
    rest_span = rest_mask.shape[1]
    where = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for j, (i, h) in enumerate(zip(present, heads)):
        start = width - len(rows[i])
        first = 1 + int(opening_of[j]) * span + span - h
        where[i, start: start + h] = torch.arange(first, first + h)
        first = 1 + len(openings) * span + j * rest_span
        where[i, start + h:] = torch.arange(first, first + len(rows[i]) - h)
        mask[i, start:] = 1
    where = where.to(device).flatten()

    def placed(*tables: torch.Tensor) -> torch.Tensor:  # (rows, heads, width, head_dim)
        flat = [table.transpose(0, 1).flatten(1, 2) for table in tables]  # (heads, rows x length, head_dim)
        slots = torch.cat([flat[0].new_zeros(flat[0].shape[0], 1, flat[0].shape[2]), *flat], dim=1)
        return slots[:, where].unflatten(1, (len(rows), width)).transpose(0, 1).contiguous()

    openings_kv = past.layers if past is not None else [()] * len(rest)
    layers = [(placed(*opening[:1], keys), placed(*opening[1:], values))
              for opening, (keys, values) in zip(openings_kv, rest)]
    return Prefilled(layers, mask.to(device))


def _forward_rows(base, rows: list[list[int]], starts: Sequence[int], pad_id: int, past=None, past_mask=None,
                  past_rows=None) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """([(keys, values)] per layer, each (len(rows), heads, longest row, head_dim), right-padded
    with padded positions zeroed, and the (len(rows), longest row) mask) of the non-empty token
    lists `rows`, row i at positions starts[i], starts[i] + 1, ... after row past_rows[i] of the
    cache `past` [(keys, values)] (row i's valid positions there: past_mask[i]). The model runs
    over `length_chunks` of at most CHUNK_TOKENS padded tokens."""
    device = next(base.parameters()).device
    longest = max(map(len, rows))
    _, mask = pad_right(rows, pad_id, device)
    keyword = hf_compat.cache_keyword(base)
    layers = None
    for chunk in length_chunks([len(row) for row in rows], CHUNK_TOKENS):
        ids, _ = pad_right([rows[i] for i in chunk], pad_id, device)
        wide = ids.shape[1]
        index = torch.tensor(chunk, device=device)
        positions = (torch.tensor([starts[i] for i in chunk], device=device).unsqueeze(1)
                     + torch.arange(wide, device=device))
        kwargs, attention = {}, mask[index, :wide]
        if past is not None:
            source = past_rows[index]
            kwargs[keyword] = hf_compat.cache_from_layers(base, [(k[source], v[source]) for k, v in past])
            attention = torch.cat([past_mask[index], attention], dim=1)
        output = base(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=True,
                      **kwargs)
        skip = 0 if past is None else past_mask.shape[1]
        keep = mask[index, :wide].bool()[:, None, :, None]
        computed = hf_compat.cache_layers(hf_compat.output_cache(output))
        if layers is None:
            layers = [(k.new_zeros(len(rows), k.shape[1], longest, k.shape[3]),
                       v.new_zeros(len(rows), v.shape[1], longest, v.shape[3])) for k, v in computed]
        for (keys, values), (k, v) in zip(layers, computed):
            keys[index, :, :wide] = torch.where(keep, k[:, :, skip:], 0.0)
            values[index, :, :wide] = torch.where(keep, v[:, :, skip:], 0.0)
    return layers, mask
