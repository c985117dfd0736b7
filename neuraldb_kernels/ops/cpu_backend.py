"""The "cpu" backend of gated_retrieve: the C++ kernel in neuraldb_kernels._cpu (csrc/cpu/).

OpenMP over key chunks and query groups, AVX2/FMA/F16C dot products chosen at run time (portable
fallback otherwise), bf16/fp16 keys converted in registers, no n x m score matrix. Importing this
module never fails: without the compiled extension the backend reports itself unavailable.
"""

from typing import Optional, Tuple

import torch

from .backend import Backend
from .contract import FLOAT_DTYPES, Gamma

try:
    from .. import _cpu
except ImportError as exc:  # extension not built, or built against another torch
    _cpu = None
    _IMPORT_ERROR: Optional[ImportError] = exc
else:
    _IMPORT_ERROR = None


def _requirement(device: torch.device) -> Optional[str]:
    if _cpu is None:
        return (
            f"the C++ extension neuraldb_kernels._cpu was not built or does not load ({_IMPORT_ERROR}); "
            "reinstall with `pip install --no-build-isolation -e .`"
        )
    return None


def _run(q2d: torch.Tensor, K: torch.Tensor, R: torch.Tensor, gamma: Gamma) -> Tuple[torch.Tensor, ...]:
    """Uses torch.get_num_threads() threads; the C++ binding checks its own inputs too. A per-key
    gamma is read at the winning index only, in the final gate."""
    if isinstance(gamma, torch.Tensor):
        return _cpu.gated_retrieve(q2d, K, R, 0.0, torch.get_num_threads(), key_gamma=gamma)
    return _cpu.gated_retrieve(q2d, K, R, float(gamma), torch.get_num_threads())


def compressed_candidates(queries, index, budget: int):
    """The certified candidate pass over an int8 KeyIndex (key_index.py) in C++: AVX-512 VNNI,
    AVX2 or portable integer dot products, chosen at run time; torch.get_num_threads() threads.
    Returns key_index.CandidateSets."""
    from .key_index import CandidateSets, certified_slack

    keys, offsets, overflowed = _cpu.int8_candidates(
        queries.codes, queries.scale, queries.error, index.codes, index.row_scale, index.row_error, index.row_norm,
        certified_slack(index.d1), budget, torch.get_num_threads(),
    )  # fmt: skip
    return CandidateSets(keys, offsets, overflowed)


BACKEND = Backend(
    "cpu", FLOAT_DTYPES, ("cpu",), _run, _requirement, candidates=compressed_candidates, candidate_formats=("int8",)
)
