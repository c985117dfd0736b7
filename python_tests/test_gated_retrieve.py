"""The gated_retrieve contract, checked identically on every (backend, device) pair usable here:
inputs are built on the CPU, moved to the pair's device for the call, and the results moved back.
Also: the backend registry (availability, "auto", the fallback warning), the custom op
(torch.library.opcheck, autograd, torch.compile) and the torch backend's key chunking.

The reference and its derived tolerance are the conftest fixtures `float64_cosines`,
`cosine_tolerance` and `assert_matches_reference` (float64 math on the exact input values,
independent of the package).
"""

import dataclasses
import os
import subprocess
import sys
from typing import NamedTuple

import pytest
import torch

import neuraldb_kernels as nk
from neuraldb_kernels.ops import dispatch, get_backend, torch_backend

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


def random_case(lead, m, d1, d2, q_dtype=torch.float32, k_dtype=torch.float32, r_dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(*lead, d1, generator=gen).to(q_dtype)
    K = torch.randn(m, d1, generator=gen).to(k_dtype)
    R = torch.randn(m, d2, generator=gen).to(r_dtype)
    return q, K, R


def run(q, K, R, gamma, target: Target):
    """gated_retrieve on `target`'s device (gamma too, when it is a per-key tensor); (out, index,
    score) come back on the CPU (differentiably)."""
    moved = (t.to(target.device) for t in (q, K, R))
    gamma = gamma.to(target.device) if isinstance(gamma, torch.Tensor) else gamma
    return tuple(t.cpu() for t in nk.gated_retrieve(*moved, gamma, backend=target.name, return_index=True))



# ----------------------------------------------------------------------------- correctness


@pytest.mark.parametrize(
    "lead,m,d1,d2",
    [((1,), 1, 7, 3), ((4,), 7, 67, 5), ((3, 5), 7, 33, 9), ((2,), 1003, 45, 11), ((), 300, 130, 4)],
)
def test_random_inputs_match_float64_reference(backend, assert_matches_reference, lead, m, d1, d2):
    q, K, R = random_case(lead, m, d1, d2, seed=m + d1)
    # plant a few strong matches so that both open and closed gates occur
    flat = q.reshape(-1, d1)
    for row in range(0, flat.shape[0], 2):
        K[(row * 13) % m] = flat[row] * 0.5 + 0.1 * torch.randn(d1)
    assert_matches_reference(q, K, R, 0.6, *run(q, K, R, 0.6, backend))


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
def test_dtypes_and_mixed_dtypes(backend, assert_matches_reference, q_dtype, k_dtype, r_dtype):
    if any(d not in get_backend(backend.name).dtypes for d in (q_dtype, k_dtype, r_dtype)):
        with pytest.raises(TypeError, match="does not support dtype"):
            run(*random_case((3,), 5, 19, 4, q_dtype, k_dtype, r_dtype), 0.1, backend)
        return
    q, K, R = random_case((6,), 57, 37, 8, q_dtype, k_dtype, r_dtype, seed=3)
    K[11] = (q[0] * 2).to(k_dtype)
    K[40] = (q[3] - 0.05).to(k_dtype)
    assert_matches_reference(q, K, R, 0.3, *run(q, K, R, 0.3, backend))


def test_non_contiguous_query(backend, assert_matches_reference):
    base = torch.randn(9, 4, 41, device=backend.device)  # strided on the device itself: .to() would compact it
    q = base.transpose(0, 1)[:, ::2]  # (4, 5, 41), strided
    assert not q.is_contiguous()
    K = torch.randn(23, 41)
    K[5] = q[2, 3].cpu() * 3
    R = torch.randn(23, 6)
    out, index, score = run(q, K, R, 0.5, backend)
    q = q.cpu()
    assert index[2, 3] == 5
    assert_matches_reference(q, K, R, 0.5, out, index, score)


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


def test_gamma_just_below_and_above_a_random_score(backend, float64_cosines, cosine_tolerance):
    q, K, R = random_case((5,), 64, 50, 3, seed=7)
    best = float64_cosines(q, K).max(dim=1).values.tolist()
    tol = cosine_tolerance(50, q.dtype, K.dtype)
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
        (lambda: (torch.randn(3, 0), torch.randn(5, 0), torch.randn(5, 2), 0.5), ValueError, "d1 must be at least 1"),
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


def _cpu_extension_imports() -> bool:
    """Whether neuraldb_kernels._cpu loads, asked of the import system, not of the registry."""
    try:
        import neuraldb_kernels._cpu  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture
def fresh_resolution():
    """Resolution and fallback warnings start afresh, and are forgotten again afterwards (a test
    changes what a backend finds)."""
    dispatch._resolve.cache_clear()
    dispatch._warned_fallbacks.clear()
    yield
    dispatch._resolve.cache_clear()
    dispatch._warned_fallbacks.clear()


def test_auto_picks_the_cpu_kernel_when_built():
    expected = "cpu" if _cpu_extension_imports() else "torch"
    assert dispatch.resolve_backend("auto", CPU, (torch.float32,) * 3) == expected


def test_auto_picks_torch_for_float64_on_cuda_tensors_and_triton_for_bf16(fresh_resolution, monkeypatch):
    # resolution reads only the records: with triton's and cuda's requirements met, the order
    # and the dtypes decide
    records = {name: get_backend(name) for name in nk.BACKENDS}
    met = {name: dataclasses.replace(records[name], requirement=lambda device: None) for name in ("triton", "cuda")}
    monkeypatch.setattr(dispatch, "get_backend", lambda name: met.get(name, records[name]))
    cuda0 = torch.device("cuda", 0)
    assert dispatch.resolve_backend("auto", cuda0, (torch.bfloat16,) * 3) == "triton"
    assert dispatch.resolve_backend("auto", cuda0, (torch.float32, torch.float64, torch.float32)) == "torch"


def test_cpu_backend_says_what_is_missing(monkeypatch):
    from neuraldb_kernels.ops import cpu_backend

    record = get_backend("cpu")
    assert "CPU tensors" in record.unavailable_reason(torch.device("cuda"))
    monkeypatch.setattr(cpu_backend, "_cpu", object())  # a loaded extension
    assert record.unavailable_reason(CPU) is None
    monkeypatch.setattr(cpu_backend, "_cpu", None)
    monkeypatch.setattr(cpu_backend, "_IMPORT_ERROR", ImportError("undefined symbol: _ZN3c10"))
    why = record.unavailable_reason(CPU)
    assert "neuraldb_kernels._cpu was not built or does not load" in why and "_ZN3c10" in why
    assert "pip install --no-build-isolation -e ." in why


def test_direct_calls_are_checked_by_the_record():
    q, K, R = torch.randn(2, 4), torch.randn(3, 4), torch.randn(3, 2)
    with pytest.raises(TypeError, match=r"gated_retrieve\[cuda\]: K has dtype torch.float64"):
        get_backend("cuda").retrieve(q, K.double(), R, 0.5)
    with pytest.raises(RuntimeError, match=r"gated_retrieve\[cuda\]: not available for tensors on cpu: .+"):
        get_backend("cuda").retrieve(q, K, R, 0.5)
    out, index, score = get_backend("torch").retrieve(q, K, R, -1.0)
    assert out.shape == (2, 2) and (index >= 0).all()


_WITHOUT_CPU_EXTENSION = """
import sys, warnings
sys.modules["neuraldb_kernels._cpu"] = None  # the extension cannot be imported
warnings.simplefilter("always")
import torch
with warnings.catch_warnings(record=True) as at_import:
    import neuraldb_kernels as nk
print("import", len([w for w in at_import if "neuraldb_kernels" in str(w.message)]))
q, K, R = torch.randn(2, 8), torch.randn(5, 8), torch.randn(5, 3)
for call in range(3):
    with warnings.catch_warnings(record=True) as caught:
        _, index, _ = nk.gated_retrieve(q.double() if call == 2 else q, K, R, -1.0, return_index=True)
    for w in caught:
        print("call", call, w.category.__name__, w.message)
    print("index", call, index.tolist())
"""


def test_missing_cpu_extension_warns_once_at_first_use_not_at_import():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    result = subprocess.run([sys.executable, "-c", _WITHOUT_CPU_EXTENSION], env=env, capture_output=True,
                            text=True, check=True)  # fmt: skip
    lines = result.stdout.splitlines()
    assert "import 0" in lines, result.stdout
    warned = [line for line in lines if line.startswith("call")]
    assert len(warned) == 1, result.stdout
    assert warned[0].startswith("call 0 RuntimeWarning")
    assert "the cpu backend is unavailable" in warned[0] and "neuraldb_kernels._cpu" in warned[0]
    assert "falls back to the slower torch backend" in warned[0]
    assert all(f"index {call} [" in result.stdout for call in range(3))  # every call still answers


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
    if torch.float64 not in get_backend(backend.name).dtypes:
        pytest.skip(f"{backend.name} has no float64 path")
    torch.manual_seed(6)
    K = torch.randn(8, 5, dtype=torch.float64)
    q = torch.cat([K[[1, 4, 4]], torch.randn(2, 5, dtype=torch.float64)])
    R = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda r: run(q, K, r, 0.9, backend)[0], (R,))


