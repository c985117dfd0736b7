"""The "cpu" backend of gated_retrieve: the C++ kernel in neuraldb_kernels._cpu (csrc/cpu/).

OpenMP over key chunks and query groups, AVX-512 or AVX2/FMA/F16C dot products chosen at run time
(portable fallback otherwise), bf16/fp16 keys converted in registers, no n x m score matrix. Two
paths with bit-identical results (`match_path` picks one per call by shape):
- "scan": every (query, key) cosine with the exact arithmetic; reads the keys at full speed, the
  fastest path for decode (few queries).
- "filtered" (prefill, CPUs with AVX512-BF16): bf16 dot products (`vdpbf16ps`, twice the float32
  FMA rate) over cache tiles of keys bound every cosine within a derived eps, and only keys that may
  win are scored exactly (csrc/cpu/gated_retrieve_cpu_filter.h).
Importing this module never fails: without the compiled extension the backend reports itself
unavailable.
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


# Query rows per call from which the filtered path is faster than the scan, per key dtype: below
# it the keys are read for too few queries to pay for the bf16 staging and the bound checks, and at
# n = 1 (decode) the scan reads the keys at full memory speed. float16 keys cost a conversion to
# bf16 per tile that the scan does not need: at n = 16 the scan was faster, at 64 the filtered path
# (bench/RESULTS.md, "CPU prefill").
FILTERED_MIN_QUERIES = {torch.float32: 16, torch.bfloat16: 16, torch.float16: 32}


def match_path(n: int, q_dtype: torch.dtype, k_dtype: torch.dtype) -> str:
    """The kernel path for n query rows against keys of k_dtype: "filtered" from
    FILTERED_MIN_QUERIES[k_dtype] rows on, when this CPU has AVX512-BF16 and the scores accumulate in
    float32 (neither q nor K is float64); else "scan". Both give the same result bit for bit."""
    if torch.float64 in (q_dtype, k_dtype) or n < FILTERED_MIN_QUERIES[k_dtype]:
        return "scan"
    return "filtered" if _cpu is not None and _cpu.filtered_path_available() else "scan"


def _run(q2d: torch.Tensor, K: torch.Tensor, R: torch.Tensor, gamma: Gamma) -> Tuple[torch.Tensor, ...]:
    """Uses torch.get_num_threads() threads and the path `match_path` picks; the C++ binding checks
    its own inputs too. A per-key gamma is read at the winning index only, in the final gate."""
    path = match_path(q2d.shape[0], q2d.dtype, K.dtype)
    if isinstance(gamma, torch.Tensor):
        return _cpu.gated_retrieve(q2d, K, R, 0.0, torch.get_num_threads(), key_gamma=gamma, path=path)
    return _cpu.gated_retrieve(q2d, K, R, float(gamma), torch.get_num_threads(), path=path)


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
