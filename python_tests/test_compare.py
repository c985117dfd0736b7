"""`neuraldb compare` and evaluation/compare.py on a tiny random Llama: the JSON's shape, the three
methods side by side, the baselines' weight edits live only while they are scored and undone bit for
bit, and the command's error paths."""

import json

import pytest
import torch

COUNTERFACT = "counterfact/counterfact-a.json"


def test_compare_writes_all_methods_sizes_timings_and_a_plot(neuraldb, tmp_path, tiny_model_dir, data_dir,
                                                             fake_general_dir):
    from neuraldb_kernels.evaluation import GENERAL_TASKS

    out_json, png = tmp_path / "compare.json", tmp_path / "compare.png"
    arguments = ["--threads", "1", "compare", "--model", tiny_model_dir, "--data", data_dir / COUNTERFACT,
                 "--sizes", "3,2", "--json", out_json, "--plot", png, "--hparam", "layer=0", "--hparam", "steps=2",
                 "--general", "--general-data", fake_general_dir, "--limit-general", "3", "--k0-tokens", "2000",
                 "--quiet"]
    code, out, err = neuraldb(*arguments)
    assert code == 0, err
    assert png.stat().st_size > 0 and "neuraldb" in out and "alphaedit" in out
    result = json.loads(out_json.read_text())
    assert result["settings"] == {"memit_weight": 1000.0, "alphaedit_regularisation": 1.0, "alphaedit_threshold": 0.02}
    assert result["statistics"]["tokens"] >= 2000
    assert [size["n_facts"] for size in result["sizes"]] == [2, 3]
    metrics = {"efficacy", "generalization", "specificity", "specificity_unedited_subjects", "strict_efficacy",
               "strict_generalization", "strict_specificity", "general_average", *(f"general_{task}" for task in GENERAL_TASKS)}
    for size in result["sizes"]:
        assert size["n_cases"] == size["n_facts"]
        assert metrics <= set(size["unedited"])
        assert list(size["methods"]) == ["neuraldb", "memit", "alphaedit"]
        for name, method in size["methods"].items():
            assert metrics <= set(method["metrics"])
            seconds = method["seconds"]
            assert seconds["keys_and_residuals"] == size["methods"]["neuraldb"]["seconds"]["keys_and_residuals"]
            parts = [value for stage, value in seconds.items() if stage not in ("total", "store")]
            if name == "neuraldb":
                assert set(seconds) == {"keys_and_residuals", "store", "total"}
                assert seconds["total"] >= seconds["keys_and_residuals"] + seconds["store"] - 1e-9
            else:
                assert seconds["statistics"] == result["statistics"]["seconds"]
                assert seconds["total"] == pytest.approx(sum(parts))
        assert set(size["methods"]["alphaedit"]["seconds"]) >= {"statistics", "projection", "solve"}

    cache = tmp_path / "compare.json.k0.safetensors"
    assert cache.is_file()
    code, _, err = neuraldb(*arguments[:-1], "--methods", "memit", "--sizes", "2", "--quiet")  # reuses the cache
    assert code == 0, err
    again = json.loads(out_json.read_text())
    assert list(again["sizes"][0]["methods"]) == ["memit"]
    assert again["statistics"]["tokens"] == result["statistics"]["tokens"]
    assert again["sizes"][0]["methods"]["memit"]["metrics"] == result["sizes"][0]["methods"]["memit"]["metrics"]


