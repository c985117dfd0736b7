"""Model-level speed on a GPU (or, for a smoke run, the CPU): batched editing vs the per-fact loop, and decode / prefill
overhead of an attached NeuralDB (triton and cuda backends), all in one run on one device.

The model is a Hugging Face config (a directory with config.json and the tokenizer, e.g. SmolLM2's)
with RANDOM weights (seeded): timings depend on the shapes, not on the weight values, so this
measures speed only — quality is measured on the real model by bench/edit_quality.py. Editing runs
a fixed number of optimisation steps per fact on both sides (stop_prob=1 disables early stopping),
so random weights cost the two sides the same work.

Example (from the repository root; `--data` takes a CounterFact file as in ../shared/data):
    python bench/gpu_speed.py --model-dir DIR --data counterfact.json --out gpu_speed.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import torch
from edit_quality import per_fact_throughput  # float(nll) every step synchronises


def synchronize() -> None:
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def median_seconds(fn, rounds: int) -> float:
    """Median wall time (s) of `fn()` over `rounds` synchronised calls after one warm-up."""
    fn()
    synchronize()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def random_database(model, layer: int, m: int, dtype: torch.dtype):
    from neuraldb_kernels import NeuralDB
    from neuraldb_kernels.integration import down_proj_dims

    d1, d2 = down_proj_dims(model, layer)
    db = NeuralDB(d1=d1, d2=d2, layer=layer, gamma=0.65, dtype=dtype)
    gen = torch.Generator().manual_seed(m)
    for start in range(0, m, 50_000):
        count = min(50_000, m - start)
        db.add(torch.randn(count, d1, generator=gen).to(dtype), torch.randn(count, d2, generator=gen).to(dtype),
               [f"f{start + i}" for i in range(count)])
    return db


def edit_speed(model, tokenizer, facts, per_fact_facts: int, batch_size: int) -> dict:
    from neuraldb_kernels.editing import Editor, resolve_hparams

    overrides = {"stop_prob": 1.0, "batch_size": batch_size}
    hparams = resolve_hparams(model, overrides)
    editor = Editor(model, tokenizer, **overrides)
    editor.edit(facts[:batch_size], progress=False)  # warm-up: prefixes, CUDA kernels, allocator
    synchronize()
    start = time.perf_counter()
    editor.edit(facts[batch_size:], progress=False)
    synchronize()
    batched = (len(facts) - batch_size) / (time.perf_counter() - start)
    editor.detach()
    # the loop edits facts of the timed batched run (same contexts), fewer of them: it is ~100x slower
    loop = per_fact_throughput(model, tokenizer, facts[batch_size:batch_size + per_fact_facts], hparams)
    return {"facts": len(facts) - batch_size, "batch_size": batch_size, "steps": hparams.steps,
            "batched_facts_per_s": batched, "per_fact_facts": per_fact_facts, "per_fact_facts_per_s": loop,
            "speedup": batched / loop}


def attached_overhead(model, layer: int, sizes, backends, new_tokens: int, prefill_tokens: int) -> list:
    """Decode (batch 1, greedy, KV cache) and prefill time with each backend attached / bare."""
    from neuraldb_kernels import attach

    vocab, device = model.config.vocab_size, model.device
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, vocab, (1, 8), generator=gen).to(device)
    long_prompt = torch.randint(0, vocab, (1, prefill_tokens), generator=gen).to(device)

    def decode():
        model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=0)

    def prefill():
        with torch.no_grad():
            model(long_prompt)

    bare = {"decode": median_seconds(decode, 3), "prefill": median_seconds(prefill, 5)}
    rows = [{"facts": 0, "backend": "bare", "decode_ms_per_token": 1e3 * bare["decode"] / new_tokens,
             "prefill_ms": 1e3 * bare["prefill"]}]
    for m in sizes:
        db = random_database(model, layer, m, model.dtype)
        for backend in backends:
            with attach(model, db, layer, backend=backend):
                decode_s, prefill_s = median_seconds(decode, 3), median_seconds(prefill, 5)
            rows.append({"facts": m, "backend": backend, "decode_ms_per_token": 1e3 * decode_s / new_tokens,
                         "decode_vs_bare": decode_s / bare["decode"], "prefill_ms": 1e3 * prefill_s,
                         "prefill_vs_bare": prefill_s / bare["prefill"]})
            print(rows[-1], flush=True)
        db.close()
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True, help="config.json + tokenizer files (weights not read)")
    parser.add_argument("--data", required=True, help="a CounterFact JSON file")
    parser.add_argument("--edit-facts", type=int, default=1024, help="facts edited batched (after a warm-up batch)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--per-fact-facts", type=int, default=16, help="facts timed in the per-fact loop")
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--backends", nargs="*", default=["triton", "cuda"])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prefill-tokens", type=int, default=2048)
    parser.add_argument("--skip", nargs="*", default=[], choices=["edit", "overhead"])
    parser.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a smoke run)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device is visible to torch: this benchmark needs a GPU (or --device cpu)")

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from neuraldb_kernels.editing import read_counterfact, resolve_hparams

    config = AutoConfig.from_pretrained(args.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report = {"device": name, "torch": torch.__version__, "model_type": config.model_type,
              "date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(sys.argv), "weights": "random (seed 0)"}
    if "edit" not in args.skip:
        with device:
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        facts = read_counterfact(args.data, limit=args.edit_facts + args.batch_size)
        report["edit"] = edit_speed(model, tokenizer, facts, args.per_fact_facts, args.batch_size)
        print("edit", report["edit"], flush=True)
        del model
        torch.cuda.empty_cache()
    if "overhead" not in args.skip:
        with device:
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
        layer = resolve_hparams(model, {}).layer
        report["overhead"] = attached_overhead(model, layer, args.sizes, args.backends, args.new_tokens,
                                               args.prefill_tokens)
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
