"""Editing on SmolLM2 end to end: keys against an independent hook computation, edits that change
the answers on the edited prompts and their paraphrases and nothing else, the unedited-model
guarantee, upsert/skip/update/remove semantics, resume after an interruption, error paths."""

import pytest
import torch

from neuraldb_kernels import NeuralDB
from neuraldb_kernels.editing import (Editor, Fact, FactError, compute_keys, generate_prefixes, read_counterfact,
                                      tokenize_fact)
from neuraldb_kernels.editing.keys import generic_queries
from neuraldb_kernels.integration import locate_down_proj

# cheap settings for the semantics tests (quality is tested with the defaults)
FAST = {"steps": 3, "n_prefixes": 2}


@pytest.fixture(scope="module")
def smollm2():
    from neuraldb_kernels.integration import load_default_model

    try:
        model, tokenizer = load_default_model()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    return model, tokenizer


@pytest.fixture(scope="module")
def counterfact(data_dir):
    return read_counterfact(data_dir / "counterfact" / "counterfact-a.json", limit=12)


def _nll(model, tokenizer, prompt, target):
    """Mean per-token NLL of " " + target after prompt (plain full forward, float64 log-softmax)."""
    ids = tokenizer(prompt)["input_ids"]
    tail = tokenizer(" " + target, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids + tail])).logits[0].double()
    logp = logits.log_softmax(-1)
    return -sum(logp[len(ids) - 1 + t, token] for t, token in enumerate(tail)).item() / len(tail)


def _greedy_next(model, tokenizer, prompts):
    with torch.no_grad():
        return [int(model(torch.tensor([tokenizer(p)["input_ids"]])).logits[0, -1].argmax()) for p in prompts]


def test_keys_equal_an_independent_hook_computation(smollm2, counterfact):
    model, tokenizer = smollm2
    layer = 4
    prefixes = generate_prefixes(model, tokenizer, count=FAST["n_prefixes"], length=10)
    facts = counterfact[:3]
    tokens = [tokenize_fact(tokenizer, fact, prefixes, index=i) for i, fact in enumerate(facts)]
    keys, bare = compute_keys(model, tokens, layer, pad_id=tokenizer.eos_token_id)

    module = locate_down_proj(model, layer)
    expected, expected_bare = [], []
    for fact in facts:
        seen = []
        handle = module.register_forward_hook(lambda _m, args, _out: seen.append(args[0][0]))
        try:
            rows = []
            for prefix in ("", *prefixes):
                text = prefix + fact.filled_prompt
                end = text.rindex(fact.subject) + len(fact.subject)
                encoded = tokenizer(text, return_offsets_mapping=True)
                last = max(i for i, (a, b) in enumerate(encoded["offset_mapping"]) if a < end and b > a)
                with torch.no_grad():
                    model(torch.tensor([encoded["input_ids"]]))
                rows.append(seen[-1][last])
        finally:
            handle.remove()
        expected.append(torch.stack(rows).mean(0))
        expected_bare.append(rows[0])  # the bare prompt, no prefix
    torch.testing.assert_close(keys, torch.stack(expected), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bare, torch.stack(expected_bare), rtol=1e-5, atol=1e-5)


def test_generic_queries_are_every_tokens_query_of_each_text_alone(smollm2):
    model, tokenizer = smollm2
    texts = ["Paris is a city.", "The", "A longer text, with punctuation; and words"]
    queries = generic_queries(model, tokenizer, texts, 4, pad_id=tokenizer.eos_token_id)
    module = locate_down_proj(model, 4)
    seen = []
    handle = module.register_forward_hook(lambda _m, args, _out: seen.append(args[0][0]))
    try:
        with torch.no_grad():
            for text in texts:  # one text at a time, no padding
                model(torch.tensor([tokenizer(text)["input_ids"]]))
    finally:
        handle.remove()
    expected = torch.nn.functional.normalize(torch.cat(seen), dim=1)
    torch.testing.assert_close(queries, expected, rtol=1e-5, atol=1e-5)


