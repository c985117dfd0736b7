"""Keys (paper Eq. 20): the input of the FFN down-projection at layer l*, at the subject's last
token, averaged over the bare prompt and the N prefixes; and the generic queries an extra key
must stay clear of.

Contexts of many facts run as one right-padded batch; the forward pass stops as soon as layer l*'s
down-projection has seen its input (nothing above l* is computed).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

from ..integration.architectures import down_proj_dims, locate_down_proj
from .prefill import CHUNK_TOKENS, length_chunks, pad_right
from .tokens import EditTokens


class _Captured(Exception):
    """Raised by the capture hook to end the forward pass once the keys are read."""


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, else its eos id, else 0 (padded positions are masked anyway)."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


@torch.no_grad()
def down_proj_inputs(model, rows: Sequence[Sequence[int]], positions: Optional[Sequence[int]], layer: int, *,
                     pad_id: int, module_path: Optional[str] = None) -> torch.Tensor:
    """(n, d1) float32: the down-projection input at layer `layer` of `rows[i]` at `positions[i]`;
    positions None: at every token of every row, (sum of row lengths, d1) in row order. The rows
    run in chunks of similar length (`prefill.length_chunks`), so little padding is computed."""
    module = locate_down_proj(model, layer, module_path)
    device = next(model.parameters()).device
    captured = {}

    def capture(_module, args):
        captured["x"] = args[0]
        raise _Captured

    found: list[Optional[torch.Tensor]] = [None] * len(rows)
    handle = module.register_forward_pre_hook(capture)
    try:
        for chunk in length_chunks([max(len(row), 1) for row in rows], CHUNK_TOKENS):
            ids, mask = pad_right([rows[i] for i in chunk], pad_id, device)
            try:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            except _Captured:
                pass
            for j, i in enumerate(chunk):
                x = captured["x"][j]
                found[i] = x[: len(rows[i])] if positions is None else x[positions[i]].unsqueeze(0)
    finally:
        handle.remove()
    return torch.cat(found).float()


def context_queries(model, tokens: Sequence[EditTokens], layer: int, *, pad_id: int, batch_size: int = 64,
                    module_path: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(queries (c, d1) float32 CPU, counts (n,) int64): the down-projection input at the subject's
    last token in every context of each tokenised fact, run on the unedited model, fact by fact
    (counts[i] contexts of fact i, its bare prompt first); `keys_of` averages them into keys."""
    queries = []
    for start in range(0, len(tokens), batch_size):
        chunk = tokens[start : start + batch_size]
        rows = [context for fact in chunk for context in fact.contexts]
        positions = [position for fact in chunk for position in fact.subject_last]
        queries.append(down_proj_inputs(model, rows, positions, layer, pad_id=pad_id, module_path=module_path).cpu())
    counts = torch.tensor([len(fact.contexts) for fact in tokens], dtype=torch.long)
    if not queries:
        return torch.zeros(0, 0), counts
    return torch.cat(queries), counts


def keys_of(queries: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, bare), both (n, d1): per fact the mean of its `counts[i]` consecutive context queries
    (Eq. 20) and its bare-prompt query (its first)."""
    owner = torch.repeat_interleave(torch.arange(len(counts)), counts)
    sums = torch.zeros(len(counts), queries.shape[1]).index_add_(0, owner, queries)
    return sums / counts.unsqueeze(1), queries[torch.cumsum(counts, 0) - counts]


def compute_keys(model, tokens: Sequence[EditTokens], layer: int, *, pad_id: int, batch_size: int = 64,
                 module_path: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, bare), both (n, d1) float32, of the tokenised facts, run on the unedited model:
    keys[i] is the mean over fact i's contexts of the down-projection input at its subject's last
    token (Eq. 20); bare[i] is that input in its bare-prompt context alone."""
    queries, counts = context_queries(model, tokens, layer, pad_id=pad_id, batch_size=batch_size,
                                      module_path=module_path)
    if not len(tokens):
        return torch.zeros(0, 0), torch.zeros(0, 0)
    return keys_of(queries, counts)


def generic_queries(model, tokenizer, texts: Sequence[str], layer: int, *, pad_id: int,
                    module_path: Optional[str] = None) -> torch.Tensor:
    """(t, d1) float32, unit norm: the down-projection input at every token of `texts` (the
    model-written prefixes: generic text, first positions included). A key whose cosine with one
    of these passes the gate would fire on arbitrary text, e.g. a query taken where the subject
    opens a sequence in a model without a BOS token, whose first position looks alike for every
    token. No texts (no prefixes): (0, d1)."""
    if not texts:
        return torch.zeros(0, down_proj_dims(model, layer, module_path)[0])
    rows = [list(tokenizer(text)["input_ids"]) for text in texts]
    inputs = down_proj_inputs(model, rows, None, layer, pad_id=pad_id, module_path=module_path)
    return torch.nn.functional.normalize(inputs, dim=1).cpu()


