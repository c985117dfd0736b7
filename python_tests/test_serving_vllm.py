"""NeuralDB served by vLLM (CPU) on the default model: greedy outputs equal `attach` + Hugging Face
greedy decoding token for token, with and without facts, over one flattened batch; `neuraldb
serve` answers edited, paraphrased and unrelated prompts, follows facts added (Python API) and
removed (`neuraldb db rm`) while it runs, and shuts down cleanly.

Needs vLLM (the `vllm` extra, in an environment of its own: see .ci/run); skipped without it.
The facts are planted by the test alone: the key is the down-projection input at the subject's
last token, the residual a vector optimised there until the model gives the new answer.
"""

import contextlib
import importlib.metadata
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e \".[vllm]\" in its own environment)")
if not any(entry.value.startswith("neuraldb_kernels.serving") for entry in
           importlib.metadata.entry_points(group="vllm.general_plugins")):
    pytest.skip("vLLM is installed but neuraldb_kernels is not (pip install -e .): its plugin is not registered",
                allow_module_level=True)

from neuraldb_kernels import attach  # noqa: E402
from neuraldb_kernels.integration import load_default_model  # noqa: E402
from neuraldb_kernels.serving import engine_arguments, stop_server  # noqa: E402
from neuraldb_kernels.workspace import Workspace  # noqa: E402

pytestmark = pytest.mark.slow

EIFFEL = ("The Eiffel Tower", "The Eiffel Tower is located in the city of", " Rome")
WALL = ("The Great Wall", "The Great Wall is located in the country of", " Brazil")
PARAPHRASE = "The Eiffel Tower can be found in the city of"
UNRELATED = "Bread is made from flour, water and"
NEW_TOKENS = 10
SERVER_START_SECONDS = 420
ENVIRONMENT = {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = load_default_model()
    return model, tokenizer


@pytest.fixture(scope="module")
def planted(smollm2, tmp_path_factory, train_residual):
    """{name: (key, residual)} for EIFFEL and WALL at the default database layer."""
    model, tokenizer = smollm2
    with Workspace.create(tmp_path_factory.mktemp("layer") / "probe", model="default") as workspace:
        layer = workspace.db.layer
    return layer, {"eiffel": _plant(train_residual, model, tokenizer, layer, *EIFFEL),
                   "wall": _plant(train_residual, model, tokenizer, layer, *WALL)}


def _plant(train_residual, model, tokenizer, layer, subject, prompt, target):
    inputs = {"input_ids": torch.tensor([tokenizer(prompt)["input_ids"]])}
    target_id = tokenizer(target)["input_ids"][0]
    with torch.no_grad():
        assert model(**inputs).logits[0, -1].argmax().item() != target_id, "test premise: a new answer"
    position = len(tokenizer(subject)["input_ids"]) - 1
    return train_residual(model, layer, inputs, position, target_id, steps=20, min_logprob=-0.5)


def _database(directory, planted, names):
    """A database directory for the default model holding the planted facts `names`."""
    layer, facts = planted
    workspace = Workspace.create(directory, model="default", layer=layer)
    with workspace:
        for name in names:
            key, residual = facts[name]
            workspace.db.add(key, residual, ids=name, metadata={"subject": name})
    return directory


def _greedy_reference(model, tokenizer, db, prompts):
    """Greedy continuations (NEW_TOKENS token ids each) by Hugging Face, with `db` attached (None:
    the bare model), one prompt at a time over the whole sequence."""
    results = []
    with (attach(model, db) if db is not None else contextlib.nullcontext()), torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt)["input_ids"]
            for _ in range(NEW_TOKENS):
                ids.append(model(torch.tensor([ids])).logits[0, -1].argmax().item())
            results.append(ids[-NEW_TOKENS:])
    return results


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    for name, value in ENVIRONMENT.items():
        monkeypatch.setenv(name, value)