def test_edits_change_answers_on_prompts_and_paraphrases_and_nothing_else(smollm2, counterfact):
    model, tokenizer = smollm2
    # facts whose edited prompt the unedited model answers with the true target
    facts = [fact for fact in counterfact if _nll(model, tokenizer, fact.filled_prompt, fact.target_new)
             > _nll(model, tokenizer, fact.filled_prompt, fact.target_true)][:3]
    assert len(facts) == 3
    unrelated = ["The capital of France is", "Water is made of hydrogen and", "The Beatles were a band from",
                 "My favourite colour is"] + [fact.extras["locality_prompt"] for fact in facts]
    before = _greedy_next(model, tokenizer, unrelated)

    editor = Editor(model, tokenizer)
    try:
        ids = editor.edit(facts, progress=False).ids
        assert ids == tuple(fact.fact_id for fact in facts) and len(list(editor.db)) == 3
        for fact in facts:
            for prompt in (fact.filled_prompt, fact.extras["rephrase_prompt"]):
                assert _nll(model, tokenizer, prompt, fact.target_new) < _nll(model, tokenizer, prompt,
                                                                               fact.target_true), prompt
        assert _greedy_next(model, tokenizer, unrelated) == before
        # the fact fired at its subject's last token of the edited prompt
        with torch.no_grad():
            model(torch.tensor([tokenizer(facts[0].filled_prompt)["input_ids"]]))
        tokens = tokenize_fact(tokenizer, facts[0], ())
        fired = {(firing.position, firing.fact_id) for firing in editor.attachment.fired()}
        assert (tokens.subject_last[0], ids[0]) in fired
    finally:
        editor.detach()
    for fact in facts:  # detached: the model is the unedited one again
        assert _nll(model, tokenizer, fact.filled_prompt, fact.target_new) > \
            _nll(model, tokenizer, fact.filled_prompt, fact.target_true)


def test_residuals_are_computed_on_the_unedited_model(smollm2, counterfact):
    model, tokenizer = smollm2
    first, second = counterfact[5], counterfact[6]
    alone = Editor(model, tokenizer, **FAST)
    alone.edit([second], progress=False)
    alone.detach()
    editor = Editor(model, tokenizer, **FAST)
    try:
        editor.edit([first], progress=False)
        editor.edit([second], progress=False)  # first is live on the model meanwhile
    finally:
        editor.detach()
    expected = alone.db.get(second.fact_id)
    got = editor.db.get(second.fact_id)
    torch.testing.assert_close(got.key, expected.key, rtol=0, atol=0)
    torch.testing.assert_close(got.residual, expected.residual, rtol=1e-5, atol=1e-5)


def test_interrupted_edit_resumes_and_adds_each_fact_once(smollm2, counterfact, tmp_path):
    model, tokenizer = smollm2
    facts = counterfact[:5]
    path = tmp_path / "edits.ndb"
    db = NeuralDB(path, d1=1536, d2=576, layer=4)
    committed = []

    def interrupt_after_first_batch(ids):
        committed.append(list(ids))
        raise KeyboardInterrupt

    editor = Editor(model, tokenizer, db=db, batch_size=2, **FAST)
    with pytest.raises(KeyboardInterrupt):
        editor.edit(facts, progress=False, callback=interrupt_after_first_batch)
    assert editor.attachment.attached  # put back despite the interruption
    editor.detach()
    db.close()

    reopened = NeuralDB.open(path)
    assert sorted(list(reopened)) == sorted(committed[0]) and len(committed[0]) == 2
    resumed = []
    editor = Editor(model, tokenizer, db=reopened, batch_size=2, **FAST)
    try:
        ids = editor.edit(facts, progress=False, callback=resumed.append).ids
    finally:
        editor.detach()
    done = [fact_id for batch in resumed for fact_id in batch]
    assert sorted(done + committed[0]) == sorted(fact.fact_id for fact in facts)  # each computed once
    assert sorted(list(reopened)) == sorted(ids) and len(ids) == 5
    for fact_id in reopened:  # an extra key only where the edit recorded one
        stored = reopened.get(fact_id)
        assert len(stored.keys) == 1 + stored.metadata["edit"]["bare_prompt_key"]
    reopened.close()


