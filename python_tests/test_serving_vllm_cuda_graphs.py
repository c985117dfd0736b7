"""The served retrieval under vLLM's CUDA graphs, checked on CPU: the model adds its op to vLLM's
splitting ops for piecewise graphs and refuses full ones, and vLLM's own graph splitter cuts a
traced layer at the op into captured piece / eager op / captured piece, the op adding in place to
the buffer the next piece reads, so the split graph follows live database writes at every call.

Needs vLLM (the `vllm` extra, in an environment of its own); skipped without it. The reference is
float64 cosines and the gate rule computed here.
"""

import pytest
import torch

pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e \".[vllm]\" in its own environment)")

from vllm.compilation.backends import split_graph  # noqa: E402
from vllm.config import CompilationConfig, CompilationMode  # noqa: E402

from neuraldb_kernels.serving.model import keep_retrieval_eager  # noqa: E402
from neuraldb_kernels.serving.retrieval import SPLITTING_OP, LiveRetrieval  # noqa: E402
from neuraldb_kernels.store import NeuralDB  # noqa: E402

D1, D2, GAMMA = 16, 8, 0.8


def finalized(cudagraph_mode: str) -> CompilationConfig:
    """vLLM's compilation config for `cudagraph_mode` with its default splitting ops, as VllmConfig
    finalizes it before the model is built."""
    config = CompilationConfig(mode=CompilationMode.VLLM_COMPILE, cudagraph_mode=cudagraph_mode)
    config.set_splitting_ops_for_v1(all2all_backend="allgather_reducescatter")
    return config


def test_piecewise_graphs_get_the_op_as_a_splitting_op():
    config = finalized("PIECEWISE")
    defaults = list(config.splitting_ops)
    assert "vllm::unified_attention_with_output" in defaults and SPLITTING_OP not in defaults
    keep_retrieval_eager(config)
    keep_retrieval_eager(config)  # a second model: no duplicate
    assert config.splitting_ops == defaults + [SPLITTING_OP]


def test_no_cuda_graphs_leave_the_splitting_ops_alone():
    config = finalized("NONE")
    defaults = list(config.splitting_ops)
    keep_retrieval_eager(config)
    assert config.splitting_ops == defaults


@pytest.mark.parametrize("mode", ["FULL", "FULL_DECODE_ONLY", "FULL_AND_PIECEWISE"])
def test_full_cuda_graphs_are_refused(mode):
    with pytest.raises(ValueError, match=f"full CUDA graphs \\(cudagraph_mode {mode}\\).*PIECEWISE"):
        keep_retrieval_eager(finalized(mode))


def test_breakable_cuda_graphs_are_refused(monkeypatch):
    monkeypatch.setattr("neuraldb_kernels.serving.model.is_breakable_cudagraph_enabled", lambda: True)
    with pytest.raises(ValueError, match="VLLM_USE_BREAKABLE_CUDAGRAPH"):
        keep_retrieval_eager(finalized("PIECEWISE"))


def test_vllm_splits_a_traced_layer_at_the_op_and_the_pieces_follow_live_writes(tmp_path):
    keys, residuals = torch.randn(2, D1), torch.randn(2, D2)
    with NeuralDB(tmp_path / "neuraldb.sqlite", d1=D1, d2=D2, layer=0, gamma=GAMMA) as writer:
        writer.add(keys[:1], residuals[:1], ids="a")
        retrieval = LiveRetrieval(tmp_path)
        try:
            down_proj, after = torch.nn.Linear(D1, D2), torch.nn.Linear(D2, 3)
            down_proj.register_forward_hook(retrieval.hook)
            traced = []

            def keep_graph(graph, example_inputs):
                traced.append(graph)
                return graph.forward

            layer = torch.compile(lambda x: after(torch.relu(down_proj(x))), backend=keep_graph, fullgraph=True)
            x = torch.cat([keys + 0.05 * torch.randn(2, D1), torch.randn(2, D1)])
            with torch.no_grad():
                layer(x)
                split, pieces = split_graph(traced[0], [SPLITTING_OP])
                assert [piece.is_splitting_graph for piece in pieces] == [False, True, False]
                op_piece = pieces[1].graph.graph
                assert [node.target for node in op_piece.nodes if node.op == "call_function"] == [
                    torch.ops.neuraldb_serving.add_live_retrieval.default]
                calls = {node.target: node for node in split.graph.nodes if node.op == "call_module"}
                written = calls[pieces[1].submod_name].args[1]  # the op's output argument...
                assert written in calls[pieces[2].submod_name].args  # ...is what the next piece reads
                assert list(op_piece.nodes)[-1].args == ((),)  # the op piece returns no new tensor

                def expected(stored_keys, stored_residuals):
                    y = torch.nn.functional.linear(x, down_proj.weight, down_proj.bias)
                    cos = torch.nn.functional.normalize(x.double(), dim=-1) @ torch.nn.functional.normalize(
                        stored_keys.double(), dim=-1).T
                    best, index = cos.max(dim=-1)
                    assert ((best - GAMMA).abs() > 1e-3).all(), "test premise: no cosine at the threshold"
                    fires = best > GAMMA
                    y[fires] += stored_residuals[index[fires]]
                    return after(torch.relu(y)), fires

                arguments = (x, down_proj.weight, down_proj.bias, after.weight, after.bias)
                reference, fires = expected(keys[:1], residuals[:1])
                assert fires.tolist() == [True, False, False, False]
                torch.testing.assert_close(split(*arguments)[0], reference, rtol=0, atol=1e-5)
                writer.add(keys[1:], residuals[1:], ids="b")  # another connection writes: the next call sees it
                reference, fires = expected(keys, residuals)
                assert fires.tolist() == [True, True, False, False]
                torch.testing.assert_close(split(*arguments)[0], reference, rtol=0, atol=1e-5)
        finally:
            retrieval.close()