@dataclasses.dataclass(frozen=True)
class BareKeys:
    """Which facts get their bare-prompt query as an extra key, (n,) bool each: `far` (cosine with
    the averaged key below `bare_key_below`), `generic` (cosine with some model-written-prefix
    query above gamma: it would pass a gate of gamma on arbitrary text), `beaten` (not far, but
    another fact's key scores higher on the bare prompt than its own keys) and `extra` (stored)."""

    far: torch.Tensor
    generic: torch.Tensor
    beaten: torch.Tensor
    extra: torch.Tensor


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=1)


def _best_cosines(queries: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(n,) the best cosine of each query with `rows` (-inf without rows)."""
    if not len(rows) or not len(queries):
        return torch.full((len(queries),), float("-inf"))
    return (_unit_rows(queries) @ _unit_rows(rows).T).max(dim=1).values


def bare_prompt_keys(keys: torch.Tensor, bare: torch.Tensor, generic: torch.Tensor, *, below: float, gamma: float,
                     text: Optional[torch.Tensor] = None, margin: float = 0.0, units: Optional[torch.Tensor] = None,
                     stored: Optional[torch.Tensor] = None) -> BareKeys:
    """The extra-key decision for facts with averaged `keys` (n, d1) and bare-prompt queries `bare`
    (n, d1). A bare query becomes a key when it is far from the averaged key, or when the bare
    prompt would be won by another fact's key: one of `stored` (s, d1), the stored keys of facts
    outside the batch, or a key of a batch fact of another residual-sharing unit (`units` (n,)
    int64; None: one unit per fact), its averaged key or a bare query stored as a key; the
    decision is repeated until no further bare prompt is beaten (a new bare key can beat another's).

    Unless it is generic (cosine above gamma with one of `generic`, (t, d1) prefix queries):
    text None (one gate threshold, gamma, for every key): a generic query is never stored.
    text (s, d1) queries of model-written text (the calibration negatives): the key is an
    exact-match key, its own threshold its floor (1, its own query) minus `margin`
    (editing.calibration), and a generic query is stored when its best text cosine is below
    1 - 2 * margin: then text stays below its threshold by `margin` and its own prompt above.
    Subjects that open the prompt (a one-token subject at position 0 in a model without BOS) have
    only such generic queries; without their key their bare prompt fires another fact's key.

    Only the batch's bare prompts are checked: a stored fact whose bare prompt a new key wins is
    not (its bare query is not stored unless it is one of its keys)."""
    n = len(bare)
    units = torch.arange(n) if units is None else units
    unit_bare = _unit_rows(bare)
    own_cosine = (unit_bare * _unit_rows(keys)).sum(dim=1) if n else torch.zeros(0)
    far = own_cosine < below
    is_generic = _best_cosines(bare, generic) > gamma
    separable = torch.zeros(n, dtype=torch.bool)
    if text is not None:
        separable = _best_cosines(bare, text) < 1.0 - 2.0 * margin
    allowed = ~is_generic | separable
    extra = far & allowed
    best_stored = _best_cosines(bare, torch.zeros(0, bare.shape[1]) if stored is None else stored)
    same_unit = units.view(-1, 1) == units.view(1, -1)
    to_averaged = unit_bare @ _unit_rows(keys).T if n else torch.zeros(0, 0)
    to_bare = unit_bare @ unit_bare.T if n else torch.zeros(0, 0)
    beaten = torch.zeros(n, dtype=torch.bool)
    while True:
        # per bare prompt: its best own-unit key and its best key of another unit (batch or stored)
        as_key = torch.where(extra.view(1, -1), to_bare, torch.tensor(float("-inf")))
        own = torch.maximum(to_averaged.masked_fill(~same_unit, float("-inf")).max(dim=1).values,
                            as_key.masked_fill(~same_unit, float("-inf")).max(dim=1).values) if n else own_cosine
        rival = torch.maximum(to_averaged.masked_fill(same_unit, float("-inf")).max(dim=1).values,
                              as_key.masked_fill(same_unit, float("-inf")).max(dim=1).values) if n else own_cosine
        newly = (torch.maximum(rival, best_stored) > own) & allowed & ~extra
        if not bool(newly.any()):
            return BareKeys(far, is_generic, beaten, extra)
        beaten |= newly
        extra |= newly
