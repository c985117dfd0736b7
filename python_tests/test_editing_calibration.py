"""Calibrated per-key gate thresholds (editing.calibration): the rule against a float64 computation
from hooks on the down-projection, facts still firing on their own prompts, stored keys raised when
a new fact collides with them, conflict counting, thresholds kept on removal, recalibration through
the CLI, and no evaluation prompts among the inputs."""

import inspect

import pytest
import torch
from tiny_models import tiny_model, token_queries

from neuraldb_kernels import NeuralDB
from neuraldb_kernels.editing import EditRecord, Editor, Fact, generate_prefixes
from neuraldb_kernels.editing import calibration
from neuraldb_kernels.integration import locate_down_proj
from neuraldb_kernels.ops import gated_retrieve

LAYER = 1
GAMMA = 0.3
MARGIN = 0.02
# near_subjects / other_wordings above what FACTS offer: every candidate name and prompt opening is used
FAST = {"steps": 2, "n_prefixes": 2, "calibration_texts": 3, "calibration_text_length": 8, "gate_margin": MARGIN,
        "near_subjects": 50, "other_wordings": 50}

FACTS = [
    Fact("The capital of {} is", "Freedonia", "Paris"),
    Fact("{} plays the", "Maria Quill", "violin"),
    Fact("The mother tongue of {} is", "Oskar Brandt", "Dutch"),
    Fact("{} was founded in", "Velmora Records", "Oslo"),
]


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model("llama", tokenizer, layers=3)


@pytest.fixture
def editor_of(model, tokenizer):
    """Editor(model, ...) factory; every editor made is detached after the test."""
    made = []

    def make(**hparams):
        made.append(Editor(model, tokenizer, layer=LAYER, gamma=GAMMA, **{**FAST, **hparams}))
        return made[-1]

    yield make
    for editor in made:
        editor.detach()


def _token_queries(model, tokenizer, text):
    """(tokens, offsets) and the float64 down-projection input at every token of `text` alone."""
    encoded, queries = token_queries(model, tokenizer, text, LAYER)
    return encoded["offset_mapping"], queries


def _context_queries(model, tokenizer, fact, prefixes):
    """(c, d1) float64: the query at the subject's last token of the bare prompt and each prefixed one."""
    rows = []
    for prefix in ("", *prefixes):
        text = prefix + fact.filled_prompt
        end = text.rindex(fact.subject) + len(fact.subject)
        offsets, queries = _token_queries(model, tokenizer, text)
        rows.append(queries[max(i for i, (a, b) in enumerate(offsets) if a < end and b > a)])
    return torch.stack(rows)


def _text_queries(model, tokenizer):
    """(t, d1) float64: every token of the model-written prefixes and calibration texts."""
    texts = (*generate_prefixes(model, tokenizer, count=FAST["n_prefixes"], length=10, seed=0),
             *calibration.model_written_texts(model, tokenizer, count=FAST["calibration_texts"],
                                              length=FAST["calibration_text_length"], seed=1))
    return torch.cat([_token_queries(model, tokenizer, text)[1] for text in texts])


def _query_at_end(model, tokenizer, text, end):
    """float64 query at the last token of `text` that overlaps the characters before `end`."""
    offsets, queries = _token_queries(model, tokenizer, text)
    return queries[max(i for i, (a, b) in enumerate(offsets) if a < end and b > a)]


def _expected_names(subject, facts):
    """Every near-subject name of `subject` among `facts`, built here by hand: its first word
    swapped for another multi-word subject's first word, its last for another's last word."""
    words = subject.split()
    if len(words) < 2:
        return set()
    others = [fact.subject.split() for fact in facts if len(fact.subject.split()) >= 2]
    names = {" ".join([o[0], *words[1:]]) for o in others} | {" ".join([*words[:-1], o[-1]]) for o in others}
    return names - {fact.subject for fact in facts}


