"""The compressed key index on realistic keys, small enough for CI: SmolLM2's layer-4
down-projection inputs at every token of a few LAMBADA passages as keys, every token of a few
CounterFact prompts as queries; through the KeyIndex the op must agree with the float32 op on
every query. The 100,000-key version is bench/key_index_realistic.py (bench/RESULTS.md).
"""

import json

import pytest
import torch

import neuraldb_kernels as nk
from neuraldb_kernels.editing.keys import down_proj_inputs, pad_token_id
from neuraldb_kernels.ops import key_index as ki


def _inputs_at_every_token(model, tokenizer, texts):
    rows = [tokenizer(text)["input_ids"] for text in texts]
    with torch.no_grad():
        return down_proj_inputs(model, rows, None, 4, pad_id=pad_token_id(tokenizer))


@pytest.fixture(scope="module")
def realistic(data_dir):
    try:
        model, tokenizer = nk.load_default_model()
    except FileNotFoundError as exc:
        pytest.skip(f"the default model is not installed: {exc}")
    lines = (data_dir / "general" / "lambada" / "lambada_test.jsonl").read_text().splitlines()[:24]
    K = _inputs_at_every_token(model, tokenizer, [json.loads(line)["text"] for line in lines])
    facts = json.loads((data_dir / "counterfact" / "counterfact-a.json").read_text())[:20]
    Q = _inputs_at_every_token(model, tokenizer, [f["prompt"] for f in facts] + [f["rephrase_prompt"] for f in facts])
    return K, Q


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_realistic_keys_agree_with_full_precision(realistic, backend):
    if backend not in nk.available_backends() or "cpu" not in nk.available_backends()[backend].usable_on:
        pytest.skip(f"{backend} is not usable here")
    K, Q = realistic
    assert K.shape[0] >= 1500 and Q.shape[0] >= 300
    R = torch.randn(K.shape[0], 4, generator=torch.Generator().manual_seed(0))
    index = nk.KeyIndex.from_keys(K)
    result = ki.retrieve(Q, index, R, 0.5, backend=backend)
    out, found, score = nk.gated_retrieve(Q, K, R, 0.5, backend=backend, return_index=True)
    assert torch.equal(result.index, found) and torch.equal(result.out, out)
    if backend == "cpu":
        assert torch.equal(result.score, score)
    # a few queries overflow on real activations (bench/RESULTS.md, "Compressed keys"): the codes
    # still prune the rest
    assert result.overflowed.double().mean() < 0.1
    assert result.candidates.double().median() < K.shape[0] / 20
