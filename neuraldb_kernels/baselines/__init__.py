"""Weight-editing baselines on NeuralDB's own keys and residuals: MEMIT and AlphaEdit at one layer.

    statistics  C0 = K0ᵀ K0 of the preserved keys, streamed over texts, saved with the model fingerprint
    texts       the texts K0 comes from: MMLU dev, LAMBADA minus scored passages, model-written text
    solvers     the closed-form updates Δ (MEMIT, AlphaEdit's null-space projection and update)
    weights     apply Δ to the down-projection and restore the original weight bit for bit

Fed the same keys K1 (n, d1) and residuals R (n, d2) that NeuralDB stores for the same facts at the
same layer, the only difference between the methods is a linear Δ against gated retrieval.
"""

from .._hf_extra import require_hf_extra

require_hf_extra("neuraldb_kernels.baselines")

from .solvers import alphaedit_delta, memit_delta, null_space_projection
from .statistics import KeyStatistics, collect_key_statistics
from .texts import general_texts, lambada_texts, mmlu_dev_texts, model_written_texts
from .weights import AppliedDelta, apply_delta

__all__ = [
    "AppliedDelta",
    "KeyStatistics",
    "alphaedit_delta",
    "apply_delta",
    "collect_key_statistics",
    "general_texts",
    "lambada_texts",
    "memit_delta",
    "mmlu_dev_texts",
    "model_written_texts",
    "null_space_projection",
]