def _near_queries(model, tokenizer, fact, facts, prefixes):
    """(n, d1) float64: each near-subject name read in the fact's contexts (cut after it), and every
    token of it alone."""
    start = fact.filled_prompt.index(fact.subject)
    names = calibration.near_subjects(fact.subject, [f.subject for f in facts], FAST["near_subjects"])
    assert set(names) == _expected_names(fact.subject, facts)
    rows = []
    for name in names:
        for prefix in ("", *prefixes):
            text = prefix + fact.filled_prompt[:start] + name
            rows.append(_query_at_end(model, tokenizer, text, len(text)))
        rows += list(_token_queries(model, tokenizer, name)[1])
    return torch.stack(rows) if rows else torch.zeros(0, model.config.intermediate_size, dtype=torch.float64)


def _wording_queries(model, tokenizer, fact, facts):
    """(w, d1) float64: the subject after every other fact's prompt opening (text before its subject)."""
    own = fact.filled_prompt[: fact.filled_prompt.index(fact.subject)]
    heads = {f.filled_prompt[: f.filled_prompt.index(f.subject)] for f in facts} - {own}
    return torch.stack([_query_at_end(model, tokenizer, head + fact.subject, len(head + fact.subject))
                        for head in sorted(heads)])


def _reference(model, tokenizer, facts, prefixes):
    """Per fact (positives, negatives) of the rule, float64 from hooks: positives = its contexts and
    other wordings; negatives = model-written text, every fact's near-subject names, the other
    facts' positives."""
    text = _text_queries(model, tokenizer)
    near = torch.cat([_near_queries(model, tokenizer, fact, facts, prefixes) for fact in facts])
    positives = [torch.cat([_context_queries(model, tokenizer, fact, prefixes),
                            _wording_queries(model, tokenizer, fact, facts)]) for fact in facts]
    return [(positives[i], torch.cat([text, near, *[positives[j] for j in range(len(facts)) if j != i]]))
            for i in range(len(facts))]


def _cosines(a, b):
    a, b = a.double(), b.double()
    return (a / a.norm(dim=-1, keepdim=True)) @ (b / b.norm(dim=-1, keepdim=True)).T


def _expected(keys, positives, negatives):
    """The module's rule in float64: (thresholds, floors, conflicts) of the rows of `keys`."""
    nearest = _cosines(positives, keys).argmax(dim=1)
    own = _cosines(positives, keys)[torch.arange(len(positives)), nearest]
    floors = torch.tensor([own[nearest == row].min().item() if (nearest == row).any() else 1.0
                           for row in range(len(keys))], dtype=torch.float64)
    worst = _cosines(keys, negatives).max(dim=1).values
    allowed = floors - MARGIN
    thresholds = torch.clamp(torch.minimum((worst + floors) / 2, allowed), min=GAMMA, max=1.0)
    return thresholds, floors, (worst + MARGIN > allowed) & (worst + MARGIN > GAMMA), worst


def test_thresholds_follow_the_rule_against_float64_hook_queries(model, tokenizer, editor_of):
    editor = editor_of()
    report = editor.edit(FACTS, progress=False)
    prefixes = generate_prefixes(model, tokenizer, count=FAST["n_prefixes"], length=10, seed=0)
    reference = _reference(model, tokenizer, FACTS, prefixes)
    conflicts = []
    for i, fact_id in enumerate(report.ids):
        stored = editor.db.get(fact_id)
        thresholds, floors, conflict, worst = _expected(stored.keys, *reference[i])
        torch.testing.assert_close(stored.key_gammas.double(), thresholds, atol=2e-5, rtol=0)
        record = EditRecord.from_metadata(stored.metadata, fact_id)
        torch.testing.assert_close(torch.tensor(record.key_floors, dtype=torch.float64), floors, atol=2e-5, rtol=0)
        for row in range(len(stored.keys)):
            gate = stored.key_gammas[row].item()
            assert gate >= GAMMA - 1e-6
            if not conflict[row]:  # between the worst negative and the fact's own worst context
                assert gate > worst[row].item() or gate == pytest.approx(GAMMA)
                assert gate < floors[row].item() or floors[row].item() - MARGIN < GAMMA
        if conflict.any():
            conflicts.append(fact_id)
    # (listed in commit order, each once)
    assert sorted(report.threshold_conflicts) == sorted(conflicts) and len(set(report.threshold_conflicts)) == len(conflicts)


