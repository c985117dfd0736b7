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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama (2 layers, hidden 32) saved as a Hugging Face model directory, with
    SmolLM2's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from neuraldb_kernels.integration.default_model import load_default_tokenizer

    tokenizer = load_default_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256)
    directory = tmp_path_factory.mktemp("tiny") / "model"
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
