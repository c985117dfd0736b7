"""The compressed key index (ops/key_index.py): gated_retrieve through a KeyIndex must return what
the full-precision op returns with the same backend, bit for bit, and meet the contract against
the float64 reference (conftest); the certified bound itself is checked against float64 cosines
of the exact inputs; overflow, incremental updates and bad input are covered.

Identity is asserted on the backends that compute each (query, key) score independently of the
other keys in the call ("cpu", "triton"); the "torch" reference (and Triton's interpreter for
tl.dot tiles) multiplies through BLAS, whose rounding depends on the matrix shape (key_index.py,
"Rescoring and identity"), so there index and out are asserted identical and the score equal
within that rounding.
"""

from typing import NamedTuple

import pytest
import torch

import neuraldb_kernels as nk
from neuraldb_kernels.ops import key_index as ki
from neuraldb_kernels.ops import torch_backend

FORMATS = ("int8",)  # fp8_e4m3 needs a GPU with fp8 (its bound is checked below on the CPU)


class Target(NamedTuple):
    name: str
    device: str


def _targets():
    status = nk.available_backends()
    return [
        pytest.param(
            Target(name, "cpu"),
            id=name,
            marks=pytest.mark.skipif("cpu" not in status[name].usable_on, reason=f"{name}: {status[name].reasons.get('cpu')}"),
        )
        for name in ("cpu", "triton", "torch")
    ]


@pytest.fixture(params=_targets())
def backend(request) -> Target:
    return request.param


@pytest.fixture(params=FORMATS)
def key_format(request) -> str:
    return request.param