def test_a_fact_still_fires_on_its_own_prompt(model, tokenizer, editor_of):
    editor = editor_of()
    report = editor.edit(FACTS, progress=False)
    snapshot = editor.db.snapshot()
    prefixes = generate_prefixes(model, tokenizer, count=FAST["n_prefixes"], length=10, seed=0)
    for fact, fact_id in zip(FACTS, report.ids):
        bare = _context_queries(model, tokenizer, fact, prefixes)[0].float()
        _, index, _ = gated_retrieve(bare.view(1, -1), snapshot.keys, snapshot.residuals, snapshot.gammas,
                                     return_index=True)
        best = _cosines(bare.view(1, -1), snapshot.keys).argmax().item()
        if snapshot.ids_at([best])[0] == fact_id:  # its own key is the best match: the gate must open
            assert snapshot.ids_at(index)[0] == fact_id


def test_a_stored_key_colliding_with_a_new_facts_contexts_is_raised(model, tokenizer, editor_of):
    editor = editor_of(share_subject_residual=False)
    first = Fact("The capital of {} is", "Freedonia", "Paris")
    [stored_id] = editor.edit([first], progress=False).ids
    before = editor.db.get(stored_id)
    floors = torch.tensor(EditRecord.from_metadata(before.metadata, stored_id).key_floors, dtype=torch.float64)
    # the same subject in another prompt: its contexts' queries lie close to the stored key
    second = Fact("The national anthem of {} is", "Freedonia", "Ode")
    report = editor.edit([second], progress=False)
    prefixes = generate_prefixes(model, tokenizer, count=FAST["n_prefixes"], length=10, seed=0)
    # what the stored key must not fire on: the new fact's contexts and other wordings (a one-word
    # subject has no near-subject names)
    positives = torch.cat([_context_queries(model, tokenizer, second, prefixes),
                           _wording_queries(model, tokenizer, second, [first, second])])
    scores = _cosines(positives, before.keys)
    old = before.key_gammas.double()
    passing = torch.where(scores > old, scores, torch.tensor(-2.0, dtype=torch.float64)).max(dim=0).values
    expected = torch.maximum(old, torch.minimum((passing + floors) / 2, floors - MARGIN))
    after = editor.db.get(stored_id)
    assert not torch.equal(after.key_gammas, before.key_gammas)  # the case under test: it was raised
    torch.testing.assert_close(after.key_gammas.double(), expected, atol=2e-5, rtol=0)
    assert report.raised_thresholds == (stored_id,)
    capped = bool(((passing > -2) & (passing + MARGIN > floors - MARGIN)).any())
    assert (stored_id in report.threshold_conflicts) == capped
    torch.testing.assert_close(after.keys, before.keys, atol=0, rtol=0)  # only the thresholds changed
    torch.testing.assert_close(after.residual, before.residual, atol=0, rtol=0)
    # removal leaves the other facts' thresholds as they are
    kept = editor.db.get(report.ids[0]).key_gammas
    editor.remove([stored_id])
    torch.testing.assert_close(editor.db.get(report.ids[0]).key_gammas, kept, atol=0, rtol=0)


