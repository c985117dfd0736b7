"""NeuralDB.for_model: d1, d2, layer, gamma and the fingerprint come from the model (a tiny random
Llama), explicit arguments win over the preset, and bad arguments are refused with clear errors."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import neuraldb_kernels.editing.hparams as hparams
from neuraldb_kernels.store import FingerprintMismatchWarning, NeuralDB

HIDDEN, INTERMEDIATE, LAYERS = 48, 96, 4


@pytest.fixture(scope="module")
def model():
    config = LlamaConfig(vocab_size=64, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=INTERMEDIATE, max_position_embeddings=64)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def test_sizes_layer_and_fingerprint_come_from_the_model(model, tmp_path):
    db = NeuralDB.for_model(model, path=tmp_path / "m.ndb", dtype=torch.bfloat16)
    down = model.model.layers[1].mlp.down_proj
    assert (db.d1, db.d2) == (down.in_features, down.out_features) == (INTERMEDIATE, HIDDEN)
    assert db.layer == round(0.25 * LAYERS) == 1 and db.gamma == 0.65  # no preset: the documented defaults
    assert db.dtype == torch.bfloat16 and db.path == tmp_path / "m.ndb"
    fingerprint = db.fingerprint
    assert (fingerprint.model_type, fingerprint.layer, fingerprint.d1, fingerprint.d2) == ("llama", 1, INTERMEDIATE, HIDDEN)
    db.close()
    with NeuralDB.open(tmp_path / "m.ndb") as reopened:
        assert reopened.fingerprint == fingerprint
    with torch.no_grad():
        down.weight[0, 0] += 1.0  # other weights at that layer: the recorded fingerprint tells
    try:
        with NeuralDB.open(tmp_path / "m.ndb") as reopened, pytest.warns(FingerprintMismatchWarning):
            reopened.check_fingerprint(NeuralDB.for_model(model).fingerprint)
    finally:
        with torch.no_grad():
            down.weight[0, 0] -= 1.0


def test_the_preset_and_explicit_arguments(model, monkeypatch):
    monkeypatch.setitem(hparams.PRESETS, ("llama", LAYERS, HIDDEN), {"layer": 2, "gamma": 0.8})
    db = NeuralDB.for_model(model)
    assert (db.layer, db.gamma, db.fingerprint.layer) == (2, 0.8, 2)
    db = NeuralDB.for_model(model, layer=3, gamma=-0.25)
    assert (db.layer, db.gamma, db.fingerprint.layer, db.d1) == (3, -0.25, 3, INTERMEDIATE)


def test_bad_arguments_are_refused(model, tmp_path):
    with pytest.raises(ValueError, match=r"layer 4 is out of range: the model has 4 decoder layers"):
        NeuralDB.for_model(model, layer=4)
    with pytest.raises(ValueError, match=r"gamma must be a finite float in \[-1, 1\]"):
        NeuralDB.for_model(model, gamma=1.5)
    with pytest.raises(ValueError, match="layer must be None or a non-negative int"):
        NeuralDB.for_model(model, layer=-1)
    with pytest.raises(ValueError, match="unsupported storage dtype"):
        NeuralDB.for_model(model, dtype=torch.float64)
    (tmp_path / "taken.ndb").write_bytes(b"")
    with pytest.raises(FileExistsError, match="already exists"):
        NeuralDB.for_model(model, path=tmp_path / "taken.ndb")
    with pytest.raises((TypeError, ValueError), match="model_type|config"):
        NeuralDB.for_model(torch.nn.Linear(4, 4))
