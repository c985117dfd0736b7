"""What is specific to the C++ CPU kernel (neuraldb_kernels._cpu, csrc/cpu/).

The generic contract is checked for every backend in test_gated_retrieve.py. Here: both compiled
instruction-set paths (avx2 and the portable generic one), 1 and 2 OpenMP threads, m spanning
many key tiles / work items, d1 that is not a multiple of the 8 (float) or 4 (double) vector
lanes, every key dtype read natively, exact ties in different work items, planted matches.

Reference: plain torch float64 on the exact input values (bf16/fp16/fp32 are exact in float64).

Score tolerance (derived, not tuned). u = unit roundoff of the accumulation dtype (2^-24 float32,
2^-53 float64). A length-d1 dot product accumulated in any order, with or without FMA, errs by
at most gamma_d1 * sum|q_i k_i| <= d1 u |q| |k| (Higham, Accuracy and Stability, 3.5, plus
Cauchy-Schwarz). Each squared norm has relative error <= d1 u, so 1/sqrt of it <= (d1/2 + 1) u
(the sqrt and division run in double and round once to the accumulation dtype). The two products
add 2u. Hence |cos_kernel - cos| <= (2 d1 + 4) u; the float32 score adds one float32 rounding of a
value <= 1 in magnitude: 2^-24. Indices may differ from the reference only where the reference
cosine of the kernel's pick is within twice that bound of the best one.
"""

import pytest
import torch

from neuraldb_kernels.ops import cpu_backend

pytestmark = pytest.mark.skipif(
    cpu_backend.unavailable_reason(torch.device("cpu")) is not None,
    reason=f"cpu backend: {cpu_backend.unavailable_reason(torch.device('cpu'))}",
)

if cpu_backend._cpu is not None:
    ISAS = cpu_backend._cpu.available_isas()
else:
    ISAS = ["generic"]

KEY_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def kernel(q, K, R, gamma, threads=2, isa="auto"):
    return cpu_backend._cpu.gated_retrieve(q, K, R, gamma, threads, isa)


def tolerance(d1, q_dtype, k_dtype):
    u = 2.0**-53 if torch.float64 in (q_dtype, k_dtype) else 2.0**-24
    return (2 * d1 + 4) * u + 2.0**-24


def reference_cosines(q, K):
    """(n, m) float64 cosines; a zero-norm row has cosine 0 with everything."""
    q64, k64 = q.double(), K.double()
    qn, kn = q64.norm(dim=1), k64.norm(dim=1)
    qi = torch.where(qn > 0, 1 / qn, torch.zeros_like(qn))
    ki = torch.where(kn > 0, 1 / kn, torch.zeros_like(kn))
    return (q64 @ k64.T) * qi[:, None] * ki[None, :]


