"""Where NeuralDB hooks into a Hugging Face model: the decoder layers and each layer's FFN
down-projection, found by `config.model_type`, or by a module path for other models.

The down-projection maps the FFN's hidden activation (size d1, the key space of the paper's
Eq. 2) to the residual stream (size d2, the hidden size). Supported by model type:

    gpt2      transformer.h[i].mlp.c_proj             (transformers Conv1D)
    gptj      transformer.h[i].mlp.fc_out
    gpt_neox  gpt_neox.layers[i].mlp.dense_4h_to_h
    llama     model.layers[i].mlp.down_proj           (SmolLM2 is a llama)
    mistral   model.layers[i].mlp.down_proj
    qwen2     model.layers[i].mlp.down_proj

Paths in the table are relative to the model's base model (`model.base_model`, e.g. `model` of a
LlamaForCausalLM), so LM-head models and bare decoders both work.

Any other model: pass `module_path`, a dotted path from the model you hold to the down-projection
with a `{layer}` placeholder for the layer index, e.g. "model.layers.{layer}.mlp.down_proj". The
part before `{layer}` must name the container of decoder layers (a ModuleList or Sequential); the
down-projection must be an `nn.Linear` (or anything with `in_features` / `out_features`) or a
transformers `Conv1D`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

LAYER_PLACEHOLDER = "{layer}"
GENERIC_PATH_HELP = (
    "for another architecture pass module_path, a dotted path to the FFN down-projection with a "
    "'{layer}' placeholder, e.g. module_path=\"model.layers.{layer}.mlp.down_proj\""
)


@dataclass(frozen=True)
class Architecture:
    """Where one model family keeps its decoder layers and their down-projections.

    layers: dotted path from the base model to the container of decoder layers.
    down_proj: dotted path from one decoder layer to its FFN down-projection.
    """

    layers: str
    down_proj: str


ARCHITECTURES = {
    "gpt2": Architecture(layers="h", down_proj="mlp.c_proj"),
    "gptj": Architecture(layers="h", down_proj="mlp.fc_out"),
    "gpt_neox": Architecture(layers="layers", down_proj="mlp.dense_4h_to_h"),
    "llama": Architecture(layers="layers", down_proj="mlp.down_proj"),
    "mistral": Architecture(layers="layers", down_proj="mlp.down_proj"),
    "qwen2": Architecture(layers="layers", down_proj="mlp.down_proj"),
}
SUPPORTED_MODEL_TYPES = tuple(sorted(ARCHITECTURES))


def model_type(model: torch.nn.Module) -> str:
    """`model.config.model_type`; a TypeError when the model has no Hugging Face config."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if not isinstance(kind, str) or not kind:
        raise TypeError(
            f"{type(model).__name__} has no config.model_type: expected a Hugging Face transformers "
            f"model (supported types: {', '.join(SUPPORTED_MODEL_TYPES)}); {GENERIC_PATH_HELP}"
        )
    return kind


def architecture(model: torch.nn.Module) -> Architecture:
    """The table entry for the model's `config.model_type`; a ValueError listing the supported types."""
    kind = model_type(model)
    if kind not in ARCHITECTURES:
        raise ValueError(
            f"model type {kind!r} is not supported by name; supported model types: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}; {GENERIC_PATH_HELP}"
        )
    return ARCHITECTURES[kind]


def _resolve(root: torch.nn.Module, path: str, described: str) -> torch.nn.Module:
    """The submodule at dotted `path` under `root`; a ValueError naming the missing part."""
    module = root
    walked = []
    for part in path.split(".") if path else []:
        children = dict(module.named_children())
        if part not in children:
            available = ", ".join(children) or "none"
            raise ValueError(
                f"{described}: {type(module).__name__} at {'.'.join(walked) or '<model>'!r} has no "
                f"submodule {part!r} (its submodules: {available})"
            )
        module = children[part]
        walked.append(part)
    return module


