"""The gated_retrieve contract, checked identically on every (backend, device) pair usable here:
inputs are built on the CPU, moved to the pair's device for the call, and the results moved back.

The reference is independent of the package: float64 NumPy math on the exact input values.

Tolerance (derived, not tuned). With unit roundoff u of the accumulation dtype (2^-24 for
float32, 2^-53 for float64), a length-d dot product computed in floating point has error at most
gamma_d * |q| |k| with gamma_d = d u / (1 - d u) (Higham, "Accuracy and Stability", eq. 3.5). Each
norm sqrt(sum x^2) carries at most (d/2 + 1) u relative error, its reciprocal u more and the two
products 2u more, so |cos_computed - cos| <= (2 d + 8) u for d u << 1. bf16/fp16 inputs are exact
in float32, so the bound holds against the reference on their exact values. A reported float32
score adds one more float32 rounding. Two backends (or a backend and the reference) may pick
different indices only when the two best reference cosines lie within twice that bound.
"""

import math
from typing import NamedTuple

import numpy as np
import pytest
import torch

import neuraldb_kernels as nk
from neuraldb_kernels.ops.dispatch import SUPPORTED_DTYPES

CPU = torch.device("cpu")


class Target(NamedTuple):
    """One backend on one device: what a contract test runs on."""

    name: str
    device: str


def usable_targets():
    status = nk.available_backends()
    return [
        pytest.param(
            Target(name, device),
            id=f"{name}-{device}",
            marks=pytest.mark.skipif(
                device not in status[name].usable_on,
                reason=f"{name} on {device}: {status[name].reasons.get(device, 'not usable')}",
            ),
        )
        for name in nk.BACKENDS
        for device in ("cpu", "cuda")
    ]


@pytest.fixture(params=usable_targets())
def backend(request) -> Target:
    return request.param


def score_tolerance(d1: int, q_dtype, k_dtype) -> float:
    acc64 = torch.float64 in (q_dtype, k_dtype)
    u = 2.0**-53 if acc64 else 2.0**-24
    return (2 * d1 + 8) * u + 2.0**-24  # + the float32 rounding of the reported score


