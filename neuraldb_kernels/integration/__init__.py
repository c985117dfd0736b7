"""Integration with Hugging Face models: attach a NeuralDB to a layer's FFN down-projection
(`attach`), where that projection lives per architecture, the model fingerprint, and the
embedded default model (`load_default_model`)."""

from .._hf_extra import require_hf_extra

require_hf_extra("neuraldb_kernels.integration")

from .architectures import SUPPORTED_MODEL_TYPES, down_proj_dims, locate_down_proj, num_layers
from .attach import Attachment, Firing, ForwardRecord, attach
from .default_model import load_default_model, load_default_tokenizer
from .fingerprint import model_fingerprint
from .graph_safe import GraphSafeAttachment, SyncReport

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "Attachment",
    "Firing",
    "ForwardRecord",
    "GraphSafeAttachment",
    "SyncReport",
    "attach",
    "load_default_model",
    "load_default_tokenizer",
    "down_proj_dims",
    "locate_down_proj",
    "model_fingerprint",
    "num_layers",
]