def test_conflicting_requirements_keep_the_fact_firing_and_are_counted():
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    positives = torch.tensor([[1.0, 0.2], [0.0, 1.0]])  # row 0's own context at cosine 0.9806
    negatives = torch.tensor([[1.0, 0.1], [-1.0, 0.0]])  # ... and text at 0.9950 with it
    found = calibration.calibrate_thresholds(keys, torch.tensor([0, 1]), positives, torch.tensor([0, 1]),
                                             negatives, torch.tensor([-1, -1]), gamma=GAMMA, margin=MARGIN)
    floor = 1 / (1 + 0.2**2) ** 0.5
    assert found.gammas[0].item() == pytest.approx(floor - MARGIN, abs=1e-6)  # below its own context
    assert found.conflicts.tolist() == [True, False]
    # row 1: halfway between its closest negative (cosine 0.1 / sqrt(1.01)) and its own context (1.0)
    assert found.gammas[1].item() == pytest.approx((0.1 / 1.01**0.5 + 1.0) / 2, abs=1e-6)
    far = calibration.calibrate_thresholds(keys, torch.tensor([0, 1]), positives, torch.tensor([0, 1]),
                                           torch.tensor([[-1.0, 0.0]]), torch.tensor([-1]), gamma=0.6, margin=MARGIN)
    assert far.gammas[1].item() == pytest.approx(0.6)  # halfway (0.5) is below gamma: the database's gamma


def test_without_calibration_keys_use_the_database_gamma_and_calibrate_sets_them(model, tokenizer, editor_of):
    editor = editor_of(calibrate_gates=False)
    report = editor.edit(FACTS, progress=False)
    assert not editor.db.has_key_gammas
    assert all(EditRecord.from_metadata(editor.db.get(i).metadata, i).key_floors is None for i in report.ids)
    result = editor.calibrate(progress=False)
    assert (result.facts, result.skipped) == (len(FACTS), ())
    assert set(result.changed) == set(report.ids)
    prefixes = generate_prefixes(model, tokenizer, count=FAST["n_prefixes"], length=10, seed=0)
    reference = _reference(model, tokenizer, FACTS, prefixes)
    for i, fact_id in enumerate(report.ids):
        stored = editor.db.get(fact_id)
        thresholds, *_ = _expected(stored.keys, *reference[i])
        torch.testing.assert_close(stored.key_gammas.double(), thresholds, atol=2e-5, rtol=0)
    assert editor.calibrate(progress=False).changed == ()  # already calibrated: nothing changes


def test_calibration_takes_no_evaluation_prompts(model, tokenizer, editor_of):
    for function in (calibration.calibrate_thresholds, calibration.raised_thresholds, calibration.colliding_rows,
                     calibration.nearest_rows):
        names = " ".join(inspect.signature(function).parameters)
        assert "paraphrase" not in names and "neighbo" not in names
    # evaluation prompts carried in a fact's extras do not change its thresholds
    extras = {"paraphrase_prompts": ["Freedonia's capital city is"], "neighborhood_prompts": ["The capital of France is"]}
    plain = editor_of()
    facts = [Fact(f.prompt, f.subject, f.target_new, extras=extras) for f in FACTS]
    ids = plain.edit(FACTS, progress=False).ids
    plain.detach()
    with_eval = editor_of()
    with_eval.edit(facts, progress=False)
    with_eval.detach()
    for fact_id in ids:
        torch.testing.assert_close(with_eval.db.get(fact_id).key_gammas, plain.db.get(fact_id).key_gammas,
                                   atol=0, rtol=0)