COMPILE_DEVICES = pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
)


def _ffn_with_edits(x, W, K, R, gamma):
    hidden = torch.relu(x @ W)
    return hidden @ W.T + nk.gated_retrieve(hidden, K, R, gamma)


def _compile_case(float64_cosines):
    """An FFN case for torch.compile: x (2, 3, 16), W (16, 24), keys K (50, 24) of which K[3] is one
    hidden row, R (50, 16); also the float32 hidden rows and their float64 cosines with K (6, 50)."""
    torch.manual_seed(7)
    x, W = torch.randn(2, 3, 16), torch.randn(16, 24)
    K, R = torch.randn(50, 24), torch.randn(50, 16)
    K[3] = torch.relu(x[1, 2] @ W)
    hidden = torch.relu(x @ W)
    return x, W, K, R, hidden, float64_cosines(hidden, K)


def _assert_compiles_to(device, inputs, expected):
    """_ffn_with_edits compiled with fullgraph=True (eager and inductor backends) gives `expected`."""
    inputs = tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in inputs)
    for compiler in ("eager", "inductor"):
        compiled = torch.compile(_ffn_with_edits, fullgraph=True, backend=compiler)
        torch.testing.assert_close(compiled(*inputs).cpu(), expected)


@COMPILE_DEVICES
def test_torch_compile_fullgraph_has_no_graph_breaks(device, float64_cosines, cosine_tolerance):
    x, W, K, R, hidden, cos = _compile_case(float64_cosines)
    # expected: the FFN in float32 plus the residual rows the float64 reference selects
    top2 = cos.topk(2, dim=1).values
    tol = cosine_tolerance(24, torch.float32, torch.float32)
    assert ((top2[:, 0] - 0.7).abs() > tol).all() and (top2[:, 0] - top2[:, 1] > 2 * tol).all(), "ambiguous case"
    fired = top2[:, 0] > 0.7
    assert fired.any() and not fired.all()
    retrieved = torch.where(fired[:, None], R[cos.argmax(dim=1)], torch.zeros(16)).reshape(2, 3, 16)
    _assert_compiles_to(device, (x, W, K, R, 0.7), hidden @ W.T + retrieved)


