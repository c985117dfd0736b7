"""Model-written rewordings of a fact's question as extra residual contexts (editing.rewordings,
EditHParams.rewordings): the filter rules, the sampled candidates against an independent sampler
(each candidate alone, full forwards, its own seeded generator), determinism per seed whatever the
batch, no evaluation field read, the tokenised rewordings, the residual trained on them exactly as
on extra contexts (the plain loop of test_editing_residuals), and the Editor's wiring."""

import dataclasses
from collections.abc import Mapping

import pytest
import torch
from test_editing_residuals import plain_unit_residual
from tiny_models import tiny_model

from neuraldb_kernels.editing import EditHParams, Editor, Fact, FactError, optimize_residuals, tokenize_fact
from neuraldb_kernels.editing import editor as editor_module
from neuraldb_kernels.editing import rewordings
from neuraldb_kernels.editing.keys import pad_token_id
from neuraldb_kernels.editing.rewordings import (candidate_seed, kept_rewordings, question_rewordings,
                                                 rewording_prompt, sampled_candidates)

LAYER = 1


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model("llama", tokenizer, layers=3)


class Unreadable(Mapping):
    """Extras that fail the test when anything reads them (where evaluation prompts live)."""

    def __getitem__(self, key):
        raise AssertionError(f"extras[{key!r}] was read")

    def __iter__(self):
        raise AssertionError("extras were iterated")

    def __len__(self):
        raise AssertionError("extras were measured")


def test_kept_rewordings_cut_filter_and_deduplicate():
    question, subject = "What is the product made by UniFirst?", "UniFirst"
    candidates = [
        " What does UniFirst make? It makes shirts.",  # cut after the first "?"
        " what is the product  made by UniFirst?",  # the question itself (case, spacing)
        " Which product is made by Unifirst?",  # the subject not verbatim
        " Which company makes UniFirst products\nWhat?",  # no "?" on the first line
        " UniFirst makes which product?\nQuestion: ...",
        " What  does UniFirst make?",  # a repeat of the first (spacing)
        " Which goods come from UniFirst?",
    ]
    assert kept_rewordings(question, subject, candidates, 5) == (
        "What does UniFirst make?", "UniFirst makes which product?", "Which goods come from UniFirst?")
    assert kept_rewordings(question, subject, candidates, 2) == ("What does UniFirst make?",
                                                                 "UniFirst makes which product?")
    assert kept_rewordings(question, subject, candidates, 0) == ()


def test_the_prompt_asks_for_the_question_last():
    text = rewording_prompt("Who founded Velmora Records?")
    assert text.endswith("Question: Who founded Velmora Records?\nThe same question in other words:")
    assert text.count("Question:") == len(rewordings.EXAMPLES) + 1


def plain_candidate(model, tokenizer, question, seed, number, length, top_k):
    """One candidate sampled alone: a full forward per token, top-k, its own seeded generator."""
    generator = torch.Generator().manual_seed(candidate_seed(seed, question, number))
    row = list(tokenizer(rewording_prompt(question))["input_ids"])
    start = len(row)
    for _ in range(length):
        with torch.no_grad():
            top = model(torch.tensor([row])).logits[0, -1].float().topk(top_k)
        pick = torch.multinomial(torch.softmax(top.values, dim=-1), 1, generator=generator)
        row.append(int(top.indices[int(pick)]))
    return tokenizer.decode(row[start:], skip_special_tokens=True)


def test_candidates_are_each_rows_own_seeded_draws(model, tokenizer):
    questions = ["Who founded Velmora Records?", "In which city was Maria Quill born, according to the records?"]
    found = sampled_candidates(model, tokenizer, questions, 2, seed=3, length=4, top_k=5)
    expected = [[plain_candidate(model, tokenizer, q, 3, j, 4, 5) for j in range(2)] for q in questions]
    assert found == expected


def test_candidates_do_not_depend_on_the_batch_and_follow_the_seed(model, tokenizer, monkeypatch):
    questions = ["Who founded Velmora Records?", "What does Oskar Brandt speak?", "Where is Freedonia?"]
    together = sampled_candidates(model, tokenizer, questions, 3, seed=0, length=5)
    monkeypatch.setattr(rewordings, "ROWS_PER_PASS", 2)  # other batch-mates and paddings
    assert [sampled_candidates(model, tokenizer, [q], 3, seed=0, length=5)[0] for q in questions] == together
    assert sampled_candidates(model, tokenizer, questions[::-1], 3, seed=0, length=5) == together[::-1]
    assert sampled_candidates(model, tokenizer, questions, 3, seed=1, length=5) != together


