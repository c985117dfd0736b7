"""The gated retrieval op and its backends (see gated_retrieve.py for the contract)."""

from .backend import Backend
from .dispatch import BACKENDS, BackendStatus, BackendUnavailableError, available_backends, get_backend
from .gated_retrieve import gated_retrieve
from .key_index import CompressedRetrieval, KeyIndex

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendStatus",
    "BackendUnavailableError",
    "CompressedRetrieval",
    "KeyIndex",
    "available_backends",
    "gated_retrieve",
    "get_backend",
]
