"""The prefill path of the C++ CPU kernel: path="filtered" (csrc/cpu/gated_retrieve_cpu_filter.h)
and the rule that picks it (cpu_backend.match_path).

The filtered path bounds every cosine with bf16 dot products and rescores only the keys that may
win, so its result must be the exact scan's bit for bit (index, score and out), ties to the lowest
index and NaN rules included, and both must match the float64 reference within the contract's
tolerance (conftest `assert_matches_reference`). Shapes cover n = 16 / 17 / 513, odd d1 (tails of
the 16-float and 32-bf16 vectors), m on both sides of the key tiles (256 KiB of bf16 keys:
2048 keys at d1 <= 64) and of the 4-key micro-blocks, NaN rows, zero, tiny and huge rows (always
rescored), exact ties across tiles and near-ties closer than the filter's bound.
"""

import pytest
import torch

from neuraldb_kernels.ops import cpu_backend, get_backend
from neuraldb_kernels.ops.dispatch import resolve_backend

_WHY = get_backend("cpu").unavailable_reason(torch.device("cpu"))
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"cpu backend: {_WHY}")
FILTERED = cpu_backend._cpu is not None and cpu_backend._cpu.filtered_path_available()
needs_filtered = pytest.mark.skipif(not FILTERED, reason="this CPU lacks AVX512-BF16 (path='filtered')")

KEY_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def kernel(q, K, R, gamma, threads, path, key_gamma=None):
    return cpu_backend._cpu.gated_retrieve(q, K, R, gamma, threads, "auto", key_gamma, path)


def assert_bit_identical(a, b, what):
    for name, x, y in zip(("out", "index", "score"), a, b):
        assert torch.equal(x.view(torch.uint8), y.view(torch.uint8)), f"{what}: {name} differs"


def random_inputs(n, m, d1, k_dtype, seed, d2=5):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d1, generator=gen, dtype=torch.float64).float()
    K = torch.randn(m, d1, generator=gen, dtype=torch.float64).to(k_dtype)
    R = torch.randn(m, d2, generator=gen).to(torch.bfloat16)
    return q, K, R


# (n, m, d1): n at and around the rule's threshold and far above; m below / at / above a tile
# (2048 keys at d1 <= 64, 84 at d1 = 1536) and not a multiple of the 4-key blocks.
SHAPES = [(16, 2047, 37), (17, 2049, 64), (513, 4099, 3), (16, 6001, 130), (33, 1001, 1536), (20, 5, 31)]