def test_same_fact_is_skipped_new_target_replaces_update_and_remove(smollm2, counterfact):
    model, tokenizer = smollm2
    fact = counterfact[7]
    editor = Editor(model, tokenizer, **FAST)
    try:
        calls = []
        [fact_id] = editor.edit([fact], progress=False, callback=calls.append).ids
        stored = editor.db.get(fact_id)
        assert stored.metadata["target_new"] == fact.target_new and stored.metadata["subject"] == fact.subject
        assert editor.edit([fact], progress=False, callback=calls.append).ids == (fact_id,)
        assert len(calls) == 1  # complete and identical: not recomputed

        changed = Fact(fact.prompt, fact.subject, "Japanese")
        assert editor.edit([changed], progress=False, callback=calls.append).ids == (fact_id,)
        assert len(calls) == 2 and list(editor.db) == [fact_id]
        assert editor.db.get(fact_id).metadata["target_new"] == "Japanese"
        assert not torch.equal(editor.db.get(fact_id).residual, stored.residual)

        assert editor.update([changed], progress=False, callback=calls.append).ids == (fact_id,)
        assert len(calls) == 3
        with pytest.raises(ValueError, match="not in the database.*use edit"):
            editor.update([Fact("{} is in", "Lyon", "Peru")], progress=False)

        assert editor.remove([fact_id]) == [fact_id] and len(editor.db) == 0 and editor.db.key_rows == 0
        with pytest.raises(Exception, match=fact_id):
            editor.remove([fact_id])
        assert editor.remove([fact_id], missing_ok=True) == []
    finally:
        editor.detach()


def test_subject_first_prompt_gets_a_bare_prompt_extra_key(smollm2, counterfact):
    # "Saint Petersburg is a twin city of": without a BOS token the subject opens the sequence, and
    # its query there is far from the prefixed contexts' average; "The mother tongue of Danielle
    # Darrieux is" keeps its subject mid-sentence in every context
    model, tokenizer = smollm2
    subject_first, subject_inside = counterfact[8], counterfact[0]
    editor = Editor(model, tokenizer, **FAST)
    try:
        first_id, inside_id = editor.edit([subject_first, subject_inside], progress=False).ids
        assert sorted(editor.db) == sorted([first_id, inside_id]) and editor.db.key_rows == 3
        stored = editor.db.get(first_id)
        assert len(stored.keys) == 2 and stored.metadata["edit"]["bare_prompt_key"]
        assert len(editor.db.get(inside_id).keys) == 1
        # the extra key is the bare prompt's down-projection input at the subject's last token
        tokens = tokenize_fact(tokenizer, subject_first, ())
        seen = []
        module = locate_down_proj(model, editor.hparams.layer)
        with editor.attachment.paused():
            handle = module.register_forward_hook(lambda _m, args, _out: seen.append(args[0][0]))
            try:
                with torch.no_grad():
                    model(torch.tensor([tokens.contexts[0]]))
            finally:
                handle.remove()
        query = seen[-1][tokens.subject_last[0]]
        torch.testing.assert_close(stored.keys[1], query, rtol=1e-5, atol=1e-5)
        assert torch.nn.functional.cosine_similarity(query, stored.key, dim=0) < 0.8
        # attached, the edited prompt fires at the subject through the extra key
        with torch.no_grad():
            model(torch.tensor([tokens.contexts[0]]))
        fired = {(f.position, f.fact_id) for f in editor.attachment.fired()}
        assert (tokens.subject_last[0], first_id) in fired
        assert editor.remove([first_id]) == [first_id] and sorted(editor.db) == [inside_id]
        assert editor.db.key_rows == 1
    finally:
        editor.detach()
    never = Editor(model, tokenizer, **FAST, bare_key_below=-1.0)
    try:
        assert never.edit([subject_first], progress=False).ids == (first_id,) and never.db.key_rows == 1
    finally:
        never.detach()


