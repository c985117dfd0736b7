"""Realistic keys through the compressed key index: zero disagreements with full precision, and
the candidate counts.

    PYTHONPATH=$PWD python bench/key_index_realistic.py [--keys 100000] [--prompts 400]
        [--queries 7770] [--cache /tmp/realistic_keys.pt]

Keys: SmolLM2-135M-Instruct's (the default model's) down-projection inputs at layer 4 at EVERY
token of LAMBADA test passages (../shared/data/general/lambada), passage after passage until
--keys keys. Queries: the same layer's inputs at every token of CounterFact prompts and their
rephrasings (../shared/data/counterfact), which is what the attached hook sees. Residuals are
random (they are only gathered). gated_retrieve through an int8 KeyIndex (the C++ candidate pass,
the C++ rescoring) vs the float32 op on the same keys, backend "cpu", gamma 0.5: every query's
index, score and out must be identical. Prints the candidate count distribution and the overflows.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

import torch

import neuraldb_kernels as nk
from neuraldb_kernels.editing.keys import down_proj_inputs, pad_token_id
from neuraldb_kernels.ops import key_index as ki

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
LAYER, GAMMA = 4, 0.5


def token_inputs(model, tokenizer, texts, limit: int, batch: int = 8) -> torch.Tensor:
    """(t, d1) float32: layer-4 down-projection inputs at every token of `texts`, in order, first
    `limit` rows."""
    pad = pad_token_id(tokenizer)
    parts, total = [], 0
    for start in range(0, len(texts), batch):
        rows = [tokenizer(text)["input_ids"] for text in texts[start : start + batch]]
        with torch.no_grad():
            parts.append(down_proj_inputs(model, rows, None, LAYER, pad_id=pad))
        total += parts[-1].shape[0]
        if total >= limit:
            break
    return torch.cat(parts)[:limit]


def realistic_keys_and_queries(keys: int, prompts: int, cache: pathlib.Path | None):
    if cache is not None and cache.exists():
        saved = torch.load(cache)
        if saved["K"].shape[0] >= keys and saved["prompts"] >= prompts:
            return saved["K"][:keys], saved["Q"]
    model, tokenizer = nk.load_default_model()
    passages = [json.loads(line)["text"] for line in (DATA / "general" / "lambada" / "lambada_test.jsonl").open()]
    started = time.perf_counter()
    K = token_inputs(model, tokenizer, passages, keys)
    facts = json.loads((DATA / "counterfact" / "counterfact-a.json").read_text())[:prompts]
    texts = [fact["prompt"] for fact in facts] + [fact["rephrase_prompt"] for fact in facts]
    Q = token_inputs(model, tokenizer, texts, 10**9)
    print(f"keys {tuple(K.shape)} and queries {tuple(Q.shape)} in {time.perf_counter() - started:.0f} s", flush=True)
    if cache is not None:
        torch.save({"K": K, "Q": Q, "prompts": prompts}, cache)
    return K, Q


def compare(K: torch.Tensor, Q: torch.Tensor, queries: int, batch: int = 64) -> dict:
    R = torch.randn(K.shape[0], 8, generator=torch.Generator().manual_seed(0))
    started = time.perf_counter()
    index = nk.KeyIndex.from_keys(K, codes="int8")
    build = time.perf_counter() - started
    disagreements, counts, overflows, fired = 0, [], 0, 0
    for start in range(0, min(queries, Q.shape[0]), batch):
        q = Q[start : min(start + batch, queries)]
        result = ki.retrieve(q, index, R, GAMMA, backend="cpu")
        out, found, score = nk.gated_retrieve(q, K, R, GAMMA, backend="cpu", return_index=True)
        same = (result.index == found) & (result.score == score) & (result.out == out).all(dim=1)
        disagreements += int((~same).sum())
        counts.append(result.candidates)
        overflows += int(result.overflowed.sum())
        fired += int((found >= 0).sum())
    counts = torch.cat(counts).double()
    return {
        "keys": K.shape[0], "budget": index.budget(), "queries": counts.numel(), "disagreements": disagreements,
        "fired": fired, "overflowed": overflows, "candidates_median": counts.median().item(),
        "candidates_p99": counts.quantile(0.99).item(), "candidates_max": counts.max().item(),
        "candidates_mean": counts.mean().item(), "mean_row_error": index.row_error.mean().item(),
        "index_build_s": round(build, 1),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--prompts", type=int, default=400)
    parser.add_argument("--queries", type=int, default=10**9, help="at most this many queries")
    parser.add_argument("--cache", type=pathlib.Path, default=None, help="save/reuse the computed keys and queries here")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()}, threads {torch.get_num_threads()}", flush=True)
    K, Q = realistic_keys_and_queries(args.keys, args.prompts, args.cache)
    print(json.dumps(compare(K, Q, min(args.queries, Q.shape[0]))), flush=True)


if __name__ == "__main__":
    main()
