"""The Editor's typed results and its attachment, on a tiny random llama (cheap): the EditReport of
edit/update calls (ids, computed, companions, already stored, skipped with reasons, superseded,
first-token subjects, not converged against the unedited model's own probabilities, seconds), the
EditRecord it stores, one attachment paused while it computes, the context manager, and the
progress bar's phases."""

import math
import time

import pytest
import torch
from tiny_models import tiny_model

from neuraldb_kernels.editing import EditRecord, Editor, Fact

# no prefixes and one step: every stored target probability is the unedited model's own
ONE_STEP = {"layer": 1, "n_prefixes": 0, "steps": 1}
SPORT = Fact("{} plays the sport of", "Carlos Valderrama", "basketball")
BIRTH = Fact("{} was born in the city of", "Carlos Valderrama", "Oslo")
TONGUE = Fact("The mother tongue of {} is", "Danielle Darrieux", "English")
TONGUE_LATER = Fact("The mother tongue of {} is", "Danielle Darrieux", "French")
OPENING = Fact("{} is a member of", "Germany", "Hamas")  # a one-token subject at position 0
TOO_LONG = Fact("word " * 200 + "{} is", "Paris", "big")  # longer than the tiny model's 128 positions


def unedited_probability(model, tokenizer, fact):
    """exp(-mean NLL) of " " + target_new after the filled prompt: plain forward, float64."""
    ids = tokenizer(fact.filled_prompt)["input_ids"]
    tail = tokenizer(" " + fact.target_new, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = model(torch.tensor([ids + tail])).logits[0].double().log_softmax(-1)
    return math.exp(sum(logp[len(ids) - 1 + t, token] for t, token in enumerate(tail)).item() / len(tail))


def test_edit_report_lists_what_each_call_did(tokenizer):
    model = tiny_model("llama", tokenizer)
    facts = {"sport": SPORT, "birth": BIRTH, "tongue": TONGUE_LATER, "opening": OPENING}
    probability = {name: unedited_probability(model, tokenizer, fact) for name, fact in facts.items()}
    # a stop_prob in the widest gap between them (as a ratio): some facts reach it, some do not
    ordered = sorted(probability.values())
    low, high = max(zip(ordered, ordered[1:]), key=lambda pair: pair[1] / pair[0])
    stop_prob = math.sqrt(low * high)
    ids = {name: fact.fact_id for name, fact in facts.items()}
    with Editor(model, tokenizer, stop_prob=stop_prob, **ONE_STEP) as editor:
        first = editor.edit([SPORT], progress=False)
        assert (first.ids, first.computed, first.companions, first.already_stored, first.skipped) == (
            (ids["sport"],), (ids["sport"],), (), (), ())

        given = [{"prompt": "{} is", "subject": "A", "id": "bad"}, BIRTH, SPORT, TONGUE, TOO_LONG, TONGUE_LATER,
                 OPENING]
        started = time.perf_counter()
        report = editor.edit(given, on_error="skip", progress=False)
        wall = time.perf_counter() - started
        assert report.ids == (ids["birth"], ids["sport"], ids["tongue"], ids["tongue"], ids["opening"])
        assert [(entry.index, entry.fact_id) for entry in report.skipped] == [(0, "bad"), (4, TOO_LONG.fact_id)]
        assert "missing field(s) target_new" in report.skipped[0].reason
        assert "longer than the model's context of 128 tokens" in report.skipped[1].reason
        assert report.superseded == ((3, 5),)
        assert report.already_stored == (ids["sport"],)
        assert report.companions == (ids["sport"],)  # stored with the same subject: recomputed with BIRTH
        assert sorted(report.computed) == sorted(ids.values())
        assert report.first_token_subjects == (ids["opening"],)
        assert set(report.not_converged) == {ids[name] for name in facts if probability[name] < stop_prob}
        assert 0 < len(report.not_converged) < len(facts)
        assert set(report.seconds) == {"prefixes", "keys", "residuals", "store", "total"}
        assert all(value >= 0 for value in report.seconds.values())
        assert sum(report.seconds.values()) - report.seconds["total"] <= report.seconds["total"] <= wall

        for name, fact_id in ids.items():  # what each stored fact records about its computation
            record = EditRecord.from_metadata(editor.db.get(fact_id).metadata, fact_id)
            assert record.target_prob == pytest.approx(probability[name], rel=1e-4)
            assert (record.layer, record.steps, record.converged) == (1, 1, probability[name] >= stop_prob)
            assert record.subject_first_token == (name == "opening")
            assert record.hparams["stop_prob"] == stop_prob and record.hparams["layer"] == 1
        assert EditRecord.from_metadata(editor.db.get(ids["sport"]).metadata).shares_residual_with == (ids["birth"],)
        assert editor.db.get(ids["tongue"]).metadata["target_new"] == "French"

        again = editor.edit(given, on_error="skip", progress=False)
        assert again.already_stored == (ids["birth"], ids["sport"], ids["tongue"], ids["opening"])
        assert again.computed == again.companions == again.not_converged == ()
        assert len(again.skipped) == 2

        updated = editor.update([TONGUE_LATER], progress=False)
        assert (updated.ids, updated.computed, updated.already_stored) == ((ids["tongue"],),) * 2 + ((),)


def test_editor_keeps_one_attachment_paused_while_it_computes_and_detaches_on_exit(tokenizer):
    model = tiny_model("llama", tokenizer, layers=3)  # (at the last layer a residual could not move the answer)
    prompt = torch.tensor([tokenizer(TONGUE.filled_prompt)["input_ids"]])
    with torch.no_grad():
        bare = model(prompt).logits
    with pytest.raises(RuntimeError, match="inside"):
        with Editor(model, tokenizer, layer=1, n_prefixes=0, steps=3, lr=0.5) as editor:
            attachment = editor.attachment
            paused_while_storing = []
            [fact_id] = editor.edit([TONGUE], progress=False,
                                    callback=lambda _ids: paused_while_storing.append(attachment.is_paused)).ids
            assert paused_while_storing == [True]
            assert editor.attachment is attachment and attachment.attached and not attachment.is_paused
            with torch.no_grad():  # live: the fact fires on its own prompt (its key is that query)
                edited = model(prompt).logits
            assert fact_id in [firing.fact_id for firing in attachment.fired()] and not torch.equal(edited, bare)
            assert "attached" in repr(editor)
            raise RuntimeError("inside")
    assert not attachment.attached and "detached" in repr(editor)
    with torch.no_grad():
        assert torch.equal(model(prompt).logits, bare)
    # the layer is free again; detach() is the same without a block, and a second one does nothing
    other = Editor(model, tokenizer, db=editor.db)
    other.detach()
    other.detach()
    assert not other.attachment.attached


def test_progress_names_each_phase(tokenizer, capsys):
    model = tiny_model("llama", tokenizer)
    with Editor(model, tokenizer, layer=1, n_prefixes=1, prefix_length=2, steps=1, batch_size=1) as editor:
        editor.edit([SPORT, TONGUE], progress=True)
    err = capsys.readouterr().err
    for phase in ("editing: prefixes", "editing: generic queries", "editing: keys (batch 1/2)",
                  "editing: residuals (batch 1/2)", "editing: store (batch 2/2)"):
        assert phase in err, phase
