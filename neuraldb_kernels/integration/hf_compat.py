"""Every detail of Hugging Face transformers that differs between its versions, in one place.

    cache_keyword        the KV-cache keyword of a base model's forward: "cache" (5.x) or
                         "past_key_values" (4.x)
    output_cache         the cache in a forward's output (`.cache` or `.past_key_values`)
    cache_layers         (keys, values) per layer of a Cache (`.layers` in 5.x, else `key_cache`)
    cache_from_layers    a DynamicCache filled with given keys/values
    decoder_output_is_tensor / replayed_decoder_layers
                         decoder layers that return their hidden states as a plain tensor (5.x)
                         can be swapped for stand-ins replaying a recorded output; tuple outputs
                         (4.x) cannot, and the residual optimisation then runs every layer
    dtype_keyword        `from_pretrained`'s dtype keyword: "dtype" (>= 4.56) or "torch_dtype"
    unmark_gguf_quantized
                         drop the "quantized with gguf" marks from a model loaded from GGUF

`compat_paths(model)` names the path each of them takes for a model (tests pin it).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Callable, Iterator, Sequence

import torch

# transformers is imported where it is needed: `import neuraldb_kernels` must not require it


def cache_keyword(base_model: torch.nn.Module) -> str:
    """The keyword `base_model.forward` takes its KV cache by: "cache" or "past_key_values"."""
    return "cache" if "cache" in inspect.signature(base_model.forward).parameters else "past_key_values"


def output_cache(output):
    """The KV cache of a base model's forward output (use_cache=True)."""
    cache = getattr(output, "cache", None)
    return output.past_key_values if cache is None else cache


def cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(keys, values)] per layer of a transformers Cache, each (batch, heads, length, head_dim)."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def cache_from_layers(model: torch.nn.Module, layers: Sequence[tuple[torch.Tensor, torch.Tensor]]):
    """A DynamicCache for `model` holding `layers` [(keys, values)] as layers 0, 1, ..."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for index, (keys, values) in enumerate(layers):
        cache.update(keys, values, index)
    return cache


def decoder_output_is_tensor(output) -> bool:
    """Whether a decoder layer's forward output is its hidden states as a plain tensor (so stand-ins
    returning a tensor can replace it), rather than a tuple."""
    return isinstance(output, torch.Tensor)


class _PassThrough(torch.nn.Module):
    """Stands in for a decoder layer whose output is never used: returns its input hidden states."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class _Replayed(torch.nn.Module):
    """Stands in for a decoder layer: returns `output()` whatever its input."""

    def __init__(self, output: Callable[[], torch.Tensor]):
        super().__init__()
        self.output = output

    def forward(self, hidden_states, *args, **kwargs):
        return self.output()


@contextlib.contextmanager
def replayed_decoder_layers(decoder_layers: torch.nn.ModuleList, layer: int,
                            output: Callable[[], torch.Tensor]) -> Iterator[None]:
    """Within the block, decoder layers 0..layer-1 pass their input through and layer `layer`
    returns `output()` (hidden states, a plain tensor): the model's forward then skips the layers
    up to `layer`. For models whose decoder layers return tensors (`decoder_output_is_tensor`).
    The original layers are back on exit, also on errors."""
    originals = [decoder_layers[i] for i in range(layer + 1)]
    try:
        for i in range(layer):
            decoder_layers[i] = _PassThrough()
        decoder_layers[layer] = _Replayed(output)
        yield
    finally:
        for i, original in enumerate(originals):
            decoder_layers[i] = original


def dtype_keyword() -> str:
    """The keyword `from_pretrained` takes the weights' dtype by."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def unmark_gguf_quantized(model: torch.nn.Module) -> None:
    """Drop the marks transformers puts on a model loaded from GGUF ("quantized with gguf"), which
    make it refuse `save_pretrained` although its weights are already dequantised tensors."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


@torch.no_grad()
def compat_paths(model: torch.nn.Module, decoder_layers: Sequence[torch.nn.Module]) -> dict[str, str]:
    """The path each version-dependent detail takes for `model` with the installed transformers:
    cache_keyword, cache_layout ("layers" or "key_cache"), decoder_output ("tensor": replayable, or
    "tuple"), dtype_keyword. Runs one forward of one token."""
    base = model.base_model
    seen = {}
    handle = decoder_layers[0].register_forward_hook(lambda _m, _a, out: seen.setdefault("out", out))
    try:
        device = next(model.parameters()).device
        output = base(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device), use_cache=True)
    finally:
        handle.remove()
    return {
        "cache_keyword": cache_keyword(base),
        "cache_layout": "layers" if hasattr(output_cache(output), "layers") else "key_cache",
        "decoder_output": "tensor" if decoder_output_is_tensor(seen["out"]) else "tuple",
        "dtype_keyword": dtype_keyword(),
    }
