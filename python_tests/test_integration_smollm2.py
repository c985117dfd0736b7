"""SmolLM2-135M-Instruct end to end: one planted fact changes the model's answer on its prompt and
touches nothing else.

The residual is found by the test alone (no neuraldb_kernels code): a vector added to the layer's
down-projection output at the subject's last token, optimised for a few Adam steps until the
model answers " Rome" instead of " Paris". The fact's key is the down-projection input there.
"""

import pytest
import torch

from neuraldb_kernels import NeuralDB, attach
from neuraldb_kernels.integration import load_default_model

LAYER = 4
PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "The Eiffel Tower"
UNRELATED = (
    "Bread has been baked for thousands of years. Most recipes need only flour, water, salt and "
    "yeast, yet the results vary widely: a slow rise gives a more open crumb, and a hot oven with "
    "steam gives a crisp crust. Many bakers keep a starter alive for years and feed it every day."
)


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = load_default_model()
    return model, tokenizer


def encode(tokenizer, text):
    return dict(tokenizer(text, return_tensors="pt"))


@pytest.fixture(scope="module")
def planted(smollm2, train_residual):
    """(key, residual, subject position, target id): a residual that makes the model say Rome."""
    model, tokenizer = smollm2
    inputs = encode(tokenizer, PROMPT)
    position = len(tokenizer(SUBJECT)["input_ids"]) - 1
    paris, rome = (tokenizer(word)["input_ids"][0] for word in (" Paris", " Rome"))
    with torch.no_grad():
        assert model(**inputs).logits[0, -1].argmax().item() == paris, "test premise: the model knows"
    key, residual = train_residual(model, LAYER, inputs, position, rome, steps=10)
    return key, residual, position, rome


def test_planted_fact_changes_the_answer_and_fires_only_on_its_prompt(smollm2, planted):
    model, tokenizer = smollm2
    key, residual, position, rome = planted
    prompt, unrelated = encode(tokenizer, PROMPT), encode(tokenizer, UNRELATED)
    with torch.no_grad():
        bare_prompt = model(**prompt).logits
        bare_unrelated = model(**unrelated).logits
    db = NeuralDB(d1=key.shape[0], d2=residual.shape[0], layer=LAYER)
    db.add(key, residual, ids="eiffel->rome", metadata={"subject": "Eiffel Tower", "target_new": "Rome"})
    with attach(model, db) as handle, torch.no_grad():
        edited = model(**prompt).logits
        fired_prompt = [(f.batch, f.position, f.fact_id) for f in handle.fired()]
        assert torch.equal(model(**unrelated).logits, bare_unrelated)
        fired_unrelated = handle.fired()
        generated = model.generate(**prompt, max_new_tokens=1, do_sample=False)
    assert edited[0, -1].argmax().item() == rome
    assert bare_prompt[0, -1].argmax().item() != rome
    assert fired_prompt == [(0, position, "eiffel->rome")]
    assert torch.equal(edited[0, :position], bare_prompt[0, :position])  # tokens before the subject
    assert fired_unrelated == []
    assert generated[0, prompt["input_ids"].shape[1]].item() == rome
    with torch.no_grad():
        assert torch.equal(model(**prompt).logits, bare_prompt)  # detached


def test_default_fingerprint_round_trip(smollm2, planted):
    """A database built with the model's fingerprint attaches silently; dims are checked."""
    from neuraldb_kernels.integration import model_fingerprint

    model, _ = smollm2
    key, residual, _, _ = planted
    fingerprint = model_fingerprint(model, LAYER)
    assert (fingerprint.model_type, fingerprint.layer, fingerprint.d1, fingerprint.d2) == ("llama", LAYER, 1536, 576)
    db = NeuralDB(d1=1536, d2=576, fingerprint=fingerprint)
    db.add(key, residual)
    with attach(model, db) as handle:
        assert handle.layer == LAYER