def test_opcheck_on_the_custom_op(backend):
    """torch.library.opcheck: schema, fake (meta) kernel, autograd registration, AOT dispatch."""
    q, K, R = random_case((3, 4), 20, 12, 5, seed=12)
    K[2] = q[0, 1] * 2
    q, K = q.to(backend.device), K.to(backend.device)
    R = R.to(backend.device).requires_grad_(True)
    torch.library.opcheck(torch.ops.neuraldb.gated_retrieve.default, (q, K, R, 0.3, backend.name))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_backend_over_many_key_chunks(monkeypatch, assert_matches_reference, dtype):
    """The torch backend's chunk loop: ties across chunk borders, NaN/Inf keys, a chunk of only
    NaN keys, and winners in the first and last chunks, against the float64 reference."""
    monkeypatch.setattr(torch_backend, "_CHUNK_ELEMENTS", 64)
    n, m, d1 = 6, 30, 16
    chunk = 64 // max(n, d1)  # 4 keys per chunk: 8 chunks, the last one of 2 keys
    gen = torch.Generator().manual_seed(13)
    K = torch.randn(m, d1, generator=gen, dtype=torch.float64).to(dtype)
    q = torch.randn(n, d1, generator=gen, dtype=torch.float64).to(dtype)
    K[2 * chunk - 1] = K[2 * chunk] = q[0] * 3  # exact copies on both sides of a chunk border
    K[5 * chunk] = q[1]  # the first key of a chunk, copied again in the last chunk
    K[m - 1] = q[1]
    K[4 * chunk : 5 * chunk] = float("nan")  # a chunk with no finite key
    K[1, 3] = float("inf")  # q[2] would match key 1 but for its Inf
    q[2] = K[1].nan_to_num(posinf=0.0) * 2
    K[0] = q[3] * 0.5  # the winner in the first chunk
    K[m - 2] = q[4] * 7  # and in the last
    R = torch.randn(m, 3, generator=gen).to(dtype)
    out, index, score = nk.gated_retrieve(q, K, R, 0.5, backend="torch", return_index=True)
    assert_matches_reference(q, K, R, 0.5, out, index, score)
    assert index[[0, 1, 3, 4]].tolist() == [2 * chunk - 1, 5 * chunk, 0, m - 2]
    assert index[2].item() != 1 and torch.equal(out[0], R[2 * chunk - 1])


