"""Serving without vLLM: `LiveRetrieval` (the per-token retrieval over a flattened batch, reading a
database file another connection writes), the engine arguments for a database directory, and
`neuraldb serve`'s checks. The vLLM end-to-end tests are in test_serving_vllm.py.

References: float64 cosines and the gate rule computed here from the stored keys, and the
projection's output without retrieval."""

import json
import subprocess
import sys

import pytest
import torch

from neuraldb_kernels.serving import LiveRetrieval, engine_arguments, serve_command, served_database, stop_server
from neuraldb_kernels.serving.launch import server_environment
from neuraldb_kernels.store import ModelFingerprint, NeuralDB
from neuraldb_kernels.integration.fingerprint import down_proj_sha256
from neuraldb_kernels.workspace import Workspace, WorkspaceError

D1, D2, LAYER, GAMMA = 48, 32, 1, 0.8


class TupleLinear(torch.nn.Linear):
    """A linear layer returning (y, None), as vLLM's parallel linear layers do."""

    def forward(self, x):
        return super().forward(x), None


def _writer(path, fingerprint=None):
    return NeuralDB(path, d1=D1, d2=D2, layer=LAYER, gamma=GAMMA, fingerprint=fingerprint)


def _expected(x, y, keys, residuals, gamma):
    """float64 reference: y + R[best] where the best cosine exceeds gamma, y elsewhere."""
    cos = torch.nn.functional.normalize(x.double(), dim=-1) @ torch.nn.functional.normalize(keys.double(), dim=-1).T
    best, index = cos.max(dim=-1)
    assert ((best - gamma).abs() > 1e-3).all(), "test premise: no cosine at the threshold"
    fires = best > gamma
    out = y.clone()
    out[fires] = y[fires] + residuals[index[fires]].to(y.dtype)
    return out, torch.where(fires, index, -1)


def _tokens(keys, fire_rows, other):
    """A flattened batch: noisy copies of the keys `fire_rows` (they fire) then `other` random rows."""
    generator = torch.Generator().manual_seed(1)
    near = keys[fire_rows] + 0.05 * torch.randn(len(fire_rows), D1, generator=generator)
    return torch.cat([near, torch.randn(other, D1, generator=generator)])


def test_flattened_batch_matches_the_float64_gate_and_follows_live_writes(tmp_path):
    path = tmp_path / "neuraldb.sqlite"
    keys, residuals = torch.randn(5, D1), torch.randn(5, D2)
    with _writer(path) as writer:
        writer.add(keys[:3], residuals[:3], ids=["a", "b", "c"])
        retrieval = LiveRetrieval(tmp_path)  # a directory names its neuraldb.sqlite
        try:
            projection = TupleLinear(D1, D2)
            projection.register_forward_hook(retrieval.hook)
            x = _tokens(keys, [2, 0, 4], other=4)  # token 2 is near fact 4, not yet written
            with torch.no_grad():
                bare = torch.nn.functional.linear(x, projection.weight, projection.bias)
                out, bias = projection(x)
            expected, index = _expected(x, bare, keys[:3], residuals[:3], GAMMA)
            assert bias is None
            torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
            assert retrieval.last_index.tolist() == index.tolist() == [2, 0, -1, -1, -1, -1, -1]
            assert torch.equal(out[index < 0], bare[index < 0])  # closed gates: bit for bit

            writer.add(keys[3:], residuals[3:], ids=["d", "e"])  # another connection commits
            writer.delete("a")
            with torch.no_grad():
                out, _ = projection(x)
            rows = retrieval.last_snapshot.ids_at(retrieval.last_index)
            assert rows == ["c", None, "e", None, None, None, None]  # a gone, e fires
            expected, _ = _expected(x, bare, keys[2:], residuals[2:], GAMMA)
            torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
        finally:
            retrieval.close()


def test_empty_database_changes_nothing_and_plain_outputs_work(tmp_path):
    path = tmp_path / "neuraldb.sqlite"
    _writer(path).close()
    retrieval = LiveRetrieval(path)
    try:
        projection = torch.nn.Linear(D1, D2)  # a projection returning a tensor
        projection.register_forward_hook(retrieval.hook)
        x = torch.randn(3, 5, D1)
        with torch.no_grad():
            bare = torch.nn.functional.linear(x, projection.weight, projection.bias)
            assert torch.equal(projection(x), bare)
    finally:
        retrieval.close()


