"""The fingerprint of the model layer a NeuralDB was built for, and how two fingerprints compare.

The store never imports a model library: the integration code computes a `ModelFingerprint`
from a model (type, edited layer, hidden sizes, SHA-256 of that layer's weights) and hands it in.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from typing import Any


class FingerprintMismatchWarning(UserWarning):
    """The model's edited-layer weights differ from the ones the database was built for.

    Dimensions, model type and layer agree, so retrieval still runs, but keys and residuals were
    computed against other weights and edits may fire or act differently.
    """


@dataclasses.dataclass(frozen=True)
class ModelFingerprint:
    """Identity of the edited layer of a model.

    model_type: the model family (``config.model_type``, e.g. "llama").
    layer: index of the edited decoder layer.
    d1: key size (the FFN down-projection's input size, the intermediate size).
    d2: residual size (the down-projection's output size, the hidden size).
    weights_sha256: hex SHA-256 of the edited layer's weights (how they are hashed is the
        integration's choice; the store only compares the strings).
    extra: informational JSON-serialisable fields (model name, revision...), never compared.
    """

    model_type: str
    layer: int
    d1: int
    d2: int
    weights_sha256: str
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.model_type, str) or not self.model_type:
            raise TypeError(f"ModelFingerprint.model_type must be a non-empty str, got {self.model_type!r}")
        for name in ("layer", "d1", "d2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "layer" else 1):
                raise ValueError(f"ModelFingerprint.{name} must be a {'non-negative' if name == 'layer' else 'positive'} int, got {value!r}")
        if not isinstance(self.weights_sha256, str) or not self.weights_sha256:
            raise TypeError(f"ModelFingerprint.weights_sha256 must be a non-empty str, got {self.weights_sha256!r}")
        if not isinstance(self.extra, dict):
            raise TypeError(f"ModelFingerprint.extra must be a dict, got {type(self.extra).__name__}")
        try:
            json.dumps(self.extra, allow_nan=False)
        except (TypeError, ValueError) as error:
            raise ValueError(f"ModelFingerprint.extra is not JSON-serialisable: {error}") from None

    def to_json(self) -> str:
        """This fingerprint as a JSON object string."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ModelFingerprint":
        """Parse a string written by `to_json`; a ValueError names missing or unknown fields."""
        try:
            fields = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"model fingerprint is not valid JSON: {error}") from None
        if not isinstance(fields, dict):
            raise ValueError(f"model fingerprint JSON must be an object, got {type(fields).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - names)
        missing = sorted(names - {"extra"} - set(fields))
        if unknown or missing:
            raise ValueError(f"model fingerprint JSON has unknown fields {unknown} / lacks fields {missing}")
        return cls(**fields)

    def describe(self) -> str:
        """One line naming every compared field, for error messages."""
        return (f"model_type={self.model_type!r}, layer={self.layer}, d1={self.d1}, d2={self.d2}, "
                f"weights_sha256={self.weights_sha256[:16]}...")


def check_compatible(stored: ModelFingerprint, given: ModelFingerprint, *, allow_weight_mismatch: bool) -> None:
    """Compare the fingerprint a database was built for with the one of the model at hand.

    Raises ValueError (naming both) when model type, layer or dimensions differ; warns with
    `FingerprintMismatchWarning` when only the weight hash differs, unless `allow_weight_mismatch`.
    """
    structural = ("model_type", "layer", "d1", "d2")
    differing = [name for name in structural if getattr(stored, name) != getattr(given, name)]
    if differing:
        raise ValueError(
            f"model fingerprint mismatch in {', '.join(differing)}: the database was built for "
            f"[{stored.describe()}] but the model is [{given.describe()}]")
    if stored.weights_sha256 != given.weights_sha256 and not allow_weight_mismatch:
        warnings.warn(
            f"the model's layer-{given.layer} weights differ from the ones the database was built for "
            f"(database weights_sha256={stored.weights_sha256}, model weights_sha256={given.weights_sha256}); "
            f"edits may not behave as when they were made. Pass allow_weight_mismatch=True to silence this.",
            FingerprintMismatchWarning, stacklevel=3)
