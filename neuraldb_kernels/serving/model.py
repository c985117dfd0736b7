"""vLLM model classes with a NeuralDB at one layer: vLLM's own Llama, Mistral and Qwen2 classes
with a `LiveRetrieval` hooked on `model.layers[layer].mlp.down_proj` (the layer the database
records). Imported by vLLM (registered by `plugin.register`), never by the rest of the package.

The database comes from the Hugging Face config, which vLLM lets the caller override:
`hf_overrides={"architectures": ["NeuralDBLlamaForCausalLM"], "neuraldb_database": DIR}` (see
`launch.engine_overrides`), with optional "neuraldb_gamma" and "neuraldb_backend".

Requirements, checked when the engine builds the model: tensor and pipeline parallel size 1 (the
cosine gate needs the whole d1-vector of a token, which tensor parallelism splits), prefix caching
off (see retrieval.py), and the database built for these weights (its fingerprint; weights are
hashed after loading, as `integration.model_fingerprint` hashes the Hugging Face module).
"""

from __future__ import annotations

from typing import Iterable

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

from .retrieval import LiveRetrieval

DATABASE_KEY = "neuraldb_database"
GAMMA_KEY = "neuraldb_gamma"
BACKEND_KEY = "neuraldb_backend"


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