def test_gamma_override_and_per_key_thresholds(tmp_path):
    path = tmp_path / "neuraldb.sqlite"
    keys, residuals = torch.randn(2, D1), torch.randn(2, D2)
    x = _tokens(keys, [0, 1], other=0)
    cos = torch.nn.functional.cosine_similarity(x.double(), keys.double(), dim=-1)  # each token with its key
    with _writer(path) as writer:
        writer.add(keys, residuals, ids=["a", "b"], key_gammas=[torch.tensor([0.9999]), torch.tensor([-1.0])])  # a cannot fire, b always
        assert (cos < 0.9999).all()
        own = LiveRetrieval(path)
        forced = LiveRetrieval(path, gamma=0.5)  # one threshold for every key
        try:
            y = torch.zeros(2, D2)
            assert own.retrieve_into(x, y).equal(torch.stack([y[0], residuals[1]]))
            assert forced.retrieve_into(x, y).equal(residuals)
        finally:
            own.close()
            forced.close()


def test_compiled_model_reads_the_live_database_every_call(tmp_path):
    """The retrieval is one custom op to torch.compile: a full graph, no recompile after a write."""
    path = tmp_path / "neuraldb.sqlite"
    keys, residuals = torch.randn(1, D1), torch.randn(1, D2)
    with _writer(path) as writer:
        retrieval = LiveRetrieval(path)
        try:
            projection = TupleLinear(D1, D2)
            projection.register_forward_hook(retrieval.hook)
            compiled = torch.compile(lambda x: projection(x)[0], backend="eager", fullgraph=True)
            x = _tokens(keys, [0], other=1)
            with torch.no_grad():
                bare = torch.nn.functional.linear(x, projection.weight, projection.bias)
                assert torch.equal(compiled(x), bare)
                writer.add(keys, residuals, ids="a")
                assert torch.equal(compiled(x), torch.stack([bare[0] + residuals[0], bare[1]]))
        finally:
            retrieval.close()


def test_check_model_compares_the_fingerprint(tmp_path):
    projection = torch.nn.Linear(D1, D2, bias=False)
    fingerprint = ModelFingerprint(model_type="llama", layer=LAYER, d1=D1, d2=D2,
                                   weights_sha256=down_proj_sha256(projection))
    _writer(tmp_path / "neuraldb.sqlite", fingerprint).close()
    retrieval = LiveRetrieval(tmp_path)
    try:
        retrieval.check_model(projection, "llama", D1, D2)
        with pytest.raises(ValueError, match="other weights of layer 1"):
            retrieval.check_model(torch.nn.Linear(D1, D2, bias=False), "llama", D1, D2)
        with pytest.raises(ValueError, match="qwen2"):
            retrieval.check_model(projection, "qwen2", D1, D2)
        with pytest.raises(ValueError):
            retrieval.check_model(torch.nn.Linear(D1 + 1, D2, bias=False), "llama", D1 + 1, D2)
    finally:
        retrieval.close()


def test_refuses_a_database_without_layer_or_file_and_bad_settings(tmp_path):
    NeuralDB(tmp_path / "neuraldb.sqlite", d1=D1, d2=D2).close()
    with pytest.raises(ValueError, match="records no layer"):
        LiveRetrieval(tmp_path)
    with pytest.raises(FileNotFoundError):
        LiveRetrieval(tmp_path / "missing")
    with pytest.raises(ValueError, match="gamma"):
        LiveRetrieval(tmp_path, gamma=1.5)
    with pytest.raises(ValueError, match="backend"):
        LiveRetrieval(tmp_path, backend="gpu-please")


# ---------------------------------------------------------------- database directories to serve


@pytest.fixture(scope="module")
def served_dir(tmp_path_factory, tiny_model_dir):
    directory = tmp_path_factory.mktemp("serve") / "edits"
    Workspace.create(directory, model=tiny_model_dir, layer=1).close()
    return directory


def test_engine_arguments_name_the_model_the_database_and_no_prefix_caching(served_dir, tiny_model_dir):
    arguments = engine_arguments(served_dir, gamma=0.7)
    assert arguments["model"] == arguments["tokenizer"] == str(tiny_model_dir.resolve())
    assert arguments["enable_prefix_caching"] is False and arguments["enforce_eager"] is True
    assert arguments["hf_overrides"] == {"architectures": ["NeuralDBLlamaForCausalLM"],
                                         "neuraldb_database": str(served_dir.resolve()),
                                         "neuraldb_backend": "auto", "neuraldb_gamma": 0.7}


