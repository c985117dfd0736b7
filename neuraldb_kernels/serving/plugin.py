"""The vLLM general plugin (entry point `vllm.general_plugins` = `neuraldb`): registers the NeuralDB
model classes of model.py under their architecture names. vLLM calls `register` in each of its
processes; the classes load lazily, only when a model names one of them.
"""

from __future__ import annotations

# architecture of the served model (config.json "architectures") -> the class with a NeuralDB
ARCHITECTURES = {
    "LlamaForCausalLM": "NeuralDBLlamaForCausalLM",
    "MistralForCausalLM": "NeuralDBMistralForCausalLM",
    "Qwen2ForCausalLM": "NeuralDBQwen2ForCausalLM",
}


def register() -> None:
    """Register every NeuralDB architecture with vLLM's ModelRegistry (safe to call repeatedly)."""
    from vllm import ModelRegistry

    for name in ARCHITECTURES.values():
        if name not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(name, f"neuraldb_kernels.serving.model:{name}")
