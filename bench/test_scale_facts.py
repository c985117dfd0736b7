"""bench/scale_facts.py: the generated facts are well-formed, checked against the raw CounterFact
records (not the generator's own relation tables), deterministic, and readable by the package."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import scale_facts  # noqa: E402

from neuraldb_kernels.editing import check_facts, counterfact_fact, read_counterfact  # noqa: E402

SCRIPT = pathlib.Path(__file__).resolve().parent / "scale_facts.py"
# counterfact-a leads; -b donates neighbour subjects (about 3,000), fictional names fill the rest
REAL_COUNT, COUNT = 10000, 14000


@pytest.fixture(scope="module")
def source():
    if not all(path.is_file() for path in scale_facts.SOURCES):
        pytest.skip("the CounterFact files of ../shared/data are not present")
    return scale_facts.read_records(scale_facts.SOURCES)


@pytest.fixture(scope="module")
def real(source):
    return source[:REAL_COUNT]


@pytest.fixture(scope="module")
def scale_set(source, real):
    return scale_facts.generate(source, real, COUNT, seed=0)


@pytest.fixture(scope="module")
def stated(source):
    """From the raw records: the (template, answer) pairs they state (each record's prompt
    template with its ground_truth and target_new, every template framing a locality prompt with
    its answer), the templates, and the (subject, answer) facts of the locality prompts (every
    subject a template frames in one)."""
    pairs, neighbourhood = set(), set()
    templates = set()
    for r in source:
        start = r["prompt"].rindex(r["subject"])
        template = r["prompt"][:start] + "{}" + r["prompt"][start + len(r["subject"]):]
        templates.add(template)
        pairs.update({(template, r["ground_truth"]), (template, r["target_new"])})
    frames = [(t, *t.split("{}")) for t in templates]
    for r in source:
        local = r["locality_prompt"]
        for template, prefix, suffix in frames:
            if len(local) > len(prefix) + len(suffix) and local.startswith(prefix) and local.endswith(suffix):
                pairs.add((template, r["locality_ground_truth"]))
                neighbourhood.add((local[len(prefix):len(local) - len(suffix)], r["locality_ground_truth"]))
    return pairs, templates, neighbourhood


def synthetic(scale_set):
    return [r for r in scale_set.records if r["synthetic"]]


def test_count_is_exact_and_real_records_lead(scale_set, real):
    assert len(scale_set.records) == COUNT
    kept = [r for r in scale_set.records if not r["synthetic"]]
    assert scale_set.records[: len(kept)] == kept
    assert len(kept) + scale_set.dropped_real_duplicates == REAL_COUNT
    assert [(r["subject"], r["prompt"]) for r in kept] == list(dict.fromkeys((r["subject"], r["prompt"]) for r in real))
    assert {r["source"] for r in synthetic(scale_set)} == {"neighbour-subject", "fictional"}


def test_no_duplicate_subject_and_prompt(scale_set):
    keys = [(r["subject"], r["prompt"]) for r in scale_set.records]
    assert len(set(keys)) == len(keys)


def test_prompt_and_paraphrase_are_stated_templates_of_the_relation(scale_set, stated):
    pairs, templates, _ = stated
    for r in synthetic(scale_set):
        relation = scale_set.relations[r["relation"]]
        for text in (r["prompt"], r["rephrase_prompt"]):
            assert r["subject"] in text
            template = text.replace(r["subject"], "{}", 1)
            assert template in templates and template in relation.templates
            # the data states the target (and the known true answer) in this wording
            assert (template, r["target_new"]) in pairs
            if r["ground_truth"] is not None:
                assert (template, r["ground_truth"]) in pairs
        assert r["prompt"] != r["rephrase_prompt"]
        assert r["target_new"] in relation.answer_weights


def test_target_differs_from_the_known_true_answer(scale_set, stated):
    _, _, neighbourhood = stated
    neighbours = [r for r in synthetic(scale_set) if r["source"] == "neighbour-subject"]
    assert neighbours
    for r in synthetic(scale_set):
        assert r["target_new"] != r["ground_truth"]
        assert (r["ground_truth"] is None) == (r["source"] == "fictional")
    for r in neighbours:
        # the true answer is the one a real neighbourhood prompt states of this subject
        assert (r["subject"], r["ground_truth"]) in neighbourhood


def test_locality_is_a_real_unedited_neighbourhood_fact(scale_set, source, stated):
    _, templates, _ = stated
    frames = [t.split("{}") for t in templates]
    real_neighbourhood = {(r["locality_prompt"], r["locality_ground_truth"]) for r in source}
    made = synthetic(scale_set)
    edited_in_relation = {(r["subject"], r["relation"]) for r in made}
    edited_prompts = {r["prompt"] for r in scale_set.records}
    for r in made:
        local = r["locality_prompt"]
        assert (local, r["locality_ground_truth"]) in real_neighbourhood
        assert local not in edited_prompts
        # no synthetic fact of the relation edits a subject a template frames in this prompt
        framed = {local[len(prefix):len(local) - len(suffix)] for prefix, suffix in frames
                  if len(local) > len(prefix) + len(suffix) and local.startswith(prefix) and local.endswith(suffix)}
        assert framed and all((subject, r["relation"]) not in edited_in_relation for subject in framed), r


def test_fictional_names_never_name_a_real_entity(scale_set, source):
    texts = " ".join(r[f] for r in source for f in ("prompt", "rephrase_prompt", "locality_prompt")).casefold()
    subjects = {r["subject"].casefold() for r in source}
    fictional = [r["subject"] for r in synthetic(scale_set) if r["source"] == "fictional"]
    assert fictional and len(set(fictional)) == len(fictional)
    for name in fictional:
        assert name.casefold() not in subjects
        assert name.casefold() not in texts


def test_deterministic_for_a_seed(scale_set, source, real):
    assert scale_facts.generate(source, real, COUNT, seed=0).records == scale_set.records
    assert scale_facts.generate(source, real, COUNT, seed=1).records != scale_set.records


def test_every_record_passes_the_counterfact_reader(scale_set, tmp_path):
    facts = [counterfact_fact(r, i) for i, r in enumerate(scale_set.records)]
    valid, skipped = check_facts(facts, on_error="skip")
    assert not skipped and len(valid) == COUNT
    for fact, record in zip(facts, scale_set.records):
        assert fact.subject_span == (record["prompt"].rindex(record["subject"]),
                                     record["prompt"].rindex(record["subject"]) + len(record["subject"]))
        assert fact.extras["locality_prompt"] == record["locality_prompt"]
    path = tmp_path / "scale.json"
    path.write_text(json.dumps(scale_set.records))
    assert [f.fact_id for f in read_counterfact(path)] == [f.fact_id for f in facts]


def test_summary_counts_match_the_records(scale_set):
    summary = scale_set.summary()
    assert summary["records"] == COUNT
    assert sum(summary["per_source"].values()) == COUNT
    for name, counts in summary["per_relation"].items():
        made = [r for r in synthetic(scale_set) if r["relation"] == name]
        assert counts["neighbour-subject"] + counts["fictional"] == len(made)
        assert counts["targets"] == len({r["target_new"] for r in made})


def _run(args, env_extra=None):
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1]), **(env_extra or {})}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300)


def test_cli_writes_the_same_set_in_another_process(scale_set, real, tmp_path):
    real_path, out = tmp_path / "real.json", tmp_path / "out.json"
    real_path.write_text(json.dumps(list(real)))
    done = _run(["--count", str(COUNT), "--seed", "0", "--out", str(out), "--real", str(real_path)],
                {"PYTHONHASHSEED": "12345"})
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text()) == scale_set.records
    summary = json.loads(done.stdout)
    assert summary["records"] == COUNT and summary["per_source"] == scale_set.per_source


def test_cli_rejects_a_count_below_the_real_records(real, tmp_path):
    real_path, out = tmp_path / "real.json", tmp_path / "out.json"
    real_path.write_text(json.dumps(list(real)))
    done = _run(["--count", "10", "--seed", "0", "--out", str(out), "--real", str(real_path)])
    assert done.returncode == 2 and "smaller than the" in done.stderr
    assert not out.exists()


def test_cli_rejects_records_that_are_not_flattened_counterfact(tmp_path):
    bad, out = tmp_path / "bad.json", tmp_path / "out.json"
    bad.write_text(json.dumps([{"src": "q", "alt": "a"}]))
    done = _run(["--count", "100", "--out", str(out), "--real", str(bad)])
    assert done.returncode == 2 and "not flattened CounterFact" in done.stderr
    assert not out.exists()


def test_template_parser_takes_the_most_specific_template():
    parser = scale_facts.TemplateParser(["{} is located in", "{} is located in the country of", "{}, in"])
    assert parser.parse("Mount Fuji is located in the country of") == ("{} is located in the country of", "Mount Fuji")
    assert parser.parse("Lyon, in") == ("{}, in", "Lyon")
    assert parser.parse(" is located in") is None
    assert parser.parse("The twin city of Lyon is") is None


@pytest.mark.slow
def test_target_is_not_the_unedited_models_greedy_answer(scale_set, smollm2):
    """On SmolLM2, 10 fictional and 10 neighbour-subject facts: the unedited model's greedy
    continuation of the prompt is not already target_new (the edit has something to change)."""
    import torch

    model, tokenizer = smollm2
    made = synthetic(scale_set)
    sample = ([r for r in made if r["source"] == "fictional"][:10]
              + [r for r in made if r["source"] == "neighbour-subject"][:10])
    assert len(sample) == 20
    for r in sample:
        prompt = tokenizer(r["prompt"], return_tensors="pt").input_ids
        target = tokenizer(" " + r["target_new"]).input_ids
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=len(target), do_sample=False)
        assert out[0, prompt.shape[1]:].tolist() != target, r


def test_too_few_source_records_for_a_relation_is_an_error(real):
    with pytest.raises(ValueError, match="no relation of the source records"):
        scale_facts.generate(real[:20], real[:20], 100, seed=0)
