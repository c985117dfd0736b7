"""Evaluation metrics against independent references: hand-computed arithmetic (entropy, TF-IDF,
aggregation of probability comparisons) and, for everything that runs the model, plain
per-sequence loops over SmolLM2's logits and activations captured with our own hooks."""

import dataclasses
import json
import math

import pytest
import torch

from neuraldb_kernels.evaluation import (EvaluationReport, TargetScores, TfidfModel, cases_from_facts, counterfact, evaluate,
                                         fluency, generate_texts, load_cases, ngram_entropy, plot_scaling,
                                         preservation_metrics, read_attribute_snippets, read_json, score_targets,
                                         strict_metrics, text_fluency, write_json, zsre)
from neuraldb_kernels.evaluation.consistency import consistency, terms
from neuraldb_kernels.evaluation.fluency import words

LAYER = 6


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2 and its tokenizer, run with one torch thread while this module's tests run (on a
    shared 2-core machine one thread is several times faster than two waiting on each other)."""
    from neuraldb_kernels.integration import load_default_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield load_default_model()
    finally:
        torch.set_num_threads(threads)


def _empty_db(model, gamma=0.65):
    from neuraldb_kernels.integration import model_fingerprint
    from neuraldb_kernels.store import NeuralDB

    fingerprint = model_fingerprint(model, LAYER)
    return NeuralDB(d1=fingerprint.d1, d2=fingerprint.d2, layer=LAYER, gamma=gamma, fingerprint=fingerprint)


# ------------------------------------------------------------------------------------- scoring


def _loop_scores(model, tokenizer, prompt, target):
    """Sum of log-softmax at the target positions and the top-1 hits, one unpadded sequence."""
    text = target if prompt[-1].isspace() else " " + target
    prompt_ids = tokenizer(prompt)["input_ids"]
    target_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + target_ids])).logits[0].double()
    total, hits = 0.0, 0
    for j, token in enumerate(target_ids):
        row = torch.log_softmax(logits[len(prompt_ids) + j - 1], dim=-1)
        total += row[token].item()
        hits += int(row.argmax().item() == token)
    return total, hits, len(target_ids)


def test_score_targets_matches_a_plain_loop(smollm2):
    model, tokenizer = smollm2
    prompts = ["The mother tongue of Danielle Darrieux is", "Q: what is two plus two? A: ",
               "Paris is the capital of", "x"]
    targets = [("English", "French Creole language"), ("four", "4"), ("France", "the United Kingdom"),
               ("y z w", "a")]
    scores = score_targets(model, tokenizer, prompts, targets, batch_size=3)  # two batches, padding
    assert scores.log_prob.shape == (4, 2) and scores.log_prob.dtype == torch.float64
    multi_token = 0
    for i, (prompt, candidates) in enumerate(zip(prompts, targets)):
        for c, target in enumerate(candidates):
            log_prob, hits, count = _loop_scores(model, tokenizer, prompt, target)
            multi_token += count > 1
            assert scores.log_prob[i, c].item() == pytest.approx(log_prob, abs=2e-4), (prompt, target)
            assert scores.correct_tokens[i, c].item() == hits
            assert scores.n_tokens[i, c].item() == count
    assert multi_token >= 3  # the comparison covered multi-token targets
    assert scores.token_accuracy.max() <= 1.0


def test_score_targets_does_not_depend_on_batching(smollm2):
    model, tokenizer = smollm2
    prompts = ["The Eiffel Tower is in", "Water is made of hydrogen and", "The largest planet is"]
    targets = [("Paris",), ("oxygen atoms",), ("Jupiter",)]
    one = score_targets(model, tokenizer, prompts, targets, batch_size=1).log_prob
    three = score_targets(model, tokenizer, prompts, targets, batch_size=3).log_prob
    torch.testing.assert_close(one, three, atol=2e-4, rtol=0)


@pytest.mark.parametrize("prompts, targets, error", [
    (["a"], [("b",), ("c",)], ValueError),
    (["a", "b"], [("b",), ("c", "d")], ValueError),
    (["a"], ["bc"], TypeError),
    (["a"], [("",)], ValueError),
    ([""], [("b",)], ValueError),
    ([], [], ValueError),
])
def test_score_targets_rejects_bad_input(smollm2, prompts, targets, error):
    model, tokenizer = smollm2
    with pytest.raises(error):
        score_targets(model, tokenizer, prompts, targets)


def test_score_targets_rejects_prompts_longer_than_the_context(smollm2):
    model, tokenizer = smollm2
    with pytest.raises(ValueError, match="context"):
        score_targets(model, tokenizer, ["word " * (model.config.max_position_embeddings + 5)], [("x",)])


# ---------------------------------------------------------------------- CounterFact / ZsRE arithmetic


def _case(i, paraphrases=(), neighbours=()):
    return counterfact.CounterFactCase(case_id=i, subject=f"S{i}", prompt=f"P{i}", target_new="new",
                                       target_true="true", paraphrase_prompts=tuple(paraphrases),
                                       neighborhood=tuple(neighbours))


def test_counterfact_metrics_compare_probabilities_and_average_per_case(monkeypatch):
    # log-probs per prompt: (first target, second target); efficacy/generalization ask P(new) > P(true),
    # specificity asks P(neighbour's truth) > P(new)
    table = {"P0": (-1.0, -2.0), "P1": (-3.0, -2.0), "R0a": (-1.0, -5.0), "R0b": (-6.0, -5.0), "R1": (-2.0, -2.0),
             "N0": (-0.5, -4.0), "N1a": (-4.0, -0.5), "N1b": (-1.0, -3.0), "N1c": (-1.0, -2.0)}
    seen = []

    def fake_scores(model, tokenizer, prompts, targets, *, batch_size):
        seen.extend(zip(prompts, targets))
        return TargetScores(
            torch.tensor([table.get(p, (-1.0, -1.0)) for p in prompts], dtype=torch.float64), None, None)

    monkeypatch.setattr(counterfact, "score_targets", fake_scores)
    cases = [_case(0, ["R0a", "R0b"], [("N0", "t0")]), _case(1, ["R1"], [("N1a", "a"), ("N1b", "b"), ("N1c", "c")])]
    result = counterfact.probability_metrics(None, None, cases)
    assert result["efficacy"] == pytest.approx(50.0)  # P0 wins, P1 loses
    assert result["generalization"] == pytest.approx((0.5 + 0.0) / 2 * 100)  # a tie is no win
    assert result["specificity"] == pytest.approx((1.0 + 2 / 3) / 2 * 100)
    assert ("N1a", ("a", "new")) in seen and ("P0", ("new", "true")) in seen
    # the per-case shares behind those means; a case without paraphrases has NaN there
    per_case = counterfact.case_scores(None, None, cases + [_case(2)])
    assert per_case["efficacy"].tolist() == [1.0, 0.0, 0.0]  # P2 is not in the table: its two targets tie
    assert per_case["generalization"][:2].tolist() == [0.5, 0.0] and per_case["generalization"][2].isnan()
    assert per_case["specificity"][:2].tolist() == pytest.approx([1.0, 2 / 3])
    assert counterfact.metrics_from_case_scores(per_case)["generalization"] == pytest.approx(25.0)


@pytest.mark.parametrize("text, subjects, expected", [
    ("What sport does Hank Aaron play? They play", {"Hank Aaron"}, True),
    ("What sport does Hank Aarons play?", {"Hank Aaron"}, False),  # a longer word is another name
    ("The native language of Abraham Lincoln is", {"Abraham"}, True),
    ("Japanese cuisine", {"Japan"}, False),
    ("BBC Radio 10 is owned by", {"BBC Radio 1"}, False),
    ("BBC Radio 1, from", {"BBC Radio 1"}, True),
    ("USS Sand Lance (SS-381) was rated", {"USS Sand Lance (SS-381)"}, True),
    ("Sand Lance (SS-381)'s home port", {"(SS-381)"}, True),
    ("_Paris is", {"Paris"}, False),  # an underscore is a word character
    ("Renault 5 is made by", {"Renault 4", "Renault"}, True),
    ("renault 5 is made by", {"Renault"}, False),  # case-sensitive
    ("anything", set(), False),
])
def test_names_a_subject_matches_whole_words(text, subjects, expected):
    import re

    reference = any(re.search(r"(?<!\w)" + re.escape(s) + r"(?!\w)", text) for s in subjects)
    assert reference == expected  # the case table itself, checked against regex's word boundaries
    assert counterfact.names_a_subject(text, frozenset(subjects)) == expected


def test_specificity_unedited_subjects_leaves_out_prompts_naming_an_edited_subject(monkeypatch):
    import re

    # neighbourhood prompts won (W) or lost (L); some name an edited subject
    table = {"W Alpha Beta": (-1.0, -2.0), "L Gamma": (-3.0, -1.0), "W plain": (-1.0, -2.0),
             "L Alpha Betamax": (-3.0, -1.0), "W Gamma Ray": (-1.0, -2.0)}
    monkeypatch.setattr(counterfact, "score_targets", lambda m, t, prompts, targets, batch_size: TargetScores(
        torch.tensor([table.get(p, (-1.0, -2.0)) for p in prompts], dtype=torch.float64), None, None))
    cases = [_case(0, [], [("W Alpha Beta", "a"), ("L Gamma", "b"), ("W plain", "c")]),
             _case(1, [], [("L Alpha Betamax", "d")]),
             _case(2, [], [("L Gamma", "e"), ("W Gamma Ray", "f")]),
             _case(3, [], [("L Gamma", "g")])]
    subjects = {"Alpha Beta", "Gamma"}
    result = counterfact.case_scores(None, None, cases, edited_subjects=subjects)
    # independent reference: the same cases with those prompts removed (regex word boundaries)
    named = lambda p: any(re.search(r"(?<!\w)" + re.escape(s) + r"(?!\w)", p) for s in subjects)
    kept = [dataclasses.replace(c, neighborhood=tuple(n for n in c.neighborhood if not named(n[0]))) for c in cases]
    reference = counterfact.case_scores(None, None, kept)["specificity"]
    torch.testing.assert_close(result["specificity_unedited_subjects"], reference, equal_nan=True)
    assert result["specificity_unedited_subjects"][:2].tolist() == [1.0, 0.0]
    assert result["specificity_unedited_subjects"][2:].isnan().all()  # every prompt names "Gamma"
    assert result["specificity"].tolist() == pytest.approx([2 / 3, 0.0, 0.5, 0.0])  # unchanged
    assert "specificity_unedited_subjects" not in counterfact.case_scores(None, None, cases)
    # no edited subjects: the same as specificity
    none = counterfact.case_scores(None, None, cases, edited_subjects=[])
    torch.testing.assert_close(none["specificity_unedited_subjects"], none["specificity"])


def test_token_mean_comparison_divides_by_target_length(monkeypatch):
    # "new" is 1 token at log-prob -1.5; "true" is 3 tokens at -3.0 in all: the whole sequence favours
    # "new" (-1.5 > -3.0), the per-token mean favours "true" (-1.5 < -1.0)
    def fake_scores(model, tokenizer, prompts, targets, *, batch_size):
        rows = len(prompts)
        return TargetScores(torch.tensor([[-1.5, -3.0]] * rows, dtype=torch.float64), None,
                            torch.tensor([[1, 3]] * rows))

    monkeypatch.setattr(counterfact, "score_targets", fake_scores)
    assert counterfact.probability_metrics(None, None, [_case(0)]) == {"efficacy": 100.0}
    assert counterfact.probability_metrics(None, None, [_case(0)], compare="token_mean") == {"efficacy": 0.0}
    with pytest.raises(ValueError, match="compare must be one of"):
        counterfact.probability_metrics(None, None, [_case(0)], compare="mean")


def test_counterfact_metrics_leave_out_what_the_cases_lack(monkeypatch):
    monkeypatch.setattr(counterfact, "score_targets", lambda m, t, prompts, targets, batch_size: type(
        "S", (), {"log_prob": torch.tensor([[0.0, -1.0]] * len(prompts), dtype=torch.float64)})())
    assert counterfact.probability_metrics(None, None, [_case(0)]) == {"efficacy": 100.0}
    with pytest.raises(ValueError, match="no CounterFact cases"):
        counterfact.probability_metrics(None, None, [])


def test_zsre_metrics_are_mean_token_accuracy(monkeypatch):
    def fake_scores(model, tokenizer, prompts, targets, *, batch_size):
        correct = {"q0": 2, "q1": 0, "r0": 1, "r1": 1, "l0": 3, "l1": 1}
        counts = {"q0": 2, "q1": 2, "r0": 2, "r1": 2, "l0": 3, "l1": 4}
        return TargetScores(
            None, torch.tensor([[correct[p]] for p in prompts]), torch.tensor([[counts[p]] for p in prompts]))

    monkeypatch.setattr(zsre, "score_targets", fake_scores)
    cases = [zsre.ZsRECase("s", f"q{i}", f"r{i}", "alt", f"l{i}", "ans") for i in range(2)]
    result = zsre.accuracy_metrics(None, None, cases)
    assert result == pytest.approx({"efficacy": 50.0, "generalization": 50.0, "specificity": (1 + 0.25) / 2 * 100})


def test_cases_come_from_the_editing_readers(data_dir):
    flat = load_cases(data_dir / "counterfact" / "counterfact-a.json", "counterfact", limit=3)
    assert len(flat) == 3 and flat[0].prompt == "The mother tongue of Danielle Darrieux is"
    assert flat[0].paraphrase_prompts == ("Where Danielle Darrieux is from, people speak the language of",)
    assert flat[0].neighborhood == (("Michel Rocard is a native speaker of", "French"),)
    full = load_cases(data_dir / "counterfact" / "counterfact-full-format-a.json", "counterfact-full", limit=1)
    assert full[0].prompt == "Luigi Snozzi, who has a citizenship from" and len(full[0].generation_prompts) == 10
    assert all(true == "Switzerland" for _, true in full[0].neighborhood) and len(full[0].neighborhood) == 10
    assert (full[0].relation_id, full[0].target_new_id) == ("P27", "Q334")
    records = load_cases(data_dir / "zsre" / "zsre-1k.json", "zsre", limit=2)
    assert isinstance(records[0], zsre.ZsRECase) and records[0].alt == "unmanned aircraft"


def test_case_building_errors_name_the_fact(tmp_path):
    from neuraldb_kernels.editing import Fact

    with pytest.raises(ValueError, match="target_true"):
        cases_from_facts([Fact(prompt="{} is in", subject="X", target_new="Y")])
    with pytest.raises(ValueError, match="mix"):
        cases_from_facts([Fact("{} a", "X", "Y", "Z"), Fact("{} a", "X", "Y", "Z", extras={"source": "zsre"})])
    with pytest.raises(ValueError, match="loc"):
        cases_from_facts([Fact("{} a", "X", "Y", "Z", extras={"source": "zsre", "rephrase": "r"})])
    good = Fact("{} is in", "X", "Y", "Z")
    empty = Fact("{} is in", "W", "Y", " ")
    with pytest.raises(ValueError, match="fact 1 .*target_true.*skip-bad"):
        cases_from_facts([good, empty])
    skipped = []
    assert [c.subject for c in cases_from_facts([good, empty, good], skipped=skipped)] == ["X", "X"]
    assert len(skipped) == 1 and skipped[0][0] == 1 and "target_true" in skipped[0][1]
    with pytest.raises(ValueError, match="none of the 1 facts"):
        cases_from_facts([empty], skipped=[])
    zsre_empty = Fact("Who is {}?", "X", "", extras={"source": "zsre", "rephrase": "r", "loc": "l", "loc_ans": "a"})
    with pytest.raises(ValueError, match="'alt'"):
        cases_from_facts([zsre_empty])
    with pytest.raises(FileNotFoundError):
        load_cases(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="unknown format"):
        load_cases(tmp_path / "missing.json", "csv")


# ---------------------------------------------------------------------------------- fluency


def test_ngram_entropy_by_hand():
    tokens = ["a", "b", "a", "b"]
    # bigrams ab, ba, ab -> 2/3, 1/3; trigrams aba, bab -> 1/2, 1/2
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy(tokens, 2) == pytest.approx(h2)
    assert ngram_entropy(tokens, 3) == pytest.approx(1.0)
    assert ngram_entropy(["a"], 2) == 0.0
    assert text_fluency("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert fluency(["a b a b", "x x x x"]) == pytest.approx(text_fluency("a b a b") / 2)
    with pytest.raises(ValueError):
        fluency([])
    with pytest.raises(ValueError):
        ngram_entropy(tokens, 0)


def test_words_split_punctuation():
    assert words("It's Rome, isn't it?") == ["It's", "Rome", ",", "isn't", "it", "?"]


def test_generation_is_seeded_and_unchanged_by_a_silent_database(smollm2):
    from neuraldb_kernels.integration import attach

    model, tokenizer = smollm2
    prompts = ["The Eiffel Tower is located in", "My favourite food is"]
    bare = generate_texts(model, tokenizer, prompts, max_new_tokens=6, seed=3)
    assert bare == generate_texts(model, tokenizer, prompts, max_new_tokens=6, seed=3)
    assert all(text.startswith(prompt) and len(text) > len(prompt) for text, prompt in zip(bare, prompts))
    with attach(model, _empty_db(model)):
        assert generate_texts(model, tokenizer, prompts, max_new_tokens=6, seed=3) == bare


def test_generation_metrics_score_the_generated_texts(smollm2):
    model, tokenizer = smollm2
    case = counterfact.CounterFactCase(
        case_id=0, subject="Luigi Snozzi", prompt="Luigi Snozzi is a citizen of", target_new="Singapore",
        target_true="Switzerland", generation_prompts=("Luigi Snozzi currently lives in", "Luigi Snozzi is a"),
        relation_id="P27", target_new_id="Q334")
    references = {("P27", "Q334"): ["Singapore is a city state in Southeast Asia.", "Citizens of Singapore vote."],
                  ("P27", "Q39"): ["Switzerland is a country in Europe with Swiss citizens."]}
    result = counterfact.generation_metrics(model, tokenizer, [case, _case(1)], references=references,
                                            max_new_tokens=5, seed=1)
    texts = generate_texts(model, tokenizer, list(case.generation_prompts), max_new_tokens=5, seed=1)
    assert result["fluency"] == pytest.approx((text_fluency(texts[0]) + text_fluency(texts[1])) / 2 * 100)
    tfidf = TfidfModel(references[("P27", "Q334")] + references[("P27", "Q39")])
    expected = tfidf.cosine(" ".join(texts), " ".join(references[("P27", "Q334")])) * 100
    assert result["consistency"] == pytest.approx(expected)
    assert set(counterfact.generation_metrics(model, tokenizer, [case], max_new_tokens=2)) == {"fluency"}
    assert counterfact.generation_metrics(model, tokenizer, [_case(1)]) == {}


# ------------------------------------------------------------------------------ consistency


def test_tfidf_cosine_by_hand(tmp_path):
    tfidf = TfidfModel(["red apple", "green apple"])
    idf_red = math.log(3 / 2) + 1  # apple is in both documents: idf 1
    assert tfidf.idf == pytest.approx({"red": idf_red, "green": idf_red, "apple": 1.0})
    assert tfidf.cosine("red apple", "apple") == pytest.approx(1 / math.sqrt(idf_red ** 2 + 1))
    assert tfidf.cosine("red", "green") == 0.0
    assert tfidf.cosine("blue", "apple") == 0.0  # no known word
    assert terms("A Red-apple") == ["red", "apple"]
    assert consistency(tfidf, ["red", "apple"], ["red apple"]) == pytest.approx(1.0)
    snippets = tmp_path / "snippets.json"
    snippets.write_text(json.dumps([{"relation_id": "P1", "target_id": "Q2", "samples": [{"text": "t1"}, {"text": "t2"}]}]))
    assert read_attribute_snippets(snippets) == {("P1", "Q2"): ["t1", "t2"]}
    snippets.write_text(json.dumps([{"relation_id": "P1"}]))
    with pytest.raises(ValueError, match="record 0"):
        read_attribute_snippets(snippets)


# ------------------------------------------------------------------------------ preservation


def _down_proj_inputs(model, tokenizer, texts):
    """Bare-model FFN down-projection inputs at LAYER per text: list of (t, d1) tensors."""
    captured = []
    module = model.model.layers[LAYER].mlp.down_proj
    hook = module.register_forward_hook(lambda m, args, out: captured.append(args[0][0].detach().clone()))
    try:
        with torch.no_grad():
            for text in texts:
                model(torch.tensor([tokenizer(text)["input_ids"]]))
    finally:
        hook.remove()
    return captured


def test_preservation_counts_fired_tokens_and_kl_independently(smollm2):
    model, tokenizer = smollm2
    texts = ["The Eiffel Tower is located in Paris.", "Bananas are yellow.", "Rome is in Italy and it is old."]
    inputs = _down_proj_inputs(model, tokenizer, texts)
    gamma = 0.95
    db = _empty_db(model, gamma)
    empty = preservation_metrics(model, tokenizer, db, texts, batch_size=2)
    assert empty == {"gate_fire_rate": 0.0, "kl": 0.0}

    key = inputs[0][4]  # a token of the first text
    residual = torch.randn(db.d2, generator=torch.Generator().manual_seed(0)) * 4
    db.add(key, residual, ids="planted")
    result = preservation_metrics(model, tokenizer, db, texts, batch_size=2)

    # reference: cosine of every token's activation with the key, and our own hook adding the residual
    fires = [torch.nn.functional.cosine_similarity(x.double(), key.double().unsqueeze(0), dim=-1) > gamma
             for x in inputs]
    total = sum(len(f) for f in fires)
    assert result["gate_fire_rate"] == pytest.approx(sum(int(f.sum()) for f in fires) / total * 100)
    assert 0 < result["gate_fire_rate"] < 100
    module = model.model.layers[LAYER].mlp.down_proj
    kl_sum = 0.0
    for text, fired in zip(texts, fires):
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        with torch.no_grad():
            bare = torch.log_softmax(model(ids).logits[0].double(), -1)
            hook = module.register_forward_hook(
                lambda m, args, out, fired=fired: out + fired.unsqueeze(-1).to(out.dtype) * residual)
            try:
                edited = torch.log_softmax(model(ids).logits[0].double(), -1)
            finally:
                hook.remove()
        kl_sum += float((bare.exp() * (bare - edited)).sum())
    assert result["kl"] == pytest.approx(kl_sum / total, rel=1e-3, abs=1e-6)
    assert result["kl"] > 0
    with pytest.raises(ValueError):
        preservation_metrics(model, tokenizer, db, [])


# --------------------------------------------------------------------------------- harness


def test_evaluate_with_a_silent_database_changes_nothing(smollm2, data_dir):
    model, tokenizer = smollm2
    cases = load_cases(data_dir / "counterfact" / "counterfact-a.json", "counterfact", limit=2)
    lines = []
    report = evaluate(model, tokenizer, _empty_db(model), cases, log=lines.append)
    assert report.n_cases == 2 and report.n_facts == 0 and len(lines) == 3
    assert set(report.before) == {"efficacy", "generalization", "specificity", "specificity_unedited_subjects",
                                  "strict_efficacy", "strict_generalization", "strict_specificity",
                                  "gate_fire_rate", "kl"}
    assert report.after == report.before
    # no stored subjects: no neighbourhood prompt is left out
    assert report.before["specificity_unedited_subjects"] == report.before["specificity"]
    reference = counterfact.probability_metrics(model, tokenizer, cases)
    assert {k: report.before[k] for k in reference} == reference
    strict = strict_metrics(model, tokenizer, cases).as_dict()
    assert {name: report.before[f"strict_{name}"] for name in strict} == strict
    assert any("consistency: not computable" in note for note in report.notes)
    assert any("fluency" in note for note in report.notes)


def test_evaluate_zsre_runs_before_and_after(smollm2, data_dir):
    model, tokenizer = smollm2
    cases = load_cases(data_dir / "zsre" / "zsre-1k.json", "zsre", limit=2)
    report = evaluate(model, tokenizer, _empty_db(model), cases)
    assert report.after == report.before and report.notes == ()
    assert all(0 <= report.before[k] <= 100 for k in ("efficacy", "generalization", "specificity"))


# ----------------------------------------------------------------------------------- report


def test_report_table_json_and_plot(tmp_path):
    report = EvaluationReport(n_facts=10, n_cases=8, before={"efficacy": 12.5, "kl": 0.0},
                              after={"efficacy": 100.0, "kl": 0.00123}, notes=("consistency: not computable",))
    table = report.table()
    assert "efficacy" in table and "12.5" in table and "100.0" in table and "+87.5" in table
    assert "0.0012" in table and "note: consistency" in table
    path = tmp_path / "r.json"
    write_json(report, path)
    assert json.loads(path.read_text()) == {"n_facts": 10, "n_cases": 8, "before": {"efficacy": 12.5, "kl": 0.0},
                                            "after": {"efficacy": 100.0, "kl": 0.00123}}
    again = read_json(path)
    assert (again.n_facts, dict(again.after)) == (10, {"efficacy": 100.0, "kl": 0.00123})
    bigger = EvaluationReport(1000, 8, {"efficacy": 12.5}, {"efficacy": 97.0})
    png = tmp_path / "scaling.png"
    plot_scaling([bigger, report], png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    path.write_text('{"n_facts": 3, "before": {"bogus": 1}, "after": {}}')
    with pytest.raises(ValueError, match="metric names"):
        read_json(path)
    with pytest.raises(ValueError):
        plot_scaling([], png)


def test_write_json_never_writes_through_a_planted_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    planted = tmp_path / ".report.json.tmp"  # the temporary name a fixed naming scheme would use
    planted.symlink_to(victim)
    path = tmp_path / "report.json"
    write_json(EvaluationReport(1, 1, {"efficacy": 0.0}, {"efficacy": 100.0}), path)
    assert victim.read_text() == "precious" and planted.is_symlink() and planted.resolve() == victim
    assert not path.is_symlink() and json.loads(path.read_text())["after"] == {"efficacy": 100.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".report.json.tmp", "report.json", "victim.txt"]


def test_zsre_answers_as_one_string_are_one_answer(tmp_path):
    from neuraldb_kernels.editing import read_facts

    record = {"subject": "Berlin Wall", "src": "Where is the Berlin Wall?", "alt": "Paris", "rephrase": "r",
              "loc": "l", "loc_ans": "a"}
    path = tmp_path / "zsre.json"
    path.write_text(json.dumps([{**record, "answers": "Berlin"}, {**record, "answers": ["Bonn", "Köln"]},
                                {**record, "answers": []}]))
    assert [fact.target_true for fact in read_facts(path, "zsre")] == ["Berlin", "Bonn", None]
    assert [fact.target_true for fact in read_facts(path)] == ["Berlin", "Bonn", None]  # recognised as ZsRE
    path.write_text(json.dumps([{**record, "answers": 5}]))
    with pytest.raises(ValueError, match="zsre: record 0: 'answers' must be a list of strings or one string"):
        read_facts(path, "zsre")


def test_evaluation_reexports_the_editing_readers():
    from neuraldb_kernels import editing, evaluation

    assert evaluation.read_facts is editing.read_facts and evaluation.FORMATS == editing.FORMATS
    assert set(editing.FORMATS) == {"counterfact", "counterfact-full", "zsre", "jsonl"}
