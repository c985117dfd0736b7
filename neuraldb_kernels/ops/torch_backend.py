"""The "torch" backend of gated_retrieve: the plain-PyTorch reference every kernel must match.

Chunked over the keys so that memory stays bounded at any m: at most about 2^22 scores or
converted key elements are alive at once, whatever m is.
"""

from typing import Iterator, Tuple

import torch

from .backend import Backend
from .contract import FLOAT_DTYPES, Gamma, accumulation_dtype

_CHUNK_ELEMENTS = 1 << 22


def _inverse_norms(x: torch.Tensor) -> torch.Tensor:
    """1/||x_i|| per row, with 0 for zero rows (a zero vector has cosine 0 with everything)."""
    norms = torch.linalg.vector_norm(x, dim=-1)
    return torch.where(norms > 0, norms.reciprocal(), torch.zeros_like(norms))


def cosine_chunks(q2d: torch.Tensor, K: torch.Tensor) -> Iterator[Tuple[int, torch.Tensor]]:
    """The op's scores, a bounded chunk of keys at a time: (start, scores) with scores (n, c) the
    cosines of q2d (n, d1) with K[start : start + c] (m, d1), in float64 when q or K is float64,
    else float32; a key with NaN/Inf scores -inf (it never wins). Also what `NeuralDB.search` ranks by."""
    acc = accumulation_dtype(q2d.dtype, K.dtype)
    q = q2d.to(acc)
    q_inv = _inverse_norms(q)
    chunk = max(1, _CHUNK_ELEMENTS // max(q.shape[0], K.shape[1]))
    for start in range(0, K.shape[0], chunk):
        keys = K[start : start + chunk].to(acc)
        scores = (q @ keys.T) * q_inv[:, None] * _inverse_norms(keys)[None, :]
        yield start, scores.nan_to_num(nan=float("-inf"))


def _run(q2d: torch.Tensor, K: torch.Tensor, R: torch.Tensor, gamma: Gamma) -> Tuple[torch.Tensor, ...]:
    """Scores from `cosine_chunks`; a per-key gamma is read at the winning index only."""
    acc = accumulation_dtype(q2d.dtype, K.dtype)
    n = q2d.shape[0]
    best = torch.full((n,), float("-inf"), dtype=acc, device=q2d.device)
    best_index = torch.zeros(n, dtype=torch.int64, device=q2d.device)
    for start, scores in cosine_chunks(q2d, K):
        chunk_best, chunk_index = scores.max(dim=1)  # first maximal index on ties
        better = chunk_best > best  # strict: an earlier chunk keeps its ties
        best = torch.where(better, chunk_best, best)
        best_index = torch.where(better, chunk_index + start, best_index)
    finite = torch.isfinite(q2d).all(dim=1)
    threshold = gamma[best_index] if isinstance(gamma, torch.Tensor) else gamma
    fired = finite & (best > threshold)
    index = torch.where(fired, best_index, torch.full_like(best_index, -1))
    score = torch.where(finite, best, torch.full_like(best, float("nan"))).to(torch.float32)
    rows = R.index_select(0, index.clamp_min(0))
    out = torch.where(fired[:, None], rows, torch.zeros_like(rows))
    return out, index, score


def _approximate_bounds(query_dots: torch.Tensor, queries, index, start: int, stop: int, slack: float):
    """(lower, upper) (n, stop - start) float64: a -/+ eps of keys [start, stop) (key_index.py);
    NaN bounds (NaN/Inf keys or queries) become -inf so they never count."""
    codes = index.codes[start:stop].to(torch.float64)
    scale = index.row_scale[start:stop].to(torch.float64)
    approx = (query_dots @ codes.T) * queries.scale.to(torch.float64)[:, None] * scale[None, :]
    eps = index.row_error[start:stop].to(torch.float64)[None, :] + queries.error.to(torch.float64)[:, None] * index.row_norm[
        start:stop
    ].to(torch.float64)[None, :] + slack
    return (approx - eps).nan_to_num(nan=float("-inf")), (approx + eps).nan_to_num(nan=float("-inf"))


def compressed_candidates(queries, index, budget: int):
    """The reference certified candidate pass (key_index.py): float64 products of the decoded
    codes (exact for integer codes), two passes over the codes in chunks: the best lower bound L
    per query, then every key with upper bound >= L; a query stops collecting once it has more
    than `budget`. NaN/Inf keys and queries (bounds -inf) give no candidates. Returns
    key_index.CandidateSets."""
    from .key_index import candidate_sets, certified_slack

    n, m = queries.codes.shape[0], index.m
    slack = certified_slack(index.d1)
    query_dots = queries.codes.to(torch.float64)
    chunk = max(1, _CHUNK_ELEMENTS // max(n, query_dots.shape[1]))
    best_lower = torch.full((n,), float("-inf"), dtype=torch.float64, device=query_dots.device)
    for start in range(0, m, chunk):
        lower, _ = _approximate_bounds(query_dots, queries, index, start, min(m, start + chunk), slack)
        best_lower = torch.maximum(best_lower, lower.amax(dim=1))
    counts = torch.zeros(n, dtype=torch.int64, device=query_dots.device)
    query_rows, key_rows = [], []
    for start in range(0, m, chunk):
        _, upper = _approximate_bounds(query_dots, queries, index, start, min(m, start + chunk), slack)
        keep = (upper >= best_lower[:, None]) & (upper > float("-inf")) & (counts <= budget)[:, None]
        rows, cols = torch.nonzero(keep, as_tuple=True)
        counts += torch.bincount(rows, minlength=n)
        query_rows.append(rows)
        key_rows.append(cols + start)
    return candidate_sets(torch.cat(query_rows), torch.cat(key_rows), n, counts > budget)


BACKEND = Backend(
    "torch", FLOAT_DTYPES, None, _run, candidates=compressed_candidates, candidate_formats=("int8", "fp8_e4m3")
)  # every device torch runs on