def reference(q, K, gamma):
    """float64 NumPy: cosines (n, m) on the exact input values, best index/score and fired mask."""
    qn = q.detach().reshape(-1, q.shape[-1]).to(torch.float64).numpy()
    Kn = K.detach().to(torch.float64).numpy()
    q_norm = np.linalg.norm(qn, axis=1, keepdims=True)
    k_norm = np.linalg.norm(Kn, axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = (qn @ Kn.T) / (q_norm * k_norm.T)
    cos[:, (k_norm[:, 0] == 0)] = 0.0
    cos[(q_norm[:, 0] == 0), :] = 0.0
    return cos


def check_against_reference(q, K, R, gamma, out, index, score):
    """Assert the contract on (out, index, score) against the float64 reference."""
    n = q[..., 0].numel()
    lead = q.shape[:-1]
    assert out.shape == (*lead, R.shape[1]) and out.dtype == R.dtype
    assert index.shape == lead and index.dtype == torch.int64
    assert score.shape == lead and score.dtype == torch.float32
    out, index, score = out.reshape(n, -1), index.reshape(n), score.reshape(n)
    tol = score_tolerance(q.shape[-1], q.dtype, K.dtype)
    q2 = q.detach().reshape(n, -1).to(torch.float64)
    finite = torch.isfinite(q2).all(dim=1)
    cos = reference(q, K, gamma)
    for row in range(n):
        if not finite[row]:
            assert index[row] == -1 and torch.isnan(score[row]) and not out[row].any()
            continue
        best = cos[row].max()
        assert abs(score[row].item() - best) <= tol, (row, score[row].item(), best, tol)
        if index[row] >= 0:
            picked = cos[row, index[row]]
            assert picked >= best - 2 * tol, (row, index[row].item(), picked, best)
            assert score[row].item() > gamma or math.isclose(score[row].item(), gamma, abs_tol=tol)
            assert torch.equal(out[row], R[index[row]]), "the fired row must be R[index] bit for bit"
        else:
            assert best <= gamma + tol, (row, best, gamma)
            assert not out[row].any() and not torch.signbit(out[row]).any()


def random_case(lead, m, d1, d2, q_dtype=torch.float32, k_dtype=torch.float32, r_dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(*lead, d1, generator=gen).to(q_dtype)
    K = torch.randn(m, d1, generator=gen).to(k_dtype)
    R = torch.randn(m, d2, generator=gen).to(r_dtype)
    return q, K, R


def run(q, K, R, gamma, target: Target):
    """gated_retrieve on `target`'s device; (out, index, score) come back on the CPU (differentiably)."""
    moved = (t.to(target.device) for t in (q, K, R))
    return tuple(t.cpu() for t in nk.gated_retrieve(*moved, gamma, backend=target.name, return_index=True))


# ----------------------------------------------------------------------------- correctness


@pytest.mark.parametrize(
    "lead,m,d1,d2",
    [((1,), 1, 7, 3), ((4,), 7, 67, 5), ((3, 5), 7, 33, 9), ((2,), 1003, 45, 11), ((), 300, 130, 4)],
)
def test_random_inputs_match_float64_reference(backend, lead, m, d1, d2):
    q, K, R = random_case(lead, m, d1, d2, seed=m + d1)
    # plant a few strong matches so that both open and closed gates occur
    flat = q.reshape(-1, d1)
    for row in range(0, flat.shape[0], 2):
        K[(row * 13) % m] = flat[row] * 0.5 + 0.1 * torch.randn(d1)
    check_against_reference(q, K, R, 0.6, *run(q, K, R, 0.6, backend))


@pytest.mark.parametrize(
    "q_dtype,k_dtype,r_dtype",
    [
        (torch.float16, torch.float16, torch.float16),
        (torch.bfloat16, torch.bfloat16, torch.bfloat16),
        (torch.float32, torch.bfloat16, torch.float16),
        (torch.bfloat16, torch.float32, torch.bfloat16),
        (torch.float16, torch.bfloat16, torch.float32),
        (torch.float64, torch.float64, torch.float64),
        (torch.float32, torch.float64, torch.bfloat16),
    ],
)
def test_dtypes_and_mixed_dtypes(backend, q_dtype, k_dtype, r_dtype):
    if any(d not in SUPPORTED_DTYPES[backend.name] for d in (q_dtype, k_dtype, r_dtype)):
        with pytest.raises(TypeError, match="does not support dtype"):
            run(*random_case((3,), 5, 19, 4, q_dtype, k_dtype, r_dtype), 0.1, backend)
        return
    q, K, R = random_case((6,), 57, 37, 8, q_dtype, k_dtype, r_dtype, seed=3)
    K[11] = (q[0] * 2).to(k_dtype)
    K[40] = (q[3] - 0.05).to(k_dtype)
    check_against_reference(q, K, R, 0.3, *run(q, K, R, 0.3, backend))


def test_non_contiguous_query(backend):
    base = torch.randn(9, 4, 41, device=backend.device)  # strided on the device itself: .to() would compact it
    q = base.transpose(0, 1)[:, ::2]  # (4, 5, 41), strided
    assert not q.is_contiguous()
    K = torch.randn(23, 41)
    K[5] = q[2, 3].cpu() * 3
    R = torch.randn(23, 6)
    out, index, score = run(q, K, R, 0.5, backend)
    q = q.cpu()
    assert index[2, 3] == 5
    check_against_reference(q, K, R, 0.5, out, index, score)


def test_empty_database(backend):
    q = torch.randn(2, 3, 10)
    q[1, 2, 4] = float("nan")
    K, R = torch.empty(0, 10), torch.empty(0, 7, dtype=torch.bfloat16)
    out, index, score = run(q, K, R, 0.5, backend)
    assert out.shape == (2, 3, 7) and out.dtype == torch.bfloat16 and not out.any()
    assert (index == -1).all()
    assert torch.isnan(score[1, 2])
    score[1, 2] = float("-inf")
    assert (score == float("-inf")).all()


def test_empty_query_batch(backend):
    q, K, R = torch.randn(0, 4, 12), torch.randn(5, 12), torch.randn(5, 3)
    out, index, score = run(q, K, R, 0.5, backend)
    assert out.shape == (0, 4, 3) and index.shape == (0, 4) and score.shape == (0, 4)


def test_planted_scaled_copies_win(backend):
    torch.manual_seed(1)
    K, R = torch.randn(500, 29), torch.randn(500, 4)
    rows = torch.tensor([0, 17, 250, 499])
    q = K[rows] * torch.tensor([[0.01], [3.0], [250.0], [1.0]])
    out, index, score = run(q, K, R, 0.9, backend)
    assert torch.equal(index, rows)
    assert torch.allclose(score, torch.ones(4), atol=1e-5)
    assert torch.equal(out, R[rows])


def test_exact_ties_pick_lowest_index(backend):
    torch.manual_seed(2)
    K, R = torch.randn(1200, 16), torch.randn(1200, 5)
    target = torch.randn(16)
    for row in (9, 600, 1199):  # the same key in three places, far apart
        K[row] = target
    K[300] = target * 4  # a scaled copy: the same cosine in exact arithmetic, not necessarily in floats
    q = torch.stack([target, target * 2.5])
    out, index, score = run(q, K, R, 0.5, backend)
    assert index.tolist() in ([9, 9], [9, 300], [300, 9], [300, 300]) and 600 not in index.tolist()
    K[300] = torch.randn(16)
    out, index, score = run(q, K, R, 0.5, backend)
    assert index.tolist() == [9, 9]
    assert torch.equal(out, R[[9, 9]])


def test_gate_is_strict_on_exactly_representable_cosines(backend):
    # cos((4,0,0,0), (1,1,1,1)) = 1/2 and cos(2e1, 2e1) = 1, both exact in every float format
    q = torch.tensor([[4.0, 0, 0, 0], [0, 2.0, 0, 0]])
    K = torch.tensor([[1.0, 1, 1, 1], [0, 2.0, 0, 0]])
    R = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        qq, KK = q.to(dtype), K.to(dtype)
        _, index, score = run(qq, KK, R, 0.5, backend)
        assert score.tolist() == [0.5, 1.0] and index.tolist() == [-1, 1]
        _, index, _ = run(qq, KK, R, 0.5 - 2**-20, backend)
        assert index.tolist() == [0, 1]
        _, index, _ = run(qq, KK, R, 1.0, backend)
        assert index.tolist() == [-1, -1]
        _, index, _ = run(qq, KK, R, 1.0 - 2**-20, backend)
        assert index.tolist() == [-1, 1]


def test_gamma_just_below_and_above_a_random_score(backend):
    q, K, R = random_case((5,), 64, 50, 3, seed=7)
    best = reference(q, K, 0.0).max(axis=1)
    tol = score_tolerance(50, q.dtype, K.dtype)
    for row, s in enumerate(best):
        _, index, _ = run(q[row], K, R, float(s) - 2 * tol, backend)
        assert index.item() >= 0
        _, index, _ = run(q[row], K, R, float(s) + 2 * tol, backend)
        assert index.item() == -1


def test_nan_inf_and_zero_queries(backend):
    torch.manual_seed(4)
    K, R = torch.randn(40, 12), torch.randn(40, 3)
    q = K[[5, 6, 7, 8]].clone()
    q[0, 3] = float("nan")
    q[1, 0] = float("inf")
    q[2, 11] = float("-inf")
    q[3] = 0.0
    out, index, score = run(q, K, R, -0.5, backend)
    assert index[:3].tolist() == [-1, -1, -1] and torch.isnan(score[:3]).all() and not out[:3].any()
    # a zero query has cosine 0 with every key: it fires (on key 0) only because gamma < 0
    assert score[3].item() == 0.0 and index[3].item() == 0
    _, index, _ = run(q, K, R, 0.0, backend)
    assert index[3].item() == -1


def test_zero_keys_have_cosine_zero(backend):
    K = torch.zeros(6, 8)
    K[4, :4] = 1.0  # norm 2: every cosine below is exact
    R = torch.arange(12.0).reshape(6, 2)
    q = torch.stack([-K[4], K[4]])
    out, index, score = run(q, K, R, -0.9, backend)
    assert score.tolist() == [0.0, 1.0] and index.tolist() == [0, 4]  # zero keys tie at 0: lowest wins


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda: (torch.randn(3, 8), torch.randn(5, 7), torch.randn(5, 2), 0.5), ValueError, "d1 mismatch"),
        (lambda: (torch.randn(3, 8), torch.randn(5, 8), torch.randn(4, 2), 0.5), ValueError, "m mismatch"),
        (lambda: (torch.randn(3, 8), torch.randn(5, 8, 1), torch.randn(5, 2), 0.5), ValueError, "K must be 2-D"),
        (lambda: (torch.randn(3, 8), torch.randn(5, 8), torch.randn(5), 0.5), ValueError, "R must be 2-D"),
        (lambda: (torch.tensor(1.0), torch.randn(5, 8), torch.randn(5, 2), 0.5), ValueError, "0-d"),
        (lambda: (torch.ones(3, 8, dtype=torch.int32), torch.randn(5, 8), torch.randn(5, 2), 0.5), TypeError, "q has dtype torch.int32"),
        (lambda: (torch.randn(3, 8), torch.ones(5, 8, dtype=torch.bool), torch.randn(5, 2), 0.5), TypeError, "K has dtype torch.bool"),
        (lambda: (torch.randn(3, 8), torch.randn(5, 8), torch.randn(5, 2, dtype=torch.complex64), 0.5), TypeError, "R has dtype torch.complex64"),
        (lambda: (torch.randn(3, 8).numpy(), torch.randn(5, 8), torch.randn(5, 2), 0.5), TypeError, "q must be a torch.Tensor"),
        (lambda: (torch.randn(3, 8), torch.randn(5, 8, device="meta"), torch.randn(5, 2), 0.5), ValueError, "one device"),
        (lambda: (torch.randn(3, 8), torch.randn(5, 8), torch.randn(5, 2), 1.5), ValueError, r"in \[-1, 1\]"),
        (lambda: (torch.randn(3, 8), torch.randn(5, 8), torch.randn(5, 2), float("nan")), ValueError, "finite"),
        (lambda: (torch.randn(3, 8), torch.randn(5, 8), torch.randn(5, 2), "0.5"), TypeError, "gamma must be a real number"),
        (lambda: (torch.randn(3, 8), torch.randn(5, 8), torch.randn(5, 2), True), TypeError, "gamma must be a real number"),
    ],
)
def test_bad_inputs_raise_clear_errors(make, error, match):
    with pytest.raises(error, match=match):
        nk.gated_retrieve(*make())


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="unknown backend 'fastest'.*'triton', 'cuda', 'cpu', 'torch'"):
        nk.gated_retrieve(torch.randn(2, 4), torch.randn(3, 4), torch.randn(3, 2), 0.5, backend="fastest")


