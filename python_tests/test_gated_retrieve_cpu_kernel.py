"""What is specific to the C++ CPU kernel (neuraldb_kernels._cpu, csrc/cpu/).

The generic contract is checked for every backend in test_gated_retrieve.py. Here: both compiled
instruction-set paths (avx2 and the portable generic one), 1 and 2 OpenMP threads, m spanning
many key tiles / work items, d1 that is not a multiple of the 8 (float) or 4 (double) vector
lanes, every key dtype read natively, exact ties in different work items, planted matches,
per-key thresholds read at the winning index.

Reference and tolerance: the conftest fixtures `float64_cosines`, `cosine_tolerance` and
`assert_matches_reference` (float64 math on the exact input values, one derived bound).
"""

import pytest
import torch

from neuraldb_kernels.ops import cpu_backend, get_backend

CPU_BACKEND = get_backend("cpu")
_WHY = CPU_BACKEND.unavailable_reason(torch.device("cpu"))
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"cpu backend: {_WHY}")

if cpu_backend._cpu is not None:
    ISAS = cpu_backend._cpu.available_isas()
else:
    ISAS = ["generic"]

KEY_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def kernel(q, K, R, gamma, threads=2, isa="auto"):
    return cpu_backend._cpu.gated_retrieve(q, K, R, gamma, threads, isa)


def random_inputs(n, m, d1, d2, q_dtype, k_dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d1, generator=gen, dtype=torch.float64).to(q_dtype)
    K = torch.randn(m, d1, generator=gen, dtype=torch.float64).to(k_dtype)
    R = torch.randn(m, d2, generator=gen).to(torch.bfloat16)
    return q, K, R


