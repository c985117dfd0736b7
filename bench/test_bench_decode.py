"""Decode speed of SmolLM2-135M-Instruct with a NeuralDB attached vs the bare model, same run.

What is timed: `model.generate` of NEW_TOKENS greedy tokens (prefill of a 10-token prompt, then
NEW_TOKENS - 1 cached decoding steps), float32 model, 2 threads. The database holds m facts:
m - 1 random unit keys (they never fire) and one planted fact keyed on the prompt's subject token
(it fires in the prefill). The attached runs use the "auto" backend (the C++ "cpu" kernel when
built) with the keys in the model's dtype, and also with `key_dtype=torch.float16` (half the bytes
to read per decoded token).

Run:
    python -m pytest bench/test_bench_decode.py -q --benchmark-columns=median,min,rounds
Gate only (attached at most 10% slower than bare at 10k facts, as a ratio from one run):
    python -m pytest bench/test_bench_decode.py -q -k gate -s
"""

import time

import pytest
import torch

from neuraldb_kernels import NeuralDB, attach

LAYER = 4
NEW_TOKENS = 16
FACT_COUNTS = (1_000, 10_000, 100_000)
PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT_TOKEN = 3  # " Tower"
ROUNDS = 5


@pytest.fixture(scope="module")
def model_and_inputs(smollm2):
    model, tokenizer = smollm2
    return model, dict(tokenizer(PROMPT, return_tensors="pt"))


def subject_key(model, inputs) -> torch.Tensor:
    """(1536,) the layer's down-projection input at the prompt's subject token: the planted key."""
    seen = {}
    module = model.model.layers[LAYER].mlp.down_proj

    def capture(_, args, output):
        seen["key"] = args[0][0, SUBJECT_TOKEN].clone()

    handle = module.register_forward_hook(capture)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    return seen["key"]


@pytest.fixture(scope="module")
def planted_key(model_and_inputs):
    return subject_key(*model_and_inputs)


_DATABASES = {}


def database(m: int, planted_key: torch.Tensor, stored_keys: torch.Tensor | None = None) -> NeuralDB:
    """m facts with small random residuals: m - 1 random unit keys (or the first m - 1 rows of
    `stored_keys` (t, 1536), e.g. real activations), and the planted one (built once per m and keys)."""
    name = (m, None if stored_keys is None else stored_keys.data_ptr())
    if name not in _DATABASES:
        db = NeuralDB(d1=1536, d2=576, layer=LAYER)
        generator = torch.Generator().manual_seed(m)
        for start in range(0, m - 1, 10_000):
            n = min(10_000, m - 1 - start)
            keys = (torch.nn.functional.normalize(torch.randn(n, 1536, generator=generator), dim=1)
                    if stored_keys is None else stored_keys[start : start + n])
            db.add(keys, torch.randn(n, 576, generator=generator) * 0.01, ids=[f"random-{start + i}" for i in range(n)])
        db.add(planted_key, torch.randn(576, generator=generator), ids="planted")
        _DATABASES[name] = db
    return _DATABASES[name]


def generate(model, inputs):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved_min_times(model, inputs, db, key_dtypes=(None,), rounds=ROUNDS):
    """{"bare": s, key_dtype: s, ...}: minimum seconds per generate call, one round = bare, then
    attached with each key dtype in turn."""
    times = {"bare": []}
    times.update({key_dtype: [] for key_dtype in key_dtypes})
    generate(model, inputs)  # warm-up
    for _ in range(rounds):
        times["bare"].append(timed(lambda: generate(model, inputs)))
        for key_dtype in key_dtypes:
            with attach(model, db, key_dtype=key_dtype) as handle:
                times[key_dtype].append(timed(lambda: generate(model, inputs)))
                assert handle.last is not None
    return {name: min(values) for name, values in times.items()}


def greedy_without_cache(model, inputs) -> torch.Tensor:
    """The reference decode: NEW_TOKENS times a full forward over everything so far, then argmax
    with the end-of-sequence tokens excluded (as `min_new_tokens=NEW_TOKENS` does in `generate`)."""
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    ids = inputs["input_ids"]
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            logits = model(input_ids=ids, use_cache=False).logits[:, -1]
            logits[:, eos] = -torch.inf
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


def test_decode_bare(benchmark, model_and_inputs):
    """The baseline the attached runs are compared with; what it times is the model's own greedy decode."""
    model, inputs = model_and_inputs
    benchmark.group = "decode SmolLM2"
    output = benchmark.pedantic(lambda: generate(model, inputs), rounds=ROUNDS, warmup_rounds=1)
    benchmark.extra_info["tokens_per_s"] = NEW_TOKENS / benchmark.stats.stats.min
    assert torch.equal(output, greedy_without_cache(model, inputs))


@pytest.mark.parametrize(
    "m, key_dtype",
    [(m, None) for m in FACT_COUNTS] + [(10_000, torch.float16), (100_000, torch.float16)],
    ids=[f"{m // 1000}k-keys-model-dtype" for m in FACT_COUNTS] + ["10k-keys-fp16", "100k-keys-fp16"],
)
def test_decode_attached(benchmark, model_and_inputs, planted_key, m, key_dtype):
    model, inputs = model_and_inputs
    db = database(m, planted_key)
    benchmark.group = "decode SmolLM2"
    with attach(model, db, key_dtype=key_dtype) as handle:
        with torch.no_grad():
            model(**inputs)
        assert [f.fact_id for f in handle.fired()] == ["planted"]
        benchmark.pedantic(lambda: generate(model, inputs), rounds=ROUNDS, warmup_rounds=1)
    benchmark.extra_info["tokens_per_s"] = NEW_TOKENS / benchmark.stats.stats.min


def test_gate_decode_at_most_10_percent_slower_at_10k_facts(model_and_inputs, planted_key):
    """Gate on the default (keys in the model's dtype); float16 keys are timed alongside for the record."""
    model, inputs = model_and_inputs
    times = interleaved_min_times(model, inputs, database(10_000, planted_key), key_dtypes=(None, torch.float16))
    for key_dtype in (None, torch.float16):
        print(f"\n[decode gate] 10k facts, keys {key_dtype or 'in the model dtype'}: bare "
              f"{NEW_TOKENS / times['bare']:.1f} tok/s, attached {NEW_TOKENS / times[key_dtype]:.1f} tok/s, "
              f"x{times[key_dtype] / times['bare']:.3f}")
    ratio = times[None] / times["bare"]
    assert ratio <= 1.10, f"attached decoding takes x{ratio:.3f} the bare model's time at 10k facts"
