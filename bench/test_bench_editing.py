"""Editing throughput on SmolLM2: the batched Editor vs the per-fact loop of existing tools, same run.

Per-fact loop (ROME/MEMIT style, `per_fact_residual` in bench/edit_quality.py): one fact at a
time, every step the full model over all its contexts and the full logits. Batched: `Editor.edit`
(keys + residuals of the facts in one batch, frozen prefix KV cache, layers 0..l* replayed, LM head
at the loss positions only). Like for like: the same FACTS CounterFact facts (distinct subjects, so
the Editor shares no residual), the same contexts and hyperparameters (the SmolLM2 preset, early
stop included), the same threads; the prefixes are generated before either is timed. Gate: batched
facts/s >= 3x the per-fact loop's.

Run:
    python -m pytest bench/test_bench_editing.py -q -s
Quality (efficacy / generalization / specificity) at scale: bench/edit_quality.py.
"""

import time

import pytest
import torch
from edit_quality import per_fact_throughput

from neuraldb_kernels.editing import Editor, read_counterfact, resolve_hparams

FACTS = 8
GATE = 3.0


@pytest.fixture(scope="module")
def setup(smollm2, counterfact_path):
    """The model, its tokenizer and the first FACTS CounterFact facts with distinct subjects."""
    model, tokenizer = smollm2
    facts, subjects = [], set()
    for fact in read_counterfact(counterfact_path, limit=4 * FACTS):
        if fact.subject not in subjects and len(facts) < FACTS:
            subjects.add(fact.subject)
            facts.append(fact)
    assert len(facts) == FACTS
    return model, tokenizer, facts


def test_gate_batched_editing_vs_per_fact_loop(setup):
    model, tokenizer, facts = setup
    hparams = resolve_hparams(model, {})
    assert hparams.batch_size >= FACTS, "the batched run must edit all facts in one batch"
    per_fact = per_fact_throughput(model, tokenizer, facts, hparams)  # also caches the prefixes
    editor = Editor(model, tokenizer)
    try:
        start = time.perf_counter()
        ids = editor.edit(facts, progress=False).ids
        batched = len(facts) / (time.perf_counter() - start)
    finally:
        editor.detach()
    assert len(ids) == len(editor.db) == FACTS
    print(f"\n{FACTS} facts, {torch.get_num_threads()} threads: batched {batched:.3f} facts/s, "
          f"per-fact loop {per_fact:.3f} facts/s, speedup {batched / per_fact:.2f}x")
    assert batched >= GATE * per_fact
