"""The C++ CPU kernel (neuraldb_kernels._cpu) gives the same bits whatever its thread count.

Threads claim work items (key chunk x query group) dynamically, so which thread scans which keys
changes from call to call; the per-chunk partial maxima are merged in chunk order. Here: 1, 2, 3
and 7 threads (7 oversubscribes the machine, as a busy neighbour does), for each compiled
instruction set, on shapes with exact ties
across work items, keys holding NaN or Inf, non-finite and zero queries, many key chunks and few
(query groups split). Every result must be bit-identical to the 1-thread result AND agree with an
independent float64 reference.

Reference tolerance on the score (derived, not tuned): u = unit roundoff of the accumulation dtype
(float64 if q or K is float64, else float32). A length-d dot product accumulated in any order errs
by at most d u |q| |k|; each 1/|x| (from a squared norm with relative error d u, square root and
reciprocal in double rounded once) by (d/2 + 1) u; two products 2u: (2d + 4) u in all, plus one
float32 rounding of the returned score (2^-24).
"""

import pytest
import torch

from neuraldb_kernels.ops import cpu_backend, get_backend

_WHY = get_backend("cpu").unavailable_reason(torch.device("cpu"))
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"cpu backend: {_WHY}")

THREAD_COUNTS = (1, 2, 3, 7)
ISAS = cpu_backend._cpu.available_isas() if cpu_backend._cpu is not None else []
GAMMA = 0.2


def score_tolerance(d1: int, q_dtype: torch.dtype, k_dtype: torch.dtype) -> float:
    u = 2.0**-53 if torch.float64 in (q_dtype, k_dtype) else 2.0**-24
    return (2 * d1 + 4) * u + 2.0**-24


def float64_best_match(q: torch.Tensor, K: torch.Tensor):
    """(best cosine (n,), cosines (n, m)) in float64; a key with NaN/Inf has cosine -inf, a zero
    row cosine 0; a query with NaN/Inf gets best NaN."""
    q64, k64 = q.double(), K.double()
    q_ok = torch.isfinite(q64).all(dim=1)
    k_ok = torch.isfinite(k64).all(dim=1)
    q64 = torch.where(q_ok[:, None], q64, 0.0)
    k64 = torch.where(k_ok[:, None], k64, 0.0)
    qn, kn = q64.norm(dim=1), k64.norm(dim=1)
    q_inv = torch.where(qn > 0, 1 / qn, 0.0)
    k_inv = torch.where(kn > 0, 1 / kn, 0.0)
    cos = (q64 @ k64.T) * q_inv[:, None] * k_inv[None, :]
    cos = torch.where(k_ok[None, :], cos, float("-inf"))
    best = torch.where(q_ok, cos.max(dim=1).values, float("nan"))
    return best, cos


def case(n, m, d1, q_dtype, k_dtype, seed):
    """Random q, K, R with: query 0 a scaled copy of a key duplicated at 4 positions spread over K
    (and NaN/Inf keys of the same direction before them), a NaN query, a zero query."""
    gen = torch.Generator().manual_seed(seed)
    K = torch.randn(m, d1, generator=gen, dtype=torch.float64)
    q = torch.randn(n, d1, generator=gen, dtype=torch.float64)
    R = torch.randn(m, 7, generator=gen)
    target = torch.randn(d1, generator=gen, dtype=torch.float64)
    duplicates = sorted({m - 1, m // 2 + 1, m // 3, 3 * m // 4 + 2})
    K[duplicates] = target
    K[0] = target
    K[0, d1 // 2] = float("nan")
    K[1] = target
    K[1, d1 - 1] = float("inf")
    K[m // 5] = float("nan")
    q[0] = 1.75 * target
    if n > 2:
        q[1, 0] = float("nan")
        q[2] = 0.0
    return q.to(q_dtype), K.to(k_dtype), R, duplicates[0]


def check_against_float64(q, K, R, out, index, score):
    best, cos = float64_best_match(q, K)
    tol = score_tolerance(q.shape[1], q.dtype, K.dtype)
    for r in range(q.shape[0]):
        if torch.isnan(best[r]):
            assert index[r] == -1 and torch.isnan(score[r]) and not out[r].any(), r
            continue
        assert abs(score[r].item() - best[r].item()) <= tol, (r, score[r].item(), best[r].item())
        if best[r] > GAMMA + tol:
            assert index[r] >= 0, r
        if best[r] < GAMMA - tol:
            assert index[r] == -1, r
        if index[r] >= 0:
            assert cos[r, index[r]] >= best[r] - 2 * tol, (r, index[r].item())
            assert torch.equal(out[r], R[index[r]])
        else:
            assert not out[r].any(), r


# (n, m, d1): many key chunks (m * d1 * bytes well above a MiB) at n = 1 and n = 9; few key tiles,
# so the queries are split into groups too; a tail-only d1 (not a multiple of the vector lanes).
SHAPES = [(1, 40_009, 96), (9, 20_011, 45), (13, 700, 64), (6, 3_001, 5)]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("k_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("q_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"n{n}-m{m}-d{d}" for n, m, d in SHAPES])
def test_every_thread_count_gives_the_same_bits_and_the_float64_answer(shape, q_dtype, k_dtype, isa):
    n, m, d1 = shape
    q, K, R, first_duplicate = case(n, m, d1, q_dtype, k_dtype, seed=n + m)
    results = {t: cpu_backend._cpu.gated_retrieve(q, K, R, GAMMA, t, isa) for t in THREAD_COUNTS}
    out, index, score = results[1]
    check_against_float64(q, K, R, out, index, score)
    # The planted direction: NaN/Inf copies at 0 and 1 never win, the lowest exact copy does.
    assert index[0].item() == first_duplicate
    for threads, result in results.items():
        for a, b in zip(results[1], result):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), threads


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("threads", THREAD_COUNTS)
def test_only_nan_keys_give_no_match_with_any_thread_count(threads, isa):
    K = torch.full((5_000, 64), float("nan"))
    q = torch.randn(3, 64)
    R = torch.randn(5_000, 4)
    out, index, score = cpu_backend._cpu.gated_retrieve(q, K, R, -1.0, threads, isa)
    assert index.tolist() == [-1, -1, -1]
    assert torch.equal(score, torch.full((3,), float("-inf")))
    assert not out.any()