def test_serve_command_binds_loopback_and_passes_the_overrides(served_dir, tiny_model_dir, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: object() if name == "vllm" else real_find_spec(name, *args))
    command = serve_command(served_dir, port=8123, vllm_args=["--max-num-seqs=4"])
    assert command[1:5] == ["-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model_dir.resolve())]
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert command[command.index("--port") + 1] == "8123"
    assert command[command.index("--served-model-name") + 1] == "edits"
    overrides = json.loads(command[command.index("--hf-overrides") + 1])
    assert overrides["neuraldb_database"] == str(served_dir.resolve())
    assert "--no-enable-prefix-caching" in command and "--enforce-eager" in command
    assert command[-1] == "--max-num-seqs=4"
    environment = server_environment({"VLLM_CPU_KVCACHE_SPACE": "3"})
    assert environment["HF_HUB_OFFLINE"] == "1" and environment["VLLM_CPU_KVCACHE_SPACE"] == "3"


def test_compiled_serving_asks_for_piecewise_cuda_graphs(served_dir, monkeypatch):
    """Full CUDA graphs would capture the live retrieval (model.keep_retrieval_eager refuses them)."""
    import importlib.util

    assert "compilation_config" not in engine_arguments(served_dir)
    arguments = engine_arguments(served_dir, enforce_eager=False)
    assert arguments["enforce_eager"] is False
    assert arguments["compilation_config"] == {"cudagraph_mode": "PIECEWISE"}
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: object() if name == "vllm" else real_find_spec(name, *args))
    command = serve_command(served_dir, compile=True)
    assert "--enforce-eager" not in command
    assert json.loads(command[command.index("--compilation-config") + 1]) == {"cudagraph_mode": "PIECEWISE"}
    assert "--compilation-config" not in serve_command(served_dir)


def test_serve_refuses_an_unsupported_architecture(tmp_path, tiny_model_dir):
    model = tmp_path / "gpt2"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    directory = tmp_path / "edits"
    directory.mkdir()
    (directory / "model.json").write_text(json.dumps({"model": str(model)}))
    NeuralDB(directory / "neuraldb.sqlite", d1=D1, d2=D2, layer=0).close()
    with pytest.raises(WorkspaceError, match="GPT2LMHeadModel.*supports LlamaForCausalLM"):
        served_database(directory)


def test_neuraldb_serve_errors(neuraldb, tmp_path, served_dir):
    code, _, err = neuraldb("serve", "--db", tmp_path / "nothing")
    assert code == 1 and "not a neuraldb database directory" in err
    code, _, err = neuraldb("serve", "--db", served_dir, "--port", "70000")
    assert code == 2 and "port number" in err
    code, _, err = neuraldb("serve", "--db", served_dir, "--gamma", "1.5")
    assert code == 2 and "[-1, 1]" in err
    code, _, err = neuraldb("serve", "--db", served_dir, "--backend", "gpu-please")
    assert code == 1 and "unknown backend 'gpu-please'" in err


def test_neuraldb_serve_without_vllm_names_the_extra(neuraldb, served_dir, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "vllm" else real_find_spec(name, *args))
    code, _, err = neuraldb("serve", "--db", served_dir)
    assert code == 1 and 'pip install -e ".[vllm]"' in err


def test_stop_server_interrupts_then_kills_a_server_that_ignores_the_interrupt():
    ready = "import signal, sys, time; {}; print('up', flush=True); time.sleep(60)"
    # the default handler set explicitly: a job started in the background inherits SIGINT ignored
    polite = subprocess.Popen([sys.executable, "-c",
                               ready.format("signal.signal(signal.SIGINT, signal.default_int_handler)")],
                              stdout=subprocess.PIPE, text=True)
    assert polite.stdout.readline() == "up\n"
    assert stop_server(polite, timeout=30) is True
    assert polite.returncode != 0 and polite.returncode is not None  # KeyboardInterrupt, not the full sleep
    stubborn = subprocess.Popen([sys.executable, "-c", ready.format("signal.signal(signal.SIGINT, signal.SIG_IGN)")],
                                stdout=subprocess.PIPE, text=True)
    assert stubborn.stdout.readline() == "up\n"
    assert stop_server(stubborn, timeout=1) is False
    assert stubborn.returncode == -9  # killed