def test_question_rewordings_read_the_prompt_and_subject_only(tokenizer, monkeypatch):
    """A stand-in sampler writes fixed continuations; the rewordings are what the filter keeps of
    them, the prompts sampled from are the facts' filled prompts, and extras are never read."""
    per = rewordings.CANDIDATES_PER_REWORDING
    continuations = [" Who started Velmora Records?\n", " Velmora Records was founded by whom?", " No.",
                     " Who began Velmora Records? Then", " Who founded Velmora Records?", " Who runs it?"]
    continuations += [" Who runs it?"] * (3 * per - len(continuations))  # filtered out
    seen = []

    def fake_sample_tokens(model, starts, length, *, top_k, generator):
        seen.extend(tokenizer.decode(row) for row in starts)
        assert len(generator) == len(starts) and length == rewordings.LENGTH and top_k == rewordings.TOP_K
        rows = [tokenizer(continuations[len(seen) - len(starts) + i], add_special_tokens=False)["input_ids"]
                for i in range(len(starts))]
        width = max(map(len, rows))
        return torch.tensor([row + [tokenizer.eos_token_id] * (width - len(row)) for row in rows])

    monkeypatch.setattr(rewordings, "sample_tokens", fake_sample_tokens)
    fact = Fact("Who founded {}?", "Velmora Records", "Anna Berg", extras=Unreadable())
    assert question_rewordings(None, tokenizer, [fact], 3) == (
        [("Who started Velmora Records?", "Velmora Records was founded by whom?", "Who began Velmora Records?")])
    assert seen == [rewording_prompt("Who founded Velmora Records?")] * (3 * per)
    assert question_rewordings(None, tokenizer, [fact], 0) == [()] and len(seen) == 3 * per  # nothing sampled
    with pytest.raises(ValueError, match="count"):
        question_rewordings(None, tokenizer, [fact], -1)
    # a statement (CounterFact's kind of prompt) gets none and is not sampled; the question beside it is
    seen.clear()
    statement = Fact("The founder of {} is", "Velmora Records", "Anna Berg", extras=Unreadable())
    assert question_rewordings(None, tokenizer, [statement, fact, statement], 1) == (
        [(), ("Who started Velmora Records?",), ()])
    assert seen == [rewording_prompt("Who founded Velmora Records?")] * per
    assert question_rewordings(None, tokenizer, [statement], 3) == [()] and len(seen) == per


def test_rewordings_are_tokenised_at_the_subjects_last_token(tokenizer):
    fact = Fact("Who founded {}?", "Velmora Records", "Anna Berg")
    texts = ("Velmora Records was started by whom?", "The founder of Velmora Records is who?")
    tokens = tokenize_fact(tokenizer, fact, ["A prefix. "], rewordings=texts)
    assert tokens.reworded == tuple(tuple(tokenizer(text)["input_ids"]) for text in texts)
    # the subject ends at a token boundary in both: its last token is the last of the text up to it
    expected = tuple(len(tokenizer(text[: text.index("Records") + len("Records")])["input_ids"]) - 1 for text in texts)
    assert tokens.reworded_subject_last == expected
    assert tokens.contexts == tokenize_fact(tokenizer, fact, ["A prefix. "]).contexts  # the keys' contexts unchanged
    assert tokenize_fact(tokenizer, fact, ["A prefix. "]).reworded == ()
    with pytest.raises(FactError, match="does not contain the subject"):
        tokenize_fact(tokenizer, fact, [], rewordings=("Who founded it?",))


def test_the_residual_trains_on_rewordings_as_on_extra_contexts(model, tokenizer):
    facts = [Fact("Who founded {}?", "Velmora Records", "Anna Berg"),
             Fact("Which group is {} a member of?", "Germany", "Hamas")]
    texts = [("Velmora Records was started by whom?", "The founder of Velmora Records is who?"),
             ("Germany belongs to which group?", "What group has Germany as a member?")]  # the first: position 0
    hparams = EditHParams(layer=LAYER, steps=4, lr=0.05, stop_prob=1.0, residual_matmuls="float32")  # as the plain loop
    tokens = [tokenize_fact(tokenizer, fact, ["A short text. "], rewordings=t) for fact, t in zip(facts, texts)]
    assert tokens[1].reworded_subject_last[0] == 0 and tokens[1].reworded_subject_last[1] > 0
    result = optimize_residuals(model, tokens, hparams, pad_id=0, units=[[0], [1]])
    for i, fact_tokens in enumerate(tokens):
        trained = [(c, s) for c, s in zip(fact_tokens.reworded, fact_tokens.reworded_subject_last) if s > 0]
        extended = dataclasses.replace(fact_tokens, contexts=fact_tokens.contexts + tuple(c for c, _ in trained),
                                       subject_last=fact_tokens.subject_last + tuple(s for _, s in trained),
                                       reworded=(), reworded_subject_last=())
        expected = plain_unit_residual(model, [extended], hparams)
        assert torch.allclose(result.residuals[i], expected.residual, rtol=1e-3,
                              atol=1e-4 * float(expected.residual.norm())), i
        without = optimize_residuals(model, [dataclasses.replace(fact_tokens, reworded=(), reworded_subject_last=())],
                                     hparams, pad_id=0)
        assert not torch.allclose(without.residuals[0], result.residuals[i], rtol=1e-3, atol=1e-3)