def _split_module_path(module_path: str) -> Tuple[str, str]:
    """'a.b.{layer}.c.d' -> ('a.b', 'c.d'); a ValueError unless exactly one '.{layer}.' segment."""
    if not isinstance(module_path, str):
        raise TypeError(f"module_path must be a str, got {type(module_path).__name__}")
    parts = module_path.split(".")
    if parts.count(LAYER_PLACEHOLDER) != 1 or module_path.count(LAYER_PLACEHOLDER) != 1:
        raise ValueError(
            f"module_path {module_path!r} must contain the placeholder '{{layer}}' exactly once, as a "
            f"whole path segment, e.g. \"model.layers.{{layer}}.mlp.down_proj\""
        )
    at = parts.index(LAYER_PLACEHOLDER)
    if at == len(parts) - 1:
        raise ValueError(f"module_path {module_path!r} ends at the layer; it must go on to the down-projection")
    return ".".join(parts[:at]), ".".join(parts[at + 1 :])


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    base = getattr(model, "base_model", model)
    return base if isinstance(base, torch.nn.Module) else model


def decoder_layers(model: torch.nn.Module, module_path: Optional[str] = None) -> torch.nn.Module:
    """The container (ModuleList / Sequential) of the model's decoder layers."""
    if module_path is None:
        arch = architecture(model)
        root, path, described = _base_model(model), arch.layers, f"{model_type(model)} decoder layers"
    else:
        path, _ = _split_module_path(module_path)
        root, described = model, f"module_path {module_path!r}"
    layers = _resolve(root, path, described)
    if not isinstance(layers, (torch.nn.ModuleList, torch.nn.Sequential)):
        raise ValueError(
            f"{described}: {path or '<model>'!r} is a {type(layers).__name__}, not a ModuleList or "
            "Sequential of decoder layers"
        )
    return layers


def num_layers(model: torch.nn.Module, module_path: Optional[str] = None) -> int:
    """How many decoder layers the model has."""
    return len(decoder_layers(model, module_path))


def check_layer(model: torch.nn.Module, layer, module_path: Optional[str] = None) -> int:
    """`layer` as an int in [0, num_layers); a TypeError / ValueError otherwise."""
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"layer must be an int, got {type(layer).__name__}")
    count = num_layers(model, module_path)
    if not 0 <= layer < count:
        raise ValueError(f"layer {layer} is out of range: the model has {count} decoder layers (0..{count - 1})")
    return layer


def locate_down_proj(
    model: torch.nn.Module, layer: Optional[int] = None, module_path: Optional[str] = None
) -> torch.nn.Module:
    """The FFN down-projection module of decoder layer `layer` (required, 0-based).

    Found through the model-type table, or through `module_path` ("....{layer}....") when given.
    Errors: unsupported model type (ValueError listing supported types and the generic path),
    bad module path, layer out of range, or a module that is not a linear projection.
    """
    if layer is None:
        raise ValueError("locate_down_proj needs the decoder layer index (layer=...)")
    layers = decoder_layers(model, module_path)
    check_layer(model, layer, module_path)
    if module_path is None:
        inner, described = architecture(model).down_proj, f"{model_type(model)} layer {layer}"
    else:
        _, inner = _split_module_path(module_path)
        described = f"module_path {module_path!r} at layer {layer}"
    module = _resolve(layers[layer], inner, described)
    projection_dims(module, described)
    return module


def projection_dims(module: torch.nn.Module, described: str = "down-projection") -> Tuple[int, int]:
    """(d1, d2) = (input size, output size) of a linear projection module.

    nn.Linear and lookalikes expose in_features / out_features; a transformers Conv1D (GPT-2)
    stores its weight as (d1, d2) and exposes nx / nf.
    """
    if isinstance(getattr(module, "in_features", None), int) and isinstance(getattr(module, "out_features", None), int):
        return module.in_features, module.out_features
    if isinstance(getattr(module, "nx", None), int) and isinstance(getattr(module, "nf", None), int):
        return module.nx, module.nf
    raise TypeError(
        f"{described}: {type(module).__name__} is not a linear projection (expected nn.Linear, a "
        "module with in_features/out_features, or a transformers Conv1D)"
    )


def down_proj_dims(
    model: torch.nn.Module, layer: int = 0, module_path: Optional[str] = None
) -> Tuple[int, int]:
    """(d1, d2) of the down-projection at `layer`: d1 = its input size (the key size), d2 = its
    output size (the residual size, the model's hidden size)."""
    return projection_dims(locate_down_proj(model, layer, module_path))
