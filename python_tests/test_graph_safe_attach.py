"""attach(..., graph_safe=True) on CPU: torch.compile(fullgraph=True) traces the attached model with
no graph break, follows the database after sync() without recompiling while the buffers keep their
shapes, and the hook never reads a tensor value on the host.

References are independent of the code under test: the firing tokens come from float64 cosines of
the bare model's activations, the expected logits from the bare model with the residuals added by
a hook of the test's own (test_integration's helpers), and the op over padded buffers is compared
with the same op over the live rows alone and with the float64 reference.
"""

import sys

import pytest
import torch
from test_integration import GAMMA, PLANTED, PROMPTS, batch, capture, cosines, down_proj, plant, tilted, with_addition
from tiny_models import ARCHS, HIDDEN, tiny_model
from torch._dynamo.testing import CompileCounterWithBackend
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from neuraldb_kernels import NeuralDB, attach, available_backends, gated_retrieve
from neuraldb_kernels.integration import GraphSafeAttachment
from neuraldb_kernels.integration.graph_safe import grown_capacity
from neuraldb_kernels.ops import get_backend
from neuraldb_kernels.ops.contract import check_key_gamma_values
from neuraldb_kernels.ops.gated_retrieve import gated_retrieve_prechecked

LAYER = 1
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BACKEND_CASES = [(name, device) for device in DEVICES for name, status in available_backends().items()
                 if device in status.usable_on]


class HostReadError(AssertionError):
    pass


class _NoScalarReads(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default):
            raise HostReadError(f"{func} reads a tensor value on the host")
        return func(*args, **(kwargs or {}))


class _NoHostCopies(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.numpy, torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__bool__):
            raise HostReadError(f"{func.__name__} reads tensor values on the host")
        return func(*args, **(kwargs or {}))


def no_host_reads():
    """A guard failing on every way Python code reads a tensor value: .item(), bool(), .tolist(),
    .numpy() (a GPU synchronisation each, on a GPU)."""
    import contextlib

    stack = contextlib.ExitStack()
    stack.enter_context(_NoScalarReads())
    stack.enter_context(_NoHostCopies())
    return stack


@pytest.fixture(scope="module")
def planted(tokenizer):
    """A 2-layer tiny Llama, its inputs, bare logits and down-projection inputs at LAYER, and three
    facts near tokens of the prompts: "strict" at cosine 0.97 with threshold 0.98, "loose" at 0.90
    with threshold 0.85, "plain" at 0.96 with the database's gamma (0.95)."""
    model = tiny_model("llama", tokenizer)
    inputs = batch(tokenizer, PROMPTS)
    inputs["use_cache"] = False
    module = model.model.layers[LAYER].mlp.down_proj
    bare, x, _ = capture(model, module, **inputs)
    at = {"strict": (1, 3), "loose": (0, 2), "plain": (1, 1)}
    keys = {"strict": tilted(x[1, 3], 0.97, seed=1), "loose": tilted(x[0, 2], 0.90, seed=2),
            "plain": tilted(x[1, 1], 0.96, seed=3)}
    own = {"strict": 0.98, "loose": 0.85, "plain": None}
    generator = torch.Generator().manual_seed(4)
    residuals = {name: torch.randn(HIDDEN, generator=generator) * 4 for name in keys}
    return dict(model=model, inputs=inputs, bare=bare, x=x, module=module, at=at, keys=keys, own=own,
                residuals=residuals, mask=inputs["attention_mask"].bool())


def database(p, names=("strict", "loose", "plain")):
    db = NeuralDB(d1=p["x"].shape[-1], d2=HIDDEN, layer=LAYER, gamma=GAMMA)
    db.add(torch.stack([p["keys"][n] for n in names]), torch.stack([p["residuals"][n] for n in names]), list(names),
           key_gammas=[None if p["own"][n] is None else torch.tensor([p["own"][n]]) for n in names])
    return db


def expected_logits(p, db, attachment, gamma=None):
    """The bare model (`attachment` paused) with the residual of each token's best fact added
    where its float64 cosine is above that fact's threshold (gamma: one threshold for all)."""
    names = [n for n in p["keys"] if n in db]
    scores = torch.stack([cosines(p["x"], p["keys"][n]) for n in names], dim=-1)
    best, index = scores.max(dim=-1)

    def threshold(name):
        if gamma is not None:
            return gamma
        return db.gamma if p["own"][name] is None else p["own"][name]

    additions = {(b, t): p["residuals"][names[index[b, t]]] for b, t in torch.ones_like(best).nonzero().tolist()
                 if best[b, t] > threshold(names[index[b, t]])}
    with attachment.paused():
        return with_addition(p["model"], p["module"], additions, **p["inputs"])


