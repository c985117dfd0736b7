"""Benchmark session setup: every suite runs torch with BENCH_THREADS threads (2, the CI machine's
cores, unless NEURALDB_BENCH_THREADS says otherwise), restored afterwards; the SmolLM2 suites
share one loaded model and the CounterFact file of ../shared/data; the script tests share one tiny
random Llama."""

import os
import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "python_tests"))
from tiny_models import save_tiny_llama  # noqa: E402  (python_tests' tiny models, shared)

BENCH_THREADS = int(os.environ.get("NEURALDB_BENCH_THREADS", "2"))
COUNTERFACT = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "counterfact" / "counterfact-a.json"


@pytest.fixture(scope="module", autouse=True)
def bench_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(BENCH_THREADS)
    yield BENCH_THREADS
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded SmolLM2, loaded once per session."""
    from neuraldb_kernels.integration import load_default_model

    return load_default_model()


@pytest.fixture(scope="session")
def counterfact_path():
    """The CounterFact records the SmolLM2 suites read; they are skipped when it is absent."""
    if not COUNTERFACT.is_file():
        pytest.skip(f"{COUNTERFACT} is not present")
    return COUNTERFACT


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama (2 layers, hidden 32) saved with SmolLM2's tokenizer as a model directory
    (the same model as python_tests' fixture of that name)."""
    from neuraldb_kernels.integration.default_model import load_default_tokenizer

    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", load_default_tokenizer())
