"""The fingerprint of a model's edited layer, as the store records and compares it.

weights_sha256 hashes the layer's FFN down-projection parameters (the matrix whose input space
holds the keys and whose output space holds the residuals): for each parameter in name order,
its name, shape and its values as little-endian float32 bytes. Hashing float32 values makes the
hash independent of where the weights live (CPU/GPU) but not of the model's dtype: a model cast to
float16 has other weights, and the store warns about it.
"""

from __future__ import annotations

import hashlib
from typing import Optional

import torch

from ..store import ModelFingerprint
from .architectures import locate_down_proj, model_type, projection_dims


def down_proj_sha256(module: torch.nn.Module) -> str:
    """Hex SHA-256 of a down-projection's parameters (names, shapes, float32 values)."""
    digest = hashlib.sha256()
    for name, parameter in sorted(module.named_parameters(), key=lambda item: item[0]):
        values = parameter.detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(values.shape)};".encode())
        digest.update(values.numpy().astype("<f4", copy=False).tobytes())
    return digest.hexdigest()


def model_fingerprint(model: torch.nn.Module, layer: int, module_path: Optional[str] = None) -> ModelFingerprint:
    """The `ModelFingerprint` of `model` at decoder layer `layer`.

    model_type from `config.model_type` ("custom" for a model without one, reachable only through
    `module_path`), d1 / d2 = the down-projection's input / output size, weights_sha256 of its
    parameters (see `down_proj_sha256`); extra records the module path used, when given.
    """
    module = locate_down_proj(model, layer, module_path)
    d1, d2 = projection_dims(module)
    try:
        kind = model_type(model)
    except TypeError:
        if module_path is None:
            raise
        kind = "custom"
    extra = {} if module_path is None else {"module_path": module_path}
    return ModelFingerprint(model_type=kind, layer=layer, d1=d1, d2=d2,
                            weights_sha256=down_proj_sha256(module), extra=extra)
