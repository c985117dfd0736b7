"""prefill: the KV cache of many rows with shared openings computed once, against one forward of
each row alone on every tiny architecture."""

import pytest
import torch
from tiny_models import ARCHS, tiny_model

from neuraldb_kernels.editing import prefill as prefill_module
from neuraldb_kernels.editing import tokenize_fact
from neuraldb_kernels.editing.prefill import length_chunks, prefill, shared_head_lengths
from neuraldb_kernels.editing.rewordings import rewording_prompt
from neuraldb_kernels.integration import hf_compat
from test_editing_residuals import FACTS, PREFIXES


def test_shared_head_lengths_are_the_longest_opening_shared_with_another_row():
    rows = [[1, 2, 3, 4], [1, 2, 3, 5, 6], [1, 2, 9], [7, 8], [7, 8], [4], [], [5, 6, 7]]
    assert shared_head_lengths(rows) == [3, 3, 2, 0, 0, 0, 0, 0]  # [7, 8] twice: one token must stay theirs
    assert shared_head_lengths(rows, least=3) == [3, 3, 0, 0, 0, 0, 0, 0]
    assert shared_head_lengths([[7, 8, 9], [7, 8, 9]]) == [2, 2]


@pytest.mark.parametrize("budget", [1, 12, 4096])
def test_length_chunks_cover_every_row_with_bounded_padding(budget):
    lengths = [5, 1, 9, 2, 2, 7, 30, 3, 1, 8]
    chunks = length_chunks(lengths, budget)
    assert sorted(i for chunk in chunks for i in chunk) == list(range(len(lengths)))
    for chunk in chunks:
        padded = len(chunk) * max(lengths[i] for i in chunk)
        assert len(chunk) == 1 or (padded <= budget and padded <= 1.25 * sum(lengths[i] for i in chunk))


def context_prefixes(tokenizer):
    """The residual optimisation's rows: each context up to its subject's last token (the same
    prefix opens several; "Germany" opens a prompt, so one row is empty)."""
    tokens = [tokenize_fact(tokenizer, fact, PREFIXES, index=i) for i, fact in enumerate(FACTS)]
    return [list(c[:s]) for t in tokens for c, s in zip(t.contexts, t.subject_last)]


def rewording_rows(tokenizer):
    """Three candidates of each of two rewording prompts: rows equal in threes, and the prompts'
    shared examples under them (nested sharing)."""
    prompts = [tokenizer(rewording_prompt(q))["input_ids"] for q in ("Who made the Renault 4?", "Where is Oslo?")]
    return [list(p) for p in prompts for _ in range(3)]


@pytest.mark.parametrize("chunk_tokens", [8, 4096], ids=["many chunks", "one chunk"])
@pytest.mark.parametrize("rows_of", [context_prefixes, rewording_rows], ids=["contexts", "rewordings"])
@pytest.mark.parametrize("kind", sorted(ARCHS))
def test_prefill_equals_a_forward_of_each_row_alone(tokenizer, kind, rows_of, chunk_tokens, monkeypatch):
    monkeypatch.setattr(prefill_module, "CHUNK_TOKENS", chunk_tokens)
    model = tiny_model(kind, tokenizer)
    rows = rows_of(tokenizer)
    assert any(shared_head_lengths([row for row in rows if row]))
    cached = prefill(model.base_model, rows, pad_id=0)
    width = max(map(len, rows))
    assert cached.mask.shape == (len(rows), width)
    for i, row in enumerate(rows):
        pad = width - len(row)
        assert cached.mask[i].tolist() == [0] * pad + [1] * len(row)
        for keys, values in cached.layers:
            assert not keys[i, :, :pad].any() and not values[i, :, :pad].any()
        if not row:
            continue
        with torch.no_grad():
            alone = model.base_model(input_ids=torch.tensor([row]), use_cache=True)
        for (keys, values), (k, v) in zip(cached.layers, hf_compat.cache_layers(hf_compat.output_cache(alone))):
            torch.testing.assert_close(keys[i, :, pad:], k[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(values[i, :, pad:], v[0], rtol=1e-5, atol=1e-5)


def test_prefill_of_empty_rows_is_none(tokenizer):
    model = tiny_model("llama", tokenizer)
    assert prefill(model.base_model, [[], []], pad_id=0) is None
    assert prefill(model.base_model, [], pad_id=0) is None
