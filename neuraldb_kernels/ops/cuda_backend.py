"""The "cuda" backend of gated_retrieve: the CUDA C++ kernels in neuraldb_kernels._cuda (csrc/cuda/).

The same two-stage split-m algorithm as the Triton backend: warp-per-key fp32 dot products with
16-byte vector loads and the key norms from the same read, a block-level (max, lowest index)
reduction to per-(query, split) partials, then one small kernel that reduces the partials, applies
the gate and copies the selected residual row bit for bit. Runs on the caller's current stream.
Importing this module never fails: without the compiled extension `unavailable_reason` says why.
"""

from typing import Optional, Tuple

import torch

from .contract import require_kernel_inputs

try:
    from .. import _cuda
except ImportError as exc:  # not built (CPU-only torch, no nvcc) or built against another torch
    _cuda = None
    _IMPORT_ERROR: Optional[ImportError] = exc
else:
    _IMPORT_ERROR = None

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def unavailable_reason(device: torch.device) -> Optional[str]:
    """None when the kernel runs on tensors of `device`, else a sentence saying why not."""
    if _cuda is None:
        return (
            f"the CUDA extension neuraldb_kernels._cuda was not built or does not load ({_IMPORT_ERROR}); "
            "it is built by `pip install --no-build-isolation -e .` with a CUDA build of torch and nvcc "
            "(or FORCE_CUDA=1)"
        )
    if device.type != "cuda":
        return f"tensors are on {device.type}, the cuda backend needs CUDA tensors"
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    return None


def run(
    q2d: torch.Tensor, K: torch.Tensor, R: torch.Tensor, gamma: float
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q2d (n >= 1, d1), K (m >= 1, d1), R (m, d2), contiguous CUDA tensors, float32/float16/bfloat16 ->
    out (n, d2) R.dtype, index (n,) int64, score (n,) float32 (cosines accumulated in fp32).
    Inputs unchecked: the dispatcher's entry point (it checks dtypes and availability first)."""
    stream = torch.cuda.current_stream(q2d.device).cuda_stream
    return tuple(_cuda.gated_retrieve(q2d, K, R, float(gamma), stream))


def retrieve(
    q2d: torch.Tensor, K: torch.Tensor, R: torch.Tensor, gamma: float
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`run` for direct calls: a TypeError / RuntimeError first for an unsupported dtype or device."""
    require_kernel_inputs("cuda", SUPPORTED_DTYPES, unavailable_reason, q2d, K, R)
    return run(q2d, K, R, gamma)
