"""integration.hf_compat: which path each transformers-version-dependent detail takes with the
installed transformers (pinned, so that an upgrade that changes one is noticed), and that the
residual optimisation's replay of the lower layers (the fast path) runs."""

import pytest
import torch
import transformers
from packaging.version import Version
from tiny_models import tiny_model

from neuraldb_kernels.editing import EditHParams, Fact, optimize_residuals, tokenize_fact
from neuraldb_kernels.editing import residuals as residuals_module
from neuraldb_kernels.integration import hf_compat
from neuraldb_kernels.integration.architectures import decoder_layers

# transformers major version -> the path each detail takes
PINNED = {
    5: {"cache_keyword": "cache", "cache_layout": "layers", "decoder_output": "tensor", "dtype_keyword": "dtype"},
}


def test_the_installed_transformers_takes_the_pinned_paths(tokenizer):
    model = tiny_model("llama", tokenizer)
    major = Version(transformers.__version__).major
    assert major in PINNED, f"no pinned paths for transformers {transformers.__version__}: check and add them"
    assert hf_compat.compat_paths(model, decoder_layers(model)) == PINNED[major]


def test_residual_optimisation_replays_the_layers_up_to_the_edit_layer(tokenizer, monkeypatch):
    # layer 0 runs for the prefix cache (prefill) and the first step only; later steps replay layer 1's output
    model = tiny_model("llama", tokenizer, layers=3)
    facts = [Fact("The mother tongue of {} is", "Danielle Darrieux", "English"),
             Fact("{} plays the sport of", "Carlos Valderrama", "basketball")]
    tokens = [tokenize_fact(tokenizer, fact, ["Some words first. "], index=i) for i, fact in enumerate(facts)]
    prefilling, prefill = [], residuals_module.prefill

    def counted_prefill(*args, **kwargs):
        prefilling.append(True)
        try:
            return prefill(*args, **kwargs)
        finally:
            prefilling.pop()

    monkeypatch.setattr(residuals_module, "prefill", counted_prefill)
    runs = []
    handle = decoder_layers(model)[0].register_forward_hook(lambda *_: runs.append("prefill" if prefilling else "step"))
    try:
        result = optimize_residuals(model, tokens, EditHParams(layer=1, steps=4, lr=0.5, stop_prob=1.0, residual_matmuls="float32"),
                                    pad_id=0)
    finally:
        handle.remove()
    assert result.steps.tolist() == [4, 4] and runs.count("step") == 1 and "prefill" in runs
    assert all(type(layer).__name__ == "LlamaDecoderLayer" for layer in decoder_layers(model))  # put back


def test_cache_round_trip_and_layers_put_back_after_an_error(tokenizer):
    model = tiny_model("llama", tokenizer)
    with torch.no_grad():
        output = model.base_model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True)
    layers = hf_compat.cache_layers(hf_compat.output_cache(output))
    assert len(layers) == model.config.num_hidden_layers and layers[0][0].shape[2] == 3
    again = hf_compat.cache_layers(hf_compat.cache_from_layers(model, layers))
    assert all(torch.equal(a, b) for pair, other in zip(layers, again) for a, b in zip(pair, other))
    stack = decoder_layers(model)
    originals = list(stack)
    with pytest.raises(RuntimeError, match="inside"):
        with hf_compat.replayed_decoder_layers(stack, 1, lambda: torch.zeros(1)):
            assert stack[0] is not originals[0] and stack[1] is not originals[1]
            raise RuntimeError("inside")
    assert list(stack) == originals
