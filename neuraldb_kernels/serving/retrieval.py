"""Gated retrieval inside a serving engine: `LiveRetrieval` reads a NeuralDB file that other
processes write, and adds `gated_retrieve` to one FFN down-projection's output, token by token.

A serving engine (vLLM) flattens the tokens of every request in a step into one batch, so the
down-projection sees x: (num_tokens, d1) and returns y: (num_tokens, d2) (vLLM's parallel linear
layers return (y, bias)). Each token is gated on its own, exactly as `integration.attach` does:

    y[t] = y[t] + R[i]   where i = argmax_j cos(x[t], K[j]) and that cosine > gamma_i
    y[t] unchanged        elsewhere (selected, not added to: a closed gate is bit-identical)

Live facts, the rule: every forward step first applies what other processes committed to the
database file (`NeuralDB.refresh`, one SQLite read of the data version when nothing changed), then
reads one snapshot that all tokens of the step use. So a write committed before a request is
submitted is seen by every token of that request; a request already running sees it from its next
step on (tokens it already produced, and their KV cache, stay as they were). Prefix caching must
be off: a cached prefix would carry hidden states computed before a write.

The retrieval runs as the custom op `neuraldb_serving::add_live_retrieval` (SPLITTING_OP), opaque
to torch.compile (it reads the database, which a traced graph cannot), so a compiled model calls
it on every step. CUDA graphs: the op must run eagerly, never inside a captured graph (which would
replay the snapshot of its capture). Under vLLM's piecewise CUDA graphs it is a splitting op
(model.py adds it to `compilation_config.splitting_ops`): vLLM captures the pieces between such
ops and runs the ops themselves eagerly at every step, between the replays, so the live rule
above holds with CUDA graphs on. The op adds to the down-projection's output in place, because the
next captured piece reads the buffer whose address it was captured with; full CUDA graphs
(cudagraph_mode FULL, FULL_DECODE_ONLY, FULL_AND_PIECEWISE, vLLM's default on GPUs) would capture
it, and model.py refuses them.
"""

from __future__ import annotations

import itertools
import os
import threading
from pathlib import Path
from typing import Optional

import torch

from ..integration.fingerprint import down_proj_sha256
from ..ops import gated_retrieve
from ..ops.contract import check_gamma
from ..ops.dispatch import check_backend_name
from ..store import ModelFingerprint, NeuralDB
from ..workspace import DB_FILE

_LIVE: dict[int, "LiveRetrieval"] = {}  # the op finds its retrieval by id: an op takes no Python objects
_NEXT_ID = itertools.count(1)
_REGISTRY_LOCK = threading.Lock()


SPLITTING_OP = "neuraldb_serving::add_live_retrieval"


@torch.library.custom_op(SPLITTING_OP, mutates_args=("output",))
def add_live_retrieval(hidden: torch.Tensor, output: torch.Tensor, retrieval_id: int) -> None:
    """Add to `output` (..., d2), in place, the gated retrieval for `hidden` (..., d1) where a gate
    fires, read from the live database of the `LiveRetrieval` numbered `retrieval_id`."""
    output.copy_(_LIVE[retrieval_id].retrieve_into(hidden, output))


@add_live_retrieval.register_fake
def _(hidden: torch.Tensor, output: torch.Tensor, retrieval_id: int) -> None:
    return None


class LiveRetrieval:
    """One NeuralDB database file, opened read-only, retrieved from at one down-projection.

    path: the database file (`neuraldb.sqlite`) or a database directory holding it; the database
        must record its layer (`layer`, the decoder layer to hook).
    gamma: one threshold for every key (overrides the database's); None: the database's own
        (per-key thresholds where facts have them), re-read at every step.
    backend: the `gated_retrieve` backend ("auto", "cpu", "torch", "triton", "cuda").
    After a step, `last_index` holds the fired row of each token of that step (int64, -1: none)
    and `last_snapshot` the snapshot it read (for tests and logs; ids via `last_snapshot.ids_at`).
    """

    def __init__(self, path: os.PathLike | str, *, gamma: Optional[float] = None, backend: str = "auto"):
        check_backend_name(backend)
        gamma = None if gamma is None else check_gamma(gamma)
        path = Path(path)
        if path.is_dir():
            path = path / DB_FILE
        self.db = NeuralDB.open(path, readonly=True)
        if self.db.layer is None:
            self.db.close()
            raise ValueError(f"{path} records no layer: serving needs the layer its facts were edited into")
        self.layer = self.db.layer
        self.gamma = gamma
        self.backend = backend
        self.last_index: Optional[torch.Tensor] = None
        self.last_snapshot = None
        with _REGISTRY_LOCK:
            self.id = next(_NEXT_ID)
            _LIVE[self.id] = self

    def check_model(self, module: torch.nn.Module, model_type: str, d1: int, d2: int) -> None:
        """ValueError unless the database was built for this down-projection: model type, layer,
        d1, d2 and (for a database with a fingerprint) the weights, hashed as `model_fingerprint`
        does. Call it once the weights are loaded."""
        given = ModelFingerprint(model_type=model_type, layer=self.layer, d1=d1, d2=d2,
                                 weights_sha256=down_proj_sha256(module))
        self.db.check_fingerprint(given, allow_weight_mismatch=True)  # type, layer, d1, d2
        stored = self.db.fingerprint
        if stored is not None and stored.weights_sha256 != given.weights_sha256:
            raise ValueError(f"{self.db.path} was built for other weights of layer {self.layer} "
                             f"[{stored.describe()}] than the served model's [{given.describe()}] "
                             f"(served in another dtype? serve the weights the facts were edited on)")

    def retrieve_into(self, hidden: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """`output` + the retrieved residual where a token's gate fires, `output` elsewhere (a new
        tensor; see the module docstring for the snapshot each step reads)."""
        self.db.refresh()
        snapshot = self.db.snapshot(hidden.device, output.dtype)
        if self.gamma is not None:
            gamma = self.gamma
        else:
            gamma = snapshot.gammas if snapshot.has_key_gammas else snapshot.gamma
        retrieved, index, _ = gated_retrieve(hidden, snapshot.keys, snapshot.residuals, gamma,
                                             backend=self.backend, return_index=True)
        self.last_index, self.last_snapshot = index, snapshot
        return torch.where((index >= 0).unsqueeze(-1), output + retrieved, output)

    def hook(self, module: torch.nn.Module, args: tuple, output):
        """A forward hook for the down-projection: its output, a tensor or (tensor, bias), gets the
        retrieval added in place (the hook returns None: the output object stays the module's)."""
        add_live_retrieval(args[0], output[0] if isinstance(output, tuple) else output, self.id)

    def close(self) -> None:
        """Forget this retrieval and close the database (idempotent)."""
        with _REGISTRY_LOCK:
            _LIVE.pop(self.id, None)
        self.db.close()
