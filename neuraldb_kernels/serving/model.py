"""vLLM model classes with a NeuralDB at one layer: vLLM's own Llama, Mistral and Qwen2 classes
with a `LiveRetrieval` hooked on `model.layers[layer].mlp.down_proj` (the layer the database
records). Imported by vLLM (registered by `plugin.register`), never by the rest of the package.

The database comes from the Hugging Face config, which vLLM lets the caller override:
`hf_overrides={"architectures": ["NeuralDBLlamaForCausalLM"], "neuraldb_database": DIR}` (see
`launch.engine_overrides`), with optional "neuraldb_gamma" and "neuraldb_backend".

Requirements, checked when the engine builds the model: tensor and pipeline parallel size 1 (the
cosine gate needs the whole d1-vector of a token, which tensor parallelism splits), prefix caching
off (see retrieval.py), no full CUDA graphs and the database built for these weights (its
fingerprint; weights are hashed after loading, as `integration.model_fingerprint` hashes the
Hugging Face module).

CUDA graphs: with piecewise graphs the retrieval op joins vLLM's splitting ops, so it runs eagerly
at every step between the captured pieces and reads the live database (`keep_retrieval_eager`);
`launch.engine_arguments(..., enforce_eager=False)` asks for cudagraph_mode "PIECEWISE".
"""

from __future__ import annotations

from typing import Iterable

import torch
from vllm.compilation.breakable_cudagraph import is_breakable_cudagraph_enabled
from vllm.config import CompilationConfig, VllmConfig
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

from .retrieval import SPLITTING_OP, LiveRetrieval

DATABASE_KEY = "neuraldb_database"
GAMMA_KEY = "neuraldb_gamma"
BACKEND_KEY = "neuraldb_backend"


def keep_retrieval_eager(config: CompilationConfig) -> None:
    """Make the retrieval op run eagerly at every step under `config`'s CUDA graphs: with
    piecewise graphs, add SPLITTING_OP to `config.splitting_ops` (vLLM captures the pieces between
    splitting ops; the ops run between the replays); with none, nothing to do. ValueError for full
    CUDA graphs (FULL, FULL_DECODE_ONLY, FULL_AND_PIECEWISE) and for breakable CUDA graphs
    (VLLM_USE_BREAKABLE_CUDAGRAPH), which would capture the op and replay one database snapshot.
    Call it while the model is built, before vLLM compiles it."""
    mode = config.cudagraph_mode
    if mode.has_full_cudagraphs():
        raise ValueError(f"NeuralDB serving cannot run under full CUDA graphs (cudagraph_mode {mode.name}): a "
                         "captured graph would replay one database snapshot. Use cudagraph_mode PIECEWISE "
                         "(compilation_config={'cudagraph_mode': 'PIECEWISE'}, as neuraldb serve --compile does) "
                         "or enforce_eager")
    if mode.has_piecewise_cudagraphs():
        if is_breakable_cudagraph_enabled():
            raise ValueError("NeuralDB serving cannot run under breakable CUDA graphs (VLLM_USE_BREAKABLE_CUDAGRAPH): "
                             "they would capture the retrieval; unset it to use piecewise graphs")
        if config.splitting_ops is not None and SPLITTING_OP not in config.splitting_ops:
            config.splitting_ops.append(SPLITTING_OP)


class NeuralDBMixin:
    """Adds a live NeuralDB to a vLLM decoder whose layers are `self.model.layers` with an
    `mlp.down_proj` each; `neuraldb` is the `LiveRetrieval`."""

    def _attach_neuraldb(self, vllm_config: VllmConfig) -> None:
        config = vllm_config.model_config.hf_config
        directory = getattr(config, DATABASE_KEY, None)
        if not directory:
            raise ValueError(f"{type(self).__name__} needs the database: pass hf_overrides with "
                             f"{DATABASE_KEY!r} (the database directory)")
        parallel = vllm_config.parallel_config
        if parallel.tensor_parallel_size != 1 or parallel.pipeline_parallel_size != 1:
            raise ValueError("NeuralDB serving needs tensor_parallel_size=1 and pipeline_parallel_size=1 "
                             "(the gate compares whole d1-vectors, which tensor parallelism splits)")
        if vllm_config.cache_config.enable_prefix_caching:
            raise ValueError("NeuralDB serving needs prefix caching off (enable_prefix_caching=False, "
                             "--no-enable-prefix-caching): a cached prefix would keep hidden states computed "
                             "before the database changed")
        keep_retrieval_eager(vllm_config.compilation_config)
        self.neuraldb = LiveRetrieval(directory, gamma=getattr(config, GAMMA_KEY, None),
                                      backend=getattr(config, BACKEND_KEY, None) or "auto")
        layers = self.model.layers
        if not 0 <= self.neuraldb.layer < len(layers):
            layer = self.neuraldb.layer
            self.neuraldb.close()
            raise ValueError(f"the database is for layer {layer}; the model has {len(layers)} layers")
        self._neuraldb_model_type = config.model_type
        self._neuraldb_module = layers[self.neuraldb.layer].mlp.down_proj
        self._neuraldb_module.register_forward_hook(self.neuraldb.hook)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = super().load_weights(weights)
        module = self._neuraldb_module
        self.neuraldb.check_model(module, self._neuraldb_model_type, module.input_size, module.output_size)
        return loaded


class NeuralDBLlamaForCausalLM(NeuralDBMixin, LlamaForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._attach_neuraldb(vllm_config)


class NeuralDBMistralForCausalLM(NeuralDBMixin, MistralForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._attach_neuraldb(vllm_config)


class NeuralDBQwen2ForCausalLM(NeuralDBMixin, Qwen2ForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._attach_neuraldb(vllm_config)