def test_facts_of_one_subject_share_a_residual_and_removal_recomputes_the_rest(smollm2):
    # both prompts open with the subject: their keys (the subject's last token) coincide, so with a
    # residual each only one of them can win
    model, tokenizer = smollm2
    sport = Fact("{} professionally plays the sport", "Carlos Valderrama", "basketball", "soccer")
    position = Fact("{} plays as", "Carlos Valderrama", "quarterback", "midfielder")
    prompts = [sport.filled_prompt, position.filled_prompt]
    first_tokens = [tokenizer(" " + f.target_new, add_special_tokens=False)["input_ids"][0] for f in (sport, position)]
    unedited = _greedy_next(model, tokenizer, prompts)
    assert all(u != t for u, t in zip(unedited, first_tokens))

    separate = Editor(model, tokenizer, share_subject_residual=False)
    try:
        separate.edit([sport, position], progress=False)
        assert sum(a == t for a, t in zip(_greedy_next(model, tokenizer, prompts), first_tokens)) < 2
    finally:
        separate.detach()

    editor = Editor(model, tokenizer)
    try:
        calls = []
        [sport_id] = editor.edit([sport], progress=False, callback=calls.append).ids
        alone = editor.db.get(sport_id).residual
        # a new fact of the subject recomputes the stored one with it, in one batch
        report = editor.edit([position], progress=False, callback=calls.append)
        [position_id] = report.ids
        assert calls == [[sport_id], [position_id, sport_id]]
        assert report.companions == (sport_id,) and report.computed == (position_id, sport_id)
        assert _greedy_next(model, tokenizer, prompts) == first_tokens
        shared = editor.db.get(sport_id)
        assert torch.equal(shared.residual, editor.db.get(position_id).residual)
        assert not torch.equal(shared.residual, alone)
        assert shared.metadata["edit"]["shares_residual_with"] == [position_id]
        assert editor.db.get(position_id).metadata["edit"]["shares_residual_with"] == [sport_id]
        assert shared.metadata["target_new"] == "basketball" and shared.metadata["target_true"] == "soccer"
        # resuming skips both; removing one recomputes the other alone
        assert editor.edit([sport, position], progress=False, callback=calls.append).ids == (sport_id, position_id)
        assert len(calls) == 2
        with pytest.raises(ValueError, match="duplicate ids"):  # refused before anything is recomputed
            editor.remove([position_id, position_id])
        assert torch.equal(editor.db.get(sport_id).residual, shared.residual)
        assert editor.remove([position_id]) == [position_id] and list(editor.db) == [sport_id]
        assert editor.db.get(sport_id).metadata["edit"]["shares_residual_with"] == []
        assert _greedy_next(model, tokenizer, prompts) == [first_tokens[0], unedited[1]]
        with pytest.raises(KeyError, match="not in the database"):
            editor.remove([sport_id, "nope"])
        assert list(editor.db) == [sport_id]
    finally:
        editor.detach()


def test_a_one_token_subject_opening_the_prompt_is_reported_and_spares_its_subject_mates(smollm2):
    model, tokenizer = smollm2
    opening = Fact("{} is a member of", "Germany", "Hamas", "NATO")  # "Germany" is one token, at position 0
    inside = Fact("In {}, they understand", "Germany", "Tamil", "German")
    editor = Editor(model, tokenizer)
    try:
        report = editor.edit([opening, inside], progress=False)
        opening_id, inside_id = report.ids
        assert report.first_token_subjects == (opening_id,)
        assert editor.db.get(opening_id).metadata["edit"]["subject_first_token"]
        assert not editor.db.get(inside_id).metadata["edit"]["subject_first_token"]
        # the shared residual is not trained on position 0 (it wrecked the whole unit): the
        # subject's other fact takes effect
        assert editor.db.get(inside_id).metadata["edit"]["converged"]
        prompt = inside.filled_prompt
        assert _nll(model, tokenizer, prompt, "Tamil") < _nll(model, tokenizer, prompt, "German")
    finally:
        editor.detach()


def test_bad_facts_raise_or_are_skipped(smollm2):
    model, tokenizer = smollm2
    good = Fact("{} plays the", "Lionel Messi", "violin")
    too_long = Fact("word " * 9000 + "{} is", "Paris", "big")
    editor = Editor(model, tokenizer, **FAST)
    try:
        with pytest.raises(FactError, match=r"fact 1 \(id .*longer than the model's context of 8192 tokens"):
            editor.edit([good, too_long], progress=False)
        with pytest.raises(FactError, match="fact 0.*subject is empty"):
            editor.edit([Fact("{} is", "", "x")], progress=False)
        assert len(editor.db) == 0 and editor.attachment.attached
        report = editor.edit([Fact("{} is", "", "x"), good, too_long], on_error="skip", progress=False)
        assert report.ids == (good.fact_id,)
        assert [entry.index for entry in report.skipped] == [0, 2]
        assert "subject is empty" in report.skipped[0].reason and "longer than" in report.skipped[1].reason
    finally:
        editor.detach()