# d1: tail-only (3), lanes + tail (37, 67), many lanes (130); m: below / around / far above the
# kernel's 4-key micro-blocks, key tiles (~128 KiB) and 16 work items at 2 threads.
SHAPES = [(1, 5003, 37), (5, 4099, 67), (19, 1000, 130), (6, 7, 3), (2, 12001, 130)]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("k_dtype", KEY_DTYPES)
@pytest.mark.parametrize("q_dtype", [torch.float32, torch.float64])
def test_matches_float64_reference(assert_matches_reference, isa, k_dtype, q_dtype):
    for i, (n, m, d1) in enumerate(SHAPES):
        q, K, R = random_inputs(n, m, d1, 11, q_dtype, k_dtype, seed=i)
        plant = torch.arange(0, n, 2)  # even queries: a scaled copy of a key far into K
        K[(plant * 7919 + m // 2) % m] = (q[plant] * 0.37).to(k_dtype)
        q[n // 2, d1 // 2] = float("nan") if n > 2 else q[n // 2, d1 // 2]
        for threads in (1, 2):
            out, index, score = kernel(q, K, R, 0.3, threads, isa)
            assert_matches_reference(q, K, R, 0.3, out, index, score)
            planted = index[plant]
            finite = torch.isfinite(q[plant].double()).all(dim=1)
            expected = torch.where(finite, (plant * 7919 + m // 2) % m, -1)
            assert torch.equal(planted, expected), (n, m, d1, threads)


@pytest.mark.parametrize("isa", ISAS)
def test_result_is_bit_identical_across_thread_counts(isa):
    q, K, R = random_inputs(9, 20011, 45, 5, torch.float32, torch.bfloat16, seed=3)
    one = kernel(q, K, R, -1.0, 1, isa)
    for threads in (2, 3, 8):
        many = kernel(q, K, R, -1.0, threads, isa)
        for a, b in zip(one, many):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _duplicated_best_key(n, k_dtype, noise):
    """n queries near one key that is stored five times: 20003 keys of d1 = 41 (~800-key tiles, 16
    work items at 2 threads), the copies in different tiles, chunks and micro-kernel positions
    (i % 4 = 1, 2, 3, and the last, odd key). Returns q, K, R and the copies' positions."""
    m, d1 = 20003, 41
    q, K, R = random_inputs(n, m, d1, 3, torch.float32, k_dtype, seed=4)
    target = torch.randn(d1, dtype=torch.float64).to(k_dtype)
    positions = [m - 1, 15002, 9001, 5, 4006]
    for p in positions:
        K[p] = target
    q[:] = (target.double() * 1.5 + noise * torch.randn(n, d1, dtype=torch.float64)).to(q.dtype)
    return q, K, R, positions


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("k_dtype", KEY_DTYPES)
@pytest.mark.parametrize("n", [1, 6])
def test_duplicated_best_key_in_different_work_items_ties_to_lowest_index(isa, k_dtype, n):
    q, K, R, positions = _duplicated_best_key(n, k_dtype, noise=0.05)
    for threads in (1, 2):
        out, index, score = kernel(q, K, R, 0.5, threads, isa)
        assert index.tolist() == [min(positions)] * n, threads
        assert torch.equal(out, R[min(positions)].expand(n, -1))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("k_dtype", [torch.float32, torch.float64])
def test_per_key_thresholds_of_tied_keys_in_different_work_items(isa, k_dtype):
    # the duplicates of the previous test: only the lowest copy's threshold decides
    n = 3
    q, K, R, positions = _duplicated_best_key(n, k_dtype, noise=0.5)
    m = K.shape[0]
    gamma = torch.full((m,), -1.0)
    gamma[5] = 0.999  # above every query's cosine (about 0.95): the winner stays closed
    for threads in (1, 2):
        out, index, score = cpu_backend._cpu.gated_retrieve(q, K, R, 0.0, threads, isa, key_gamma=gamma)
        assert index.tolist() == [-1] * n and not out.any() and (score > 0.5).all() and (score < 0.999).all()
    gamma[positions] = 0.999  # every later copy would stay closed; the lowest one fires
    gamma[5] = -1.0
    for threads in (1, 2):
        out, index, score = cpu_backend._cpu.gated_retrieve(q, K, R, 0.0, threads, isa, key_gamma=gamma)
        assert index.tolist() == [5] * n and torch.equal(out, R[5].expand(n, -1))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("k_dtype", [torch.float16, torch.bfloat16])
def test_tiny_subnormal_keys_are_converted_exactly(assert_matches_reference, cosine_tolerance, isa, k_dtype):
    # A key made of subnormal fp16 (or tiny bf16) values, a scaled copy of the query: its cosine
    # is ~1 only if every element is converted exactly in registers (vector body and tail).
    d1 = 29
    gen = torch.Generator().manual_seed(5)
    signs = torch.randint(0, 2, (d1,), generator=gen) * 2 - 1
    mantissas = torch.randint(1, 1023, (d1,), generator=gen)
    tiny = (signs * mantissas).double() * 2.0**-24  # fp16 subnormals, exact in bf16 too
    K = torch.randn(50, d1, generator=gen).to(k_dtype)
    K[33] = tiny.to(k_dtype)
    assert torch.equal(K[33].double(), tiny.to(k_dtype).double())
    q = K[33].double()[None] * 1e6
    R = torch.randn(50, 2)
    out, index, score = kernel(q.float(), K, R, 0.99, 2, isa)
    assert index.item() == 33 and abs(score.item() - 1.0) <= cosine_tolerance(d1, torch.float32, k_dtype)
    assert_matches_reference(q.float(), K, R, 0.99, out, index, score)


@pytest.mark.parametrize("isa", ISAS)
def test_special_query_rows_and_zero_keys(assert_matches_reference, isa):
    q, K, R = random_inputs(5, 300, 21, 4, torch.float32, torch.float16, seed=6)
    q[1, 20] = float("inf")  # in the scalar tail
    q[2, 3] = float("-inf")  # in the vector body
    q[3] = 0.0  # zero query: cosine 0 with everything -> index 0 when gamma < 0
    K[0] = 0.0  # zero key: cosine 0
    out, index, score = kernel(q, K, R, -0.5, 2, isa)
    assert_matches_reference(q, K, R, -0.5, out, index, score)
    assert index[3].item() == 0 and score[3].item() == 0.0
    assert index[1].item() == index[2].item() == -1


def test_large_database_spans_many_work_items(assert_matches_reference):
    # m * d1 large enough that every thread runs many tiles; planted matches at both ends.
    n, m, d1 = 3, 60001, 96
    q, K, R = random_inputs(n, m, d1, 8, torch.float32, torch.bfloat16, seed=7)
    K[1] = (q[0] * 3).to(torch.bfloat16)
    K[m - 2] = (q[1] * 0.5).to(torch.bfloat16)
    out, index, score = kernel(q, K, R, 0.2, 2)
    assert_matches_reference(q, K, R, 0.2, out, index, score)
    assert index[:2].tolist() == [1, m - 2]


def test_backend_uses_torch_thread_count_and_matches_kernel(assert_matches_reference):
    q, K, R = random_inputs(4, 3001, 50, 6, torch.bfloat16, torch.float16, seed=8)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = CPU_BACKEND.retrieve(q, K, R, 0.1)
        torch.set_num_threads(2)
        two = CPU_BACKEND.retrieve(q, K, R, 0.1)
    finally:
        torch.set_num_threads(previous)
    assert_matches_reference(q, K, R, 0.1, *one)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda q, K, R: (q, K[None], R), "2-D"),
        (lambda q, K, R: (q, K[:, ::2], R), "match|contiguous"),
        (lambda q, K, R: (q, K.t().contiguous().t(), R), "contiguous"),
        (lambda q, K, R: (q[:0], K, R), "n >= 1"),
        (lambda q, K, R: (q, K.to(torch.int32), R), "K must be float"),
        (lambda q, K, R: (q[0], K, R), "2-D"),
    ],
)
def test_binding_rejects_bad_tensors(make, match):
    q, K, R = random_inputs(2, 10, 8, 3, torch.float32, torch.float32, seed=9)
    with pytest.raises((ValueError, TypeError), match=match):
        kernel(*make(q, K, R), 0.5)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda m: torch.zeros(m + 1), r"shape \(10,\), got Float of shape \[11\]"),
        (lambda m: torch.zeros(m, 1), r"shape \(10,\), got Float of shape \[10, 1\]"),
        (lambda m: torch.zeros(m, dtype=torch.float64), "got Double"),
        (lambda m: torch.zeros(2 * m)[::2], "contiguous float32"),
    ],
)
def test_binding_rejects_bad_key_gamma(make, match):
    q, K, R = random_inputs(2, 10, 8, 3, torch.float32, torch.float32, seed=9)
    with pytest.raises(ValueError, match=match):
        cpu_backend._cpu.gated_retrieve(q, K, R, 0.0, 1, key_gamma=make(10))


def test_binding_rejects_unknown_isa():
    q, K, R = random_inputs(2, 10, 8, 3, torch.float32, torch.float32, seed=9)
    with pytest.raises(ValueError, match="unknown isa"):
        kernel(q, K, R, 0.5, 1, "avx1024")
