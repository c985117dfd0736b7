"""The model-written prefixes and the batched sampler behind them (editing.prefixes), against
independent samplers: every step a full forward of each row alone (no KV cache, no padding), its
own top-k, and the same generator draws (over the rows per step, or row after row)."""

import pytest
import torch
from tiny_models import tiny_model

from neuraldb_kernels.editing import prefixes as prefixes_module
from neuraldb_kernels.editing.prefixes import SEED_WORDS, generate_prefixes, row_streams, sample_tokens


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model("llama", tokenizer, layers=3)


def plain_samples(model, starts, length, top_k, seed):
    """(n, length) int64: what sample_tokens must draw, row by row without a cache."""
    generator = torch.Generator().manual_seed(seed)
    rows = [list(row) for row in starts]
    for _ in range(length):
        with torch.no_grad():
            tops = [model(torch.tensor([row])).logits[0, -1].float().topk(top_k) for row in rows]
        probs = torch.softmax(torch.stack([top.values for top in tops]), dim=-1)
        choice = torch.multinomial(probs, 1, generator=generator)[:, 0]
        for row, top, pick in zip(rows, tops, choice.tolist()):
            row.append(int(top.indices[pick]))
    return torch.tensor([row[len(start):] for row, start in zip(rows, starts)])


@pytest.mark.parametrize("words", [("The", "Therefore", "Because"),  # one token each
                                   ("Xylophonically", "The", "In a")])  # 4, 1 and 2 tokens: left padding
def test_sample_tokens_match_the_plain_sampler(model, tokenizer, words):
    starts = [tokenizer(word)["input_ids"] for word in words]
    sampled = sample_tokens(model, starts, 7, top_k=5, generator=torch.Generator().manual_seed(11))
    assert sampled.dtype == torch.int64 and sampled.shape == (3, 7)
    assert torch.equal(sampled, plain_samples(model, starts, 7, 5, 11))


def one_after_the_other(model, starts, length, top_k, seed):
    """(n, length) int64: each row sampled alone to its end before the next starts, all from one
    generator (how the prefixes were sampled before the batched sampler), no KV cache."""
    generator = torch.Generator().manual_seed(seed)
    sampled = []
    for start in starts:
        row = list(start)
        for _ in range(length):
            with torch.no_grad():
                top = model(torch.tensor([row])).logits[0, -1].float().topk(top_k)
            row.append(int(top.indices[torch.multinomial(torch.softmax(top.values, -1), 1, generator=generator)]))
        sampled.append(row[len(start):])
    return torch.tensor(sampled)


def test_row_streams_draw_what_rows_sampled_one_after_the_other_draw(model, tokenizer):
    starts = [tokenizer(word)["input_ids"] for word in ("Xylophonically", "The", "In a", "We")]
    sampled = sample_tokens(model, starts, 6, top_k=5, generator=row_streams(4, len(starts), 6, 5))
    assert torch.equal(sampled, one_after_the_other(model, starts, 6, 5, 4))
    with pytest.raises(ValueError, match="3 generators for 4 rows"):
        sample_tokens(model, starts, 6, top_k=5, generator=row_streams(4, 3, 6, 5))


def test_top_1_is_greedy_decoding(model, tokenizer):
    starts = [tokenizer(word)["input_ids"] for word in ("Xylophonically", "I")]
    sampled = sample_tokens(model, starts, 5, top_k=1, generator=torch.Generator().manual_seed(0))
    for start, row in zip(starts, sampled.tolist()):
        greedy = list(start)
        for _ in range(5):
            with torch.no_grad():
                greedy.append(int(model(torch.tensor([greedy])).logits[0, -1].argmax()))
        assert row == greedy[len(start):]


def test_prefixes_are_well_formed_and_sampled_from_their_seed_words(model, tokenizer):
    prefixes_module._CACHE.pop(model, None)
    found = generate_prefixes(model, tokenizer, count=12, length=6, seed=3)
    assert len(found) == 12
    starts = [tokenizer(SEED_WORDS[i % len(SEED_WORDS)])["input_ids"] for i in range(12)]
    expected = one_after_the_other(model, starts, 6, 5, 3)
    for index, (prefix, row) in enumerate(zip(found, expected.tolist())):
        word = SEED_WORDS[index % len(SEED_WORDS)]
        text = " ".join((word + tokenizer.decode(row, skip_special_tokens=True)).replace("{", " ")
                        .replace("}", " ").split())
        assert prefix == text + ". "
        assert prefix.startswith(word) and prefix.endswith(". ")
        assert "{" not in prefix and "}" not in prefix and "\n" not in prefix and "  " not in prefix[:-2]


def test_prefixes_are_deterministic_per_seed_cached_and_leave_the_global_rng_alone(model, tokenizer):
    prefixes_module._CACHE.pop(model, None)
    state = torch.get_rng_state()
    first = generate_prefixes(model, tokenizer, count=4, length=8, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    prefixes_module._CACHE.pop(model, None)
    assert generate_prefixes(model, tokenizer, count=4, length=8, seed=1) == first
    assert generate_prefixes(model, tokenizer, count=4, length=8, seed=2) != first

    def forward_again(module, args):
        raise AssertionError("the same prefixes were sampled twice")

    hook = model.register_forward_pre_hook(forward_again)
    try:
        assert generate_prefixes(model, tokenizer, count=4, length=8, seed=1) == first
        assert generate_prefixes(model, tokenizer, count=0, length=8, seed=1) == ()
    finally:
        hook.remove()


def test_the_training_flag_is_restored(model, tokenizer):
    model.train()
    try:
        sample_tokens(model, [[504]], 2, top_k=5, generator=torch.Generator().manual_seed(0))
        assert model.training
    finally:
        model.eval()


@pytest.mark.parametrize("settings", [{"count": -1}, {"count": 2.0}, {"count": True}, {"length": 0},
                                      {"length": "10"}])
def test_bad_settings_are_refused(model, tokenizer, settings):
    with pytest.raises(ValueError, match=next(iter(settings))):
        generate_prefixes(model, tokenizer, **settings)


@pytest.mark.parametrize("starts", [[], [[504], []]])
def test_sample_tokens_refuses_missing_starts(model, starts):
    with pytest.raises(ValueError, match="start row"):
        sample_tokens(model, starts, 3, top_k=5, generator=torch.Generator())