def test_baseline_edits_are_live_while_scored_and_undone_bit_for_bit(tiny_model_dir, data_dir, monkeypatch):
    from neuraldb_kernels.baselines import collect_key_statistics
    from neuraldb_kernels.editing import read_facts
    from neuraldb_kernels.evaluation import compare
    from neuraldb_kernels.workspace import load_model

    model, tokenizer = load_model(str(tiny_model_dir))
    original = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    weight = model.model.layers[0].mlp.down_proj.weight
    seen = []
    scores = compare._scores

    def recording(*args, **kwargs):
        seen.append(weight.detach().clone())
        return scores(*args, **kwargs)

    monkeypatch.setattr(compare, "_scores", recording)
    texts = [f"Some plain text number {i} about the weather and the sea." for i in range(40)]
    statistics = collect_key_statistics(model, tokenizer, texts, 0)  # layer 0 of the two
    second_moment = statistics.second_moment()
    threshold = float(torch.linalg.eigvalsh(second_moment)[second_moment.shape[0] // 2])  # half the directions
    settings = compare.BaselineSettings(alphaedit_threshold=threshold)
    result = compare.compare_methods(model, tokenizer, read_facts(data_dir / COUNTERFACT, limit=2), [2],
                                     statistics=statistics, settings=settings, edit_hparams={"steps": 2})
    assert list(result.sizes[0].methods) == ["neuraldb", "memit", "alphaedit"]
    unedited, neuraldb, memit, alphaedit = seen
    base = original["model.layers.0.mlp.down_proj.weight"]
    assert torch.equal(unedited, base) and torch.equal(neuraldb, base)  # NeuralDB leaves the weights alone
    assert not torch.equal(memit, base) and not torch.equal(alphaedit, base) and not torch.equal(memit, alphaedit)
    # AlphaEdit's Δ lies where E[k kᵀ] is below the threshold: tr(Δ E[k kᵀ] Δᵀ) <= threshold ‖Δ‖²
    # (up to the float32 rounding of W + Δ)
    delta = alphaedit.double() - base.double()
    assert float(((delta @ second_moment) * delta).sum()) <= 1.01 * threshold * float(delta.pow(2).sum()) + 1e-12
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, original[name]), name


def test_compare_rejects_bad_input(neuraldb, tmp_path, tiny_model_dir, data_dir):
    common = ["compare", "--model", tiny_model_dir, "--data", data_dir / COUNTERFACT, "--json", tmp_path / "c.json"]
    code, _, err = neuraldb(*common, "--sizes", "2", "--methods", "neuraldb,rome")
    assert code == 2 and "neuraldb, memit, alphaedit" in err
    code, _, err = neuraldb(*common, "--sizes", "0")
    assert code == 2 and "positive integer" in err
    code, _, err = neuraldb(*common, "--sizes", "2", "--memit-weight", "-1")
    assert code == 2 and "positive number" in err
    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps({"prompt": "{} is located in", "subject": "The Louvre", "target_new": "Berlin"}) + "\n")
    code, _, err = neuraldb("compare", "--model", tiny_model_dir, "--data", facts, "--json", tmp_path / "c.json",
                            "--sizes", "2", "--hparam", "layer=0", "--k0-tokens", "500", "--quiet")
    assert code == 1 and "size 2 needs 2 facts but only 1 were given" in err
    assert not (tmp_path / "c.json").exists()
    code, _, err = neuraldb(*common, "--sizes", "2", "--general", "--general-data", tmp_path / "nowhere")
    assert code == 1 and "is not a directory" in err


def test_k0_texts_leave_out_the_scored_lambada_passages(fake_general_dir):
    from neuraldb_kernels.baselines import general_texts
    from neuraldb_kernels.evaluation.compare import scored_lambada_passages

    lines = (fake_general_dir / "lambada" / "lambada_test.jsonl").read_text().splitlines()
    passages = [json.loads(line)["text"] for line in lines]
    scored = scored_lambada_passages(fake_general_dir, 2, 0)
    assert len(scored) == 2 and set(scored) <= set(passages)  # whole passages, exactly as the file holds them
    texts = general_texts(fake_general_dir, exclude=scored)
    assert not set(scored) & set(texts)
    assert set(passages) - set(scored) <= set(texts)



def test_kept_databases_resume_and_are_scored_with_their_own_thresholds(tiny_model_dir, data_dir, tmp_path,
                                                                        monkeypatch):
    from neuraldb_kernels.baselines import collect_key_statistics
    from neuraldb_kernels.editing import read_facts
    from neuraldb_kernels.evaluation import compare
    from neuraldb_kernels.store import NeuralDB
    from neuraldb_kernels.workspace import load_model

    model, tokenizer = load_model(str(tiny_model_dir))
    facts = read_facts(data_dir / COUNTERFACT, limit=2)
    probe = tokenizer([facts[0].prompt.format(facts[0].subject)], return_tensors="pt")
    logits = []

    def recording(*args, **kwargs):  # the model's logits on an edited prompt, as each state is scored
        with torch.no_grad():
            logits.append(model(**probe).logits)
        return {"efficacy": 0.0}

    monkeypatch.setattr(compare, "_scores", recording)
    statistics = collect_key_statistics(model, tokenizer, [f"Plain text number {i} about the sea." for i in range(20)], 0)
    run = lambda: compare.compare_methods(model, tokenizer, facts, [2], statistics=statistics, methods=["neuraldb"],
                                          edit_hparams={"steps": 2}, databases=tmp_path / "dbs")
    assert run().sizes[0].resumed_facts == 0
    unedited, edited = logits
    assert not torch.equal(unedited, edited)  # the edit fires on its own prompt
    db = NeuralDB.open(tmp_path / "dbs" / "facts-2.sqlite")
    assert len(db) == 2
    # thresholds of 1 never open (the gate needs a cosine > 1): a rerun scores the kept database
    # exactly as the unedited model, which it would not if the database's gamma overrode them
    for fact in list(db.facts()):
        extra = fact.keys[1:] if len(fact.keys) > 1 else None
        db.upsert(fact.keys[0], fact.residual, fact.id, fact.metadata, extra_keys=extra,
                  key_gammas=torch.ones(len(fact.keys)))
    db.close()
    logits.clear()
    assert run().sizes[0].resumed_facts == 2
    assert torch.equal(logits[0], unedited) and torch.equal(logits[1], unedited)
    with pytest.raises(ValueError, match="fingerprint mismatch in layer"):
        compare._size_database(tmp_path / "dbs", 2, model, 1, None)