def check(q, K, R, gamma, out, index, score):
    n = q.shape[0]
    assert out.shape == (n, R.shape[1]) and out.dtype == R.dtype
    assert index.dtype == torch.int64 and score.dtype == torch.float32
    tol = tolerance(q.shape[1], q.dtype, K.dtype)
    finite = torch.isfinite(q.double()).all(dim=1)
    cos = reference_cosines(torch.where(finite[:, None], q.double(), 0.0), K)
    best, best_index = cos.max(dim=1)
    for r in range(n):
        if not finite[r]:
            assert index[r] == -1 and torch.isnan(score[r]) and not out[r].any(), r
            continue
        assert abs(score[r].item() - best[r].item()) <= tol, (r, score[r].item(), best[r].item(), tol)
        if best[r] > gamma + tol:
            assert index[r] >= 0, (r, best[r].item(), gamma)
        if best[r] < gamma - tol:
            assert index[r] == -1, (r, best[r].item(), gamma)
        if index[r] >= 0:
            assert cos[r, index[r]] >= best[r] - 2 * tol, (r, index[r].item(), best_index[r].item())
            assert torch.equal(out[r].view(torch.uint8), R[index[r]].view(torch.uint8))
        else:
            assert not out[r].any()


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
def test_matches_float64_reference(isa, k_dtype, q_dtype):
    for i, (n, m, d1) in enumerate(SHAPES):
        q, K, R = random_inputs(n, m, d1, 11, q_dtype, k_dtype, seed=i)
        plant = torch.arange(0, n, 2)  # even queries: a scaled copy of a key far into K
        K[(plant * 7919 + m // 2) % m] = (q[plant] * 0.37).to(k_dtype)
        q[n // 2, d1 // 2] = float("nan") if n > 2 else q[n // 2, d1 // 2]
        for threads in (1, 2):
            out, index, score = kernel(q, K, R, 0.3, threads, isa)
            check(q, K, R, 0.3, out, index, score)
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


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("k_dtype", KEY_DTYPES)
@pytest.mark.parametrize("n", [1, 6])
def test_duplicated_best_key_in_different_work_items_ties_to_lowest_index(isa, k_dtype, n):
    # 20003 keys of d1 = 41: ~800-key tiles, 16 work items at 2 threads. The duplicates sit in
    # different tiles, chunks and micro-kernel positions (i % 4 = 1, 2, 3, and the last, odd key).
    m, d1 = 20003, 41
    q, K, R = random_inputs(n, m, d1, 3, torch.float32, k_dtype, seed=4)
    target = torch.randn(d1, dtype=torch.float64).to(k_dtype)
    positions = [m - 1, 15002, 9001, 5, 4006]
    for p in positions:
        K[p] = target
    q[:] = (target.double() * 1.5 + 0.05 * torch.randn(n, d1, dtype=torch.float64)).to(q.dtype)
    for threads in (1, 2):
        out, index, score = kernel(q, K, R, 0.5, threads, isa)
        assert index.tolist() == [min(positions)] * n, threads
        assert torch.equal(out, R[min(positions)].expand(n, -1))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("k_dtype", [torch.float16, torch.bfloat16])
def test_tiny_subnormal_keys_are_converted_exactly(isa, k_dtype):
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
    assert index.item() == 33 and abs(score.item() - 1.0) <= tolerance(d1, torch.float32, k_dtype)
    check(q.float(), K, R, 0.99, out, index, score)


@pytest.mark.parametrize("isa", ISAS)
def test_special_query_rows_and_zero_keys(isa):
    q, K, R = random_inputs(5, 300, 21, 4, torch.float32, torch.float16, seed=6)
    q[1, 20] = float("inf")  # in the scalar tail
    q[2, 3] = float("-inf")  # in the vector body
    q[3] = 0.0  # zero query: cosine 0 with everything -> index 0 when gamma < 0
    K[0] = 0.0  # zero key: cosine 0
    out, index, score = kernel(q, K, R, -0.5, 2, isa)
    check(q, K, R, -0.5, out, index, score)
    assert index[3].item() == 0 and score[3].item() == 0.0
    assert index[1].item() == index[2].item() == -1


def test_large_database_spans_many_work_items():
    # m * d1 large enough that every thread runs many tiles; planted matches at both ends.
    n, m, d1 = 3, 60001, 96
    q, K, R = random_inputs(n, m, d1, 8, torch.float32, torch.bfloat16, seed=7)
    K[1] = (q[0] * 3).to(torch.bfloat16)
    K[m - 2] = (q[1] * 0.5).to(torch.bfloat16)
    out, index, score = kernel(q, K, R, 0.2, 2)
    check(q, K, R, 0.2, out, index, score)
    assert index[:2].tolist() == [1, m - 2]


def test_loader_uses_torch_thread_count_and_matches_kernel():
    q, K, R = random_inputs(4, 3001, 50, 6, torch.bfloat16, torch.float16, seed=8)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_backend.retrieve(q, K, R, 0.1)
        torch.set_num_threads(2)
        two = cpu_backend.retrieve(q, K, R, 0.1)
    finally:
        torch.set_num_threads(previous)
    check(q, K, R, 0.1, *one)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def test_unavailable_reason():
    assert cpu_backend.unavailable_reason(torch.device("cpu")) is None
    assert "CPU tensors" in cpu_backend.unavailable_reason(torch.device("cuda"))


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


def test_binding_rejects_unknown_isa():
    q, K, R = random_inputs(2, 10, 8, 3, torch.float32, torch.float32, seed=9)
    with pytest.raises(ValueError, match="unknown isa"):
        kernel(q, K, R, 0.5, 1, "avx1024")
