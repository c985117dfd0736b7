"""The "hf" extra: the Hugging Face packages that models, editing and evaluation need and the core
(gated_retrieve, NeuralDB) does not. `require_hf_extra` turns their absence into one ImportError
that says how to install them."""

import importlib.util

# the extra's modules that our code imports (gguf and accelerate are read by transformers itself)
HF_EXTRA_MODULES = ("transformers", "tqdm")
INSTALL_COMMAND = 'pip install "neuraldb_kernels[hf]" (from a checkout: pip install --no-build-isolation -e ".[hf]")'


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # ValueError: sys.modules[name] is None, i.e. blocked on purpose
        return False


def require_hf_extra(feature: str) -> None:
    """Raise ImportError naming the missing packages and the install command when transformers or
    tqdm is not installed; `feature` says what needed them (e.g. "neuraldb_kernels.editing")."""
    missing = [name for name in HF_EXTRA_MODULES if not _installed(name)]
    if missing:
        raise ImportError(f"{feature} needs the Hugging Face extra, and {', '.join(missing)} "
                          f"{'is' if len(missing) == 1 else 'are'} not installed: {INSTALL_COMMAND}")