def test_compare_keeps_databases_from_the_command_line(neuraldb, tmp_path, tiny_model_dir, data_dir):
    out_json = tmp_path / "compare.json"
    code, out, err = neuraldb("--threads", "1", "compare", "--model", tiny_model_dir, "--data",
                              data_dir / COUNTERFACT, "--sizes", "1", "--json", out_json, "--methods", "neuraldb",
                              "--hparam", "layer=0", "--hparam", "steps=1", "--k0-tokens", "500",
                              "--databases", tmp_path / "dbs")
    assert code == 0, err
    assert (tmp_path / "dbs" / "facts-1.sqlite").is_file()
    assert json.loads(out_json.read_text())["sizes"][0]["resumed_facts"] == 0


def _comparison_json(path, n_facts, efficacy, settings=None):
    """A file shaped like `compare --json`'s output, one size, NeuralDB and MEMIT."""
    size = {"n_facts": n_facts, "n_cases": n_facts, "resumed_facts": 0,
            "unedited": {"efficacy": 30.0, "general_average": 40.0},
            "methods": {name: {"metrics": {"efficacy": value, "general_average": 40.0},
                               "seconds": {"solve": 0.5, "total": 1.5}}
                        for name, value in (("neuraldb", efficacy), ("memit", efficacy - 20))}}
    settings = settings or {"memit_weight": 1000.0, "alphaedit_regularisation": 1.0, "alphaedit_threshold": 0.02}
    path.write_text(json.dumps({"settings": settings, "statistics": {"tokens": 10, "sources": ["x"]},
                                "sizes": [size]}))
    return path


def test_plot_draws_several_comparison_runs_in_one_figure(neuraldb, tmp_path):
    from neuraldb_kernels.evaluation import merge_comparisons, read_comparison

    runs = [_comparison_json(tmp_path / "c1000.json", 1000, 99.0), _comparison_json(tmp_path / "c100.json", 100, 100.0)]
    merged = merge_comparisons([read_comparison(path) for path in runs])
    assert [size.n_facts for size in merged.sizes] == [100, 1000]
    assert [size.methods["memit"].metrics["efficacy"] for size in merged.sizes] == [80.0, 79.0]
    assert merged.sizes[0].methods["neuraldb"].seconds == {"solve": 0.5, "total": 1.5}
    code, out, err = neuraldb("plot", *runs, "--out", tmp_path / "runs.png")
    assert code == 0, err
    assert (tmp_path / "runs.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_refuses_mixed_repeated_and_malformed_comparisons(neuraldb, tmp_path):
    from test_cli import assert_one_line_error

    run = _comparison_json(tmp_path / "c100.json", 100, 100.0)
    report = tmp_path / "r.json"
    report.write_text(json.dumps({"n_facts": 10, "before": {"efficacy": 10.0}, "after": {"efficacy": 90.0}}))
    code, _, err = neuraldb("plot", run, report, "--out", tmp_path / "x.png")
    assert_one_line_error(code, err, 1, "not both", "c100.json is a comparison", "r.json is a report")
    again = _comparison_json(tmp_path / "again.json", 100, 98.0)
    code, _, err = neuraldb("plot", run, again, "--out", tmp_path / "x.png")
    assert_one_line_error(code, err, 1, "more than one run measured [100] facts")
    other = _comparison_json(tmp_path / "other.json", 1000, 98.0, {"memit_weight": 15000.0,
                                                                  "alphaedit_regularisation": 1.0,
                                                                  "alphaedit_threshold": 0.02})
    code, _, err = neuraldb("plot", run, other, "--out", tmp_path / "x.png")
    assert_one_line_error(code, err, 1, "different baseline settings")
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"sizes": [{"n_facts": 5}]}))
    code, _, err = neuraldb("plot", broken, "--out", tmp_path / "x.png")
    assert_one_line_error(code, err, 1, "broken.json", "not a comparison")
    assert not (tmp_path / "x.png").exists()
