"""Which bare-prompt queries become extra keys (editing.keys.bare_prompt_keys), against float64
cosines of hand-made vectors: far from the averaged key, and either not generic or (with
calibrated thresholds) separable from model-written text by a margin on both sides."""

import pytest
import torch

from neuraldb_kernels.editing.keys import bare_prompt_keys

GAMMA = 0.65
MARGIN = 0.02
BELOW = 0.8


def _unit(x):
    return torch.nn.functional.normalize(x, dim=-1)


def _at_cosine(base, other, cosine):
    """A unit vector at `cosine` (float64) from unit `base`, in the plane of base and unit `other`."""
    orthogonal = _unit(other - (other @ base) * base)
    return cosine * base + (1 - cosine**2) ** 0.5 * orthogonal


@pytest.fixture
def vectors():
    """Facts 0-3 (averaged keys, bare queries), one generic prefix query and two model-written-text
    queries, float64 in 16 dimensions: fact 0's bare query is near its key; fact 1's is far and
    unlike any text; facts 2 and 3 are far and generic (cosine 0.9 with the prefix query), fact 2
    with 0.9 as its best text cosine, fact 3 with 0.97 (above 1 - 2 * margin = 0.96)."""
    basis = torch.eye(16, dtype=torch.float64)
    keys = basis[:4].clone()
    generic_query = basis[8]
    bare = torch.stack([
        _at_cosine(keys[0], basis[4], 0.9),
        _at_cosine(keys[1], basis[5], 0.1),
        _at_cosine(generic_query, basis[6], 0.9),
        _at_cosine(generic_query, basis[7], 0.9),
    ])
    text = torch.stack([generic_query, _at_cosine(bare[3], basis[9], 0.97)])
    return keys, bare, generic_query.unsqueeze(0), text


def _expected(keys, bare, generic, text):
    cosine = _unit(bare) @ _unit(keys).T
    far = cosine.diagonal() < BELOW
    is_generic = (_unit(bare) @ _unit(generic).T).max(dim=1).values > GAMMA
    separable = None if text is None else (_unit(bare) @ _unit(text).T).max(dim=1).values < 1 - 2 * MARGIN
    extra = far & ~is_generic if text is None else far & (~is_generic | separable)
    return far, is_generic, extra


def test_a_generic_query_is_stored_only_when_calibration_can_separate_it_from_text(vectors):
    keys, bare, generic, text = vectors
    for given_text in (None, text):
        decided = bare_prompt_keys(keys.float(), bare.float(), generic.float(), below=BELOW, gamma=GAMMA,
                                   text=None if given_text is None else given_text.float(), margin=MARGIN)
        far, is_generic, extra = _expected(keys, bare, generic, given_text)
        assert torch.equal(decided.far, far) and torch.equal(decided.generic, is_generic)
        assert torch.equal(decided.extra, extra)
    # what the fixture is built to show: near / far and plain / generic separable / generic not
    calibrated = bare_prompt_keys(keys, bare, generic, below=BELOW, gamma=GAMMA, text=text, margin=MARGIN)
    uncalibrated = bare_prompt_keys(keys, bare, generic, below=BELOW, gamma=GAMMA)
    assert calibrated.extra.tolist() == [False, True, True, False]
    assert uncalibrated.extra.tolist() == [False, True, False, False]


def test_without_prefixes_or_text_nothing_is_generic_and_every_far_query_is_stored(vectors):
    keys, bare, _, _ = vectors
    empty = torch.zeros(0, keys.shape[1], dtype=keys.dtype)
    for text in (None, empty):
        decided = bare_prompt_keys(keys, bare, empty, below=BELOW, gamma=GAMMA, text=text, margin=MARGIN)
        assert decided.generic.tolist() == [False] * 4
        assert decided.extra.tolist() == decided.far.tolist() == [False, True, True, True]