def run(model, p):
    with torch.no_grad():
        return model(**p["inputs"]).logits


def test_fullgraph_compile_equals_eager_and_follows_every_sync(planted):
    p = planted
    db = database(p)
    fired_at = {p["at"]["loose"], p["at"]["plain"]}
    assert {(b, t) for b, t in fired_at if p["mask"][b, t]} == fired_at, "test premise: real tokens"
    with attach(p["model"], db) as eager_handle:
        eager = run(p["model"], p)
    with attach(p["model"], db, graph_safe=True, capacity=4) as handle:
        counter = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(p["model"], fullgraph=True, backend=counter)  # raises on any graph break
        logits = run(compiled, p)
        assert torch.equal(logits, expected_logits(p, db, handle)) and not torch.equal(logits, p["bare"])
        assert torch.equal(logits, eager)
        assert torch.equal(run(p["model"], p), eager)  # the eager graph-safe hook too
        assert counter.frame_count == 1

        db.gamma = 0.99  # moves "plain" only; not seen before sync
        assert handle.stale and torch.equal(run(compiled, p), eager)
        report = handle.sync()
        assert (report.copied, report.reallocated, report.rows, report.capacity) == (True, False, 3, 4)
        assert not handle.stale
        after_gamma = run(compiled, p)
        assert torch.equal(after_gamma, expected_logits(p, db, handle)) and not torch.equal(after_gamma, eager)

        db.delete("loose")
        handle.sync()
        assert torch.equal(run(compiled, p), expected_logits(p, db, handle))
        db.delete(["strict", "plain"])  # every row padding now
        handle.sync()
        assert torch.equal(run(compiled, p), p["bare"])
        assert counter.frame_count == 1, "same shapes: no recompilation"

        db.add(torch.stack(list(p["keys"].values())), torch.stack(list(p["residuals"].values())), list(p["keys"]),
               key_gammas=[None if o is None else torch.tensor([o]) for o in p["own"].values()])
        db.add(torch.randn(3, p["x"].shape[-1]), torch.randn(3, HIDDEN), ["r1", "r2", "r3"])  # 6 rows > 4
        report = handle.sync()
        assert (report.reallocated, report.rows, report.capacity) == (True, 6, 8)
        db.gamma = GAMMA
        assert handle.sync().reallocated is False
        assert torch.equal(run(compiled, p), expected_logits(p, db, handle))
        assert counter.frame_count == 2, "new buffers: one recompilation"
        assert handle.sync().copied is False  # nothing changed: nothing copied


def test_gamma_given_to_attach_is_every_keys_threshold(planted):
    p = planted
    db = database(p)
    with attach(p["model"], db, gamma=GAMMA, graph_safe=True) as handle:
        compiled = torch.compile(p["model"], fullgraph=True, backend="aot_eager")
        overridden = expected_logits(p, db, handle, gamma=GAMMA)
        assert torch.equal(run(compiled, p), overridden)
        db.gamma = 0.5  # the attach-time gamma still rules
        handle.sync()
        assert torch.equal(run(compiled, p), overridden)


@pytest.mark.parametrize("kind", sorted(ARCHS))
def test_every_architecture_adds_the_planted_residual_at_its_token(kind, tokenizer):
    model = tiny_model(kind, tokenizer)
    db, inputs, bare, _, residual = plant(model, kind, 1, tokenizer)
    expected = with_addition(model, down_proj(model, kind, 1), {PLANTED: residual}, **inputs)
    with attach(model, db, graph_safe=True), torch.no_grad():
        assert torch.equal(model(**inputs).logits, expected)
        db.delete("planted")
        assert torch.equal(model(**inputs).logits, expected), "not synced: the buffers keep the fact"


def test_generate_with_cache_equals_attach(planted, tokenizer):
    """Cached decoding steps (one token each) through the graph-safe hook give attach's tokens and
    logits; a fact keyed on the prompt's last token changes them (premise: LAYER is the last layer,
    so only a firing at the last token reaches the next-token logits)."""
    p = planted
    db = database(p)
    last = int(p["mask"][1].sum()) - 1
    db.add(p["x"][1, last], torch.randn(HIDDEN, generator=torch.Generator().manual_seed(5)) * 8, ids="last")
    prompt = tokenizer(PROMPTS[1], return_tensors="pt")["input_ids"]

    def generate():
        with torch.no_grad():
            out = p["model"].generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5,
                                      do_sample=False, use_cache=True, return_dict_in_generate=True,
                                      output_logits=True)
        return out.sequences, torch.stack(out.logits, 1)

    bare = generate()
    with attach(p["model"], db):
        expected = generate()
    with attach(p["model"], db, graph_safe=True):
        sequences, logits = generate()
    assert not torch.equal(expected[1], bare[1]), "test premise: a fact fires"
    assert torch.equal(sequences, expected[0]) and torch.equal(logits, expected[1])