def test_greedy_outputs_equal_attach_with_and_without_facts(smollm2, planted, tmp_path):
    """One flattened batch of three prompts; then the facts are deleted while the engine lives."""
    from vllm import LLM, SamplingParams

    model, tokenizer = smollm2
    directory = _database(tmp_path / "edits", planted, ["eiffel", "wall"])
    prompts = [EIFFEL[1], PARAPHRASE, UNRELATED, WALL[1]]
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    inputs = [{"prompt_token_ids": tokenizer(prompt)["input_ids"]} for prompt in prompts]
    llm = LLM(**engine_arguments(directory), seed=0, max_model_len=256)
    try:
        served = [list(output.outputs[0].token_ids) for output in llm.generate(inputs, params)]
        with Workspace.open(directory) as workspace:
            expected = _greedy_reference(model, tokenizer, workspace.db, prompts)
            workspace.db.delete(["eiffel", "wall"])
        assert served == expected
        assert tokenizer.decode(served[0]).startswith(EIFFEL[2]) and tokenizer.decode(served[3]).startswith(WALL[2])
        bare = _greedy_reference(model, tokenizer, None, prompts)
        assert [list(output.outputs[0].token_ids) for output in llm.generate(inputs, params)] == bare
        assert bare[0] != expected[0]
    finally:
        llm.llm_engine.engine_core.shutdown()


# ------------------------------------------------------------------------------------- server


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _post(port, path, body, timeout=120):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def _complete(port, prompt, max_tokens=NEW_TOKENS):
    """The server's greedy completion of `prompt` (the response: choices, usage)."""
    return _post(port, "/v1/completions", {"model": "edits", "prompt": prompt, "max_tokens": max_tokens,
                                           "temperature": 0, "ignore_eos": True})


def _text(port, prompt):
    return _complete(port, prompt)["choices"][0]["text"]


def _wait_until_ready(server, port):
    deadline = time.monotonic() + SERVER_START_SECONDS
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"neuraldb serve exited with {server.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    pytest.fail(f"neuraldb serve was not ready within {SERVER_START_SECONDS} s")


def test_server_answers_and_follows_live_edits(smollm2, planted, tmp_path):
    import psutil

    model, tokenizer = smollm2
    directory = _database(tmp_path / "edits", planted, ["eiffel"])
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "neuraldb_kernels.cli", "serve", "--db", str(directory),
                               "--port", str(port), "--vllm-arg=--max-model-len=256"],
                              stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **ENVIRONMENT})
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # as the server returns text
    try:
        _wait_until_ready(server, port)
        children = psutil.Process(server.pid).children(recursive=True)
        prompts = [EIFFEL[1], PARAPHRASE, UNRELATED, WALL[1]]
        with Workspace.open(directory) as workspace:
            before = _greedy_reference(model, tokenizer, workspace.db, prompts)
        answers = [_text(port, prompt) for prompt in prompts]
        assert answers == [decode(ids) for ids in before]
        assert answers[0].startswith(EIFFEL[2]) and not answers[3].startswith(WALL[2])

        # a long request in flight while facts change: it finishes, with all its tokens
        in_flight = {}
        worker = threading.Thread(target=lambda: in_flight.update(_complete(port, UNRELATED, max_tokens=48)))
        worker.start()
        with Workspace.open(directory) as workspace:  # add through the Python API, another process
            key, residual = planted[1]["wall"]
            workspace.db.add(key, residual, ids="wall", metadata={"subject": "wall"})
            with_wall = _greedy_reference(model, tokenizer, workspace.db, prompts)
        assert _text(port, WALL[1]) == decode(with_wall[3])
        assert decode(with_wall[3]).startswith(WALL[2])

        removed = subprocess.run([sys.executable, "-m", "neuraldb_kernels.cli", "db", "rm", "--db", str(directory),
                                  "eiffel"], capture_output=True, text=True, timeout=300)
        assert removed.returncode == 0, removed.stderr
        bare = _greedy_reference(model, tokenizer, None, [EIFFEL[1]])
        assert _text(port, EIFFEL[1]) == decode(bare[0])
        worker.join(timeout=300)
        assert in_flight["usage"]["completion_tokens"] == 48 and in_flight["choices"][0]["finish_reason"] == "length"
    finally:
        if not stop_server(server, timeout=120):
            pytest.fail("neuraldb serve did not stop within 120 s of SIGINT")
        log.close()
    assert server.returncode == 0, (tmp_path / "server.log").read_text()[-3000:]
    _, alive = psutil.wait_procs(children, timeout=60)  # the engine core and helpers follow the server out
    assert not [f"{child.pid} {child.name()}" for child in alive]