def test_custom_op_path_meets_the_contract_and_serves_autograd(backend, assert_matches_reference):
    # eager inference skips the custom op; the op itself (autograd, torch.compile) must meet the
    # same float64 reference, and autograd must go through it
    q, K, R = random_case((3, 4), 50, 24, 6, seed=11)
    K[7] = q[1, 2] * 3
    via_op = torch.ops.neuraldb.gated_retrieve(*(t.to(backend.device) for t in (q, K, R)), 0.3, backend.name)
    assert_matches_reference(q, K, R, 0.3, *(t.cpu() for t in via_op))
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


# ----------------------------------------------------------------------------- per-key thresholds


def thresholds_around_best(q, K, float64_cosines, margin):
    """Per-key thresholds (m,) float32 in [-1, 1] such that every even query row's reference best
    key has a threshold `margin` below that row's best cosine (it fires) and every odd row's best
    key one `margin` above (it stays closed); the other keys get seeded random thresholds. Rows
    sharing a best key keep the first row's choice. Returns (thresholds, reference best cosine
    and best index per row)."""
    cos = float64_cosines(q, K)
    best, best_index = cos.max(dim=1)
    gen = torch.Generator().manual_seed(K.shape[0])
    gamma = torch.rand(K.shape[0], generator=gen, dtype=torch.float64) * 2 - 1
    assigned = set()
    for row, (s, i) in enumerate(zip(best.tolist(), best_index.tolist())):
        if i not in assigned:
            gamma[i] = s - margin if row % 2 == 0 else s + margin
            assigned.add(i)
    return gamma.clamp(-1, 1).to(torch.float32), best, best_index


@pytest.mark.parametrize(
    "lead,m,d1,d2,dtype",
    [
        ((6,), 7, 67, 5, torch.float32),
        ((3, 5), 300, 33, 9, torch.float32),
        ((8,), 1003, 45, 11, torch.bfloat16),
        ((5,), 57, 37, 8, torch.float16),
        ((4,), 40, 19, 3, torch.float64),
    ],
)
def test_per_key_thresholds_match_float64_reference(
    backend, assert_matches_reference, float64_cosines, lead, m, d1, d2, dtype
):
    if dtype not in get_backend(backend.name).dtypes:
        pytest.skip(f"{backend.name} has no {dtype} path")
    q, K, R = random_case(lead, m, d1, d2, dtype, dtype, dtype, seed=m + d1)
    flat = q.reshape(-1, d1)
    for row in range(flat.shape[0]):  # a distinct planted best key per row
        K[(row * 13 + 1) % m] = (flat[row].float() * 0.5 + 0.2 * torch.randn(d1)).to(dtype)
    gamma, best, best_index = thresholds_around_best(q, K, float64_cosines, margin=0.01)
    out, index, score = run(q, K, R, gamma, backend)
    assert_matches_reference(q, K, R, gamma, out, index, score)
    expected = torch.where(best > gamma.double()[best_index], best_index, -1)  # the winner's own threshold
    assert torch.equal(index.reshape(-1), expected)
    assert (expected >= 0).any() and (expected == -1).any()


