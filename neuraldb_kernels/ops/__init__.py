"""The gated retrieval op and its backends (see gated_retrieve.py for the contract)."""

from .dispatch import BACKENDS, BackendStatus, BackendUnavailableError, available_backends, warn_if_cpu_kernel_missing
from .gated_retrieve import gated_retrieve

warn_if_cpu_kernel_missing()

__all__ = ["BACKENDS", "BackendStatus", "BackendUnavailableError", "available_backends", "gated_retrieve"]
