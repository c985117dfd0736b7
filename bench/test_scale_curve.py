"""bench/scale_curve.py on a tiny random-weight Llama with SmolLM2's tokenizer: the curve is measured
at every size, resumes after SIGINT without editing a fact twice or losing one, records each size
once, and bad arguments or a foreign database directory give clear errors."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

import scale_curve
from neuraldb_kernels.editing import read_counterfact

SCRIPT = pathlib.Path(__file__).resolve().parent / "scale_curve.py"
REPO = SCRIPT.parents[1]
FACTS = 24
TIMEOUT = 600


def write_facts(path: pathlib.Path, count: int, offset: int = 0) -> pathlib.Path:
    """`count` flattened CounterFact records with distinct subjects (no residual is shared)."""
    names = ["Zorvath", "Melindra", "Quoster", "Brallik", "Fenwhistle", "Tarsova", "Olumbra", "Kestrane"]
    records = []
    for i in range(offset, offset + count):
        subject = f"{names[i % len(names)]} {['Hall', 'Bridge', 'Tower', 'Lake'][i // len(names) % 4]} {i}"
        records.append({"case_id": i, "prompt": f"{subject} is located in", "subject": subject,
                        "target_new": ["Paris", "Tokyo", "Lima"][i % 3], "ground_truth": "Berlin",
                        "rephrase_prompt": f"Where can one find {subject}? It is in",
                        "locality_prompt": "The Eiffel Tower is located in", "locality_ground_truth": "France"})
    path.write_text(json.dumps(records))
    return path


def command(db, data, model_dir, *extra):
    return [sys.executable, str(SCRIPT), "--db", str(db), "--data", str(data), "--model", str(model_dir),
            "--threads", "1", "--hparam", "batch_size=2", "--hparam", "steps=4", *extra]


def environment():
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def log_lines(db: pathlib.Path) -> list[list[str]]:
    path = db / scale_curve.LOG_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_resumes_after_sigint_without_editing_twice_or_losing_facts(tiny_model_dir, tmp_path):
    data = write_facts(tmp_path / "facts.json", FACTS)
    db = tmp_path / "curve"
    sizes = ["--sizes", "4", "8", "16", str(FACTS), "--eval-cases", "4"]
    process = subprocess.Popen(command(db, data, tiny_model_dir, *sizes), env=environment(), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + TIMEOUT
    while len(log_lines(db)) < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)  # the first size recorded and a batch of the second committed
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=TIMEOUT)
    assert process.returncode == scale_curve.INTERRUPTED, stderr
    assert "run the same command again to resume" in stderr
    interrupted = json.loads((db / scale_curve.STATE_FILE).read_text())
    assert "4" in interrupted["sizes"] and str(FACTS) not in interrupted["sizes"]
    logged = [fact_id for batch in log_lines(db) for fact_id in batch]
    assert len(logged) < FACTS

    finished = subprocess.run(command(db, data, tiny_model_dir, *sizes), env=environment(), text=True,
                              capture_output=True, timeout=TIMEOUT)
    assert finished.returncode == 0, finished.stderr
    state = json.loads((db / scale_curve.STATE_FILE).read_text())
    expected = [fact.fact_id for fact in read_counterfact(data)]
    logged = [fact_id for batch in log_lines(db) for fact_id in batch]
    assert len(logged) == len(set(logged)) == FACTS  # no fact edited twice
    assert set(logged) == set(expected)  # none lost
    from neuraldb_kernels import NeuralDB

    with NeuralDB.open(db / "neuraldb.sqlite", readonly=True) as stored:
        assert sorted(stored) == sorted(expected)
    assert list(state["sizes"]) == ["4", "8", "16", str(FACTS)]  # each size once, in order
    for size, entry in state["sizes"].items():
        assert entry["facts_in_database"] == int(size)
        assert set(entry["metrics"]) >= {"efficacy", "generalization", "specificity", "gate_fire_rate", "kl"}
        assert entry["peak_rss_mb"] > 0 and entry["edit_seconds"] > 0 and entry["edited_facts"] > 0
        # the stages of every editing call that finished (an interrupted one reports none)
        finished_calls = [segment for segment in entry["edit_segments"] if "stage_seconds" in segment]
        assert set(entry["edit_stage_seconds"]) == ({"prefixes", "keys", "residuals", "store", "total"}
                                                    if finished_calls else set())
        report = json.loads((db / scale_curve.REPORTS_DIR / f"facts-{size}.json").read_text())
        assert report["n_facts"] == int(size) and report["after"]["efficacy"] == entry["metrics"]["efficacy"]
    for size in interrupted["sizes"]:  # sizes measured before the interruption are not measured again
        assert state["sizes"][size] == interrupted["sizes"][size]
    assert sum(entry["edited_facts"] for entry in state["sizes"].values()) == FACTS
    assert (db / scale_curve.FIGURE_FILE).stat().st_size > 0

    batches = log_lines(db)
    again = subprocess.run(command(db, data, tiny_model_dir, *sizes), env=environment(), text=True,
                           capture_output=True, timeout=TIMEOUT)
    assert again.returncode == 0, again.stderr
    assert json.loads((db / scale_curve.STATE_FILE).read_text())["sizes"] == state["sizes"]
    assert log_lines(db) == batches  # a finished curve run again edits nothing


def test_unedited_scores_are_the_bare_models(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from neuraldb_kernels.evaluation import case_scores, cases_from_facts, metrics_from_case_scores

    data = write_facts(tmp_path / "facts.json", 4)
    records = json.loads(data.read_text())
    records[0]["locality_prompt"] = f"{records[1]['subject']} is located in"  # names an edited subject
    data.write_text(json.dumps(records))
    state = scale_curve.run(scale_curve.parse_args(command(tmp_path / "curve", data, tiny_model_dir, "--sizes", "2",
                                                           "--eval-cases", "2")[2:]))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    cases = cases_from_facts(read_counterfact(data)[:2])
    bare = metrics_from_case_scores(case_scores(model, tokenizer, cases, compare="token_mean"))
    assert {name: state["unedited"][name] for name in bare} == bare
    entry = state["sizes"]["2"]
    assert entry["facts_in_database"] == 2
    # the prompts naming no stored subject: case 1's alone, scored on the bare model
    other = metrics_from_case_scores(case_scores(model, tokenizer, cases[1:], compare="token_mean"))
    assert entry["unedited_subject_metrics"] == {"specificity_unedited_subjects": other["specificity"]}
    assert "specificity_unedited_subjects" in entry["metrics"]
    report = json.loads((tmp_path / "curve" / scale_curve.REPORTS_DIR / "facts-2.json").read_text())
    assert report["before"]["specificity_unedited_subjects"] == other["specificity"]


@pytest.mark.parametrize("arguments, message", [
    (["--sizes", "8", "4"], "--sizes must be increasing"),
    (["--sizes", "4", "4"], "--sizes must be increasing"),
    (["--sizes", "0", "4"], "--sizes must be positive"),
    (["--sizes", "4", "--eval-cases", "5"], "--eval-cases must be between 1 and the smallest size (4)"),
    (["--sizes", "4", "--hparam", "steps"], "--hparam takes NAME=VALUE"),
    (["--sizes", "4", "--threads", "0"], "--threads must be >= 1"),
])
def test_bad_arguments_are_clear_errors(arguments, message, tmp_path, capsys):
    data = write_facts(tmp_path / "facts.json", 4)
    with pytest.raises(SystemExit) as exit_info:
        scale_curve.parse_args(["--db", str(tmp_path / "db"), "--data", str(data), *arguments])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_data_file_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        scale_curve.parse_args(["--db", str(tmp_path / "db"), "--sizes", "4", "--data", str(tmp_path / "none.json")])
    assert f"--data file(s) not found: {tmp_path / 'none.json'}" in capsys.readouterr().err


def test_sizes_beyond_the_data_are_an_error_before_anything_is_written(tmp_path, capsys):
    data = write_facts(tmp_path / "facts.json", 4)
    db = tmp_path / "db"
    assert scale_curve.main(["--db", str(db), "--data", str(data), "--sizes", "2", "6", "--eval-cases", "2"]) == 2
    assert "--sizes goes up to 6 facts but the --data files hold 4 distinct facts" in capsys.readouterr().err
    assert not db.exists()


def test_resuming_with_other_settings_or_foreign_facts_is_refused(tiny_model_dir, tmp_path, capsys):
    data = write_facts(tmp_path / "facts.json", 4)
    other = write_facts(tmp_path / "other.json", 4, offset=100)
    db = tmp_path / "curve"
    first = command(db, data, tiny_model_dir, "--sizes", "2", "--eval-cases", "2")[2:]
    assert scale_curve.main(first) == 0
    state_before = (db / scale_curve.STATE_FILE).read_text()
    assert scale_curve.main(command(db, data, tiny_model_dir, "--sizes", "2", "--eval-cases", "1")[2:]) == 2
    assert "eval_cases: recorded 2, given 1" in capsys.readouterr().err
    assert (db / scale_curve.STATE_FILE).read_text() == state_before
    (db / scale_curve.STATE_FILE).unlink()  # a database of another curve, without its state file
    assert scale_curve.main(command(db, other, tiny_model_dir, "--sizes", "2", "--eval-cases", "2")[2:]) == 2
    assert "holds 2 fact(s) that are not in the --data files" in capsys.readouterr().err
