"""Serving edited models: NeuralDB inside vLLM (the `vllm.general_plugins` entry point registers
the model classes of model.py), with facts added and removed live through the same database.

- retrieval.py: `LiveRetrieval`, the per-token gated retrieval over a serving engine's flattened
  batch, reading the database file other processes write (no vLLM import: testable anywhere).
- model.py: vLLM's Llama / Mistral / Qwen2 classes with a `LiveRetrieval` at the database's layer.
- plugin.py: the entry point that registers them.
- launch.py: the engine arguments for a database directory, `neuraldb serve`, and stopping a server.
"""

from .launch import ServedDatabase, engine_arguments, serve_command, served_database, stop_server
from .retrieval import LiveRetrieval

__all__ = ["LiveRetrieval", "ServedDatabase", "engine_arguments", "serve_command", "served_database",
           "stop_server"]
