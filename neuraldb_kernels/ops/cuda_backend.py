"""The "cuda" backend of gated_retrieve: the CUDA C++ kernels in neuraldb_kernels._cuda (csrc/cuda/).

The same two-stage split-m algorithm as the Triton backend: warp-per-key fp32 dot products with
16-byte vector loads and the key norms from the same read, a block-level (max, lowest index)
reduction to per-(query, split) partials, then one small kernel that reduces the partials, applies
the gate (reading the winner's own threshold when gamma is per key) and copies the selected
residual row bit for bit. Runs on the caller's current stream.
The split count is planned in C++ from the SM count (cudaDeviceGetAttribute: a cheap lookup).
Importing this module never fails: without the compiled extension the backend reports itself
unavailable.
"""

from typing import Optional, Tuple

import torch

from .backend import Backend
from .contract import Gamma

try:
    from .. import _cuda
except ImportError as exc:  # not built (CPU-only torch, no nvcc) or built against another torch
    _cuda = None
    _IMPORT_ERROR: Optional[ImportError] = exc
else:
    _IMPORT_ERROR = None


def _requirement(device: torch.device) -> Optional[str]:
    if _cuda is None:
        return (
            f"the CUDA extension neuraldb_kernels._cuda was not built or does not load ({_IMPORT_ERROR}); "
            "it is built by `pip install --no-build-isolation -e .` with a CUDA build of torch and nvcc "
            "(or FORCE_CUDA=1)"
        )
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    return None


def _run(q2d: torch.Tensor, K: torch.Tensor, R: torch.Tensor, gamma: Gamma) -> Tuple[torch.Tensor, ...]:
    """Cosines accumulated in fp32, on the current stream of q2d's device; a per-key gamma is read
    for the winning key only, in the finalize kernel."""
    stream = torch.cuda.current_stream(q2d.device).cuda_stream
    if isinstance(gamma, torch.Tensor):
        return tuple(_cuda.gated_retrieve(q2d, K, R, 0.0, gamma, stream))
    return tuple(_cuda.gated_retrieve(q2d, K, R, float(gamma), None, stream))


BACKEND = Backend("cuda", (torch.float32, torch.float16, torch.bfloat16), ("cuda",), _run, _requirement)
