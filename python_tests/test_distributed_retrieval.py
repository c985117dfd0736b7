"""Sharded retrieval over 2 and 4 local gloo processes against the single-process op.

The reference is `gated_retrieve` over the union of every rank's rows in rank order (the op's own
contract is tested against float64 elsewhere): each rank builds every rank's rows from the same
seeds, runs the sharded retrieval on its part and its own queries, and reports every difference
in index, score (bits, NaN included) and the residual bits.
"""

import time

import pytest
import torch

from neuraldb_kernels import gated_retrieve
from neuraldb_kernels.distributed import RankFailureError, sharded_gated_retrieve
from neuraldb_kernels.distributed.retrieval import EXCHANGES

D1, D2 = 24, 8
# (rows per rank for 4 ranks (the first 2 for 2 ranks), key dtype, query dtype, per-key thresholds)
CASES = [
    ((6, 0, 9, 4), torch.float32, torch.float32, False),
    ((0, 7, 0, 5), torch.bfloat16, torch.float32, True),
    ((5, 5, 5, 5), torch.bfloat16, torch.bfloat16, True),
    ((0, 0, 0, 0), torch.float32, torch.float32, False),
]


def _rank_rows(case, world_size, rank):
    """(K (m, D1), R (m, D2), per-key thresholds (m,) float32) of `rank`, from fixed seeds; rank 0
    and the last rank share one key (a cross-shard tie) with different residuals and thresholds."""
    counts, key_dtype, _, _ = case
    generator = torch.Generator().manual_seed(1000 * world_size + rank)
    m = counts[rank]
    K = torch.randn(m, D1, generator=generator)
    R = torch.randn(m, D2, generator=generator).to(key_dtype)
    R[:, 0] = -0.0  # signed zeros must survive the exchange
    gammas = torch.rand(m, generator=generator) * 0.5 + 0.3
    shared = torch.randn(D1, generator=torch.Generator().manual_seed(7))
    if m and rank in (0, world_size - 1):
        K[-1] = shared
        gammas[-1] = 0.99 if rank == 0 else 0.2  # the tie goes to rank 0's row, whose gate stays closed
    if m >= 3:
        K[1] = K[2]  # a tie inside one shard: its lower row wins
    return K.to(key_dtype), R, gammas.float()


def _queries(case, world_size, rank, union_keys):
    """This rank's queries: copies of keys of every rank (they fire), random ones, NaN, Inf, zero."""
    _, _, query_dtype, _ = case
    generator = torch.Generator().manual_seed(50 + rank)
    n_keys = min(union_keys.shape[0], 3 + rank)
    picks = torch.randint(0, max(1, union_keys.shape[0]), (n_keys,), generator=generator)
    rows = [union_keys[picks].float() * 2.5, torch.randn(2 + rank, D1, generator=generator),
            torch.randn(D1, generator=torch.Generator().manual_seed(7))[None]]
    q = torch.cat(rows)
    if rank % 2 == 0:
        q = torch.cat([q, torch.zeros(1, D1), torch.full((1, D1), 1.0)])
        q[-1, 3] = float("nan")
        q[-2 if q.shape[0] > 2 else -1] = 0.0
        q = torch.cat([q, torch.full((1, D1), float("inf"))])
    if rank == 1:
        q = q[:0]  # a rank without queries
    return q.to(query_dtype).reshape(-1, 1, D1) if rank == 2 else q.to(query_dtype)


def _same(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.uint8) if a.dtype != torch.bool
                                                                       else a, b.view(torch.uint8) if b.dtype != torch.bool else b)


def _cross_shard_tie(rank, world_size):
    """A key held by rank 0 (threshold 0.95) and the last rank (threshold 0.2); a query at cosine
    about 0.9 to it ties; the lowest global row (rank 0's) wins and its closed gate decides:
    nothing fires. With the thresholds swapped rank 0's row fires. Returns (index closed, index
    opened, fired value, owner, the single-process op's index for both)."""
    key = torch.randn(D1, generator=torch.Generator().manual_seed(3))
    q = (key + 0.45 * torch.randn(D1, generator=torch.Generator().manual_seed(4)))[None]
    holds = int(rank in (0, world_size - 1))
    K, R = key[None].repeat(holds, 1), torch.full((holds, D2), float(rank + 1))
    results, expected = [], []
    for gamma_first, gamma_last in ((0.95, 0.2), (0.2, 0.95)):
        gamma = torch.tensor([gamma_first if rank == 0 else gamma_last])[:holds]
        results.append(sharded_gated_retrieve(q, K, R, gamma))
        union = gated_retrieve(q, key[None].repeat(2, 1), torch.ones(2, D2), torch.tensor([gamma_first, gamma_last]),
                               return_index=True)
        expected.append(union[1].tolist())
    closed, opened = results
    return closed.index.tolist(), opened.index.tolist(), opened.out[0, 0].item(), opened.owner.tolist(), expected