def test_all_padding_buffers_leave_the_model_bit_identical(planted):
    p = planted
    db = NeuralDB(d1=p["x"].shape[-1], d2=HIDDEN, layer=LAYER, gamma=-1.0)  # any real key would fire
    with attach(p["model"], db, graph_safe=True, capacity=8) as handle:
        assert handle.synced.rows == 0 and handle.buffers.capacity == 8
        assert torch.equal(run(p["model"], p), p["bare"])
        out, index, score = gated_retrieve(p["x"], handle.buffers.keys, handle.buffers.residuals,
                                           handle.buffers.thresholds, return_index=True)
        assert torch.equal(index, torch.full_like(index, -1)) and not out.any()
        assert torch.equal(score, torch.full_like(score, float("-inf")))


@pytest.mark.parametrize("backend, device", BACKEND_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padding_rows_never_win_on_any_backend(backend, device, dtype, float64_cosines):
    """Rows of NaN keys after the live rows change nothing (index, score, out as over the live rows
    alone; float64 for the argmax); with only padding rows the result is that of m = 0."""
    if dtype not in get_backend(backend).dtypes:
        pytest.skip(f"{backend} has no {dtype}")
    generator = torch.Generator().manual_seed(7)
    n, m, pad, d1, d2 = 9, 5, 11, 40, 6
    q = torch.randn(n, d1, generator=generator)
    q[0] = 0  # a zero query: cosine 0 with every live key
    keys = torch.randn(m, d1, generator=generator)
    q[1] = keys[2] * 3
    residuals = torch.randn(m + pad, d2, generator=generator)
    thresholds = torch.cat([torch.full((m,), -0.5), torch.full((pad,), 1.0)])
    padded_keys = torch.cat([keys, torch.full((pad, d1), float("nan"))])
    as_tensors = dict(device=device, dtype=dtype)
    args = (q.to(**as_tensors), padded_keys.to(**as_tensors), residuals.to(**as_tensors), thresholds.to(device))
    out, index, score = gated_retrieve(*args, backend=backend, return_index=True)
    live = gated_retrieve(q.to(**as_tensors), keys.to(**as_tensors), residuals[:m].to(**as_tensors),
                          thresholds[:m].to(device), backend=backend, return_index=True)
    assert torch.equal(index, live[1]) and torch.equal(out, live[0])
    torch.testing.assert_close(score, live[2], rtol=0, atol=1e-6)  # the same cosines, other matmul shapes
    reference = float64_cosines(q.to(dtype).double(), keys.to(dtype).double()).argmax(dim=1)
    assert index[1:].cpu().tolist() == reference[1:].tolist()  # every cosine > -0.5 here
    assert index[0] == 0 and score[0] == 0  # the zero query ties at 0: lowest live row

    out, index, score = gated_retrieve(q.to(**as_tensors), torch.full((pad, d1), float("nan"), **as_tensors),
                                       residuals[:pad].to(**as_tensors), torch.full((pad,), -1.0, device=device),
                                       backend=backend, return_index=True)
    assert torch.equal(index.cpu(), torch.full((n,), -1)) and not out.any()
    assert torch.equal(score.cpu(), torch.full((n,), float("-inf")))


def test_the_hook_never_reads_a_tensor_value_on_the_host(planted, monkeypatch):
    p = planted
    db = database(p)
    with attach(p["model"], db), torch.no_grad():  # premise: the guard catches the eager hook's checks
        with pytest.raises(HostReadError), no_host_reads():
            p["module"](p["x"])
        expected = p["module"](p["x"])
    checks = []
    monkeypatch.setattr("neuraldb_kernels.integration.graph_safe.check_key_gamma_values",
                        lambda gammas: checks.append(1) or check_key_gamma_values(gammas))
    with attach(p["model"], db, graph_safe=True), torch.no_grad():
        assert len(checks) == 1  # the thresholds are checked at the sync attach makes
        with no_host_reads():
            for _ in range(3):
                edited = p["module"](p["x"])
        assert len(checks) == 1, "no value check per step"
    assert torch.equal(edited, expected)


def test_sync_refuses_bad_thresholds_and_keeps_the_buffers(planted, monkeypatch):
    p = planted
    db = database(p)
    with attach(p["model"], db, graph_safe=True) as handle:
        before = [t.clone() for t in (handle.buffers.keys, handle.buffers.thresholds)]
        real_snapshot = db.snapshot

        def corrupted(device=None, dtype=None):
            snapshot = real_snapshot(device, dtype)
            gammas = snapshot.gammas.clone()
            gammas[1] = 1.5
            return type(snapshot)(snapshot.keys, snapshot.residuals, gammas, snapshot.gamma, True, snapshot.version,
                                  snapshot._ids)

        db.delete("plain")
        monkeypatch.setattr(db, "snapshot", corrupted)
        with pytest.raises(ValueError, match=r"gamma\[1\] = 1.5"):
            handle.sync()
        assert handle.stale
        assert torch.equal(handle.buffers.thresholds, before[1])
        assert torch.equal(handle.buffers.keys.nan_to_num(), before[0].nan_to_num())


def test_a_moved_model_needs_a_sync(planted, tokenizer):
    model = tiny_model("llama", tokenizer)
    p = planted
    db = database(p)
    with attach(model, db, graph_safe=True) as handle:
        model.to(torch.float64)
        with pytest.raises(RuntimeError, match="call sync"), torch.no_grad():
            model(**p["inputs"])
        report = handle.sync()
        assert report.reallocated and handle.buffers.residuals.dtype == torch.float64
        with torch.no_grad():
            model(**p["inputs"])


def test_errors(planted):
    p = planted
    db = database(p)
    with pytest.raises(ValueError, match="key_format"):
        attach(p["model"], db, graph_safe=True, key_format="int8")
    with pytest.raises(ValueError, match="graph_safe=True only"):
        attach(p["model"], db, capacity=8)
    for capacity in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="capacity must be a positive int"):
            attach(p["model"], db, graph_safe=True, capacity=capacity)
        assert not p["module"]._forward_hooks, "a failed attach leaves no hook"
    handle = attach(p["model"], db, graph_safe=True)
    assert isinstance(handle, GraphSafeAttachment)
    assert repr(handle) == ("GraphSafeAttachment(attached, layer=1, module=Linear, synced=3 rows of version 1, "
                            "stale=False, capacity=4, backend='auto')")
    with pytest.raises(RuntimeError, match="does not record firings"):
        handle.fired()
    handle.detach()
    assert handle.buffers is None and not p["module"]._forward_hooks
    with pytest.raises(RuntimeError, match="detached"):
        handle.sync()


