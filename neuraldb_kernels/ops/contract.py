"""The contract every `gated_retrieve` backend honours: input validation and the dtype rules.

Shapes: q (..., d1) queries, K (m, d1) keys, R (m, d2) residuals, gamma a number or (m,) float32
per-key thresholds on K's device.
Scores are cosines accumulated in float32, or float64 when q or K is float64.
"""

import math
import numbers
from typing import Union

import numpy
import torch

# One threshold for every key (a float), or one per key row: a (m,) float32 tensor on K's device.
Gamma = Union[float, torch.Tensor]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def accumulation_dtype(q_dtype: torch.dtype, k_dtype: torch.dtype) -> torch.dtype:
    """float64 when q or K is float64, else float32."""
    return torch.float64 if torch.float64 in (q_dtype, k_dtype) else torch.float32


def _check_tensor(name: str, t) -> None:
    # the exact type first: isinstance(t, torch.Tensor) goes through torch's metaclass (slower)
    if type(t) is not torch.Tensor and not isinstance(t, torch.Tensor):
        raise TypeError(f"gated_retrieve: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"gated_retrieve: {name} has dtype {t.dtype}; supported dtypes are "
            "float32, float16, bfloat16 and float64"
        )


def check_gamma(gamma) -> float:
    """Return gamma as a Python float; it must be a finite real number in [-1, 1]."""
    if type(gamma) is not float:  # a plain float skips the slower abstract-class check
        if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real):
            raise TypeError(
                f"gated_retrieve: gamma must be a real number or a float32 tensor of shape (m,), got {type(gamma).__name__}"
            )
        gamma = float(gamma)
    if not math.isfinite(gamma) or not -1.0 <= gamma <= 1.0:
        raise ValueError(f"gated_retrieve: gamma must be a finite number in [-1, 1], got {gamma}")
    return gamma


def check_key_gamma(gamma: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """Check a per-key threshold tensor's metadata against K (m, d1): float32, shape (m,), on K's
    device. Its values are checked by `check_key_gamma_values`, at run time (not while tracing)."""
    if gamma.dtype != torch.float32:
        raise ValueError(
            f"gated_retrieve: per-key gamma must be a float32 tensor, got dtype {gamma.dtype} "
            f"(shape {tuple(gamma.shape)})"
        )
    if gamma.dim() != 1 or gamma.shape[0] != K.shape[0]:
        raise ValueError(
            f"gated_retrieve: per-key gamma must have shape (m,) = ({K.shape[0]},), one threshold per "
            f"row of K (shape {tuple(K.shape)}); got shape {tuple(gamma.shape)}"
        )
    if gamma.device != K.device:
        raise ValueError(f"gated_retrieve: per-key gamma is on {gamma.device}, K is on {K.device}; they must share one device")
    return gamma


def check_key_gamma_values(gamma: torch.Tensor) -> None:
    """Raise unless every per-key threshold is in [-1, 1] (NaN fails too): one reduction over the
    m thresholds per call and, on a GPU, one synchronisation (so never inside a CUDA graph
    capture: the graph-safe attachment calls it once per sync, not per step).

    On CPU tensors the reduction runs in numpy, on one thread: a torch reduction wakes torch's
    OpenMP threads, which keep spinning on the cores while the C++ kernel's own OpenMP threads
    (another runtime) scan the keys; that doubled the "cpu" backend's time at n = 1, m = 1e5."""
    if gamma.device.type == "cpu":
        # |value| <= 1 for the largest |value|; NaN propagates through max and fails it
        in_range = bool(numpy.abs(gamma.detach().numpy()).max(initial=0.0) <= 1.0)
    else:
        in_range = bool(((gamma >= -1.0) & (gamma <= 1.0)).all())
    if not in_range:
        bad = torch.nonzero(~((gamma >= -1.0) & (gamma <= 1.0)))[0].item()
        raise ValueError(
            f"gated_retrieve: per-key gamma values must be finite numbers in [-1, 1]; "
            f"gamma[{bad}] = {gamma[bad].item()} (shape {tuple(gamma.shape)})"
        )


def check_inputs(q, K, R, gamma) -> Gamma:
    """Validate q (..., d1), K (m, d1), R (m, d2) and gamma's type and shape; return gamma as a
    float, or as the (m,) float32 per-key tensor."""
    for name, t in (("q", q), ("K", K), ("R", R)):
        _check_tensor(name, t)
    if q.dim() == 0:
        raise ValueError("gated_retrieve: q must have at least one dimension (..., d1), got a 0-d tensor")
    if K.dim() != 2:
        raise ValueError(f"gated_retrieve: K must be 2-D (m, d1), got shape {tuple(K.shape)}")
    if R.dim() != 2:
        raise ValueError(f"gated_retrieve: R must be 2-D (m, d2), got shape {tuple(R.shape)}")
    if q.shape[-1] != K.shape[1]:
        raise ValueError(
            f"gated_retrieve: d1 mismatch: q has shape {tuple(q.shape)} (d1={q.shape[-1]}) "
            f"but K has shape {tuple(K.shape)} (d1={K.shape[1]})"
        )
    if K.shape[1] == 0:
        raise ValueError(
            f"gated_retrieve: d1 must be at least 1, got q of shape {tuple(q.shape)} and K of shape {tuple(K.shape)}"
        )
    if K.shape[0] != R.shape[0]:
        raise ValueError(
            f"gated_retrieve: m mismatch: K has {K.shape[0]} rows (shape {tuple(K.shape)}) "
            f"but R has {R.shape[0]} rows (shape {tuple(R.shape)})"
        )
    if not (q.device == K.device == R.device):
        raise ValueError(
            f"gated_retrieve: tensors must be on one device, got q on {q.device}, "
            f"K on {K.device}, R on {R.device}"
        )
    if isinstance(gamma, torch.Tensor):
        return check_key_gamma(gamma, K)
    return check_gamma(gamma)