@needs_filtered
@pytest.mark.parametrize("k_dtype", KEY_DTYPES)
def test_filtered_equals_scan_bit_for_bit_and_the_float64_reference(assert_matches_reference, k_dtype):
    for i, (n, m, d1) in enumerate(SHAPES):
        q, K, R = random_inputs(n, m, d1, k_dtype, seed=i)
        plant = torch.arange(0, min(n, m), 3)  # planted matches spread over every tile
        plant = plant[: len(set(((plant * 7919 + 11) % m).tolist()))]  # distinct keys (m = 5)
        K[(plant * 7919 + 11) % m] = (q[plant] * 0.3).to(k_dtype)
        K[m // 2] = float("nan")  # a NaN key never wins
        if n > 4:
            q[1, d1 // 2] = float("nan")  # NaN query row: score NaN, index -1
            q[2] = 0.0  # zero query: cosine 0 with every key, index 0 for a negative gamma
        for threads in (1, 2):
            scan = kernel(q, K, R, -0.5, threads, "scan")
            filtered = kernel(q, K, R, -0.5, threads, "filtered")
            assert_bit_identical(scan, filtered, (n, m, d1, threads))
            assert_matches_reference(q, K, R, -0.5, *filtered)
            expected = (plant * 7919 + 11) % m
            planted = filtered[1][plant]
            if n > 4:
                assert filtered[1][1] == -1 and torch.isnan(filtered[2][1]) and filtered[1][2] == 0
                keep = plant != 1
                planted, expected = planted[keep], expected[keep]
            assert torch.equal(planted, expected)


@needs_filtered
@pytest.mark.parametrize("k_dtype", KEY_DTYPES)
def test_exact_ties_across_tiles_go_to_the_lowest_index(k_dtype):
    # one key stored 5 times in different tiles and block positions; queries near it
    n, m, d1 = 17, 9001, 48
    q, K, R = random_inputs(n, m, d1, k_dtype, seed=21)
    target = torch.randn(d1, dtype=torch.float64).to(k_dtype)
    positions = [m - 1, 6143, 4097, 2050, 7]
    K[positions] = target
    q[:] = target.float() * 2 + 0.05 * torch.randn(n, d1, dtype=torch.float64).float()
    for threads in (1, 2):
        out, index, score = kernel(q, K, R, 0.5, threads, "filtered")
        assert index.tolist() == [7] * n
        assert torch.equal(out, R[7].expand(n, -1))
        assert_bit_identical(kernel(q, K, R, 0.5, threads, "scan"), (out, index, score), threads)


@needs_filtered
@pytest.mark.parametrize("k_dtype", KEY_DTYPES)
def test_near_ties_closer_than_the_bound_pick_the_exact_best(assert_matches_reference, k_dtype):
    # 300 keys whose cosines with the queries differ by about 1e-5 (well inside the filter's bf16
    # bound of about 4e-3), spread over tiles: only exact rescoring can order them.
    n, m, d1 = 24, 5000, 64
    q, K, R = random_inputs(n, m, d1, k_dtype, seed=22)
    gen = torch.Generator().manual_seed(23)
    base = torch.randn(d1, generator=gen, dtype=torch.float64)
    rows = torch.randperm(m, generator=gen)[:300]
    K[rows] = (base + 3e-3 * torch.randn(300, d1, generator=gen, dtype=torch.float64)).to(k_dtype)
    q[:] = (base + 1e-3 * torch.randn(n, d1, generator=gen, dtype=torch.float64)).float()
    for threads in (1, 2):
        filtered = kernel(q, K, R, 0.9, threads, "filtered")
        assert_bit_identical(kernel(q, K, R, 0.9, threads, "scan"), filtered, threads)
        assert_matches_reference(q, K, R, 0.9, *filtered)
        assert set(filtered[1].tolist()) <= set(rows.tolist())


@needs_filtered
def test_tiny_and_huge_rows_are_rescored(assert_matches_reference):
    # |k|^2 outside [2^-60, 2^60] and 1/|q| outside [2^-30, 2^30] bypass the bound: exact scores
    n, m, d1 = 18, 3000, 40
    q, K, R = random_inputs(n, m, d1, torch.float32, seed=24)
    # (scales that keep every float32 square normal, where the scan itself matches float64)
    K[100] = q[0] * 1e-15  # the best key for query 0, |k|^2 ~ 1e-28
    K[2000] = q[3] * 1e15  # the best key for query 3, |k|^2 ~ 1e32
    q[5] *= 1e-16  # 1/|q| ~ 1e16
    q[6] *= 1e16  # 1/|q| ~ 1e-17
    for threads in (1, 2):
        filtered = kernel(q, K, R, 0.5, threads, "filtered")
        assert_bit_identical(kernel(q, K, R, 0.5, threads, "scan"), filtered, threads)
        assert_matches_reference(q, K, R, 0.5, *filtered)
        assert filtered[1][0] == 100 and filtered[1][3] == 2000
    K[2001] = 1e30  # |k|^2 overflows float32: the scan scores it 0 (not the float64 cosine)
    for threads in (1, 2):
        assert_bit_identical(kernel(q, K, R, 0.5, threads, "scan"), kernel(q, K, R, 0.5, threads, "filtered"), threads)


@needs_filtered
def test_per_key_thresholds_read_at_the_winner():
    n, m, d1 = 16, 4000, 33
    q, K, R = random_inputs(n, m, d1, torch.bfloat16, seed=25)
    K[1234] = (q[0] * 2).to(torch.bfloat16)
    gamma = torch.full((m,), -1.0)
    gamma[1234] = 1.0  # no cosine exceeds 1: the winner of query 0 stays closed
    filtered = kernel(q, K, R, 0.0, 2, "filtered", key_gamma=gamma)
    assert_bit_identical(kernel(q, K, R, 0.0, 2, "scan", key_gamma=gamma), filtered, "per-key")
    assert filtered[1][0] == -1 and filtered[2][0] > 0.99
    assert (filtered[1][1:] >= 0).all()


@needs_filtered
@pytest.mark.parametrize(
    "q_dtype, k_dtype, isa, path, match",
    [
        (torch.float64, torch.float32, "auto", "filtered", "float32"),
        (torch.float32, torch.float64, "auto", "filtered", "float32"),
        (torch.float32, torch.float32, "avx2", "filtered", "isa must be"),
        (torch.float32, torch.float32, "auto", "fast", "unknown path"),
    ],
)
def test_binding_rejects_a_filtered_call_it_cannot_run(q_dtype, k_dtype, isa, path, match):
    q, K, R = random_inputs(16, 10, 8, k_dtype, seed=26)
    with pytest.raises(ValueError, match=match):
        cpu_backend._cpu.gated_retrieve(q.to(q_dtype), K, R, 0.5, 1, isa, None, path)


@pytest.mark.parametrize(
    "k_dtype, filtered_from", [(torch.float32, 16), (torch.bfloat16, 16), (torch.float16, 32), (torch.float64, None)]
)
def test_auto_picks_the_cpu_backend_and_the_path_by_shape(k_dtype, filtered_from):
    # "auto" on CPU tensors is the cpu backend; it scans for decode and float64, and filters prefill
    # where the CPU can, from the row counts where the filtered path measured faster than the scan
    # (bench/RESULTS.md, "CPU prefill": there it is also at least as fast as naive torch).
    assert resolve_backend("auto", torch.device("cpu"), (torch.float32, k_dtype, torch.float32)) == "cpu"
    for n in (1, 2, 15, 16, 17, 31, 32, 512):
        path = cpu_backend.match_path(n, torch.float32, k_dtype)
        if filtered_from is None or n < filtered_from or not FILTERED:
            assert path == "scan", n
        else:
            assert path == "filtered", n
        assert cpu_backend.match_path(n, torch.float64, k_dtype) == "scan"


@needs_filtered
def test_backend_call_at_prefill_size_equals_the_scan(assert_matches_reference):
    # the op through backend="cpu" at n = 16 takes the filtered path: the scan's bits
    q, K, R = random_inputs(16, 3001, 50, torch.bfloat16, seed=27)
    out, index, score = get_backend("cpu").retrieve(q, K, R, 0.1)
    threads = torch.get_num_threads()
    assert_bit_identical(kernel(q, K, R, 0.1, threads, "scan"), (out, index, score), "backend")
    assert_matches_reference(q, K, R, 0.1, out, index, score)
