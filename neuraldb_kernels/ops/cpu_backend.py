"""The "cpu" backend of gated_retrieve: the C++ kernel in neuraldb_kernels._cpu (csrc/cpu/).

OpenMP over key chunks and query groups, AVX2/FMA/F16C dot products chosen at run time (portable
fallback otherwise), bf16/fp16 keys converted in registers, no n x m score matrix. Importing this
module never fails: without the compiled extension `unavailable_reason` says why.
"""

from typing import Optional, Tuple

import torch

try:
    from .. import _cpu
except ImportError as exc:  # extension not built, or built against another torch
    _cpu = None
    _IMPORT_ERROR: Optional[ImportError] = exc
else:
    _IMPORT_ERROR = None


def unavailable_reason(device: torch.device) -> Optional[str]:
    """None when the kernel runs on tensors of `device`, else a sentence saying why not."""
    if _cpu is None:
        return (
            f"the C++ extension neuraldb_kernels._cpu was not built or does not load ({_IMPORT_ERROR}); "
            "reinstall with `pip install --no-build-isolation -e .`"
        )
    if device.type != "cpu":
        return f"tensors are on {device.type}, the cpu backend needs CPU tensors"
    return None


def retrieve(
    q2d: torch.Tensor, K: torch.Tensor, R: torch.Tensor, gamma: float
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q2d (n, d1), K (m >= 1, d1) and R (m, d2) contiguous -> out (n, d2) R.dtype, index (n,) int64,
    score (n,) float32. Uses torch.get_num_threads() threads."""
    return _cpu.gated_retrieve(q2d, K, R, float(gamma), torch.get_num_threads())


run = retrieve  # the dispatcher's entry point (the C++ kernel checks its own inputs)
