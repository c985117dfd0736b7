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


def _reference_beaten(keys, bare, units, stored, allowed, extra):
    """Float64, fact by fact until nothing changes: a bare prompt whose best key of another unit (a
    batch fact's averaged key or stored bare key, or a stored key) beats its best own-unit key."""
    extra = list(extra)
    cos = lambda a, b: float(_unit(a) @ _unit(b))  # noqa: E731
    changed = True
    while changed:
        changed = False
        for i in range(len(bare)):
            if extra[i] or not allowed[i]:
                continue
            candidates = [(units[j], keys[j]) for j in range(len(keys))]
            candidates += [(units[j], bare[j]) for j in range(len(bare)) if extra[j]]
            own = max(cos(bare[i], key) for unit, key in candidates if unit == units[i])
            rival = max([cos(bare[i], key) for unit, key in candidates if unit != units[i]]
                        + [cos(bare[i], key) for key in stored])
            if rival > own:
                extra[i] = changed = True
    return extra


def test_a_bare_prompt_won_by_another_units_key_gets_its_own_key():
    basis = torch.eye(24, dtype=torch.float64)
    e = list(basis)
    keys, bare = [None] * 9, [None] * 9
    keys[0], bare[0] = e[0], _at_cosine(e[0], e[1], 0.9)  # 0: a stored key wins its prompt
    keys[1], bare[1] = e[3], _at_cosine(e[3], e[4], 0.9)  # 1: fact 2's averaged key wins its prompt
    keys[2] = _at_cosine(bare[1], e[5], 0.93)
    bare[2] = _at_cosine(keys[2], e[6], 0.9)
    keys[3], bare[3] = e[7], _at_cosine(e[7], e[8], 0.85)  # 3 and 4 share a unit: 4's key is its own
    keys[4] = _at_cosine(bare[3], e[9], 0.95)
    bare[4] = _at_cosine(keys[4], e[10], 0.9)
    keys[5], bare[5] = e[11], _at_cosine(e[11], e[12], 0.1)  # 5: far, stored as a key
    bare[6] = _at_cosine(bare[5], e[14], 0.95)  # 6: fact 5's bare key wins its prompt
    keys[6] = _at_cosine(bare[6], e[15], 0.9)
    bare[7] = _at_cosine(bare[6], e[17], 0.95)  # 7: won by fact 6's bare key, once that is stored
    keys[7] = _at_cosine(bare[7], e[16], 0.93)
    keys[8], bare[8] = e[18], _at_cosine(e[18], e[19], 0.9)  # 8: generic, inseparable from text
    generic = _at_cosine(bare[8], e[20], 0.9).unsqueeze(0)
    text = torch.stack([generic[0], _at_cosine(bare[8], e[22], 0.99)])
    stored = torch.stack([_at_cosine(bare[0], e[2], 0.95), _at_cosine(bare[8], e[21], 0.95)])
    keys, bare = torch.stack(keys), torch.stack(bare)
    units = torch.tensor([0, 1, 2, 9, 9, 5, 6, 7, 8])
    decided = bare_prompt_keys(keys.float(), bare.float(), generic.float(), below=BELOW, gamma=GAMMA,
                               text=text.float(), margin=MARGIN, units=units, stored=stored.float())
    far, is_generic, _ = _expected(keys, bare, generic, text)
    allowed = (~is_generic | ((_unit(bare) @ _unit(text).T).max(dim=1).values < 1 - 2 * MARGIN)).tolist()
    expected = _reference_beaten(keys, bare, units.tolist(), stored, allowed, (far & torch.tensor(allowed)).tolist())
    assert decided.extra.tolist() == expected == [True, True, False, False, False, True, True, True, False]
    assert decided.beaten.tolist() == [True, True, False, False, False, False, True, True, False]
    assert decided.far.tolist() == [False] * 5 + [True] + [False] * 3
    # one unit per fact: fact 4's key now beats fact 3's prompt
    alone = bare_prompt_keys(keys, bare, generic, below=BELOW, gamma=GAMMA, text=text, margin=MARGIN, stored=stored)
    assert alone.extra.tolist()[3]
