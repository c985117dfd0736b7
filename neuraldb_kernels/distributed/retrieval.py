"""Sharded gated retrieval: the single-process `gated_retrieve` over the union of every rank's
key rows, computed by each rank on its own rows and merged with a few small collectives.

Global row order (shard-major): rank 0's rows first, then rank 1's, ...; global row =
(the number of rows of the ranks before the owner) + the row in the owner's own view. A freshly
opened merged database (split_merge.py) has this order, so the results below are those of the
single-process op over it.

Every rank brings its own queries (data-parallel serving: ranks run different requests; the
counts may differ, 0 included). One retrieval is four collectives:
  1. all-gather of a header per rank: (query count, d1, query dtype), 24 bytes;
  2. all-gather of the queries (padded to the largest count), so that every rank scans every query;
  3. all-gather of each rank's best candidate per query, packed as 8 bytes (float32 score bits,
     int32 code = 2 * local row + [the gate of that row fires], -1 for none) plus its row count:
     each rank then picks the same winner per query: the highest score, ties to the lowest rank
     (its row is the lowest global row among the tied, as the op's own ties go to its lowest row);
  4. the fired residual rows, only where some query fired (none: no collective): either an
     all-reduce (sum) where the owner contributes the row and every other rank -0.0 (x + -0.0 is
     x bit for bit for every x, so the sum is the row exactly), or an all-gather of each rank's
     fired rows padded to the largest count (`exchange="allreduce"` / `"gather"`).
Why per-rank gating works: each rank runs the op with gamma -1 (the best row and its cosine,
whatever the thresholds), and gates its own candidate with that row's threshold (float32, as the
backends compare); the winner's own gate then decides, exactly as the op applies the threshold
of its argmax. A query with NaN/Inf scores NaN on every rank (index -1); a rank without rows
scores -inf. Cosines are ranked in float32, so float64 queries or keys are refused.

Inference only: no autograd through the collectives.
"""

from __future__ import annotations

import dataclasses
import datetime
import time
from typing import Callable, Optional, Union

import torch
import torch.distributed as dist

from ..ops import gated_retrieve
from ..ops.contract import Gamma, check_inputs, check_key_gamma_values
from .collectives import Communicator

EXCHANGES = ("allreduce", "gather")
DEFAULT_EXCHANGE = "allreduce"
MAX_SHARD_ROWS = (1 << 30) - 1  # a row code 2 * row + 1 must fit an int32
_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3}


@dataclasses.dataclass(frozen=True)
class ShardRows:
    """One rank's rows: keys (m, d1), residuals (m, d2) on the queries' device, gamma a number
    in [-1, 1] or a (m,) float32 tensor of per-key thresholds (as `gated_retrieve` takes it)."""

    keys: torch.Tensor
    residuals: torch.Tensor
    gamma: Gamma


@dataclasses.dataclass(frozen=True)
class CommunicationStats:
    """What one retrieval exchanged, as seen by this rank: the number of collectives, the bytes it
    sent and received as a ring moves them (an all-gather of s bytes per rank: (W - 1) s each way;
    an all-reduce of s bytes: 2 (W - 1) / W s each way; nothing when W = 1), and the wall seconds
    spent in collectives (waiting for slower ranks included)."""

    collectives: int
    bytes_sent: int
    bytes_received: int
    seconds: float


@dataclasses.dataclass(frozen=True)
class ShardedRetrieval:
    """The result for this rank's queries q (..., d1).

    out (..., d2) in the residuals' dtype: the winning residual (bit for bit) where the gate
    fires, zeros elsewhere. index (...) int64: the global row (shard-major), -1 where no gate
    fires. score (...) float32: the best cosine over all rows (-inf without rows, NaN for a
    NaN/Inf query). owner (...) int64: the rank holding the fired row, -1 where none fired.
    row_offsets: the first global row of each rank (rank r's rows are row_offsets[r] + local row).
    served: {global row: local row} of this rank's rows that fired for any rank's query (what
    `fired()` of the distributed attach resolves to ids). communication: see CommunicationStats.
    """

    out: torch.Tensor
    index: torch.Tensor
    score: torch.Tensor
    owner: torch.Tensor
    row_offsets: tuple[int, ...]
    served: dict[int, int]
    communication: CommunicationStats


@dataclasses.dataclass(frozen=True)
class Winners:
    """The merged decision for all N queries of all ranks (identical on every rank)."""

    score: torch.Tensor  # (N,) float32
    index: torch.Tensor  # (N,) int64 global row or -1
    owner: torch.Tensor  # (N,) int64 rank of the fired row or -1
    local_row: torch.Tensor  # (N,) int64 row in the owner's view, -1 where none fired
    row_offsets: tuple[int, ...]


