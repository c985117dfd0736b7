"""The contract every `gated_retrieve` backend honours: input validation and the dtype rules.

Shapes: q (..., d1) queries, K (m, d1) keys, R (m, d2) residuals.
Scores are cosines accumulated in float32, or float64 when q or K is float64.
"""

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def accumulation_dtype(q_dtype: torch.dtype, k_dtype: torch.dtype) -> torch.dtype:
    """float64 when q or K is float64, else float32."""
    return torch.float64 if torch.float64 in (q_dtype, k_dtype) else torch.float32


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"gated_retrieve: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"gated_retrieve: {name} has dtype {t.dtype}; supported dtypes are "
            "float32, float16, bfloat16 and float64"
        )


def check_gamma(gamma) -> float:
    """Return gamma as a Python float; it must be a finite real number in [-1, 1]."""
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real):
        raise TypeError(f"gated_retrieve: gamma must be a real number, got {type(gamma).__name__}")
    gamma = float(gamma)
    if not math.isfinite(gamma) or not -1.0 <= gamma <= 1.0:
        raise ValueError(f"gated_retrieve: gamma must be a finite number in [-1, 1], got {gamma}")
    return gamma


def check_inputs(q, K, R, gamma) -> float:
    """Validate q (..., d1), K (m, d1), R (m, d2) and gamma; return gamma as a float."""
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
    return check_gamma(gamma)