def test_unavailable_backend_says_why():
    # no CUDA tensors here: the cuda backend cannot run on CPU tensors and must say why
    with pytest.raises(nk.BackendUnavailableError, match="backend 'cuda' is not available here: .+"):
        nk.gated_retrieve(torch.randn(2, 4), torch.randn(3, 4), torch.randn(3, 2), 0.5, backend="cuda")


def test_available_backends_reports_every_backend_with_reasons():
    status = nk.available_backends()
    assert set(status) == set(nk.BACKENDS)
    assert "cpu" in status["torch"].usable_on
    for name, st in status.items():
        for device in ("cpu", "cuda"):
            assert (device in st.usable_on) != (device in st.reasons), (name, device)
            if device in st.reasons:
                assert len(st.reasons[device]) > 10


def test_auto_picks_the_cpu_kernel_when_built():
    from neuraldb_kernels.ops.dispatch import resolve_backend

    expected = "cpu" if "cpu" in nk.available_backends()["cpu"].usable_on else "torch"
    assert resolve_backend("auto", CPU, (torch.float32,) * 3) == expected


# ----------------------------------------------------------------------------- autograd and compile


def test_gradient_flows_to_selected_residual_rows_only(backend):
    torch.manual_seed(5)
    K = torch.randn(10, 6)
    R = torch.randn(10, 3, requires_grad=True)
    q = torch.stack([K[2], K[2] * 2, K[7], -K[7] * 0 + torch.randn(6)]).requires_grad_(True)
    out, index, _ = run(q, K, R, 0.99, backend)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    expected = torch.zeros(10, 3)
    for row, i in enumerate(index.tolist()):
        if i >= 0:
            expected[i] += grad_out[row]
    assert index[:3].tolist() == [2, 2, 7]
    assert torch.allclose(R.grad, expected)
    assert q.grad is None  # the gate is piecewise constant: no gradient to q (or K)