def test_per_key_gate_is_strict_at_the_winners_threshold(backend):
    # cos((4,0,0,0), (1,1,1,1)) = 1/2 and cos(2e1, 2e1) = 1: exact in every float format
    q = torch.tensor([[4.0, 0, 0, 0], [0, 2.0, 0, 0]])
    K = torch.tensor([[1.0, 1, 1, 1], [0, 2.0, 0, 0], [0, 0, 1.0, 0]])
    R = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        qq, KK = q.to(dtype), K.to(dtype)
        # row 0 sits exactly at key 0's threshold: closed; key 1's threshold is 1.0: closed
        _, index, score = run(qq, KK, R, torch.tensor([0.5, 1.0, -1.0]), backend)
        assert score.tolist() == [0.5, 1.0] and index.tolist() == [-1, -1]
        out, index, _ = run(qq, KK, R, torch.tensor([0.5 - 2**-20, 1.0 - 2**-20, 1.0]), backend)
        assert index.tolist() == [0, 1] and torch.equal(out, R[[0, 1]])
        # a low threshold on a key that does not win opens nothing
        _, index, _ = run(qq, KK, R, torch.tensor([0.9, 1.0, -1.0]), backend)
        assert index.tolist() == [-1, -1]


def test_exact_ties_pick_lowest_index_then_its_threshold_decides(backend, float64_cosines):
    torch.manual_seed(2)
    K, R = torch.randn(1200, 16), torch.randn(1200, 5)
    target = torch.randn(16)
    for row in (9, 600, 1199):  # the same key in three places, far apart (other splits and blocks)
        K[row] = target
    q = torch.stack([target + 0.6 * torch.randn(16), target * 2.5 + 1.5 * torch.randn(16)])
    best, best_index = float64_cosines(q, K).max(dim=1)
    assert best_index.tolist() == [9, 9] and (best > 0.6).all() and (best < 0.95).all(), "case changed"
    gamma = torch.full((1200,), -1.0)
    gamma[9] = 0.95  # the winner stays closed, its tied copies would fire
    out, index, score = run(q, K, R, gamma, backend)
    assert index.tolist() == [-1, -1] and not out.any() and (score > 0.6).all()
    gamma[9], gamma[600], gamma[1199] = -1.0, 0.95, 0.95
    out, index, _ = run(q, K, R, gamma, backend)
    assert index.tolist() == [9, 9] and torch.equal(out, R[[9, 9]])


def test_per_key_thresholds_with_special_rows(backend):
    torch.manual_seed(4)
    K, R = torch.randn(40, 12), torch.randn(40, 3)
    q = K[[5, 6, 7]].clone()
    q[0, 3] = float("nan")
    q[1] = 0.0  # cosine 0 with every key: key 0 wins
    gamma = torch.full((40,), 0.5)
    gamma[0] = -0.25
    out, index, score = run(q, K, R, gamma, backend)
    assert index.tolist() == [-1, 0, 7] and torch.isnan(score[0]) and not out[0].any()
    assert torch.equal(out[1:], R[[0, 7]])
    K[7, 2] = float("inf")  # q[2]'s key no longer wins; every finite cosine is far below 0.5
    gamma[7] = -1.0
    _, index, _ = run(q[2:], K, R, gamma, backend)
    assert index.item() != 7
    _, index, score = run(q[2:], torch.full((3, 12), float("nan")), R[:3], torch.full((3,), -1.0), backend)
    assert index.tolist() == [-1] and score.tolist() == [float("-inf")]


