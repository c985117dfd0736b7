"""Preservation: how much an attached NeuralDB disturbs the model on text unrelated to its edits.

    gate_fire_rate  percent of the texts' tokens at which any fact's gate fires at the edited layer
    kl              mean over the texts' tokens of KL(P_bare || P_edited) of the next-token
                    distributions, in nats per token (0 exactly where nothing fired earlier in
                    the text, since an unfired gate leaves the model bit-identical)

Each batch runs with the database attached for that forward only (`attach(model, db,
**attach_options)`, so the model must not have another attachment on the same layer meanwhile);
the texts where some gate fired run again on the bare model for the KL. A text where no gate
fired contributes KL 0 without a second run: attach guarantees bit-identical outputs there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .scoring import model_device, context_length


def _batch(tokenizer, texts: Sequence[str], limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    encoded = []
    for text in texts:
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"preservation text must be a non-empty string, got {text!r}")
        ids = list(tokenizer(text)["input_ids"])
        if limit is not None and len(ids) > limit:
            raise ValueError(f"preservation text {text[:60]!r}... has {len(ids)} tokens, "
                             f"more than the model's context of {limit}")
        encoded.append(ids)
    width = max(len(ids) for ids in encoded)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(encoded), width), dtype=torch.int64)
    for r, ids in enumerate(encoded):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        mask[r, : len(ids)] = 1
    return input_ids, mask


@torch.no_grad()
def preservation_metrics(model, tokenizer, db, texts: Sequence[str], *,
                         attach_options: Mapping[str, Any] | None = None, batch_size: int = 16) -> dict[str, float]:
    """{"gate_fire_rate": percent, "kl": nats per token} of `db` attached to `model` on `texts`."""
    from ..integration import attach

    if not texts:
        raise ValueError("preservation needs at least one text")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    options = dict(attach_options or {})
    device = model_device(model)
    limit = context_length(model)
    fired = 0
    tokens = 0
    kl_sum = 0.0
    for start in range(0, len(texts), batch_size):
        input_ids, mask = _batch(tokenizer, texts[start : start + batch_size], limit)
        real = mask.bool()
        with attach(model, db, **options) as handle:
            edited = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
            fired_at = (handle.last.index.cpu() >= 0) & real
        fired += int(fired_at.sum())
        tokens += int(real.sum())
        rows = fired_at.any(dim=1).nonzero().flatten()
        if len(rows):
            bare = model(input_ids=input_ids[rows].to(device), attention_mask=mask[rows].to(device)).logits
            bare = torch.log_softmax(bare.float(), dim=-1)
            edited = torch.log_softmax(edited[rows.to(edited.device)].float(), dim=-1)
            kl = (bare.exp() * (bare - edited)).sum(dim=-1).cpu().double()
            kl_sum += float(kl[real[rows]].sum())
    return {"gate_fire_rate": fired / tokens * 100.0, "kl": kl_sum / tokens}