def test_db_calibrate_recomputes_thresholds_through_the_cli(tmp_path, tiny_model_dir, capsys):
    from neuraldb_kernels.cli import main
    from neuraldb_kernels.workspace import Workspace

    directory = tmp_path / "db"
    with Workspace.create(directory, model=tiny_model_dir, layer=LAYER, gamma=GAMMA) as workspace:
        ids = workspace.edit(FACTS, progress=False, calibrate_gates=False, **FAST).ids
        assert not workspace.db.has_key_gammas
    capsys.readouterr()
    assert main(["db", "calibrate", "--db", str(directory), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"calibrated the gate thresholds of {len(FACTS)} facts" in out and f"{len(FACTS)} changed" in out
    with NeuralDB.open(directory / "neuraldb.sqlite") as db:
        for fact_id in ids:
            stored = db.get(fact_id)
            assert stored.key_gammas is not None and bool((stored.key_gammas >= GAMMA - 1e-6).all())
            assert EditRecord.from_metadata(stored.metadata, fact_id).key_floors is not None
    assert main(["db", "calibrate", "--db", str(directory), "--quiet"]) == 0
    assert "0 changed" in capsys.readouterr().out


def test_db_calibrate_of_a_missing_directory_is_a_clear_error(tmp_path, capsys):
    from neuraldb_kernels.cli import main

    assert main(["db", "calibrate", "--db", str(tmp_path / "nothing")]) != 0
    assert "not a neuraldb database directory" in capsys.readouterr().err


def test_model_written_texts_are_seeded_top_k_samples_that_leave_the_global_rng_alone(model, tokenizer):
    calibration._TEXTS.pop(model, None)  # sample afresh, whatever earlier tests cached
    state = torch.get_rng_state()
    texts = calibration.model_written_texts(model, tokenizer, count=3, length=6, seed=5)
    assert torch.equal(torch.get_rng_state(), state)

    def forward_again(module, args):
        raise AssertionError("the same texts were sampled twice")

    hook = model.register_forward_pre_hook(forward_again)  # cached per model and settings
    try:
        assert calibration.model_written_texts(model, tokenizer, count=3, length=6, seed=5) == texts
    finally:
        hook.remove()
    assert calibration.model_written_texts(model, tokenizer, count=3, length=6, seed=6) != texts
    assert len(texts) == 3 and calibration.model_written_texts(model, tokenizer, count=0, length=6, seed=5) == []
    # an independent sampler: the full sequence every step (no KV cache), the same generator draws
    generator = torch.Generator().manual_seed(5)
    ids = torch.tensor([tokenizer(word)["input_ids"][:1] for word in ("The", "Therefore", "Because")])
    for _ in range(6):
        with torch.no_grad():
            top = model(ids).logits[:, -1].float().topk(5)
        choice = torch.multinomial(torch.softmax(top.values, dim=-1), 1, generator=generator)
        ids = torch.cat([ids, top.indices.gather(1, choice)], dim=1)
    assert texts == [tokenizer.decode(row, skip_special_tokens=True) for row in ids.tolist()]


@pytest.mark.parametrize("scores", [3, 1 << 24])  # many chunks, one chunk
def test_the_rule_on_random_vectors_in_chunks(monkeypatch, scores):
    monkeypatch.setattr(calibration, "_SCORES", scores)
    generator = torch.Generator().manual_seed(3)
    keys, negatives = torch.randn(7, 5, generator=generator), torch.randn(11, 5, generator=generator)
    positives = keys.repeat(2, 1) + 0.4 * torch.randn(14, 5, generator=generator)
    found = calibration.calibrate_thresholds(keys, torch.arange(7), positives, torch.arange(7).repeat(2), negatives,
                                             torch.full((11,), -1), gamma=GAMMA, margin=MARGIN)
    cosines = _cosines(positives, keys)
    floors = torch.minimum(cosines.diagonal(), cosines[7:, :].diagonal())
    worst = _cosines(keys, negatives).max(dim=1).values
    expected = torch.clamp(torch.minimum((worst + floors) / 2, floors - MARGIN), min=GAMMA, max=1.0)
    torch.testing.assert_close(found.gammas.double(), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(found.floors.double(), floors, atol=1e-6, rtol=0)
    assert found.conflicts.tolist() == ((worst + MARGIN > floors - MARGIN) & (worst + MARGIN > GAMMA)).tolist()
    stored_gammas = torch.full((7,), GAMMA)
    hit = (_cosines(positives, keys) > GAMMA).any(dim=0).nonzero().flatten()
    assert calibration.colliding_rows(positives, keys, stored_gammas).tolist() == hit.tolist()


def test_exact_match_rows_sit_at_their_floor_less_the_margin():
    generator = torch.Generator().manual_seed(4)
    keys, negatives = torch.randn(6, 5, generator=generator), torch.randn(9, 5, generator=generator)
    positives = keys.repeat(2, 1) + 0.3 * torch.randn(12, 5, generator=generator)
    exact = torch.tensor([False, True, False, True, True, False])
    found = calibration.calibrate_thresholds(keys, torch.arange(6), positives, torch.arange(6).repeat(2), negatives,
                                             torch.full((9,), -1), gamma=GAMMA, margin=MARGIN, exact=exact)
    cosines = _cosines(positives, keys)
    floors = torch.minimum(cosines.diagonal(), cosines[6:, :].diagonal())
    worst = _cosines(keys, negatives).max(dim=1).values
    halfway = torch.clamp(torch.minimum((worst + floors) / 2, floors - MARGIN), min=GAMMA, max=1.0)
    at_floor = torch.clamp(floors - MARGIN, min=GAMMA, max=1.0)
    torch.testing.assert_close(found.gammas.double(), torch.where(exact, at_floor, halfway), atol=1e-6, rtol=0)
    assert bool((at_floor[exact] > halfway[exact]).any())  # the rule changes something here
    assert found.conflicts.tolist() == ((worst + MARGIN > floors - MARGIN) & (worst + MARGIN > GAMMA)).tolist()


def test_near_subjects_swap_one_word_or_the_number_and_leave_out_known_names():
    pool = ["Michel Rocard", "Yves Montand", "Renault 4", "Toyota Corolla", "Germany", "Yves Rocard"]
    # first-word swaps (Yves, Renault, Toyota; Michel is its own) and last-word swaps; "Yves Rocard" is
    # a stored subject (a fact, not a negative)
    assert set(calibration.near_subjects("Michel Rocard", pool, 50)) == {
        "Renault Rocard", "Toyota Rocard", "Michel Montand", "Michel 4", "Michel Corolla"}
    # a trailing number changed by one comes first
    assert calibration.near_subjects("Renault 4", pool, 2) == ["Renault 5", "Renault 3"]
    assert calibration.near_subjects("Renault 0", pool, 50)[0] == "Renault 1"  # no negative numbers
    assert "Renault -1" not in calibration.near_subjects("Renault 0", pool, 50)
    assert calibration.near_subjects("Germany", pool, 50) == []  # one word: nothing to swap
    assert calibration.near_subjects("Michel Rocard", pool, 0) == []
    # the choice depends on the pool's contents, not its order
    assert calibration.near_subjects("Michel Rocard", pool, 3) == calibration.near_subjects("Michel Rocard",
                                                                                            pool[::-1], 3)


def test_hparams_reject_bad_calibration_counts(model, tokenizer):
    for name in ("near_subjects", "other_wordings"):
        for bad in (-1, 1.5, True):
            with pytest.raises(ValueError, match=name):
                Editor(model, tokenizer, layer=LAYER, gamma=GAMMA, **{name: bad})


def test_a_later_edit_draws_wordings_from_the_stored_facts_and_removal_keeps_thresholds(model, tokenizer, editor_of):
    editor = editor_of(share_subject_residual=False)
    stored_fact, new_fact = FACTS[1], FACTS[2]  # "{} plays the" (opening "") then "The mother tongue of {}"
    [stored_id] = editor.edit([stored_fact], progress=False).ids
    [new_id] = editor.edit([new_fact], progress=False).ids
    prefixes = generate_prefixes(model, tokenizer, count=FAST["n_prefixes"], length=10, seed=0)
    # the new fact's own queries: its contexts and its subject after the stored fact's opening ("")
    positives = torch.cat([_context_queries(model, tokenizer, new_fact, prefixes),
                           _wording_queries(model, tokenizer, new_fact, [stored_fact, new_fact])])
    stored = editor.db.get(new_id)
    cosines = _cosines(positives, stored.keys)
    nearest = cosines.argmax(dim=1)
    floors = torch.tensor([cosines[nearest == row, row].min().item() for row in range(len(stored.keys))],
                          dtype=torch.float64)
    record = EditRecord.from_metadata(stored.metadata, new_id)
    torch.testing.assert_close(torch.tensor(record.key_floors, dtype=torch.float64), floors, atol=2e-5, rtol=0)
    gates = stored.key_gammas.double()
    at_gamma = torch.isclose(gates, torch.full_like(gates, GAMMA), atol=1e-6, rtol=0)
    assert bool(((gates <= floors - MARGIN + 1e-6) | at_gamma).all())  # every own query fires
    kept = stored.key_gammas.clone()
    editor.remove([stored_id])
    torch.testing.assert_close(editor.db.get(new_id).key_gammas, kept, atol=0, rtol=0)


def _calibration_state(db):
    """{id: (keys, thresholds, key floors)} of every stored fact."""
    return {fact.id: (fact.keys, fact.key_gammas, EditRecord.from_metadata(fact.metadata, fact.id).key_floors)
            for fact in db.facts()}


def test_the_pool_is_held_and_updated_from_the_editors_writes_with_the_thresholds_of_a_fresh_read(
        model, tokenizer, tmp_path, monkeypatch):
    # the pool of subjects and prompt openings: read from the stored metadata when the Editor does not
    # know the database's version (first call, someone else wrote), else updated from its own writes;
    # the thresholds must equal those of a fresh Editor, which reads every stored fact's metadata
    reads = []
    metadata = NeuralDB.metadata
    monkeypatch.setattr(NeuralDB, "metadata", lambda db: reads.append(len(db)) or metadata(db))
    held_db = NeuralDB.for_model(model, layer=LAYER, gamma=GAMMA, path=tmp_path / "held.sqlite")
    held = Editor(model, tokenizer, db=held_db, **FAST)
    first = held.edit(FACTS[:3], progress=False).ids
    assert reads == [0]  # the first call reads the (empty) database once
    held.remove([first[0]])
    held.detach()
    held_db.save(tmp_path / "fresh.sqlite")
    later = [Fact("{} is a member of", "Velmora Choir", "UNESCO"), FACTS[3]]
    held.edit(later, progress=False)
    assert reads == [0]  # removal and the next call: no stored fact's metadata read again
    fresh_db = NeuralDB.open(tmp_path / "fresh.sqlite")
    with Editor(model, tokenizer, db=fresh_db, **FAST) as fresh:
        fresh.edit(later, progress=False)
    assert reads == [0, 2]  # the fresh Editor reads the 2 stored facts
    held_state, fresh_state = _calibration_state(held_db), _calibration_state(fresh_db)
    assert sorted(held_state) == sorted(fresh_state) and len(held_state) == 4
    for fact_id, (keys, gammas, floors) in fresh_state.items():
        assert torch.equal(held_state[fact_id][0], keys) and torch.equal(held_state[fact_id][1], gammas)
        assert held_state[fact_id][2] == floors
    # a write the Editor did not make (a direct delete) is seen by the version: the pool is read again
    held_db.delete([first[1]])
    fresh_db.delete([first[1]])
    extra = [Fact("The founder of {} is", "Quillon Works", "Ada")]
    held.edit(extra, progress=False)
    assert reads == [0, 2, 3]
    with Editor(model, tokenizer, db=fresh_db, **FAST) as fresh:
        fresh.edit(extra, progress=False)
    held_state, fresh_state = _calibration_state(held_db), _calibration_state(fresh_db)
    assert sorted(held_state) == sorted(fresh_state)
    for fact_id, (keys, gammas, floors) in fresh_state.items():
        assert torch.equal(held_state[fact_id][1], gammas) and held_state[fact_id][2] == floors
