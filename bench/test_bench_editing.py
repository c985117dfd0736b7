"""Editing throughput on SmolLM2: the batched Editor vs the per-fact loop of existing tools, same run.

Per-fact loop (ROME/MEMIT style, `per_fact_residual` in bench/edit_quality.py): one fact at a
time, every step the full model over all its contexts and the full logits. Batched: `Editor.edit`
(keys + residuals of BATCHED_FACTS CounterFact facts in one batch, frozen prefix KV cache, layers
0..l* replayed, LM head at the loss positions only). Same hyperparameters (the SmolLM2 preset),
same facts, same threads. Gate: batched facts/s >= 3x the per-fact loop's.

Run:
    python -m pytest bench/test_bench_editing.py -q -s
Quality (efficacy / generalization / specificity) at scale: bench/edit_quality.py.
"""

import pytest
import torch
from edit_quality import per_fact_throughput

from neuraldb_kernels.editing import Editor, read_counterfact, resolve_hparams

BATCHED_FACTS = 32
PER_FACT_FACTS = 4
GATE = 3.0


@pytest.fixture(scope="module")
def setup(smollm2, counterfact_path):
    model, tokenizer = smollm2
    return model, tokenizer, read_counterfact(counterfact_path, limit=BATCHED_FACTS)


def test_gate_batched_editing_vs_per_fact_loop(benchmark, setup):
    model, tokenizer, facts = setup
    hparams = resolve_hparams(model, {})
    per_fact = per_fact_throughput(model, tokenizer, facts[:PER_FACT_FACTS], hparams)

    def batched():
        editor = Editor(model, tokenizer)
        try:
            editor.edit(facts, progress=False)
        finally:
            editor.detach()

    benchmark.pedantic(batched, rounds=1, iterations=1)
    rate = len(facts) / benchmark.stats.stats.mean
    benchmark.extra_info.update({"batched_facts_per_s": rate, "per_fact_loop_facts_per_s": per_fact,
                                 "speedup": rate / per_fact, "threads": torch.get_num_threads(), "layer": hparams.layer})
    print(f"\nbatched {rate:.3f} facts/s, per-fact loop {per_fact:.3f} facts/s, speedup {rate / per_fact:.1f}x")
    assert rate >= GATE * per_fact