def test_capacity_doubles_until_the_rows_fit():
    assert [grown_capacity(4, rows) for rows in (0, 4, 5, 8, 9, 33)] == [4, 4, 8, 8, 16, 64]
    assert grown_capacity(0, 0) == 1 and grown_capacity(3, 7) == 12


@pytest.mark.parametrize("through_custom_op", [False, True])
def test_prechecked_thresholds_are_not_checked_per_call(through_custom_op, monkeypatch):
    """gated_retrieve checks the per-key values at every call, reading them on the host; the
    prechecked call does not, eagerly or through the custom op (autograd here; torch.compile takes
    the same path), and gives the same result."""
    checks = []
    op_module = sys.modules["neuraldb_kernels.ops.gated_retrieve"]
    monkeypatch.setattr(op_module, "check_key_gamma_values", lambda gammas: checks.append(1) or check_key_gamma_values(gammas))
    generator = torch.Generator().manual_seed(3)
    q, K = torch.randn(4, 16, generator=generator), torch.randn(6, 16, generator=generator)
    R = torch.randn(6, 5, generator=generator).requires_grad_(through_custom_op)
    K[1] = q[2]
    thresholds = torch.full((6,), 0.5)
    expected = gated_retrieve(q, K, R, thresholds, backend="torch", return_index=True)
    assert len(checks) == 1, "premise: the public op checks the values"
    if through_custom_op:
        out, index, score = gated_retrieve_prechecked(q, K, R, thresholds, backend="torch")
    else:
        with pytest.raises(HostReadError), no_host_reads():  # premise: the guard sees the check
            gated_retrieve(q, K, R, thresholds, backend="torch")
        with no_host_reads():
            out, index, score = gated_retrieve_prechecked(q, K, R, thresholds, backend="torch")
    assert len(checks) == 1 + (not through_custom_op)
    assert index.tolist() == expected[1].tolist() and index[2] == 1
    assert torch.equal(out, expected[0]) and torch.equal(score, expected[2])
    assert out.requires_grad == through_custom_op


def test_prechecked_takes_per_key_thresholds_only():
    q, K, R = torch.randn(2, 8), torch.randn(3, 8), torch.randn(3, 4)
    with pytest.raises(TypeError, match=r"key_gamma must be a \(m,\) float32 tensor"):
        gated_retrieve_prechecked(q, K, R, 0.5)
    with pytest.raises(ValueError, match="per-key gamma must have shape"):
        gated_retrieve_prechecked(q, K, R, torch.full((2,), 0.5))
