"""Tiny randomly initialised models of every supported architecture, for tests (a helper module,
not a test module). The FFN down-projection paths are written out here independently of
neuraldb_kernels' own architecture table."""

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

HIDDEN = 64

# model_type -> (tiny config, down-projection path): the paths are written out independently of
# neuraldb_kernels' own table
ARCHS = {
    "gpt2": (lambda **c: GPT2Config(n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=128, **c),
             "transformer.h.{}.mlp.c_proj"),
    "gptj": (lambda **c: GPTJConfig(n_embd=HIDDEN, n_layer=2, n_head=4, rotary_dim=8, n_positions=128, **c),
             "transformer.h.{}.mlp.fc_out"),
    "gpt_neox": (lambda **c: GPTNeoXConfig(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=112, max_position_embeddings=128, **c),
                 "gpt_neox.layers.{}.mlp.dense_4h_to_h"),
    "llama": (lambda **c: LlamaConfig(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=96, max_position_embeddings=128, **c),
              "model.layers.{}.mlp.down_proj"),
    "mistral": (lambda **c: MistralConfig(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=80, max_position_embeddings=128,
                                          **c),
                "model.layers.{}.mlp.down_proj"),
    "qwen2": (lambda **c: Qwen2Config(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=72, max_position_embeddings=128, **c),
              "model.layers.{}.mlp.down_proj"),
}


def tiny_model(kind, tokenizer, dtype=torch.float32, seed=0, layers=2):
    make_config, _ = ARCHS[kind]
    config = make_config(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=None,
                         pad_token_id=tokenizer.pad_token_id, initializer_range=0.1)
    config.num_hidden_layers = layers
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).to(dtype).eval()


def save_tiny_llama(directory, tokenizer):
    """Save a tiny random Llama (2 layers, hidden 32, seed 0) with `tokenizer` as a Hugging Face
    model directory at `directory` (the `tiny_model_dir` fixtures of python_tests and bench)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def token_queries(model, tokenizer, text, layer):
    """(the tokenizer's encoding of `text` with offsets, the float64 down-projection input of
    decoder layer `layer` at every token of `text` alone: (tokens, d1))."""
    from neuraldb_kernels.integration import locate_down_proj

    seen = []
    handle = locate_down_proj(model, layer).register_forward_pre_hook(lambda _m, args: seen.append(args[0][0]))
    try:
        encoded = tokenizer(text, return_offsets_mapping=True)
        with torch.no_grad():
            model(torch.tensor([encoded["input_ids"]]))
    finally:
        handle.remove()
    return encoded, seen[0].double()
