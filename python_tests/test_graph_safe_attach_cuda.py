"""attach(..., graph_safe=True) on a CUDA GPU (skipped without one): a hand-captured CUDA graph of
one model step and torch.compile with CUDA graphs replay the eager logits bit for bit
(mode="reduce-overhead", whose Inductor kernels round differently, to float32 tolerance), follow
the database after sync() with no re-capture, and re-capture after the buffers grow; the hook
makes no synchronising CUDA call.

References: the eager graph-safe model, itself checked against `attach` (test_graph_safe_attach.py
checks both against float64 on CPU), and the bare model where no gate fires.
"""

import pytest
import torch
from tiny_models import HIDDEN, tiny_model
from torch._dynamo.testing import CompileCounterWithBackend

from neuraldb_kernels import NeuralDB, attach, available_backends

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

LAYER = 1
GAMMA = 0.95
CUDA_BACKENDS = [name for name, status in available_backends().items() if "cuda" in status.usable_on]
PROMPT = "Paris is the capital of France, and Rome is the capital of"


@pytest.fixture
def setup(tokenizer):
    """(model on cuda, input_ids (1, T) on cuda, bare logits, down-projection inputs at LAYER)."""
    model = tiny_model("llama", tokenizer).cuda()
    input_ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"].cuda()
    seen = {}
    handle = model.model.layers[LAYER].mlp.down_proj.register_forward_hook(
        lambda module, args, output: seen.update(x=args[0].detach().clone()))
    with torch.no_grad():
        bare = model(input_ids=input_ids, use_cache=False).logits
    handle.remove()
    return model, input_ids, bare, seen["x"]


def new_database(x, rows=(3,), key_gammas=None):
    """Facts keyed exactly on the down-projection input at tokens `rows` (cosine 1: they fire)."""
    db = NeuralDB(d1=x.shape[-1], d2=HIDDEN, layer=LAYER, gamma=GAMMA)
    add(db, x, rows, key_gammas)
    return db


def add(db, x, rows, key_gammas=None):
    generator = torch.Generator().manual_seed(len(db))
    db.add(x[0, list(rows)].cpu(), torch.randn(len(rows), HIDDEN, generator=generator) * 8,
           ids=[f"t{row}" for row in rows], key_gammas=key_gammas)


def step(model, input_ids):
    """One forward step: logits of `input_ids` without a KV cache (fixed shapes, no host reads)."""
    with torch.no_grad():
        return model(input_ids=input_ids, use_cache=False).logits


def capture(model, input_ids):
    """(graph, its static logits): one step captured after warm-up runs on a side stream."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step(model, input_ids)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = step(model, input_ids)
    return graph, logits


def replayed(graph, logits):
    graph.replay()
    torch.cuda.synchronize()
    return logits.clone()


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_hand_captured_step_replays_eager_and_follows_syncs(setup, backend):
    model, input_ids, bare, x = setup
    db = new_database(x, rows=(3,), key_gammas=[torch.tensor([0.9])])
    with attach(model, db, backend=backend):
        reference = step(model, input_ids)  # the eager hook of attach
    assert not torch.equal(reference, bare), "test premise: the fact fires"
    with attach(model, db, backend=backend, graph_safe=True, capacity=4) as handle:
        assert torch.equal(step(model, input_ids), reference)
        graph, logits = capture(model, input_ids)
        assert torch.equal(replayed(graph, logits), reference)

        add(db, x, rows=(6, 8))
        assert handle.sync().reallocated is False
        eager = step(model, input_ids)
        assert not torch.equal(eager, reference)
        assert torch.equal(replayed(graph, logits), eager), "a sync in place: the captured graph follows"
        db.delete(["t3", "t6", "t8"])
        handle.sync()
        assert torch.equal(replayed(graph, logits), bare), "all padding: the bare model"

        add(db, x, rows=(1, 2, 4, 5, 7))  # 5 rows > capacity 4
        report = handle.sync()
        assert report.reallocated and report.capacity == 8
        graph, logits = capture(model, input_ids)  # new buffers: re-capture
        assert torch.equal(replayed(graph, logits), step(model, input_ids))


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_the_hook_makes_no_synchronising_cuda_call(setup, backend):
    model, input_ids, _, x = setup
    db = new_database(x, rows=(3,), key_gammas=[torch.tensor([0.9])])
    module = model.model.layers[LAYER].mlp.down_proj
    with torch.no_grad():
        with attach(model, db, backend=backend):
            module(x)  # warm-up (kernel compilation)
            torch.cuda.set_sync_debug_mode("error")
            try:  # premise: the eager hook checks the thresholds, a synchronisation
                with pytest.raises(RuntimeError, match="synchroniz"):
                    module(x)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        with attach(model, db, backend=backend, graph_safe=True):
            module(x)
            torch.cuda.set_sync_debug_mode("error")
            try:
                module(x)
            finally:
                torch.cuda.set_sync_debug_mode("default")


def compiled_steps(compiled, input_ids, times=3):
    """Logits of `times` calls (cudagraph trees warm up, record, then replay), each cloned."""
    results = []
    for _ in range(times):
        torch.compiler.cudagraph_mark_step_begin()
        results.append(step(compiled, input_ids).clone())
    return results


@pytest.mark.parametrize("mode", ["cudagraphs backend", "reduce-overhead"])
def test_torch_compile_with_cuda_graphs_equals_eager_and_follows_syncs(setup, mode):
    model, input_ids, bare, x = setup
    db = new_database(x, rows=(3,), key_gammas=[torch.tensor([0.9])])
    torch._dynamo.reset()
    with attach(model, db, graph_safe=True, capacity=4) as handle:
        if mode == "reduce-overhead":
            compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)

            def same(a, b):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
                return True
        else:
            counter = CompileCounterWithBackend("cudagraphs")
            compiled = torch.compile(model, backend=counter, fullgraph=True)
            same = torch.equal
        eager = step(model, input_ids)
        assert not torch.equal(eager, bare), "test premise: the fact fires"
        assert all(same(logits, eager) for logits in compiled_steps(compiled, input_ids))

        add(db, x, rows=(6, 8))
        db.gamma = 0.9
        assert handle.sync().reallocated is False
        eager = step(model, input_ids)
        assert all(same(logits, eager) for logits in compiled_steps(compiled, input_ids))
        db.delete(["t3", "t6", "t8"])
        handle.sync()
        assert all(same(logits, bare) for logits in compiled_steps(compiled, input_ids))
        if mode != "reduce-overhead":
            assert counter.frame_count == 1, "syncs in place: no recompilation"

        add(db, x, rows=(1, 2, 4, 5, 7))
        assert handle.sync().reallocated
        eager = step(model, input_ids)
        assert all(same(logits, eager) for logits in compiled_steps(compiled, input_ids))
        if mode != "reduce-overhead":
            assert counter.frame_count == 2, "new buffers: one recompilation"
