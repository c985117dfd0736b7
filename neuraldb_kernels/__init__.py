"""neuraldb_kernels: edit facts into LLMs with NeuralDB, a gated neural key-value database.

Layout, in the order data flows:
    ops          gated_retrieve (Triton, CUDA, C++ CPU, torch reference)
    store        NeuralDB: durable facts, keys and residuals with a live device view
    distributed  ShardedNeuralDB: a NeuralDB sharded over torch.distributed ranks; split / merge
    integration  attach/detach to Hugging Face models; the embedded default model
    editing      facts in -> keys (Eq. 20) and residuals (Eq. 21) -> NeuralDB rows (Editor)
    baselines    MEMIT / AlphaEdit weight edits on the same keys and residuals
    evaluation   CounterFact / ZsRE / preservation / strict / general-ability metrics
    workspace    a database directory with its model (what the CLI opens)
    cli          the `neuraldb` command
Heavy parts (transformers) are imported on first use.
"""

import importlib

from .ops import BACKENDS, BackendStatus, BackendUnavailableError, KeyIndex, available_backends, gated_retrieve

__version__ = "0.1.0"

# public name -> submodule that defines it, imported on first access
_LAZY = {
    "NeuralDB": "store",
    "StoredFact": "store",
    "Snapshot": "store",
    "ShardedNeuralDB": "distributed",
    "sharded_gated_retrieve": "distributed",
    "ModelFingerprint": "store",
    "FingerprintMismatchWarning": "store",
    "attach": "integration",
    "model_fingerprint": "integration",
    "load_default_model": "integration",
    "Editor": "editing",
    "Fact": "editing",
    "evaluate": "evaluation",
    "Workspace": "workspace",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BACKENDS",
    "BackendStatus",
    "BackendUnavailableError",
    "KeyIndex",
    "available_backends",
    "gated_retrieve",
    *_LAZY,
]