class _Exchanges:
    """The collectives of one retrieval, counted and timed."""

    def __init__(self, comm: Communicator):
        self.comm = comm
        self.count = self.sent = self.received = 0
        self.seconds = 0.0

    def all_gather(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        size = tensor.numel() * tensor.element_size()
        started = time.perf_counter()
        out = self.comm.all_gather(tensor, what)
        self.seconds += time.perf_counter() - started
        moved = (self.comm.world_size - 1) * size
        self.count, self.sent, self.received = self.count + 1, self.sent + moved, self.received + moved
        return out

    def all_reduce_sum(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        size = tensor.numel() * tensor.element_size()
        started = time.perf_counter()
        out = self.comm.all_reduce_sum(tensor, what)
        self.seconds += time.perf_counter() - started
        moved = 2 * (self.comm.world_size - 1) * size // self.comm.world_size
        self.count, self.sent, self.received = self.count + 1, self.sent + moved, self.received + moved
        return out

    def stats(self) -> CommunicationStats:
        return CommunicationStats(self.count, self.sent, self.received, self.seconds)


def _check_rows(rows: ShardRows, d1: int, device: torch.device) -> Gamma:
    """Validate a rank's rows as the op does (shapes, dtypes, threshold values) before any
    collective that depends on them; returns the gamma."""
    probe = torch.empty((0, d1), dtype=torch.float32, device=device)
    gamma = check_inputs(probe, rows.keys, rows.residuals, rows.gamma)
    if isinstance(gamma, torch.Tensor):
        check_key_gamma_values(gamma)
    if rows.keys.dtype == torch.float64:
        raise TypeError("sharded retrieval ranks cosines in float32: float64 keys are not supported "
                        "(use float32, float16 or bfloat16)")
    if rows.keys.shape[0] > MAX_SHARD_ROWS:
        raise ValueError(f"a shard holds {rows.keys.shape[0]} key rows; at most {MAX_SHARD_ROWS} per rank")
    return gamma


def local_candidates(queries: torch.Tensor, rows: ShardRows, gamma: Gamma, backend: str
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's best row for each of the N queries (N, d1): (packed (N, 2) int32: float32
    score bits and code 2 * row + fired or -1, residual rows (N, d2): that row's residual)."""
    residual, index, score = gated_retrieve(queries, rows.keys, rows.residuals, -1.0, backend=backend,
                                            return_index=True)
    if isinstance(gamma, torch.Tensor):  # read at the best row; no rows: nothing fires anyway
        threshold = gamma[index.clamp_min(0)] if gamma.numel() else torch.zeros_like(score)
    else:
        threshold = torch.tensor(gamma, dtype=torch.float32, device=score.device)
    fired = (index >= 0) & (score > threshold)
    code = torch.where(index >= 0, index * 2 + fired.long(), torch.full_like(index, -1))
    packed = torch.stack([score.view(torch.int32), code.to(torch.int32)], dim=1)
    return packed, residual


def choose_winners(gathered: torch.Tensor) -> Winners:
    """The merged decision from the all-gathered candidates (W, 1 + 2N) int32: column 0 each
    rank's row count, then its packed (score bits, code) per query."""
    world = gathered.shape[0]
    counts = gathered[:, 0].long()
    pairs = gathered[:, 1:].reshape(world, -1, 2)
    scores = pairs[..., 0].contiguous().view(torch.float32)
    codes = pairs[..., 1].long()
    nonfinite_query = torch.isnan(scores).any(dim=0)
    ranking = torch.where(torch.isnan(scores), torch.full_like(scores, float("-inf")), scores)
    best = ranking.amax(dim=0)
    ranks = torch.arange(world, device=gathered.device)[:, None]
    winner = torch.where(ranking == best, ranks, world).amin(dim=0)  # ties: the lowest rank
    code = codes.gather(0, winner[None]).squeeze(0)
    fired = (code >= 0) & (code % 2 == 1)
    offsets = torch.cumsum(counts, 0) - counts
    local_row = torch.where(fired, code // 2, -1)
    return Winners(
        score=torch.where(nonfinite_query, torch.full_like(best, float("nan")), best),
        index=torch.where(fired, offsets[winner] + local_row, -1),
        owner=torch.where(fired, winner, -1),
        local_row=local_row,
        row_offsets=tuple(offsets.tolist()),
    )


def _fired_residuals(exchanges: _Exchanges, winners: Winners, residual: torch.Tensor, fired: torch.Tensor,
                     exchange: str) -> torch.Tensor:
    """(F, d2): the residual of each fired query (positions `fired`), from its owner."""
    comm = exchanges.comm
    owner = winners.owner[fired]
    mine = owner == comm.rank
    if exchange == "allreduce":
        buffer = torch.full((fired.shape[0], residual.shape[1]), -0.0, dtype=residual.dtype, device=residual.device)
        buffer[mine] = residual[fired[mine]]
        return exchanges.all_reduce_sum(buffer, "sharded retrieval (fired residuals, all-reduce)")
    per_rank = torch.bincount(owner, minlength=comm.world_size)
    padded = torch.zeros((int(per_rank.max()), residual.shape[1]), dtype=residual.dtype, device=residual.device)
    padded[: int(per_rank[comm.rank])] = residual[fired[mine]]
    gathered = exchanges.all_gather(padded, "sharded retrieval (fired residuals, all-gather)")
    one_hot = owner[:, None] == torch.arange(comm.world_size, device=owner.device)[None, :]
    position = (torch.cumsum(one_hot.long(), 0) - 1).gather(1, owner[:, None]).squeeze(1)
    return gathered[owner, position]


def _gather_queries(exchanges: _Exchanges, q2d: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Every rank's queries, rank 0's first (N, d1), and each rank's count."""
    d1 = q2d.shape[1]
    header = torch.tensor([q2d.shape[0], d1, _DTYPE_CODES[q2d.dtype]], dtype=torch.int64)
    headers = exchanges.all_gather(header, "sharded retrieval (query counts)").tolist()
    if any((other_d1, code) != (d1, header[2].item()) for _, other_d1, code in headers):
        raise ValueError(f"sharded retrieval: every rank must bring queries of one d1 and dtype; got (count, d1, "
                         f"dtype code) {headers} (dtype codes {_DTYPE_CODES})")
    counts = [count for count, _, _ in headers]
    if sum(counts) == 0:
        return q2d, counts
    padded = torch.zeros((max(counts), d1), dtype=q2d.dtype, device=q2d.device)
    padded[: q2d.shape[0]] = q2d
    gathered = exchanges.all_gather(padded, "sharded retrieval (queries)")
    return torch.cat([gathered[rank, :count] for rank, count in enumerate(counts)]), counts


def retrieve_sharded(q: torch.Tensor, rows: Callable[[], ShardRows], comm: Communicator, *,
                     backend: str = "auto", exchange: str = DEFAULT_EXCHANGE) -> ShardedRetrieval:
    """The sharded retrieval of this rank's queries q (..., d1) (float32/float16/bfloat16).

    rows() is called once, after the first collective has passed every rank, and returns this
    rank's rows: so whatever any rank committed to a shard file before it entered this call is
    seen (the sharded database refreshes its shard there). Collective: every rank of `comm` calls
    it (with its own queries) in the same order.
    """
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")
    if not isinstance(q, torch.Tensor) or q.dtype not in _DTYPE_CODES or q.dim() == 0:
        raise TypeError(f"sharded retrieval: q must be a float32/float16/bfloat16 tensor (..., d1), got "
                        f"{q.dtype if isinstance(q, torch.Tensor) else type(q).__name__}")
    with torch.no_grad():
        exchanges = _Exchanges(comm)
        lead = q.shape[:-1]
        q2d = q.detach().reshape(-1, q.shape[-1])
        queries, counts = _gather_queries(exchanges, q2d)
        start, n = sum(counts[: comm.rank]), counts[comm.rank]
        local = rows()
        gamma = _check_rows(local, q.shape[-1], q.device)
        d2 = local.residuals.shape[1]
        if sum(counts) == 0:
            empty = torch.empty(lead, device=q.device)
            return ShardedRetrieval(torch.zeros((*lead, d2), dtype=local.residuals.dtype, device=q.device),
                                    empty.long(), empty.float(), empty.long(), (), {}, exchanges.stats())
        packed, residual = local_candidates(queries, local, gamma, backend)
        header = torch.tensor([local.keys.shape[0]], dtype=torch.int32, device=q.device)
        gathered = exchanges.all_gather(torch.cat([header, packed.flatten()]), "sharded retrieval (candidates)")
        winners = choose_winners(gathered)
        fired = (winners.owner >= 0).nonzero().squeeze(1)
        out = torch.zeros((queries.shape[0], d2), dtype=local.residuals.dtype, device=q.device)
        if fired.numel():
            out[fired] = _fired_residuals(exchanges, winners, residual, fired, exchange)
        mine = winners.owner[fired] == comm.rank
        served = dict(zip(winners.index[fired[mine]].tolist(), winners.local_row[fired[mine]].tolist()))
        part = slice(start, start + n)
        return ShardedRetrieval(out[part].reshape(*lead, d2), winners.index[part].reshape(lead),
                                winners.score[part].reshape(lead), winners.owner[part].reshape(lead),
                                winners.row_offsets, served, exchanges.stats())


def sharded_gated_retrieve(q: torch.Tensor, K: torch.Tensor, R: torch.Tensor, gamma: Gamma, *,
                           group: Optional[dist.ProcessGroup] = None, backend: str = "auto",
                           exchange: str = DEFAULT_EXCHANGE,
                           timeout: Union[float, datetime.timedelta, None] = None) -> ShardedRetrieval:
    """`gated_retrieve(q, K_all, R_all, gamma_all, return_index=True)` where K_all, R_all,
    gamma_all concatenate every rank's K (m_r, d1), R (m_r, d2), gamma (a number, or (m_r,)
    float32 per-key thresholds) in rank order, with index a global row (shard-major). Each rank
    passes its own queries q (..., d1) and gets its own results; m_r may be 0. Collective over
    `group` (default: the default group); every collective waits at most `timeout` (seconds or a
    timedelta; None: the group's), else `RankFailureError`."""
    comm = Communicator.of(group, timeout)
    return retrieve_sharded(q, lambda: ShardRows(K, R, gamma), comm, backend=backend, exchange=exchange)