def clustered_case(lead, m, d1, d2, seed, clusters=6, spread=0.4, dtypes=(torch.float32,) * 3):
    """Queries and keys around a few shared directions (so that candidate sets are small but not
    trivial), residuals random."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, d1, generator=gen)
    K = centres[torch.randint(0, clusters, (m,), generator=gen)] + spread * torch.randn(m, d1, generator=gen)
    n = int(torch.tensor(lead).prod()) if lead else 1
    q = centres[torch.randint(0, clusters, (n,), generator=gen)] + spread * torch.randn(n, d1, generator=gen)
    R = torch.randn(m, d2, generator=gen)
    return q.reshape(*lead, d1).to(dtypes[0]), K.to(dtypes[1]), R.to(dtypes[2])


def blas_rounded(target: Target, n: int) -> bool:
    """True where the full op's dot products go through BLAS: the torch backend, and the triton
    backend's tl.dot tiles (n > 8) in Triton's interpreter (numpy)."""
    from neuraldb_kernels.ops import triton_backend

    return target.name == "torch" or (target.name == "triton" and triton_backend._interpreting() and n > 8)


def assert_identical(q, K, R, gamma, target, key_format, budget=None):
    """gated_retrieve through a KeyIndex of K == the full op on K (same backend); returns the
    CompressedRetrieval."""
    index = nk.KeyIndex.from_keys(K, codes=key_format, candidate_budget=budget)
    result = ki.retrieve(q, index, R, gamma, backend=target.name)
    out, found, score = nk.gated_retrieve(q, K, R, gamma, backend=target.name, return_index=True)
    assert torch.equal(result.index, found)
    assert torch.equal(result.out.contiguous().view(torch.uint8), out.contiguous().view(torch.uint8))  # bit for bit
    assert torch.equal(torch.isnan(result.score), torch.isnan(score))
    if blas_rounded(target, q[..., 0].numel()):  # BLAS rounds a dot product by matrix shape: a few ulp
        assert torch.allclose(result.score, score, rtol=0, atol=4 * 2.0**-24, equal_nan=True)
    else:
        assert torch.equal(result.score.nan_to_num(7.0), score.nan_to_num(7.0))
    via_op = nk.gated_retrieve(q, index, R, gamma, backend=target.name, return_index=True)
    assert all(torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)) for a, b in zip(via_op, (result.out, result.index, result.score)))
    return result


# ----------------------------------------------------------------------------- the bound


@pytest.mark.parametrize("fmt", ki.FORMATS)
@pytest.mark.parametrize("d1", [1, 7, 64, 300])
def test_certified_bound_holds_against_float64_cosines(fmt, d1, float64_cosines):
    """|cos(q, k) - q~.k~| <= err_k + qerr * norm_k for every pair, on the exact inputs, and the
    stored err/norm bound the true ones (fp8 codes are encoded on the CPU here: the math is the
    same; only its use is guarded to GPUs)."""
    q, K, _ = clustered_case((9,), 400, d1, 1, seed=d1, spread=1.0)
    K[3] = 0.0
    K[4, 0] = 1e30  # a huge entry: its row normalises fine in float64
    rows = ki.encode_rows(K, fmt)
    queries = ki.quantise_queries(q, fmt)
    d_pad = ki.padded_features(d1)
    k_deq = rows.codes.double() * rows.scale.double()[:, None]
    q_deq = queries.codes.double() * queries.scale.double()[:, None]
    k64 = torch.nn.functional.pad(K.double(), (0, d_pad - d1))
    q64 = torch.nn.functional.pad(q.double(), (0, d_pad - d1))
    k_hat = k64 / k64.norm(dim=1, keepdim=True).clamp_min(1e-300)
    q_hat = q64 / q64.norm(dim=1, keepdim=True)
    assert ((k_hat - k_deq).norm(dim=1) <= rows.error.double() + 1e-12).all()
    assert (k_deq.norm(dim=1) <= rows.norm.double() + 1e-12).all() and (rows.norm <= 2).all()
    assert ((q_hat - q_deq).norm(dim=1) <= queries.error.double() + 1e-12).all()
    cos = float64_cosines(q, K)
    bound = rows.error.double()[None, :] + queries.error.double()[:, None] * rows.norm.double()[None, :]
    assert ((cos - q_deq @ k_deq.T).abs() <= bound + 1e-12).all()  # 1e-12: this check's own float64 rounding


def _adversarial_rows(d1: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows an encoder could get wrong: massive single features, huge and subnormal magnitudes,
    values on code rounding boundaries, ties of the largest feature, NaN/Inf and zero rows."""
    gen = torch.Generator().manual_seed(d1)
    rows = [torch.randn(d1, generator=gen, dtype=torch.float64) for _ in range(6)]
    rows[1][d1 // 2] = 300.0  # one massive feature: the scale is coarse for the others
    rows[2] = torch.full((d1,), 1.0, dtype=torch.float64)  # every feature ties for the largest
    rows[3] = (torch.arange(d1, dtype=torch.float64) % 255 - 127) + 0.5  # halfway between codes
    rows[4][:] = 0.0
    rows[4][0] = -2.0
    big, tiny = (1e300, 1e-310) if dtype == torch.float64 else (3e38, 1e-44)  # float64 only: beyond float32
    rows += [torch.randn(d1, generator=gen, dtype=torch.float64) * big / 4, torch.randn(d1, generator=gen, dtype=torch.float64) * tiny]
    rows += [torch.zeros(d1, dtype=torch.float64), torch.full((d1,), float("nan"), dtype=torch.float64)]
    K = torch.stack(rows).to(dtype)
    K[-1, 1:] = 1.0  # one NaN in an otherwise fine row
    return torch.cat([K, torch.randn(40, d1, generator=gen).to(dtype)])


ENCODERS = {"cpu": ki._encode_rows_cpu, "torch": lambda x: ki._encode_rows_torch(x, "int8")}


@pytest.mark.parametrize("encoder", ["cpu", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d1", [1, 5, 64, 1536])
def test_int8_encoders_bound_the_true_errors(encoder, dtype, d1):
    """Both int8 encoders (C++ and float64 torch) store err >= |k_hat - k~| and norm >= |k~|
    against float64 values computed here from the exact inputs (no tolerance: the stored bounds
    carry 2^-30 of slack for the encoders' float64 rounding); NaN/Inf rows get scale NaN, zero
    rows zeros; and the C++ bounds are as tight as the torch ones to within float32 rounding."""
    if encoder == "cpu" and ki._cpu_kernels is None:
        pytest.skip("the C++ extension is not built")
    K = _adversarial_rows(d1, dtype)
    rows = ENCODERS[encoder](K)
    d_pad = ki.padded_features(d1)
    assert rows.codes.shape == (K.shape[0], d_pad) and rows.codes.dtype == torch.int8
    assert (rows.codes[:, d1:] == 0).all() and (rows.codes.abs() <= 127).all()
    k64 = K.double()
    finite = torch.isfinite(k64).all(dim=1)
    length = k64.norm(dim=1)
    usable = finite & (length > 0) & torch.isfinite(length) & (length > 1e-150)  # norms this test's float64 can take
    k_hat = k64[usable] / length[usable, None]
    k_deq = rows.codes[usable, :d1].double() * rows.scale[usable].double()[:, None]
    assert ((k_hat - k_deq).norm(dim=1) <= rows.error[usable].double()).all()
    assert (k_deq.norm(dim=1) <= rows.norm[usable].double()).all() and (rows.norm <= 2).all()
    huge = finite & ~usable & (k64.abs().amax(dim=1) > 0)  # rows whose norm over- or underflows here
    if huge.any():
        scaled = k64[huge] / k64[huge].abs().amax(dim=1, keepdim=True)
        deq = rows.codes[huge, :d1].double() * rows.scale[huge].double()[:, None]
        assert ((scaled / scaled.norm(dim=1, keepdim=True) - deq).norm(dim=1) <= rows.error[huge].double()).all()
    assert torch.isnan(rows.scale[~finite]).all() and not torch.isnan(rows.scale[finite]).any()
    zero = finite & (k64.abs().amax(dim=1) == 0)
    assert zero.any() and (rows.scale[zero] == 0).all() and (rows.error[zero] == 0).all() and (rows.codes[zero] == 0).all()
    reference = ki._encode_rows_torch(K, "int8")
    assert (rows.error <= reference.error + 1e-6).all() and (rows.norm <= reference.norm + 1e-6).all()


def test_cpu_encoder_is_the_same_on_every_thread_count():
    if ki._cpu_kernels is None:
        pytest.skip("the C++ extension is not built")
    K = torch.randn(3000, 200, generator=torch.Generator().manual_seed(4))
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(ki._encode_rows_cpu(K))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(getattr(results[0], f), getattr(other, f)) for f in ("codes", "scale", "error", "norm"))


@pytest.mark.parametrize("encoder", ["cpu", "torch"])
def test_encode_rows_leaves_room_for_capacity(encoder, monkeypatch):
    if encoder == "torch":
        monkeypatch.setattr(ki, "_cpu_kernels", None)
    elif ki._cpu_kernels is None:
        pytest.skip("the C++ extension is not built")
    x = torch.randn(3, 70, generator=torch.Generator().manual_seed(8))
    plain, roomy = ki.encode_rows(x, "int8"), ki.encode_rows(x, "int8", capacity=10)
    for f in ("codes", "scale", "error", "norm"):
        assert getattr(roomy, f).shape[0] == 10 and torch.equal(getattr(roomy, f)[:3], getattr(plain, f))
    assert ki.encode_rows(x, "int8", capacity=2).codes.shape[0] == 3


def test_slack_covers_the_reference_rounding_tolerance(cosine_tolerance):
    for d1 in (1, 64, 1536, 14336):
        assert ki.certified_slack(d1) > cosine_tolerance(d1, torch.float32, torch.float32)


def test_candidate_sets_keep_every_key_that_can_win(backend, key_format, float64_cosines, cosine_tolerance):
    """Every key within twice the rounding tolerance of the float64 best is a candidate."""
    q, K, R = clustered_case((16,), 3000, 96, 2, seed=11)
    K[100:110] = q[0]  # exact duplicates of a query: ties
    index = nk.KeyIndex.from_keys(K, codes=key_format, candidate_budget=3000)
    find = nk.ops.get_backend(backend.name).candidates if key_format in nk.ops.get_backend(backend.name).candidate_formats else torch_backend.compressed_candidates
    sets = find(ki.quantise_queries(q, key_format), index, index.budget())
    cos = float64_cosines(q, K)
    tol = cosine_tolerance(96, torch.float32, torch.float32)
    for row in range(q.shape[0]):
        assert not sets.overflowed[row]
        keys = sets.keys[sets.offsets[row] : sets.offsets[row + 1]]
        assert torch.equal(keys, keys.sort().values) and keys.unique().numel() == keys.numel()
        must = torch.nonzero(cos[row] >= cos[row].max() - 2 * tol).ravel()
        assert torch.isin(must, keys).all(), row
        assert set(range(100, 110)) <= set(keys.tolist()) or row != 0


# ----------------------------------------------------------------------------- identity


@pytest.mark.parametrize(
    "lead,m,d1,d2",
    [((1,), 1, 1, 1), ((5,), 300, 96, 7), ((2, 3), 1000, 70, 5), ((33,), 2500, 128, 3), ((4,), 9000, 200, 2)],
)
def test_identical_to_full_precision(backend, key_format, lead, m, d1, d2, assert_matches_reference):
    for gamma in (-1.0, 0.2, 0.6):
        q, K, R = clustered_case(lead, m, d1, d2, seed=m + d1)
        result = assert_identical(q, K, R, gamma, backend, key_format)
        assert_matches_reference(q, K, R, gamma, result.out, result.index, result.score)


@pytest.mark.parametrize(
    "dtypes",
    [
        (torch.bfloat16, torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16, torch.float32),
        (torch.float32, torch.bfloat16, torch.float16),
        (torch.float64, torch.float32, torch.float64),
    ],
)
def test_identical_across_dtypes(backend, dtypes, assert_matches_reference):
    if torch.float64 in dtypes and backend.name == "triton":
        pytest.skip("triton has no float64")
    q, K, R = clustered_case((6,), 700, 100, 4, seed=5, dtypes=dtypes)
    result = assert_identical(q, K, R, 0.3, backend, "int8")
    assert_matches_reference(q, K, R, 0.3, result.out, result.index, result.score)


def test_per_key_thresholds_identical(backend, key_format, assert_matches_reference):
    q, K, R = clustered_case((12,), 1500, 64, 3, seed=21)
    gamma = torch.rand(1500, generator=torch.Generator().manual_seed(3)) * 1.2 - 0.2
    result = assert_identical(q, K, R, gamma.float(), backend, key_format)
    assert_matches_reference(q, K, R, gamma.float(), result.out, result.index, result.score)


def test_exact_ties_pick_lowest_index(backend, key_format):
    torch.manual_seed(2)
    K, R = torch.randn(1200, 16), torch.randn(1200, 5)
    target = torch.randn(16)
    for row in (9, 600, 1199):
        K[row] = target
    q = torch.stack([target, target * 2.5])
    result = assert_identical(q, K, R, 0.5, backend, key_format)
    assert result.index.tolist() == [9, 9]


def test_adversarial_near_ties_within_the_bound(backend, key_format):
    """Keys whose cosines with the query differ by far less than eps: the codes cannot order them,
    the rescoring must; also which one wins flips with the sign of a 1e-7 perturbation."""
    gen = torch.Generator().manual_seed(8)
    d1 = 256
    q = torch.randn(1, d1, generator=gen)
    noise = torch.randn(40, d1, generator=gen)
    noise -= (noise @ q[0])[:, None] * q[0] / q[0].dot(q[0])  # orthogonal to q
    steps = torch.linspace(1e-3, 1.2e-3, 40)[:, None]  # cosines 1 - O(1e-6) apart by 1e-9 .. 1e-7
    K = torch.cat([torch.randn(500, d1, generator=gen), q + steps * noise / noise.norm(dim=1, keepdim=True) * q.norm()])
    K = K[torch.randperm(K.shape[0], generator=gen)]
    R = torch.randn(K.shape[0], 3, generator=gen)
    index = nk.KeyIndex.from_keys(K, codes=key_format)
    eps = index.row_error.max().item()
    result = assert_identical(q, K, R, 0.5, backend, key_format)
    assert result.candidates.item() >= 40  # all near-ties are rescored
    assert eps > 1e-4  # the ties really are within the bound
    for flip in (1.0, -1.0):  # perturb the winner's runner-up just above / below it
        K2 = K.clone()
        K2[result.index.item()] += flip * 1e-6 * noise[0] / noise[0].norm() * q.norm()
        assert_identical(q, K2, R, 0.5, backend, key_format)


def test_overflow_scores_the_query_exactly_and_counts_it(backend, key_format):
    q, K, R = clustered_case((3,), 800, 48, 2, seed=4, clusters=1, spread=0.05)  # all keys near-tie
    q[2] = torch.randn(48, generator=torch.Generator().manual_seed(1)) * 10  # far from the cluster
    result = assert_identical(q, K, R, 0.1, backend, key_format, budget=5)
    assert result.overflowed[:2].all() and result.candidates[:2].tolist() == [800, 800]
    assert result.overflowed.dtype == torch.bool and result.candidates.dtype == torch.int64
    roomy = assert_identical(q, K, R, 0.1, backend, key_format, budget=800)
    assert not roomy.overflowed.any() and (roomy.candidates <= 800).all()


def test_nan_inf_zero_queries_and_keys(backend, key_format):
    torch.manual_seed(4)
    K, R = torch.randn(40, 12), torch.randn(40, 3)
    q = K[[5, 6, 7, 8, 9]].clone()
    q[0, 3] = float("nan")
    q[1, 0] = float("inf")
    q[3] = 0.0
    K[9, 2] = float("nan")  # the key query 4 copies: never wins
    K[10] = 0.0
    for gamma in (-0.5, 0.0):
        result = assert_identical(q, K, R, gamma, backend, key_format)
        assert result.index[:2].tolist() == [-1, -1] and torch.isnan(result.score[:2]).all()
        assert result.index[4].item() != 9
    only_bad = torch.full((3, 12), float("nan"))
    result = assert_identical(q, only_bad, R[:3], -1.0, backend, key_format)
    assert result.index.tolist() == [-1] * 5


def test_empty_index_and_empty_query_batch(backend, key_format):
    K, R = torch.randn(0, 8), torch.randn(0, 2)
    index = nk.KeyIndex.from_keys(K, codes=key_format)
    out, found, score = nk.gated_retrieve(torch.randn(3, 8), index, R, 0.1, backend=backend.name, return_index=True)
    assert out.shape == (3, 2) and found.tolist() == [-1] * 3 and (score == float("-inf")).all()
    full = nk.KeyIndex.from_keys(torch.randn(5, 8), codes=key_format)
    out, found, score = nk.gated_retrieve(torch.randn(0, 8), full, torch.randn(5, 2), 0.1, backend=backend.name, return_index=True)
    assert out.shape == (0, 2) and found.shape == (0,)


def test_gradient_to_residuals_matches_the_full_op(backend):
    q, K, R = clustered_case((6,), 300, 32, 4, seed=9)
    grads = []
    for keys in (K, nk.KeyIndex.from_keys(K)):
        Rg = R.clone().requires_grad_(True)
        out = nk.gated_retrieve(q, keys, Rg, 0.2, backend=backend.name)
        (out * torch.arange(4.0)).sum().backward()
        grads.append(Rg.grad)
    assert torch.equal(grads[0], grads[1]) and grads[0].abs().sum() > 0


def test_cpu_candidate_pass_is_the_same_on_every_isa_and_thread_count():
    cpu = pytest.importorskip("neuraldb_kernels._cpu")
    q, K, _ = clustered_case((9,), 9000, 200, 1, seed=3)
    index = nk.KeyIndex.from_keys(K, candidate_budget=500)
    qc = ki.quantise_queries(q, "int8")
    results = [
        cpu.int8_candidates(qc.codes, qc.scale, qc.error, index.codes, index.row_scale, index.row_error, index.row_norm,
                            ki.certified_slack(200), 500, threads, isa)
        for isa in cpu.available_int8_isas() for threads in (1, 2)
    ]  # fmt: skip
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))
    assert (results[0][1][1:] - results[0][1][:-1]).max() < 500