def test_gradcheck_on_residuals_in_float64(backend):
    if torch.float64 not in SUPPORTED_DTYPES[backend.name]:
        pytest.skip(f"{backend.name} has no float64 path")
    torch.manual_seed(6)
    K = torch.randn(8, 5, dtype=torch.float64)
    q = torch.cat([K[[1, 4, 4]], torch.randn(2, 5, dtype=torch.float64)])
    R = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda r: run(q, K, r, 0.9, backend)[0], (R,))


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
)
def test_torch_compile_fullgraph_has_no_graph_breaks(device):
    def ffn_with_edits(x, W, K, R):
        hidden = torch.relu(x @ W)
        return hidden @ W.T + nk.gated_retrieve(hidden, K, R, 0.7)

    torch.manual_seed(7)
    x, W = torch.randn(2, 3, 16), torch.randn(16, 24)
    K, R = torch.randn(50, 24), torch.randn(50, 16)
    K[3] = torch.relu(x[1, 2] @ W)
    x, W, K, R = (t.to(device) for t in (x, W, K, R))
    compiled = torch.compile(ffn_with_edits, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, W, K, R), ffn_with_edits(x, W, K, R))
    compiled_inductor = torch.compile(ffn_with_edits, fullgraph=True)
    torch.testing.assert_close(compiled_inductor(x, W, K, R), ffn_with_edits(x, W, K, R))


