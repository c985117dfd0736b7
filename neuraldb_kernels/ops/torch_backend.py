"""The "torch" backend of gated_retrieve: the plain-PyTorch reference every kernel must match.

Chunked over the keys so that memory stays bounded at any m: at most about 2^22 scores or
converted key elements are alive at once, whatever m is.
"""

from typing import Tuple

import torch

from .backend import Backend
from .contract import FLOAT_DTYPES, Gamma, accumulation_dtype

_CHUNK_ELEMENTS = 1 << 22


def _inverse_norms(x: torch.Tensor) -> torch.Tensor:
    """1/||x_i|| per row, with 0 for zero rows (a zero vector has cosine 0 with everything)."""
    norms = torch.linalg.vector_norm(x, dim=-1)
    return torch.where(norms > 0, norms.reciprocal(), torch.zeros_like(norms))


def _run(q2d: torch.Tensor, K: torch.Tensor, R: torch.Tensor, gamma: Gamma) -> Tuple[torch.Tensor, ...]:
    """Scores in float64 when q or K is float64, else float32; key chunks of `_CHUNK_ELEMENTS`.
    A per-key gamma is read at the winning index only."""
    acc = accumulation_dtype(q2d.dtype, K.dtype)
    q = q2d.to(acc)
    n, m = q.shape[0], K.shape[0]
    q_inv = _inverse_norms(q)
    best = torch.full((n,), float("-inf"), dtype=acc, device=q.device)
    best_index = torch.zeros(n, dtype=torch.int64, device=q.device)
    chunk = max(1, _CHUNK_ELEMENTS // max(n, K.shape[1]))
    for start in range(0, m, chunk):
        keys = K[start : start + chunk].to(acc)
        scores = (q @ keys.T) * q_inv[:, None] * _inverse_norms(keys)[None, :]
        scores = scores.nan_to_num(nan=float("-inf"))  # a key with NaN/Inf never matches
        chunk_best, chunk_index = scores.max(dim=1)  # first maximal index on ties
        better = chunk_best > best  # strict: an earlier chunk keeps its ties
        best = torch.where(better, chunk_best, best)
        best_index = torch.where(better, chunk_index + start, best_index)
    finite = torch.isfinite(q).all(dim=1)
    threshold = gamma[best_index] if isinstance(gamma, torch.Tensor) else gamma
    fired = finite & (best > threshold)
    index = torch.where(fired, best_index, torch.full_like(best_index, -1))
    score = torch.where(finite, best, torch.full_like(best, float("nan"))).to(torch.float32)
    rows = R.index_select(0, index.clamp_min(0))
    out = torch.where(fired[:, None], rows, torch.zeros_like(rows))
    return out, index, score


BACKEND = Backend("torch", FLOAT_DTYPES, None, _run)  # every device torch runs on
