"""bench/gate_curve.py on a tiny random Llama and a hand-made database whose thresholds decide
the outcome: a global gamma overrides every key's own threshold, per-key thresholds (plus a
shift, clipped) are honoured, a gate that cannot fire leaves the model exactly unedited, and the
database file is only read."""

import hashlib
import json

import pytest
import torch
from gate_curve import main

CASES = 3


def _database(path, model_dir, own_threshold):
    """4 random facts at layer 1 of the tiny model, every key with threshold `own_threshold`,
    database gamma 0.0."""
    from transformers import AutoModelForCausalLM

    from neuraldb_kernels import NeuralDB
    from neuraldb_kernels.integration import model_fingerprint

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    generator = torch.Generator().manual_seed(1)
    db = NeuralDB(path, d1=48, d2=32, layer=1, gamma=0.0, fingerprint=model_fingerprint(model, 1))
    db.add(torch.randn(4, 48, generator=generator), torch.randn(4, 32, generator=generator) * 5,
           extra_keys=[torch.randn(1, 48, generator=generator), None, None, None],
           key_gammas=[torch.full((2,), own_threshold), *[torch.full((1,), own_threshold)] * 3])
    db.close()


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_global_gammas_override_and_per_key_thresholds_are_honoured(tmp_path, tiny_model_dir, counterfact_path):
    db_path = tmp_path / "facts.sqlite"
    _database(db_path, tiny_model_dir, own_threshold=1.0)  # as stored, no key can fire
    before = _digest(db_path)
    out, plot = tmp_path / "curve.json", tmp_path / "curve.png"
    report = main(["--db", str(db_path), "--data", str(counterfact_path), "--cases", str(CASES),
                   "--model-dir", str(tiny_model_dir), "--gammas", "-1", "1", "--shifts", "0", "-2",
                   "--out", str(out), "--plot", str(plot), "--threads", "1"])
    assert _digest(db_path) == before  # read only
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    unedited = report["unedited"]
    by_gamma = {entry["gamma"]: entry for entry in report["global"]}
    by_shift = {entry["shift"]: entry for entry in report["per_key"]}
    assert report["cases"] == CASES and report["facts"] == 4 and report["key_rows"] == 5
    # every cosine exceeds -1: every token fires, whatever the keys' own thresholds say
    assert by_gamma[-1.0]["gate_fire_rate"] == 100.0 and by_gamma[-1.0]["kl"] > 0
    # nothing fires at 1 (global) or at the stored thresholds of 1 (per-key): the bare model exactly
    for entry in (by_gamma[1.0], by_shift[0.0]):
        assert entry["gate_fire_rate"] == 0.0 and entry["kl"] == 0.0
        assert {name: entry[name] for name in unedited} == unedited
    assert by_shift[0.0]["mean_threshold"] == 1.0
    # the stored thresholds shifted by -2 clip to -1: every token fires again
    assert by_shift[-2.0]["mean_threshold"] == -1.0 and by_shift[-2.0]["gate_fire_rate"] == 100.0


def test_at_least_raises_only_lower_thresholds_and_include_merges_earlier_runs(tmp_path, tiny_model_dir,
                                                                                  counterfact_path):
    db_path = tmp_path / "facts.sqlite"
    _database(db_path, tiny_model_dir, own_threshold=-1.0)  # as stored, every key fires
    common = ["--db", str(db_path), "--data", str(counterfact_path), "--cases", str(CASES), "--model-dir",
              str(tiny_model_dir), "--threads", "1"]
    first = main(common + ["--gammas", "-1", "--shifts", "--out", str(tmp_path / "a.json")])
    report = main(common + ["--gammas", "--shifts", "--at-least", "-1", "1", "--include", str(tmp_path / "a.json"),
                            "--out", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png")])
    by_bound = {entry["at_least"]: entry for entry in report["per_key"]}
    assert by_bound[-1.0]["mean_threshold"] == -1.0 and by_bound[-1.0]["gate_fire_rate"] == 100.0
    # raised to at least 1: nothing fires, the bare model exactly
    assert by_bound[1.0]["mean_threshold"] == 1.0 and by_bound[1.0]["gate_fire_rate"] == 0.0
    assert {name: by_bound[1.0][name] for name in first["unedited"]} == first["unedited"]
    assert report["global"] == [{**first["global"][0], "from": str(tmp_path / "a.json")}]
    assert report["unedited"] == {**first["unedited"], "from": str(tmp_path / "a.json")}  # not recomputed
    # an earlier run of other cases is refused
    main(common[:4] + ["--cases", "2", *common[6:], "--gammas", "1", "--shifts", "--out", str(tmp_path / "c.json")])
    with pytest.raises(SystemExit):
        main(common + ["--gammas", "1", "--include", str(tmp_path / "c.json"), "--out", str(tmp_path / "d.json")])


def test_bad_arguments_are_refused(tmp_path, tiny_model_dir, counterfact_path):
    db_path = tmp_path / "facts.sqlite"
    _database(db_path, tiny_model_dir, own_threshold=0.5)
    common = ["--db", str(db_path), "--data", str(counterfact_path), "--model-dir", str(tiny_model_dir),
              "--out", str(tmp_path / "out.json")]
    for bad in (["--cases", "0"], ["--gammas", "1.5"], ["--gammas", "--shifts"], ["--at-least", "2"],
                ["--include", str(tmp_path / "missing.json")]):
        with pytest.raises(SystemExit):
            main(common + bad)
    with pytest.raises(FileNotFoundError):
        main(["--db", str(tmp_path / "missing.sqlite"), "--data", str(counterfact_path), "--model-dir",
              str(tiny_model_dir), "--out", str(tmp_path / "out.json")])
    assert not (tmp_path / "out.json").exists()