def test_per_key_thresholds_with_an_empty_database(backend):
    q = torch.randn(2, 10)
    out, index, score = run(q, torch.empty(0, 10), torch.empty(0, 4), torch.empty(0), backend)
    assert out.shape == (2, 4) and not out.any() and (index == -1).all() and (score == float("-inf")).all()


def test_uniform_per_key_thresholds_equal_the_scalar_gamma(backend):
    q, K, R = random_case((9,), 300, 40, 6, seed=21)
    K[[3, 150, 299]] = q[[0, 4, 8]] * 2
    scalar = run(q, K, R, 0.25, backend)
    per_key = run(q, K, R, torch.full((300,), 0.25), backend)
    strided = run(q, K, R, torch.full((600,), 0.25)[::2], backend)  # a non-contiguous view
    for a, b, c in zip(scalar, per_key, strided):
        assert torch.equal(a, b) and torch.equal(a, c)


def _bad_gamma(K):
    m = K.shape[0]
    return [
        (torch.full((m + 1,), 0.5), r"shape \(m,\) = \(5,\).*K \(shape \(5, 8\)\).*got shape \(6,\)"),
        (torch.full((m, 1), 0.5), r"shape \(m,\) = \(5,\).*got shape \(5, 1\)"),
        (torch.full((), 0.5), r"shape \(m,\) = \(5,\).*got shape \(\)"),
        (torch.full((m,), 0.5, device="meta"), "per-key gamma is on meta, K is on cpu"),
        (torch.zeros(m, dtype=torch.int64), "float32 tensor, got dtype torch.int64"),
        (torch.zeros(m, dtype=torch.float64), "float32 tensor, got dtype torch.float64"),
        (torch.tensor([0.5, 0.1, float("nan"), 0.0, 0.2]), r"in \[-1, 1\]; gamma\[2\] = nan"),
        (torch.tensor([0.5, 0.1, 0.0, 1.5, 0.2]), r"in \[-1, 1\]; gamma\[3\] = 1.5"),
        (torch.tensor([-1.25, 0.1, 0.0, 0.5, 0.2]), r"in \[-1, 1\]; gamma\[0\] = -1.25"),
        (torch.tensor([0.5, float("-inf"), 0.0, 0.5, 0.2]), r"in \[-1, 1\]; gamma\[1\] = -inf"),
    ]


@pytest.mark.parametrize("case", range(10))
def test_bad_per_key_gamma_raises_clear_errors(case):
    q, K, R = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5, 2)
    gamma, match = _bad_gamma(K)[case]
    with pytest.raises(ValueError, match=match):
        nk.gated_retrieve(q, K, R, gamma, backend="torch")
    with pytest.raises(ValueError, match=match):  # the custom op (autograd) path checks the same
        nk.gated_retrieve(q, K, R.requires_grad_(), gamma, backend="torch")


def test_auto_answers_per_key_calls_on_cpu_tensors(assert_matches_reference):
    q, K, R = random_case((4,), 30, 16, 3, seed=5)
    K[2] = q[0]
    gamma = torch.linspace(-0.5, 0.9, 30)
    out, index, score = nk.gated_retrieve(q, K, R, gamma, return_index=True)
    assert_matches_reference(q, K, R, gamma, out, index, score)
    assert index[0].item() == 2


def test_per_key_gradcheck_on_residuals_in_float64(backend, float64_cosines):
    if torch.float64 not in get_backend(backend.name).dtypes:
        pytest.skip(f"{backend.name} has no float64 path")
    torch.manual_seed(6)
    K = torch.randn(8, 5, dtype=torch.float64)
    q = torch.cat([K[[1, 4, 6]] + 0.3 * torch.randn(3, 5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)])
    best, best_index = float64_cosines(q, K).max(dim=1)
    gamma = torch.full((8,), 0.5)
    gamma[best_index[1]] = 1.0  # row 1's winner never fires; rows 0 and 2 fire
    expected = torch.where(best > gamma.double()[best_index], best_index, -1)
    assert expected[0] >= 0 and expected[1] == -1 and expected[2] >= 0
    R = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    assert torch.equal(run(q, K, R, gamma, backend)[1], expected)
    assert torch.autograd.gradcheck(lambda r: run(q, K, r, gamma, backend)[0], (R,))


