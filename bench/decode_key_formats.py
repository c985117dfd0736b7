"""SmolLM2 decode with a NeuralDB attached, full-precision keys vs the int8 key index, against the
bare model, at 1 and 2 threads, in one run.

    PYTHONPATH=$PWD python bench/decode_key_formats.py [--facts 1 100000] [--threads 1 2] [--rounds 7]
        [--new-tokens 24] [--keys FILE]

Model: float32 SmolLM2-135M-Instruct, hooked at layer 4; prompt and databases as
bench/test_bench_decode.py: m - 1 random unit keys (they never fire) and one planted fact keyed on
the prompt's subject token (it fires in the prefill). --keys FILE: the m - 1 keys are instead the
first rows of FILE's "K" (the cache bench/key_index_realistic.py writes: SmolLM2's layer-4
down-projection inputs at every token of LAMBADA passages), realistic keys that may fire too.
What is timed: `generate` of --new-tokens greedy tokens, batch 1, KV cache (a 10-token prefill,
then cached single-token steps). A round, for each thread count in turn: bare, attached with
float32 keys, attached with key_format="int8" (the store's compressed index of the view, built
once before the rounds and kept by the database), interleaved so that every side sees the same
load. Reported per (m, threads): median and min seconds per call (wall clock, and the process's
CPU time), each attached median over the bare one, and the attach hook's own time per forward
(from a forward hook registered before the attachment's to one after it, in an extra untimed
call per round), and the candidate counts of the int8 index on the queries of one decode (the
hook's inputs; an overflowed query is scored over all keys). The tokens generated with int8
codes are asserted equal to those with float32 keys, and the planted fact must fire.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from neuraldb_kernels import attach
from neuraldb_kernels.integration import load_default_model
from neuraldb_kernels.ops import key_index as ki
from test_bench_decode import PROMPT, database, subject_key

SIDES = ("bare", "fp32 keys", "int8 index")


def timed(call) -> tuple:
    """(wall seconds, process CPU seconds) of one call; on a shared machine the CPU time leaves out
    the waits for a core (with 2 threads it counts both threads, spinning included)."""
    wall, cpu = time.perf_counter(), time.process_time()
    call()
    return time.perf_counter() - wall, time.process_time() - cpu


def generate(model, inputs, new_tokens: int) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)


def hook_seconds(model, inputs, db, key_format, new_tokens: int) -> float:
    """Mean seconds per forward spent in the attachment's hook: hooks run in registration order, so
    one registered before `attach` and one after bracket it."""
    module = model.model.layers[db.layer].mlp.down_proj
    starts, spent = [], []
    before = module.register_forward_hook(lambda *_: starts.append(time.perf_counter()))
    try:
        with attach(model, db, key_format=key_format):
            after = module.register_forward_hook(lambda *_: spent.append(time.perf_counter() - starts[-1]))
            try:
                generate(model, inputs, new_tokens)
            finally:
                after.remove()
    finally:
        before.remove()
    return statistics.mean(spent)


def candidate_counts(model, inputs, db, new_tokens: int) -> str:
    """The int8 index's candidates per query over the hook's inputs in one decode (bare model)."""
    module = model.model.layers[db.layer].mlp.down_proj
    queries = []
    handle = module.register_forward_hook(lambda _, args, output: queries.append(args[0].reshape(-1, args[0].shape[-1])))
    try:
        generate(model, inputs, new_tokens)
    finally:
        handle.remove()
    snapshot = db.snapshot()
    result = ki.retrieve(torch.cat(queries), db.key_index(snapshot, "int8"), snapshot.residuals, snapshot.gamma)
    counts = result.candidates.float()
    return (f"{counts.numel()} queries: candidates median {counts.median():.0f}, "
            f"overflowed {int(result.overflowed.sum())} (budget {db.key_index(snapshot, 'int8').budget()})")


def run(model, inputs, m: int, thread_counts, rounds: int, new_tokens: int, stored_keys) -> None:
    started = time.perf_counter()
    db = database(m, subject_key(model, inputs), stored_keys)
    built = time.perf_counter() - started
    started = time.perf_counter()
    db.key_index(db.snapshot(), "int8")  # the store keeps these codes for every later attach
    indexed = time.perf_counter() - started
    print(f"m = {m}: database built in {built:.1f} s, int8 codes in {indexed:.1f} s; "
          f"{candidate_counts(model, inputs, db, new_tokens)}", flush=True)
    formats = {"fp32 keys": None, "int8 index": "int8"}
    times = {(threads, side): [] for threads in thread_counts for side in SIDES}  # (wall, process CPU) s
    hooks = {(threads, side): [] for threads in thread_counts for side in formats}
    for threads in thread_counts:  # warm-up, and the identity of the two key formats
        torch.set_num_threads(threads)
        generate(model, inputs, new_tokens)
        outputs = []
        for key_format in formats.values():
            with attach(model, db, key_format=key_format) as handle:
                with torch.no_grad():
                    model(**inputs)
                assert "planted" in [f.fact_id for f in handle.fired()]
                outputs.append(generate(model, inputs, new_tokens))
        assert torch.equal(*outputs), "int8 codes changed the generated tokens"
    for _ in range(rounds):
        for threads in thread_counts:
            torch.set_num_threads(threads)
            times[threads, "bare"].append(timed(lambda: generate(model, inputs, new_tokens)))
            for side, key_format in formats.items():
                with attach(model, db, key_format=key_format):
                    times[threads, side].append(timed(lambda: generate(model, inputs, new_tokens)))
                hooks[threads, side].append(hook_seconds(model, inputs, db, key_format, new_tokens))
    for threads in thread_counts:
        for clock, which in (("wall", 0), ("CPU", 1)):
            samples = {side: [t[which] for t in times[threads, side]] for side in SIDES}
            bare = statistics.median(samples["bare"])
            line = [f"m={m:>7} threads {threads} {clock:>4}: bare {bare * 1e3:7.1f} ms (min {min(samples['bare']) * 1e3:.1f})"]
            for side in formats:
                median = statistics.median(samples[side])
                line.append(f"{side} {median * 1e3:7.1f} ms (min {min(samples[side]) * 1e3:.1f}) x{median / bare:5.3f}"
                            + (f", hook {statistics.median(hooks[threads, side]) * 1e6:6.0f} us/forward (wall)" if which == 0 else ""))
            print("  |  ".join(line), flush=True)
    print(f"load average after m = {m}: {os.getloadavg()}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--facts", type=int, nargs="+", default=[1, 100_000])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--keys", help="a torch file whose 'K' holds the stored keys (default: random unit keys)")
    args = parser.parse_args()
    stored_keys = None if args.keys is None else torch.load(args.keys)["K"]
    model, tokenizer = load_default_model()
    inputs = dict(tokenizer(PROMPT, return_tensors="pt"))
    print(f"{args.new_tokens} new tokens, rounds {args.rounds}, load average {os.getloadavg()}", flush=True)
    for m in args.facts:
        run(model, inputs, m, args.threads, args.rounds, args.new_tokens, stored_keys)


if __name__ == "__main__":
    main()
