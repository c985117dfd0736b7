"""The backend registry: which backends exist, where each can run, and which one runs a call.

Backends: "triton" (fused kernel, CUDA tensors; CPU tensors under TRITON_INTERPRET=1), "cuda"
(CUDA C++ extension), "cpu" (C++ extension, OpenMP) and "torch" (plain-PyTorch reference). Each
is one `Backend` record (backend.py) in its own module, imported on first use; availability
reports, "auto" resolution and explicit choices all read those records.
"""

import functools
import importlib
import warnings
from dataclasses import dataclass, field
from typing import Dict, Optional, Set, Tuple

import torch

from .backend import Backend

BACKENDS = ("triton", "cuda", "cpu", "torch")
_MODULES = {"triton": "triton_backend", "cuda": "cuda_backend", "cpu": "cpu_backend", "torch": "torch_backend"}
# "auto": the fastest usable backend for the tensors' device type, in this order. On CPU tensors
# the "cpu" backend then picks its kernel path by the number of query rows (cpu_backend.match_path:
# the exact scan for decode, the bf16-filtered scan for prefill), so that no shape runs slower than
# the naive torch code against pre-normalised keys (bench/RESULTS.md, "CPU prefill").
AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}
_FALLBACK = "torch"
_warned_fallbacks: Set[Tuple[str, str]] = set()


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


def check_backend_name(backend) -> None:
    """Raise unless `backend` is "auto" or one of BACKENDS."""
    if not isinstance(backend, str):
        raise TypeError(f"gated_retrieve: backend must be a string, got {type(backend).__name__}")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"gated_retrieve: unknown backend {backend!r}; choose one of {('auto',) + BACKENDS}")


@functools.lru_cache(maxsize=None)
def get_backend(name: str) -> Backend:
    """The `Backend` record of backend `name` (its module is imported on first use)."""
    check_backend_name(name)
    if name == "auto":
        raise ValueError("gated_retrieve: 'auto' is resolved per call (resolve_backend), it has no record")
    return importlib.import_module(f"{__package__}.{_MODULES[name]}").BACKEND


def _record_or_reason(name: str) -> Tuple[Optional[Backend], Optional[str]]:
    try:
        return get_backend(name), None
    except ImportError as exc:  # a backend module that fails to import is reported, never fatal
        return None, f"its Python module failed to import: {exc}"


def unavailable_reason(name: str, device) -> Optional[str]:
    """None when backend `name` runs on tensors of `device`, else a sentence saying why not."""
    record, why = _record_or_reason(name)
    return why if record is None else record.unavailable_reason(torch.device(device))


def available_backends() -> Dict[str, BackendStatus]:
    """For every backend: the device types it runs on here, and for the others why not."""
    devices = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    report = {}
    for name in BACKENDS:
        usable, reasons = [], {}
        for dev in devices:
            why = unavailable_reason(name, dev)
            if why is None:
                usable.append(dev)
            else:
                reasons[dev] = why
        if not torch.cuda.is_available():
            reasons["cuda"] = "no CUDA device is visible to torch (torch.cuda.is_available() is False)"
        report[name] = BackendStatus(name, tuple(usable), reasons)
    return report


def resolve_backend(backend: str, device: torch.device, dtypes: Tuple[torch.dtype, ...]) -> str:
    """The concrete backend for tensors on `device` with `dtypes`; raises if `backend` cannot run.

    "auto" takes the first backend of AUTO_ORDER that accepts the dtypes and runs on the device;
    passing over one that cannot run here (an extension not built, say) warns, once per backend
    and device type."""
    check_backend_name(backend)
    return _resolve(backend, torch.device(device), tuple(dtypes))


@functools.lru_cache(maxsize=256)  # availability is fixed for a process: decode calls skip the checks
def _resolve(backend: str, device: torch.device, dtypes: Tuple[torch.dtype, ...]) -> str:
    if backend == "auto":
        passed_over = []
        for name in AUTO_ORDER.get(device.type, (_FALLBACK,)):
            record, why = _record_or_reason(name)
            if record is not None:
                if not record.supports(dtypes):
                    continue
                why = record.unavailable_reason(device)
            if why is None:
                _warn_fallback(passed_over, name, device)
                return name
            passed_over.append((name, why))
        _warn_fallback(passed_over, _FALLBACK, device)
        return _FALLBACK
    why = unavailable_reason(backend, device)
    if why is not None:
        raise BackendUnavailableError(f"gated_retrieve: backend {backend!r} is not available here: {why}")
    record = get_backend(backend)
    unsupported = [d for d in dtypes if d not in record.dtypes]
    if unsupported:
        raise TypeError(
            f"gated_retrieve: backend {backend!r} does not support dtype {unsupported[0]}; "
            f"it supports {', '.join(str(d) for d in record.dtypes)}"
        )
    return backend


def _warn_fallback(passed_over, chosen: str, device: torch.device) -> None:
    """Warn, once per (backend, device type), that "auto" passed over a faster backend."""
    for name, why in passed_over:
        if (name, device.type) in _warned_fallbacks:
            continue
        _warned_fallbacks.add((name, device.type))
        warnings.warn(
            f"neuraldb_kernels: the {name} backend is unavailable for {device.type} tensors ({why}); "
            f"gated_retrieve falls back to the slower {chosen} backend.",
            RuntimeWarning,
            stacklevel=2,
        )
