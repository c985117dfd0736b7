"""Nearest facts of a query by cosine, over the key rows of a view. Scores come from the op's own
reference backend (`ops.torch_backend.cosine_chunks`: the cosine of float32 vectors, a key with
NaN/Inf never ranks, a bounded chunk of keys at a time); `torch.topk` per chunk keeps the
candidates, which are merged: never a sort of all m scores.
"""

from __future__ import annotations

import torch

from ..ops.torch_backend import cosine_chunks


def _top_rows(keys: torch.Tensor, query: torch.Tensor, want: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, rows) of the `want` best rows of (m, d1) `keys` for the float32 `query` (d1,), plus
    every row tied with the last of them, best first and lower row first on ties."""
    best_scores = torch.empty(0)
    best_rows = torch.empty(0, dtype=torch.int64)
    for start, chunk_scores in cosine_chunks(query[None, :], keys):
        scores = torch.cat([best_scores, chunk_scores[0]])  # candidate rows stay in ascending order
        rows = torch.cat([best_rows, torch.arange(start, start + chunk_scores.shape[1])])
        if scores.shape[0] > want:
            keep = scores >= torch.topk(scores, want, sorted=False).values.min()  # ties at the cut stay
            scores, rows = scores[keep], rows[keep]
        best_scores, best_rows = scores, rows
    order = torch.sort(best_scores, descending=True, stable=True).indices  # stable: lower row first on ties
    return best_scores[order], best_rows[order]


def top_facts(keys: torch.Tensor, row_ids: list[str], query: torch.Tensor, k: int) -> list[tuple[str, float]]:
    """The `k` facts (or all, if fewer) whose best key row has the highest cosine with `query`, best
    first, lower view row first on ties: (fact id, cosine). keys: (m, d1) CPU, any float dtype;
    row_ids: the fact of each row (a fact with several keys has several rows); query: (d1,) float32."""
    want = k
    while True:
        scores, rows = _top_rows(keys, query, want)
        found: dict[str, float] = {}
        for score, row in zip(scores.tolist(), rows.tolist()):
            found.setdefault(row_ids[row], score)
            if len(found) == k:
                return list(found.items())
        if want >= keys.shape[0]:
            return list(found.items())
        want *= 2  # facts with several keys took some of the rows: look further
