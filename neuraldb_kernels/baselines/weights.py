"""Reversible weight edits: add Δ to a layer's down-projection and take it back bit for bit.

The edited model stays a plain Hugging Face model (only the weight's values change), so every
metric runs on it unchanged. `apply_delta` keeps a copy of the original weight; `restore` (or
leaving the `with` block) copies it back, so the weight's bits are exactly the original ones.
Edits applied on top of each other must be restored in reverse order.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..integration.architectures import locate_down_proj, projection_dims


class AppliedDelta:
    """A Δ added to one down-projection weight; `restore()` (or the end of a `with` block) puts the
    original weight back exactly. `active` is True until then."""

    def __init__(self, module: torch.nn.Module, original: torch.Tensor, layer: int) -> None:
        self.module = module
        self.layer = layer
        self._original = original
        self.active = True

    def restore(self) -> None:
        """Copy the original weight back (bit-exact); a RuntimeError when already restored."""
        if not self.active:
            raise RuntimeError(f"the weight edit of layer {self.layer} was already restored")
        with torch.no_grad():
            self.module.weight.copy_(self._original)
        self.active = False

    def __enter__(self) -> "AppliedDelta":
        return self

    def __exit__(self, *exc_info) -> None:
        if self.active:
            self.restore()


def apply_delta(model: torch.nn.Module, delta: torch.Tensor, layer: int,
                module_path: Optional[str] = None) -> AppliedDelta:
    """Add Δ (d2, d1) to the down-projection weight of decoder layer `layer`, in place.

    The sum W + Δ is formed in float64 and rounded once to the weight's dtype. nn.Linear stores W
    as (d2, d1); a transformers Conv1D (GPT-2) stores Wᵀ (d1, d2) and gets Δᵀ. A ValueError naming
    the shapes when Δ is not (d2, d1) for this layer, or holds NaN/Inf. Returns the handle that
    restores the original weight.
    """
    module = locate_down_proj(model, layer, module_path)
    d1, d2 = projection_dims(module)
    if not isinstance(delta, torch.Tensor) or delta.dim() != 2 or tuple(delta.shape) != (d2, d1):
        shape = tuple(delta.shape) if isinstance(delta, torch.Tensor) else type(delta).__name__
        raise ValueError(f"delta has shape {shape} but layer {layer}'s down-projection needs (d2, d1) = ({d2}, {d1})")
    if not delta.is_floating_point() or not torch.isfinite(delta).all():
        raise ValueError("delta must hold finite floating-point values")
    weight = module.weight
    linear_layout = isinstance(getattr(module, "in_features", None), int)  # else Conv1D: W stored as (d1, d2)
    oriented = delta if linear_layout else delta.T
    if weight.shape != oriented.shape:
        raise ValueError(f"layer {layer}'s down-projection weight has shape {tuple(weight.shape)}, which does not "
                         f"match its sizes (d1, d2) = ({d1}, {d2})")
    original = weight.detach().clone()
    with torch.no_grad():
        updated = original.to(torch.float64) + oriented.detach().to(device=weight.device, dtype=torch.float64)
        weight.copy_(updated.to(weight.dtype))
    return AppliedDelta(module, original, layer)