def test_the_editor_trains_the_residual_on_the_models_rewordings_and_keeps_the_keys(model, tokenizer, monkeypatch):
    fact = Fact("Who founded {}?", "Velmora Records", "Anna Berg", extras={"rephrase": "EVALUATION ONLY"})
    written = ("Velmora Records was started by whom?",)
    asked = []

    def fake_rewordings(model_, tokenizer_, facts, count, *, seed):
        if facts:  # (the stored companions of the subject: none here)
            asked.append(([f.filled_prompt for f in facts], count, seed))
        return [written[:count] for _ in facts]

    monkeypatch.setattr(editor_module, "question_rewordings", fake_rewordings)
    fast = {"steps": 3, "n_prefixes": 2, "calibrate_gates": False, "prefix_seed": 4}
    stored = {}
    for count in (0, 1):
        editor = Editor(model, tokenizer, layer=LAYER, gamma=0.3, rewordings=count, **fast)
        try:
            editor.edit([fact], progress=False)
            stored[count] = editor.db.get(fact.fact_id)
            prefixes = editor_module.generate_prefixes(model, tokenizer, count=2, length=editor.hparams.prefix_length,
                                                       seed=4)
            hparams = editor.hparams
        finally:
            editor.detach()
    assert asked == [(["Who founded Velmora Records?"], 0, 4), (["Who founded Velmora Records?"], 1, 4)]
    assert torch.equal(stored[0].keys, stored[1].keys)  # the keys do not read rewordings
    tokens = tokenize_fact(tokenizer, fact, prefixes, rewordings=written)
    expected = optimize_residuals(model, [tokens], hparams, pad_id=pad_token_id(tokenizer))
    assert torch.allclose(stored[1].residual.float(), expected.residuals[0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(stored[0].residual.float(), stored[1].residual.float(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("value", [-1, True, 1.5, "2"])
def test_rewordings_hparam_must_be_a_count(value):
    with pytest.raises(ValueError, match="rewordings"):
        EditHParams(layer=1, rewordings=value)


def recorded_rewordings(monkeypatch) -> list:
    """Stands in for the Editor's rewording sampler: one fixed rewording per fact; returns the list
    that receives each call's filled prompts."""
    asked = []

    def fake_rewordings(model_, tokenizer_, facts, count, *, seed):
        asked.append([f.filled_prompt for f in facts])
        return [(f"So, {f.subject} was started by whom?",) for f in facts]

    monkeypatch.setattr(editor_module, "question_rewordings", fake_rewordings)
    return asked


def test_a_stored_subject_mate_is_recomputed_with_its_own_rewordings(model, tokenizer, monkeypatch):
    asked = recorded_rewordings(monkeypatch)
    editor = Editor(model, tokenizer, layer=LAYER, gamma=0.3, rewordings=1, steps=2, n_prefixes=1,
                    calibrate_gates=False)
    try:
        editor.edit([Fact("Who founded {}?", "Velmora Records", "Anna Berg")], progress=False)
        asked.clear()
        report = editor.edit([Fact("Where is {} based?", "Velmora Records", "Oslo")], progress=False)
    finally:
        editor.detach()
    assert len(report.companions) == 1
    # one batch: the new fact and its stored subject-mate, recomputed with rewordings of its own
    assert asked == [["Where is Velmora Records based?", "Who founded Velmora Records?"]]


def test_rewordings_are_sampled_only_for_the_facts_not_yet_stored(model, tokenizer, monkeypatch):
    asked = recorded_rewordings(monkeypatch)
    first = Fact("Who founded {}?", "Velmora Records", "Anna Berg")
    second = Fact("Who founded {}?", "Korvath Studios", "Ivo Lind")
    editor = Editor(model, tokenizer, layer=LAYER, gamma=0.3, rewordings=1, steps=2, n_prefixes=1,
                    calibrate_gates=False, share_subject_residual=False)
    try:
        editor.edit([first], progress=False)
        stored = editor.db.get(first.fact_id).residual.clone()
        asked.clear()
        report = editor.edit([first, second], progress=False)  # a resumed run: the first is stored
    finally:
        editor.detach()
    assert report.already_stored == (first.fact_id,) and report.computed == (second.fact_id,)
    assert asked == [["Who founded Korvath Studios?"]]
    assert torch.equal(editor.db.get(first.fact_id).residual, stored)


def test_rewordings_are_sampled_per_batch_before_it_commits(model, tokenizer, monkeypatch):
    """An interrupted run keeps its committed batches, so no batch waits for the others' rewordings."""
    asked = recorded_rewordings(monkeypatch)
    facts = [Fact("Who founded {}?", subject, "Anna Berg") for subject in ("Velmora Records", "Korvath Studios",
                                                                           "Brask Ltd")]
    prompt_of = {fact.fact_id: fact.filled_prompt for fact in facts}
    events = []
    editor = Editor(model, tokenizer, layer=LAYER, gamma=0.3, rewordings=1, steps=2, n_prefixes=1,
                    calibrate_gates=False, batch_size=1)
    try:
        editor.edit(facts, progress=False, callback=lambda ids: events.append(([prompt_of[i] for i in ids], asked[-1])))
    finally:
        editor.detach()
    assert len(asked) == 3 and sorted(p for batch in asked for p in batch) == sorted(prompt_of.values())
    for number, (committed, sampled_last) in enumerate(events):
        assert committed == sampled_last == asked[number]  # each batch sampled just before it committed
