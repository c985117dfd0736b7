"""Evaluation speed: batched CounterFact scoring (one padded pass per batch of prompts, each prompt
once for both targets) against the per-pair loop of the ROME/MEMIT evaluation code (one unpadded
forward per prompt + target), on the same SmolLM2 and the same cases, in the same run.

    python -m pytest bench/test_bench_evaluation.py -q -s

Gate: batched >= 2x faster per case. Threads: 2 (bench/conftest.py; set NEURALDB_BENCH_THREADS=1 on
a shared machine, where one thread is several times faster than two waiting on each other).
"""

import time

import pytest
import torch

CASES = 40


@pytest.fixture(scope="module")
def setup(smollm2, counterfact_path):
    from neuraldb_kernels.evaluation import load_cases

    model, tokenizer = smollm2
    return model, tokenizer, load_cases(counterfact_path, "counterfact", limit=CASES)


def _per_pair_loop(model, tokenizer, cases):
    """ROME-style: every (prompt, target) pair as its own unpadded forward; returns efficacy hits."""
    from neuraldb_kernels.evaluation.scoring import encode_pair

    def log_prob(prompt, target):
        prompt_ids, target_ids = encode_pair(tokenizer, prompt, target)
        logits = model(torch.tensor([prompt_ids + target_ids])).logits[0].float()
        rows = torch.log_softmax(logits[len(prompt_ids) - 1 : -1], dim=-1)
        return rows[torch.arange(len(target_ids)), torch.tensor(target_ids)].sum().item()

    hits = []
    with torch.no_grad():
        for case in cases:
            for prompt in (case.prompt,) + case.paraphrase_prompts:
                hits.append(log_prob(prompt, case.target_new) > log_prob(prompt, case.target_true))
            for prompt, true in case.neighborhood:
                hits.append(log_prob(prompt, true) > log_prob(prompt, case.target_new))
    return hits


def test_batched_scoring_beats_the_per_pair_loop(setup):
    from neuraldb_kernels.evaluation import probability_metrics

    model, tokenizer, cases = setup
    started = time.perf_counter()
    metrics = probability_metrics(model, tokenizer, cases, batch_size=32)
    batched = time.perf_counter() - started
    started = time.perf_counter()
    hits = _per_pair_loop(model, tokenizer, cases)
    loop = time.perf_counter() - started
    ratio = loop / batched
    print(f"\n{CASES} CounterFact cases ({len(hits)} prompts, 2 targets each), {torch.get_num_threads()} threads: "
          f"batched {batched:.1f} s ({batched / CASES * 1000:.0f} ms/case), per-pair loop {loop:.1f} s "
          f"({loop / CASES * 1000:.0f} ms/case), ratio {ratio:.2f}x; metrics {metrics}")
    # the same decisions (one near-tie may flip between padded and unpadded float32 sums)
    assert sum(hits[0::3]) / CASES * 100 == pytest.approx(metrics["efficacy"], abs=100 / CASES)
    assert ratio >= 2.0
