"""Model fingerprints: a clear error when model type, layer or dimensions differ, a dedicated
(overridable) warning when only the weights differ."""

import warnings

import pytest

from neuraldb_kernels.store import FingerprintMismatchWarning, ModelFingerprint, NeuralDB

FP = ModelFingerprint(model_type="llama", layer=4, d1=12, d2=6, weights_sha256="ab" * 32, extra={"name": "tiny"})


def _variant(**changes):
    fields = dict(model_type=FP.model_type, layer=FP.layer, d1=FP.d1, d2=FP.d2, weights_sha256=FP.weights_sha256)
    return ModelFingerprint(**{**fields, **changes})


def test_json_round_trip_and_bad_json():
    assert ModelFingerprint.from_json(FP.to_json()) == FP
    with pytest.raises(ValueError, match=r"unknown fields \['colour'\] / lacks fields \['weights_sha256'\]"):
        ModelFingerprint.from_json('{"model_type": "llama", "layer": 1, "d1": 2, "d2": 3, "colour": 1}')
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelFingerprint.from_json("{")
    with pytest.raises(ValueError, match="must be an object"):
        ModelFingerprint.from_json("[]")


@pytest.mark.parametrize("changes, message", [
    (dict(layer=-1), "layer must be a non-negative int"),
    (dict(d1=0), "d1 must be a positive int"),
    (dict(model_type=""), "model_type must be a non-empty str"),
    (dict(weights_sha256=None), "weights_sha256 must be a non-empty str"),
])
def test_bad_fingerprint_fields(changes, message):
    with pytest.raises((TypeError, ValueError), match=message):
        _variant(**changes)
    with pytest.raises(ValueError, match="extra is not JSON-serialisable"):
        ModelFingerprint("llama", 1, 2, 3, "x", extra={"f": object()})


def test_fingerprint_persists_and_sets_the_layer(tmp_path):
    with NeuralDB(tmp_path / "f.ndb", d1=12, d2=6, fingerprint=FP) as db:
        assert db.layer == 4 and db.fingerprint == FP
    with NeuralDB.open(tmp_path / "f.ndb") as db:
        assert db.fingerprint == FP and db.layer == 4


@pytest.mark.parametrize("changes, field", [
    (dict(d1=13), "d1"), (dict(d2=7), "d2"), (dict(layer=5), "layer"), (dict(model_type="gpt2"), "model_type")])
def test_structural_mismatch_is_an_error_naming_both(tmp_path, changes, field):
    NeuralDB(tmp_path / "f.ndb", d1=12, d2=6, fingerprint=FP).close()
    other = _variant(**changes)
    with pytest.raises(ValueError, match=f"fingerprint mismatch in {field}") as raised:
        NeuralDB.open(tmp_path / "f.ndb", fingerprint=other, allow_weight_mismatch=True)
    assert FP.describe() in str(raised.value) and other.describe() in str(raised.value)


def test_weight_mismatch_warns_unless_allowed(tmp_path):
    NeuralDB(tmp_path / "f.ndb", d1=12, d2=6, fingerprint=FP).close()
    other = _variant(weights_sha256="cd" * 32)
    with pytest.warns(FingerprintMismatchWarning, match="weights differ") as record:
        NeuralDB.open(tmp_path / "f.ndb", fingerprint=other).close()
    assert FP.weights_sha256 in str(record[0].message) and other.weights_sha256 in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        NeuralDB.open(tmp_path / "f.ndb", fingerprint=other, allow_weight_mismatch=True).close()
        NeuralDB.open(tmp_path / "f.ndb", fingerprint=_variant(extra={"name": "renamed"})).close()  # extra not compared


def test_set_fingerprint_later(tmp_path):
    with NeuralDB(tmp_path / "f.ndb", d1=12, d2=6) as db:
        db.check_fingerprint(FP)  # no fingerprint yet: dimensions only
        with pytest.raises(ValueError, match=r"does not match the database \(d1=12, d2=6, layer=None\)"):
            db.check_fingerprint(_variant(d2=8))
        with pytest.raises(TypeError, match="must be a ModelFingerprint"):
            db.set_fingerprint("llama")
        db.set_fingerprint(FP)
        with pytest.raises(ValueError, match="already has a model fingerprint"):
            db.set_fingerprint(FP)
    with NeuralDB.open(tmp_path / "f.ndb") as db:
        assert db.fingerprint == FP and db.layer == 4
    with NeuralDB(d1=12, d2=6, layer=2) as db:
        with pytest.raises(ValueError, match="layer=2"):
            db.set_fingerprint(FP)
    with pytest.raises(ValueError, match=r"does not match the database \(d1=12, d2=5"):
        NeuralDB(d1=12, d2=5, fingerprint=FP)
