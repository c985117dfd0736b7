"""Integration with Hugging Face models: where the FFN down-projection lives per architecture."""

from .architectures import SUPPORTED_MODEL_TYPES, down_proj_dims, locate_down_proj, num_layers

__all__ = ["SUPPORTED_MODEL_TYPES", "down_proj_dims", "locate_down_proj", "num_layers"]
