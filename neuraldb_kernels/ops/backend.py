"""`Backend`: what one gated_retrieve backend is, in one record per backend module.

Each backend module defines `BACKEND = Backend(...)`; the registry (dispatch.py) reads only these
records, for `available_backends()`, "auto" resolution and explicit backend choices alike.
"""

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from .contract import Gamma

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Gamma], Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
# (query codes, KeyIndex, candidate budget) -> CandidateSets; see key_index.py
CandidateKernel = Callable[..., object]


def _always_ready(device: torch.device) -> Optional[str]:
    return None


@dataclass(frozen=True)
class Backend:
    """One backend of gated_retrieve.

    name: what `backend=` selects. dtypes: the q, K and R dtypes it accepts. device_types: the
    torch device types ("cpu", "cuda") of tensors it can run on; None for every device torch
    supports. requirement(device): None when what the backend needs beyond the device type is
    present (a compiled extension, an importable package, a visible GPU), else a sentence saying
    what is missing and how to get it. run(q2d, K, R, gamma): the kernel, on validated inputs:
    q2d (n >= 1, d1), K (m >= 1, d1), R (m, d2), contiguous, one device, dtypes in `dtypes`;
    gamma a float, or a contiguous (m,) float32 tensor of per-key thresholds in [-1, 1] on the
    same device -> out (n, d2) R.dtype, index (n,) int64, score (n,) float32.
    candidates(query_codes, key_index, budget): the certified candidate pass over a KeyIndex's
    codes for the formats in candidate_formats (key_index.py); None where the backend has none
    (the torch reference pass then finds the candidates, and `run` rescores them).
    """

    name: str
    dtypes: Tuple[torch.dtype, ...]
    device_types: Optional[Tuple[str, ...]]
    run: Kernel
    requirement: Callable[[torch.device], Optional[str]] = _always_ready
    candidates: Optional[CandidateKernel] = None
    candidate_formats: Tuple[str, ...] = ()

    def unavailable_reason(self, device) -> Optional[str]:
        """None when this backend runs on tensors of `device`, else a sentence saying why not."""
        device = torch.device(device)
        if self.device_types is not None and device.type not in self.device_types:
            wanted = " or ".join(t.upper() for t in self.device_types)
            return f"tensors are on {device.type}, the {self.name} backend needs {wanted} tensors"
        return self.requirement(device)

    def supports(self, dtypes) -> bool:
        """True when every dtype in `dtypes` is one this backend accepts."""
        return all(d in self.dtypes for d in dtypes)

    def retrieve(
        self, q2d: torch.Tensor, K: torch.Tensor, R: torch.Tensor, gamma: Gamma
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`run` for direct calls (tests, benchmarks): a TypeError naming the first of q, K, R with
        an unsupported dtype, a RuntimeError when the backend cannot run on q2d's device, then the
        kernel. Shapes as for `run`."""
        for name, t in (("q", q2d), ("K", K), ("R", R)):
            if t.dtype not in self.dtypes:
                raise TypeError(
                    f"gated_retrieve[{self.name}]: {name} has dtype {t.dtype}; the {self.name} backend "
                    f"supports {', '.join(str(d).replace('torch.', '') for d in self.dtypes)}"
                )
        why = self.unavailable_reason(q2d.device)
        if why is not None:
            raise RuntimeError(f"gated_retrieve[{self.name}]: not available for tensors on {q2d.device}: {why}")
        return self.run(q2d, K, R, gamma)