def test_editor_argument_errors(smollm2):
    model, tokenizer = smollm2
    with pytest.raises(TypeError, match="unknown editing hyperparameter.*stepz"):
        Editor(model, tokenizer, stepz=3)
    with pytest.raises(ValueError, match="invalid editing hyperparameter.*lr=-1"):
        Editor(model, tokenizer, lr=-1)
    with pytest.raises(ValueError, match="layer=5 but the database was built for layer 4"):
        Editor(model, tokenizer, db=NeuralDB(d1=1536, d2=576, layer=4), layer=5)
    with pytest.raises(ValueError, match="d1=10, d2=576"):
        Editor(model, tokenizer, db=NeuralDB(d1=10, d2=576, layer=4))
    with pytest.raises(TypeError, match="db must be a NeuralDB"):
        Editor(model, tokenizer, db={})
    editor = Editor(model, tokenizer)
    try:
        with pytest.raises(ValueError, match="already has a NeuralDB attached"):
            Editor(model, tokenizer)
    finally:
        editor.detach()


def _first_token_queries(model, editor, tokenizer, texts):
    """The layer-l* down-projection input at the first token of each text, on the unedited model."""
    seen = []
    module = locate_down_proj(model, editor.hparams.layer)
    with editor.attachment.paused():
        handle = module.register_forward_hook(lambda _m, args, _out: seen.append(args[0][0, 0]))
        try:
            with torch.no_grad():
                for text in texts:
                    model(torch.tensor([tokenizer(text)["input_ids"]]))
        finally:
            handle.remove()
    return seen


def test_a_generic_bare_prompt_query_is_stored_only_with_a_threshold_above_model_written_text(smollm2, data_dir):
    # "Bay, which is located in": the one-token subject opens the sequence, and without a BOS token
    # the first position looks alike for every token, so that query passes gamma on any text
    model, tokenizer = smollm2
    bay = read_counterfact(data_dir / "counterfact" / "counterfact-a.json", limit=426)[425]
    assert bay.subject == "Bay"
    unrelated = "The weather today is"
    # one threshold for every key (no calibration): the query is left out
    editor = Editor(model, tokenizer, **FAST, calibrate_gates=False)
    try:
        [fact_id] = editor.edit([bay], progress=False).ids
        stored = editor.db.get(fact_id)
        assert len(stored.keys) == 1 and not stored.metadata["edit"]["bare_prompt_key"]
        assert stored.metadata["edit"]["bare_prompt_key_generic"]
        # independently: the bare query passes the gate against the first token of unrelated text
        bare_query, unrelated_query = _first_token_queries(model, editor, tokenizer, [bay.filled_prompt, unrelated])
        assert torch.nn.functional.cosine_similarity(bare_query, unrelated_query, dim=0) > editor.hparams.gamma
        # attached, unrelated text does not fire the fact
        with torch.no_grad():
            model(torch.tensor([tokenizer(unrelated)["input_ids"]]))
        assert editor.attachment.fired() == []
    finally:
        editor.detach()
    # calibrated thresholds: the query is stored, its own threshold above the unrelated first token
    editor = Editor(model, tokenizer, **FAST)
    try:
        [fact_id] = editor.edit([bay], progress=False).ids
        stored = editor.db.get(fact_id)
        assert len(stored.keys) == 2 and stored.metadata["edit"]["bare_prompt_key"]
        assert stored.metadata["edit"]["bare_prompt_key_generic"]
        torch.testing.assert_close(stored.keys[1], bare_query, rtol=1e-5, atol=1e-5)
        unrelated_cosine = torch.nn.functional.cosine_similarity(bare_query.double(), unrelated_query.double(), dim=0)
        assert stored.key_gammas[1] > unrelated_cosine
        # an exact-match key (editing.calibration): its own query alone is its floor, its threshold 1 - margin
        margin = editor.hparams.gate_margin
        assert stored.metadata["edit"]["key_floors"][1] == pytest.approx(1.0, abs=1e-5)
        assert float(stored.key_gammas[1]) == pytest.approx(1.0 - margin, abs=1e-5)
        # attached: the bare prompt fires the fact at its subject, unrelated text fires nothing
        with torch.no_grad():
            model(torch.tensor([tokenizer(bay.filled_prompt)["input_ids"]]))
        assert (0, fact_id) in {(f.position, f.fact_id) for f in editor.attachment.fired()}
        with torch.no_grad():
            model(torch.tensor([tokenizer(unrelated)["input_ids"]]))
        assert editor.attachment.fired() == []
    finally:
        editor.detach()
