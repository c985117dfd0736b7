"""Which backend runs `gated_retrieve`: the registry, availability reports and "auto" selection.

Backends: "triton" (fused kernel, CUDA tensors; CPU tensors under TRITON_INTERPRET=1), "cuda"
(CUDA C++ extension), "cpu" (C++ extension, OpenMP) and "torch" (plain-PyTorch reference).
"""

import functools
import importlib
import warnings
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch

from .contract import FLOAT_DTYPES

BACKENDS = ("triton", "cuda", "cpu", "torch")
_MODULES = {
    "triton": "triton_backend",
    "cuda": "cuda_backend",
    "cpu": "cpu_backend",
    "torch": "torch_backend",
}
_NO_FLOAT64 = (torch.float32, torch.float16, torch.bfloat16)
SUPPORTED_DTYPES = {"triton": _NO_FLOAT64, "cuda": _NO_FLOAT64, "cpu": FLOAT_DTYPES, "torch": FLOAT_DTYPES}
# "auto": the fastest usable backend for the tensors' device type, in this order.
AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}


class BackendUnavailableError(ValueError):
    """The requested backend cannot run here; the message says why."""


@dataclass(frozen=True)
class BackendStatus:
    """Where one backend can run on this machine, and why not elsewhere."""

    name: str
    usable_on: Tuple[str, ...]
    reasons: Dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        parts = [f"{self.name}: usable on {', '.join(self.usable_on) or 'nothing here'}"]
        parts += [f"  not on {dev}: {why}" for dev, why in self.reasons.items()]
        return "\n".join(parts)


@functools.lru_cache(maxsize=None)
def backend_module(name: str):
    """The module implementing backend `name`: run (the dispatcher's unchecked entry point),
    retrieve (for direct calls) and unavailable_reason."""
    if name not in _MODULES:
        raise ValueError(f"gated_retrieve: unknown backend {name!r}; choose one of {('auto',) + BACKENDS}")
    return importlib.import_module(f"{__package__}.{_MODULES[name]}")


def unavailable_reason(name: str, device: torch.device) -> Optional[str]:
    """None when backend `name` runs on tensors of `device`, else a sentence saying why not."""
    try:
        module = backend_module(name)
    except ImportError as exc:  # a backend module that fails to import is reported, never fatal
        return f"its Python module failed to import: {exc}"
    return module.unavailable_reason(torch.device(device))


def _devices() -> Tuple[str, ...]:
    return ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)


def available_backends() -> Dict[str, BackendStatus]:
    """For every backend: the device types it runs on here, and for the others why not."""
    report = {}
    for name in BACKENDS:
        usable, reasons = [], {}
        for dev in _devices():
            why = unavailable_reason(name, torch.device(dev))
            if why is None:
                usable.append(dev)
            else:
                reasons[dev] = why
        if not torch.cuda.is_available():
            reasons["cuda"] = "no CUDA device is visible to torch (torch.cuda.is_available() is False)"
        report[name] = BackendStatus(name, tuple(usable), reasons)
    return report


def check_backend_name(backend) -> None:
    """Raise unless `backend` is "auto" or one of BACKENDS."""
    if not isinstance(backend, str):
        raise TypeError(f"gated_retrieve: backend must be a string, got {type(backend).__name__}")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"gated_retrieve: unknown backend {backend!r}; choose one of {('auto',) + BACKENDS}")


def resolve_backend(backend: str, device: torch.device, dtypes: Tuple[torch.dtype, ...]) -> str:
    """The concrete backend for tensors on `device` with `dtypes`; raises if `backend` cannot run."""
    check_backend_name(backend)
    return _resolve(backend, device, tuple(dtypes))


@functools.lru_cache(maxsize=256)  # availability is fixed for a process: decode calls skip the checks
def _resolve(backend: str, device: torch.device, dtypes: Tuple[torch.dtype, ...]) -> str:
    if backend == "auto":
        for name in AUTO_ORDER.get(device.type, ("torch",)):
            if all(d in SUPPORTED_DTYPES[name] for d in dtypes) and unavailable_reason(name, device) is None:
                return name
        return "torch"
    why = unavailable_reason(backend, device)
    if why is not None:
        raise BackendUnavailableError(f"gated_retrieve: backend {backend!r} is not available here: {why}")
    unsupported = [d for d in dtypes if d not in SUPPORTED_DTYPES[backend]]
    if unsupported:
        raise TypeError(
            f"gated_retrieve: backend {backend!r} does not support dtype {unsupported[0]}; "
            f"it supports {', '.join(str(d) for d in SUPPORTED_DTYPES[backend])}"
        )
    return backend


def warn_if_cpu_kernel_missing() -> None:
    """Warn once, at import, when the C++ CPU kernel is not built (the torch reference takes over)."""
    why = unavailable_reason("cpu", torch.device("cpu"))
    if why is not None:
        warnings.warn(
            f"neuraldb_kernels: the C++ CPU kernel is unavailable ({why}); "
            "gated_retrieve falls back to the slower torch reference on CPU tensors.",
            RuntimeWarning,
            stacklevel=3,
        )