def _contract_worker(rank, world_size):
    torch.manual_seed(0)
    report = []
    for number, case in enumerate(CASES):
        parts = [_rank_rows(case, world_size, r) for r in range(world_size)]
        K = torch.cat([p[0] for p in parts])
        R = torch.cat([p[1] for p in parts])
        gammas = torch.cat([p[2] for p in parts])
        per_key = case[3]
        q = _queries(case, world_size, rank, K)
        expected = gated_retrieve(q, K, R, gammas if per_key else 0.5, return_index=True)
        local_K, local_R, local_gammas = parts[rank]
        for exchange in EXCHANGES:
            result = sharded_gated_retrieve(q, local_K, local_R, local_gammas if per_key else 0.5, exchange=exchange)
            problems = [name for name, got, want in (("out", result.out, expected[0]), ("index", result.index, expected[1]),
                                                     ("score", result.score, expected[2])) if not _same(got, want)]
            owner_ok = torch.equal(result.owner >= 0, expected[1] >= 0)
            report.append({"case": number, "exchange": exchange, "problems": problems, "owner_ok": owner_ok,
                           "fired": int((expected[1] >= 0).sum()), "queries": q.shape[:-1].numel(),
                           "nan_scores": int(torch.isnan(expected[2]).sum())})
    return report, _cross_shard_tie(rank, world_size)


@pytest.mark.parametrize("world_size", [2, 4])
def test_sharded_retrieval_equals_the_single_process_op_over_the_union(world_size, spawn_ranks):
    results = spawn_ranks(_contract_worker, world_size, timeout=240)
    reports = [report for report, _ in results]
    for rank, report in enumerate(reports):
        for entry in report:
            assert entry["problems"] == [] and entry["owner_ok"], f"rank {rank}: {entry}"
    entries = [entry for report in reports for entry in report]
    assert sum(entry["fired"] for entry in entries) > 10, "test premise: queries fire"
    assert sum(entry["nan_scores"] for entry in entries) > 0, "test premise: NaN/Inf queries"
    assert any(entry["queries"] == 0 for entry in entries), "test premise: a rank without queries"
    # a cross-shard tie: the lowest global row wins, and its own gate decides
    for _, (closed, opened, value, owner, expected) in results:
        assert expected == [[-1], [0]], "test premise: the single-process op closes, then opens"
        assert closed == [-1]
        assert opened == [0] and value == 1.0 and owner == [0]


def _failing_rank_worker(rank, world_size):
    """Rank 1 first hangs past the timeout, then dies, each time in a fresh group after one
    retrieval that works; rank 0 reports (message, seconds waited) for both."""
    import os

    import torch.distributed as dist

    q, K, R = torch.randn(1, D1), torch.randn(2, D1), torch.randn(2, D2)
    seen = []
    for failure in ("hang", "exit"):
        group = dist.new_group()  # a failed collective leaves its group unusable
        sharded_gated_retrieve(q, K, R, 0.5, group=group, timeout=10.0)
        if rank == 1:
            if failure == "hang":
                time.sleep(4.0)
                continue
            os._exit(3)
        started = time.monotonic()
        try:
            sharded_gated_retrieve(q, K, R, 0.5, group=group, timeout=2.0)
            seen.append(("no error", time.monotonic() - started))
        except RankFailureError as error:
            seen.append((str(error), time.monotonic() - started))
    return seen


def test_a_hung_or_killed_rank_gives_the_others_a_clear_error_within_the_timeout(spawn_ranks):
    seen = spawn_ranks(_failing_rank_worker, 2, timeout=60, exiting=(1,))[0]
    assert len(seen) == 2
    for message, seconds in seen:
        assert "rank 0 of 2" in message and "did not answer within 2 s" in message, message
        assert "restart the job" in message
        assert seconds < 4.0


def test_bad_arguments_are_refused_before_any_collective():
    from neuraldb_kernels.distributed.collectives import as_timeout

    with pytest.raises(RuntimeError, match="init_process_group"):
        sharded_gated_retrieve(torch.randn(1, D1), torch.randn(2, D1), torch.randn(2, D2), 0.5)
    with pytest.raises(ValueError, match="positive"):
        as_timeout(0)
    with pytest.raises(TypeError, match="timeout"):
        as_timeout("5")