# ----------------------------------------------------------------------------- updates


def test_default_budget_follows_the_number_of_keys():
    index = nk.KeyIndex.from_keys(torch.randn(100, 8))
    assert index.budget() == 1024
    index.append(torch.randn(40000, 8))
    assert index.budget() == 40100 // 32
    assert nk.KeyIndex.from_keys(torch.randn(100, 8), candidate_budget=7).budget() == 7


def test_incremental_updates_equal_a_fresh_index(key_format):
    gen = torch.Generator().manual_seed(6)
    K = torch.randn(50, 40, generator=gen)
    index = nk.KeyIndex.from_keys(K, codes=key_format)
    assert index.keys.data_ptr() == K.data_ptr()  # referenced, not copied
    reference = K.clone()
    capacities = set()
    for step in range(60):
        extra = torch.randn(int(torch.randint(1, 9, (1,), generator=gen)), 40, generator=gen)
        index.append(extra)
        reference = torch.cat([reference, extra])
        capacities.add(index._keys.shape[0])
    assert len(capacities) <= 6  # doubling: a logarithmic number of reallocations
    assert torch.equal(K, reference[:50])  # the caller's K was copied before the first write
    rows = torch.tensor([0, 7, reference.shape[0] - 1, 30])
    new = torch.randn(4, 40, generator=gen)
    index.overwrite(rows, new)
    reference[rows] = new
    index.swap_remove([3, 0, reference.shape[0] - 2])
    keep = torch.ones(reference.shape[0], dtype=torch.bool)
    keep[[3, 0, reference.shape[0] - 2]] = False
    assert index.m == int(keep.sum())
    fresh = nk.KeyIndex.from_keys(index.keys.clone(), codes=key_format)
    assert sorted(map(tuple, index.keys.tolist())) == sorted(map(tuple, reference[keep].tolist()))
    for name in ("codes", "row_scale", "row_error", "row_norm"):
        assert torch.equal(getattr(index, name), getattr(fresh, name)), name
    q, R = torch.randn(7, 40, generator=gen), torch.randn(index.m, 3, generator=gen)
    assert_identical(q, index.keys.clone(), R, 0.1, Target("cpu" if "cpu" in nk.available_backends()["cpu"].usable_on else "torch", "cpu"), key_format)