def test_custom_op_path_meets_the_contract_and_serves_autograd(backend):
    # eager inference skips the custom op; the op itself (autograd, torch.compile) must meet the
    # same float64 reference, and autograd must go through it
    q, K, R = random_case((3, 4), 50, 24, 6, seed=11)
    K[7] = q[1, 2] * 3
    via_op = torch.ops.neuraldb.gated_retrieve(*(t.to(backend.device) for t in (q, K, R)), 0.3, backend.name)
    check_against_reference(q, K, R, 0.3, *(t.cpu() for t in via_op))
    assert via_op[1][1, 2].item() == 7
    assert run(q, K, R.requires_grad_(), 0.3, backend)[0].grad_fn is not None  # autograd takes the op


def test_keys_with_nan_or_inf_never_win(backend):
    torch.manual_seed(8)
    K, R = torch.randn(30, 10), torch.randn(30, 2)
    q = K[[4, 20]].clone()
    K[4, 0] = float("nan")
    K[20, 3] = float("inf")
    K[21] = q[1] * 2  # the best finite key for the second query
    out, index, score = run(q, K, R, -1.0, backend)
    assert index[0] not in (-1, 4) and index[1].item() == 21
    assert torch.isfinite(score).all()
    bad_only = torch.full((3, 10), float("nan"))
    _, index, score = run(q, bad_only, torch.randn(3, 2), -1.0, backend)
    assert index.tolist() == [-1, -1] and (score == float("-inf")).all()