def test_per_key_gradient_flows_to_selected_residual_rows_only(backend, float64_cosines):
    torch.manual_seed(5)
    K = torch.randn(10, 6)
    R = torch.randn(10, 3, requires_grad=True)
    q = torch.stack([K[2], K[2] * 2, K[7], K[4] * 3 + 2.0 * torch.randn(6)]).requires_grad_(True)
    best, best_index = float64_cosines(q, K)[3].max(dim=0)
    assert best_index == 4 and 0.6 < best < 0.95, "case changed"
    gamma = torch.full((10,), 0.5)
    gamma[4] = 0.99  # row 3 would fire under the other keys' threshold; its winner's closes it
    out, index, _ = run(q, K, R, gamma, backend)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    expected = torch.zeros(10, 3)
    expected[2] = grad_out[0] + grad_out[1]
    expected[7] = grad_out[2]
    assert index.tolist() == [2, 2, 7, -1]
    assert torch.allclose(R.grad, expected)
    assert q.grad is None


@COMPILE_DEVICES
def test_torch_compile_fullgraph_with_per_key_thresholds(device, float64_cosines, cosine_tolerance):
    x, W, K, R, hidden, cos = _compile_case(float64_cosines)
    top2, top_index = cos.topk(2, dim=1)
    gamma = torch.full((50,), 0.7)
    closed_under_scalar = torch.nonzero(top2[:, 0] < 0.7).flatten()
    opened = top_index[closed_under_scalar[0], 0]
    gamma[opened] = top2[closed_under_scalar[0], 0] - 0.05  # per-key: this row's winner now fires
    thresholds = gamma.double()[top_index[:, 0]]
    tol = cosine_tolerance(24, torch.float32, torch.float32)
    assert ((top2[:, 0] - thresholds).abs() > tol).all() and (top2[:, 0] - top2[:, 1] > 2 * tol).all(), "ambiguous"
    fired = top2[:, 0] > thresholds
    assert fired.any() and not fired.all() and not torch.equal(fired, top2[:, 0] > 0.7)
    retrieved = torch.where(fired[:, None], R[top_index[:, 0]], torch.zeros(16)).reshape(2, 3, 16)
    _assert_compiles_to(device, (x, W, K, R, gamma), hidden @ W.T + retrieved)


def test_opcheck_on_the_custom_op_with_per_key_thresholds(backend):
    q, K, R = random_case((3, 4), 20, 12, 5, seed=12)
    K[2] = q[0, 1] * 2
    gamma = torch.linspace(-0.2, 0.8, 20)
    q, K, gamma = q.to(backend.device), K.to(backend.device), gamma.to(backend.device)
    R = R.to(backend.device).requires_grad_(True)
    torch.library.opcheck(torch.ops.neuraldb.gated_retrieve.default, (q, K, R, 0.0, backend.name, gamma))


def test_torch_backend_per_key_thresholds_over_many_key_chunks(monkeypatch, assert_matches_reference):
    """The winner's threshold is read after the chunk loop: ties across a chunk border keep the
    first chunk's key and its threshold."""
    monkeypatch.setattr(torch_backend, "_CHUNK_ELEMENTS", 64)
    gen = torch.Generator().manual_seed(14)
    K, R = torch.randn(30, 16, generator=gen), torch.randn(30, 3, generator=gen)
    q = torch.randn(2, 16, generator=gen)
    K[3] = K[4] = q[0]  # 4 keys per chunk: the border between chunks 0 and 1
    K[29] = q[1] * 2
    gamma = torch.full((30,), -1.0)
    gamma[3] = 1.0
    out, index, score = nk.gated_retrieve(q, K, R, gamma, backend="torch", return_index=True)
    assert_matches_reference(q, K, R, gamma, out, index, score)
    assert index.tolist() == [-1, 29]