def test_host_keys_with_codes_elsewhere_are_gathered_per_candidate():
    """Keys stay on their device (host), codes on `device`; here both are the CPU, so the call
    checks the bookkeeping: the index's keys are the caller's tensor and results are identical."""
    q, K, R = clustered_case((4,), 500, 64, 2, seed=2)
    index = nk.KeyIndex.from_keys(K, device="cpu")
    assert index.key_device == K.device and index.keys.data_ptr() == K.data_ptr()
    assert torch.equal(nk.gated_retrieve(q, index, R, 0.3), nk.gated_retrieve(q, K, R, 0.3))


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: nk.KeyIndex.from_keys([[1.0]]), TypeError, "must be a torch.Tensor"),
        (lambda: nk.KeyIndex.from_keys(torch.ones(3, 4, dtype=torch.int32)), TypeError, "dtype torch.int32"),
        (lambda: nk.KeyIndex.from_keys(torch.ones(3)), ValueError, r"2-D \(m, d1\)"),
        (lambda: nk.KeyIndex.from_keys(torch.ones(3, 4), codes="int2"), ValueError, "unknown code format"),
        (lambda: nk.KeyIndex.from_keys(torch.ones(3, 4), codes=torch.float8_e4m3fn), ValueError, "CUDA GPU"),
        (lambda: nk.KeyIndex.from_keys(torch.ones(3, 4), candidate_budget=0), ValueError, "candidate_budget"),
        (lambda: nk.gated_retrieve(torch.ones(2, 5), nk.KeyIndex.from_keys(torch.ones(3, 4)), torch.ones(3, 1), 0.1), ValueError, "d1 = 4"),
        (lambda: nk.gated_retrieve(torch.ones(2, 4), nk.KeyIndex.from_keys(torch.ones(3, 4)), torch.ones(2, 1), 0.1), ValueError, "m = 3"),
        (lambda: nk.gated_retrieve(torch.ones(2, 4), nk.KeyIndex.from_keys(torch.ones(3, 4)), torch.ones(3, 1), 1.5), ValueError, r"\[-1, 1\]"),
        (lambda: nk.gated_retrieve(torch.ones(2, 4), nk.KeyIndex.from_keys(torch.ones(3, 4)), torch.ones(3, 1), torch.zeros(2)), ValueError, r"shape \(3,\)"),
        (lambda: nk.gated_retrieve(torch.ones(2, 4), nk.KeyIndex.from_keys(torch.ones(3, 4)), torch.ones(3, 1), torch.full((3,), 2.0)), ValueError, "gamma"),
        (lambda: nk.gated_retrieve(torch.ones(2, 4), nk.KeyIndex.from_keys(torch.ones(3, 4)), torch.ones(3, 1), 0.1, backend="gpu"), ValueError, "unknown backend"),
        (lambda: nk.gated_retrieve(torch.ones(2, 4), nk.KeyIndex.from_keys(torch.ones(3, 4), device="meta"), torch.ones(3, 1), 0.1), ValueError, "KeyIndex's device"),
        (lambda: nk.KeyIndex.from_keys(torch.ones(3, 4)).append(torch.ones(2, 5)), ValueError, r"\(rows, 4\)"),
        (lambda: nk.KeyIndex.from_keys(torch.ones(3, 4)).overwrite([3], torch.ones(1, 4)), ValueError, r"in \[0, 3\)"),
        (lambda: nk.KeyIndex.from_keys(torch.ones(3, 4)).swap_remove([5]), ValueError, r"in \[0, 3\)"),
        (lambda: nk.KeyIndex.from_keys(torch.ones(1, 2**20, dtype=torch.bfloat16)), ValueError, "below 1048576 features"),
    ],
)
def test_bad_input_raises_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()
