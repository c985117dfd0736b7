"""The `neuraldb` command line: every error path's exit code and one-line message (nothing written
half-way) and the db commands on hand-built databases, through `cli.main` in this process (its
return value is the process exit code); the console script's exit codes and the workflow
edit -> eval -> ask -> db rm -> eval on SmolLM2 with two CounterFact facts as subprocesses."""

import errno
import json
import os
import pickle
import sqlite3
import subprocess
import sys

import pytest
import torch

from neuraldb_kernels.store import ModelFingerprint, NeuralDB
from neuraldb_kernels.workspace import Workspace

COUNTERFACT = "counterfact/counterfact-a.json"


def neuraldb_process(*args):
    """Run the console script `neuraldb ARGS` as a subprocess; (exit code, stdout, stderr).
    Model-running commands get `--threads 1`: on a shared 2-core machine one thread is several
    times faster than two that wait on each other."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    script = os.path.join(os.path.dirname(sys.executable), "neuraldb")
    command = [script] if os.path.exists(script) else [sys.executable, "-m", "neuraldb_kernels.cli"]
    done = subprocess.run(command + [str(arg) for arg in args], env=env, capture_output=True, text=True, timeout=900)
    return done.returncode, done.stdout, done.stderr


def assert_one_line_error(code, err, expected_code, *fragments):
    assert code == expected_code, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("neuraldb: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _fingerprint(model_dir, layer=1):
    from transformers import AutoModelForCausalLM

    from neuraldb_kernels.integration import model_fingerprint

    return model_fingerprint(AutoModelForCausalLM.from_pretrained(model_dir), layer)


def _db_dir(path, model_spec, fingerprint, facts=0):
    """A database directory as `neuraldb edit` lays it out, with `facts` random facts."""
    path.mkdir()
    (path / "model.json").write_text(json.dumps({"model": str(model_spec)}))
    with NeuralDB(path / "neuraldb.sqlite", d1=fingerprint.d1, d2=fingerprint.d2, layer=fingerprint.layer,
                  fingerprint=fingerprint) as db:
        if facts:
            db.add(torch.randn(facts, fingerprint.d1), torch.randn(facts, fingerprint.d2),
                   ids=[f"fact{i}" for i in range(facts)],
                   metadata=[{"subject": f"S{i}", "prompt": f"P{i}", "target_new": "new"} for i in range(facts)])
    return path


# ------------------------------------------------------------------------------ error paths


def test_help_and_usage_errors(neuraldb):
    code, out, _ = neuraldb("--help")
    assert code == 0 and "edit" in out and "eval" in out and "demo" in out
    code, _, err = neuraldb()
    assert_one_line_error(code, err, 2, "required")
    code, _, err = neuraldb("edit", "--facts", "x.json", "--db", "d", "--format", "csv")
    assert_one_line_error(code, err, 2, "invalid choice: 'csv'")
    code, _, err = neuraldb("edit", "--facts", "x.json", "--db", "d", "--limit", "0")
    assert_one_line_error(code, err, 2, "positive integer")
    code, _, err = neuraldb("edit", "--facts", "x.json", "--db", "d", "--hparam", "bogus=1")
    assert_one_line_error(code, err, 2, "NAME=VALUE")


def test_edit_with_bad_input_writes_nothing(neuraldb, tmp_path, data_dir):
    db = tmp_path / "db"
    code, _, err = neuraldb("edit", "--facts", tmp_path / "missing.json", "--db", db)
    assert_one_line_error(code, err, 1, "no such file")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    code, _, err = neuraldb("edit", "--facts", empty, "--db", db)
    assert_one_line_error(code, err, 1, "holds no facts")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "{} is in", "subject": "X", "target_new": "Rome"}) + "\n"
                   + json.dumps({"prompt": "{} is in", "subject": " ", "target_new": "Rome"}) + "\n")
    code, _, err = neuraldb("edit", "--facts", bad, "--db", db)
    assert_one_line_error(code, err, 1, "fact 1", "subject is empty")
    code, _, err = neuraldb("edit", "--facts", data_dir / "zsre" / "zsre-1k.json", "--format", "jsonl", "--db", db)
    assert_one_line_error(code, err, 1, "not valid JSON")
    code, _, err = neuraldb("edit", "--facts", data_dir / COUNTERFACT, "--db", db, "--model", tmp_path / "nowhere")
    assert_one_line_error(code, err, 1, "not a directory")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file.txt").write_text("x")
    code, _, err = neuraldb("edit", "--facts", data_dir / COUNTERFACT, "--db", tmp_path / "other")
    assert_one_line_error(code, err, 1, "not a neuraldb database directory")
    assert not db.exists()
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["file.txt"]


def test_edit_that_fails_validation_in_the_editor_leaves_no_database(neuraldb, tmp_path, tiny_model_dir):
    too_long = tmp_path / "long.jsonl"
    too_long.write_text(json.dumps({"prompt": "word " * 300 + "{} is in", "subject": "X", "target_new": "Rome"}) + "\n")
    code, _, err = neuraldb("edit", "--facts", too_long, "--db", tmp_path / "db", "--model", tiny_model_dir,
                            "--hparam", "layer=1", "--quiet")
    assert_one_line_error(code, err, 1)
    assert not (tmp_path / "db").exists()


def test_records_repeating_a_subject_and_prompt_are_reported(neuraldb, tmp_path, tiny_model_dir):
    records = tmp_path / "facts.jsonl"
    twin = {"prompt": "{} is a twin city of", "subject": "Lyon", "target_true": "Beirut"}
    other = {"prompt": "{} is located in", "subject": "The Louvre", "target_new": "Berlin", "target_true": "Paris"}
    records.write_text("\n".join(json.dumps(r) for r in (
        {**twin, "target_new": "Manila"}, other, {**twin, "target_new": "Karachi"})) + "\n")
    directory = tmp_path / "db"
    code, out, err = neuraldb("edit", "--facts", records, "--db", directory, "--model", tiny_model_dir,
                              "--hparam", "layer=1", "--hparam", "steps=2", "--quiet")
    assert code == 0 and "now holds 2 facts" in out, err
    assert "1 records repeat the subject and prompt of a later record" in err and "record 0 by record 2" in err
    with NeuralDB.open(directory / "neuraldb.sqlite") as db:
        targets = sorted(db.get(fact_id).metadata["target_new"] for fact_id in db)
    assert targets == ["Berlin", "Karachi"]  # the last of the repeated records
    code, out, err = neuraldb("eval", "--db", directory, "--data", records, "--quiet")
    assert code == 0 and "1 cases repeat the subject and prompt of a later case" in out, err


def _tiny_database(neuraldb, tmp_path, tiny_model_dir):
    """(database directory, facts file) with two facts edited into the tiny model."""
    records = tmp_path / "facts.jsonl"
    records.write_text("\n".join(json.dumps(r) for r in (
        {"prompt": "{} is located in", "subject": "The Louvre", "target_new": "Berlin", "target_true": "Paris"},
        {"prompt": "{} plays the", "subject": "Miles Davis", "target_new": "piano", "target_true": "trumpet"})) + "\n")
    directory = tmp_path / "db"
    code, _, err = neuraldb("edit", "--facts", records, "--db", directory, "--model", tiny_model_dir,
                            "--hparam", "layer=1", "--hparam", "steps=2", "--quiet")
    assert code == 0, err
    return directory, records


def test_eval_reports_strict_and_general_metrics_before_and_after(neuraldb, tmp_path, tiny_model_dir,
                                                                   fake_general_dir):
    from neuraldb_kernels.evaluation import GENERAL_TASKS as TASKS
    from neuraldb_kernels.evaluation import general_abilities, load_cases, strict_metrics
    from neuraldb_kernels.workspace import load_model

    directory, records = _tiny_database(neuraldb, tmp_path, tiny_model_dir)
    report_path = tmp_path / "report.json"
    code, out, err = neuraldb("eval", "--db", directory, "--data", records, "--general", "--general-data",
                              fake_general_dir, "--general-limit", "3", "--json", report_path, "--quiet")
    assert code == 0, err
    report = json.loads(report_path.read_text())
    general = [f"general_{task}" for task in TASKS] + ["general_average", "lambada_perplexity"]
    for side in ("before", "after"):
        assert {"strict_efficacy", *general} <= set(report[side])  # JSONL facts: no paraphrases, no neighbours
    for name in ("strict_efficacy", "general_mmlu", "general_average"):
        assert name in out
    # the before side is the unedited model's, scored independently here
    model, tokenizer = load_model(str(tiny_model_dir))
    strict = strict_metrics(model, tokenizer, load_cases(records))
    assert report["before"]["strict_efficacy"] == strict.efficacy
    scores = general_abilities(model, tokenizer, fake_general_dir, limit=3, seed=0)
    for task in TASKS:
        assert report["before"][f"general_{task}"] == pytest.approx(scores[task].acc)
    assert report["before"]["general_average"] == pytest.approx(sum(s.acc for s in scores.values()) / 6)


def test_eval_general_needs_its_data(neuraldb, tmp_path, tiny_model_dir, monkeypatch):
    from neuraldb_kernels.evaluation import harness

    directory, records = _tiny_database(neuraldb, tmp_path, tiny_model_dir)
    code, _, err = neuraldb("eval", "--db", directory, "--data", records, "--general", "--general-data",
                            tmp_path / "missing")
    assert_one_line_error(code, err, 1, "--general-data", "missing", "is not a directory")
    monkeypatch.setattr(harness, "SHIPPED_GENERAL_DATA", tmp_path / "no-shared-data")
    code, _, err = neuraldb("eval", "--db", directory, "--data", records, "--general")
    assert_one_line_error(code, err, 1, "../shared/data/general", "--general-data DIR")


def test_edit_says_what_it_is_doing(neuraldb, tmp_path, tiny_model_dir):
    records = tmp_path / "facts.jsonl"
    records.write_text(json.dumps({"prompt": "{} is located in", "subject": "The Louvre", "target_new": "Berlin"}))
    code, out, err = neuraldb("edit", "--facts", records, "--db", tmp_path / "db", "--model", tiny_model_dir,
                              "--hparam", "layer=1", "--hparam", "steps=1")
    assert code == 0 and "edited 1 fact in" in out and "now holds 1 fact (was 0)" in out, err
    assert f"loading the model at {tiny_model_dir} ..." in err
    editing = f"editing 1 fact(s) into layer 1 of {tmp_path / 'db'}"
    assert err.index(f"loading the model at {tiny_model_dir} ...") < err.index(editing)  # what it is doing, in order


def test_edit_skip_bad_lists_the_records_it_left_out(neuraldb, tmp_path, tiny_model_dir):
    records = tmp_path / "facts.jsonl"
    good = {"prompt": "{} is located in", "subject": "The Louvre", "target_new": "Berlin"}
    records.write_text(json.dumps(good) + "\n" + json.dumps({**good, "subject": " ", "id": "blank"}) + "\n")
    code, out, err = neuraldb("edit", "--facts", records, "--db", tmp_path / "db", "--model", tiny_model_dir,
                              "--hparam", "layer=1", "--hparam", "steps=1", "--quiet", "--skip-bad")
    assert code == 0 and "edited 1 fact in" in out and "now holds 1 fact (was 0)" in out, err
    lines = err.splitlines()
    assert lines[0] == "skipped 1 bad record:" and all(part in lines[1] for part in ("fact 1", "'blank'", "empty")), err


def test_interrupted_edit_leaves_no_new_directory_and_says_how_to_resume(neuraldb, tmp_path, tiny_model_dir,
                                                                         monkeypatch):
    from neuraldb_kernels.editing import Editor

    def interrupted(self, facts, **options):
        raise KeyboardInterrupt

    records = tmp_path / "facts.jsonl"
    records.write_text(json.dumps({"prompt": "{} is located in", "subject": "The Louvre", "target_new": "Berlin"}))
    monkeypatch.setattr(Editor, "edit", interrupted)
    code, _, err = neuraldb("edit", "--facts", records, "--db", tmp_path / "new", "--model", tiny_model_dir,
                            "--hparam", "layer=1", "--quiet")
    assert code == 130 and err.strip() == "neuraldb: interrupted" and not (tmp_path / "new").exists()
    directory = _db_dir(tmp_path / "db", tiny_model_dir, _fingerprint(tiny_model_dir))
    code, _, err = neuraldb("edit", "--facts", records, "--db", directory, "--quiet")
    assert code == 130 and f"interrupted: 0 facts committed to {directory}; run the same command again" in err
    assert Workspace.exists(directory)


def test_commands_on_a_directory_that_is_no_database(neuraldb, tmp_path, data_dir):
    code, _, err = neuraldb("eval", "--db", tmp_path, "--data", data_dir / COUNTERFACT, "--limit", "1")
    assert_one_line_error(code, err, 1, "not a neuraldb database directory")
    code, _, err = neuraldb("db", "info", "--db", tmp_path / "nothing")
    assert_one_line_error(code, err, 1, "not a neuraldb database directory")
    code, _, err = neuraldb("ask", "--db", tmp_path, "  ")
    assert_one_line_error(code, err, 1, "prompt is empty")


def test_database_built_for_another_model_is_refused(neuraldb, tmp_path, tiny_model_dir, data_dir):
    foreign = ModelFingerprint(model_type="llama", layer=1, d1=1536, d2=576, weights_sha256="0" * 64)
    directory = _db_dir(tmp_path / "db", tiny_model_dir, foreign)
    code, _, err = neuraldb("ask", "--db", directory, "The Eiffel Tower is in")
    assert_one_line_error(code, err, 1, "built for another model", "d1")
    code, _, err = neuraldb("eval", "--db", directory, "--data", data_dir / COUNTERFACT, "--limit", "1")
    assert_one_line_error(code, err, 1, "built for another model")
    same_shape = _fingerprint(tiny_model_dir)
    other_weights = ModelFingerprint(**{**same_shape.__dict__, "weights_sha256": "f" * 64})
    directory = _db_dir(tmp_path / "db2", tiny_model_dir, other_weights)
    code, _, err = neuraldb("ask", "--db", directory, "The Eiffel Tower is in")
    assert_one_line_error(code, err, 1, "built for another model", "weights")
    # edit names the recorded model before loading anything
    code, _, err = neuraldb("edit", "--facts", data_dir / COUNTERFACT, "--db", directory, "--model", "default")
    assert_one_line_error(code, err, 1, "was built with model")


def test_consistency_from_reference_snippets_of_original_format_records(neuraldb, tmp_path, tiny_model_dir,
                                                                        data_dir):
    # the first original-format record rewrites (P27, Luigi Snozzi) to Singapore, Q334
    snippets = tmp_path / "attribute_snippets.json"
    snippets.write_text(json.dumps([{"relation_id": "P27", "target_id": "Q334",
                                     "samples": [{"text": "Singapore is a city state."}, {"text": "He lives there."}]}]))
    directory = _db_dir(tmp_path / "db", tiny_model_dir, _fingerprint(tiny_model_dir))
    report_path = tmp_path / "report.json"
    full_format = data_dir / "counterfact" / "counterfact-full-format-a.json"
    code, out, err = neuraldb("eval", "--db", directory, "--data", full_format,
                              "--limit", "1", "--references", snippets, "--max-new-tokens", "4", "--quiet",
                              "--json", report_path)
    assert code == 0, err
    report = json.loads(report_path.read_text())
    assert 0.0 <= report["before"]["consistency"] <= 100.0 and "consistency" in report["after"]
    assert "not computable" not in out


def test_skip_bad_records(neuraldb, tmp_path, tiny_model_dir):
    records = tmp_path / "facts.jsonl"
    good = {"prompt": "{} is located in", "subject": "The Louvre", "target_new": "Berlin", "target_true": "Paris",
            "extras": {"rephrase_prompt": "The Louvre can be found in"}}
    bad = {**good, "subject": "Big Ben", "target_true": ""}
    records.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    directory = _db_dir(tmp_path / "db", tiny_model_dir, _fingerprint(tiny_model_dir))
    code, _, err = neuraldb("eval", "--db", directory, "--data", records, "--quiet")
    assert_one_line_error(code, err, 1, "fact 1", "target_true", "--skip-bad")
    code, out, err = neuraldb("eval", "--db", directory, "--data", records, "--quiet", "--skip-bad")
    assert code == 0 and "1 cases evaluated" in out, err
    assert "skipped 1 bad record:" in err and "fact 1" in err
    all_bad = tmp_path / "bad.jsonl"
    all_bad.write_text(json.dumps({"prompt": "{} is in", "subject": " ", "target_new": "Rome"}) + "\n")
    code, _, err = neuraldb("edit", "--facts", all_bad, "--db", tmp_path / "new", "--skip-bad")
    assert_one_line_error(code, err, 1, "none of the facts")
    assert not (tmp_path / "new").exists()


def test_edit_help_documents_the_jsonl_fields(neuraldb, tmp_path):
    from neuraldb_kernels.editing import check_facts, read_facts

    code, out, _ = neuraldb("edit", "--help")
    assert code == 0
    for field in ("prompt", "subject", "target_new", "target_true"):
        assert f"  {field}" in out, out
    example = next(line.strip() for line in out.splitlines() if line.strip().startswith("{"))
    path = tmp_path / "example.jsonl"
    path.write_text(example + "\n")
    (fact,) = check_facts(read_facts(path))[0]  # the documented line is a valid fact
    assert (fact.filled_prompt, fact.target_new) == ("The Louvre is located in", "Berlin")


@pytest.mark.parametrize("threads, fragment", [("1e20", "positive integer"), ("0", "positive integer"),
                                               ("100000000000000000000", "at most")])
def test_threads_option_is_checked(neuraldb, threads, fragment):
    code, _, err = neuraldb("--threads", threads, "backends")
    assert_one_line_error(code, err, 2, "--threads", fragment)


# ------------------------------------------------------------------- every failure is one line


@pytest.mark.parametrize("error, fragments", [
    (sqlite3.OperationalError("database is locked"), ["db/neuraldb.sqlite: database is locked", "write lock"]),
    (sqlite3.OperationalError("database or disk is full"), ["db/neuraldb.sqlite: database or disk is full"]),
    (sqlite3.DatabaseError("file is not a database"), ["db/neuraldb.sqlite: file is not a database", "damaged"]),
    (OSError(errno.ENOSPC, "No space left on device", "/full/neuraldb.sqlite-wal"),
     ["No space left on device", "/full/neuraldb.sqlite-wal"]),
    (TypeError("metadata must be a dict"), ["metadata must be a dict"]),
    (RecursionError("maximum recursion depth exceeded"), ["nested too deeply"]),
    (MemoryError(), ["out of memory"]),
    (pickle.UnpicklingError("invalid load key, 'x'"), ["pickled", "invalid load key"]),
], ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else None)
def test_every_expected_failure_is_one_line(neuraldb, monkeypatch, tmp_path, error, fragments):
    from neuraldb_kernels import cli

    def fail(args):
        raise error

    monkeypatch.setattr(cli, "cmd_db_info", fail)
    code, _, err = neuraldb("db", "info", "--db", tmp_path / "db")
    assert_one_line_error(code, err, 1, *fragments)


def test_safetensors_errors_name_the_file_and_interrupts_exit_130(neuraldb, monkeypatch, tmp_path):
    from safetensors import SafetensorError

    from neuraldb_kernels import cli

    def corrupt(args):
        raise SafetensorError("Error while deserializing header: HeaderTooLarge")

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_db_import", corrupt)
    code, _, err = neuraldb("db", "import", "--db", tmp_path / "db", tmp_path / "share.safetensors")
    assert_one_line_error(code, err, 1, f"{tmp_path / 'share.safetensors'}: safetensors: Error while deserializing",
                          "HeaderTooLarge")
    monkeypatch.setattr(cli, "cmd_db_info", interrupted)
    code, _, err = neuraldb("db", "info", "--db", tmp_path / "db")
    assert code == 130 and err.strip() == "neuraldb: interrupted"


def test_an_error_quoting_a_huge_input_is_cut(neuraldb, tmp_path):
    records = tmp_path / "facts.jsonl"
    records.write_text(json.dumps({"prompt": "{} is in", "subject": "x" * 1_000_000, "target_new": "Rome"})
                       + "\n" + json.dumps({"prompt": "y" * 1_000_000, "subject": "Z", "target_new": "Rome"}) + "\n")
    code, _, err = neuraldb("edit", "--facts", records, "--db", tmp_path / "db")
    assert_one_line_error(code, err, 1, "fact 1", "(1000000 characters)")
    assert len(err) < 3000


def test_an_error_line_is_cut_whatever_raised_it(neuraldb, monkeypatch, tmp_path):
    from neuraldb_kernels import cli

    def fail(args):
        raise ValueError("bad value " + "z" * 1_000_000)

    monkeypatch.setattr(cli, "cmd_db_info", fail)
    code, _, err = neuraldb("db", "info", "--db", tmp_path / "db")
    assert_one_line_error(code, err, 1, "bad value", "more characters left out")
    assert len(err) < 3000


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs (needs root and mount rights; skipped elsewhere), unmounted afterwards."""
    mount_point = tmp_path / "full"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def test_a_full_disk_is_one_line_and_leaves_nothing(neuraldb, tmp_path, full_disk):
    fingerprint = ModelFingerprint(model_type="llama", layer=1, d1=48, d2=32, weights_sha256="0" * 64)
    directory = _db_dir(tmp_path / "db", "default", fingerprint, facts=400)  # ~130 KB of vectors
    export = full_disk / "share.safetensors"
    code, _, err = neuraldb("db", "export", "--db", directory, export)
    assert_one_line_error(code, err, 1, str(export), "No space left on device")
    assert list(full_disk.iterdir()) == []


def test_a_bug_still_shows_its_traceback(monkeypatch, tmp_path):
    from neuraldb_kernels import cli

    def bug(args):
        raise AttributeError("no attribute 'x'")

    monkeypatch.setattr(cli, "cmd_db_info", bug)
    with pytest.raises(AttributeError):
        cli.main(["db", "info", "--db", str(tmp_path)])


def test_real_failures_are_one_line(neuraldb, tmp_path):
    directory = tmp_path / "db"
    directory.mkdir()
    (directory / "model.json").write_text(json.dumps({"model": "default"}))
    (directory / "neuraldb.sqlite").write_bytes(b"SQLite format 3\x00" + os.urandom(4000))
    code, _, err = neuraldb("db", "info", "--db", directory)
    assert_one_line_error(code, err, 1, str(directory / "neuraldb.sqlite"))
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    code, _, err = neuraldb("edit", "--facts", deep, "--db", tmp_path / "new")
    assert_one_line_error(code, err, 1, str(deep), "nested too deeply")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("spec, fragment", [("gpt2", "neither 'default' nor an absolute path"),
                                            ("tiny/model", "neither 'default' nor an absolute path"),
                                            ("fifo", "not a regular file")])
def test_hostile_model_json_is_one_line_and_loads_nothing(neuraldb, tmp_path, spec, fragment):
    if spec == "fifo":
        model_dir = tmp_path / "model"
        model_dir.mkdir()
        os.mkfifo(model_dir / "config.json")
        spec = str(model_dir)
    foreign = ModelFingerprint(model_type="llama", layer=1, d1=48, d2=32, weights_sha256="0" * 64)
    directory = _db_dir(tmp_path / "db", spec, foreign)
    code, _, err = neuraldb("ask", "--db", directory, "The Eiffel Tower is in")
    assert_one_line_error(code, err, 1, "model.json", fragment)
    code, out, err = neuraldb("db", "info", "--db", directory)  # what it names is still shown
    assert code == 0 and spec in out, err


# ---------------------------------------------------------------------------------- db commands


def test_db_info_list_rm_export_import(neuraldb, tmp_path, tiny_model_dir):
    fingerprint = _fingerprint(tiny_model_dir)
    directory = _db_dir(tmp_path / "db", tiny_model_dir, fingerprint, facts=3)
    code, out, err = neuraldb("db", "info", "--db", directory)
    assert code == 0, err
    assert "facts        3" in out and str(tiny_model_dir) in out and "layer        1" in out
    code, out, _ = neuraldb("db", "list", "--db", directory, "--limit", "2")
    assert code == 0 and "fact0  S0: 'P0' -> 'new'" in out and "2 of 3 facts" in out
    code, _, err = neuraldb("db", "rm", "--db", directory, "fact0", "nope")
    assert_one_line_error(code, err, 1, "nothing removed", "1 id not in", "'nope'", "--missing-ok")
    assert "missing_ok" not in err  # a Python keyword, not an option of the command
    code, out, err = neuraldb("db", "rm", "--db", directory, "fact0", "nope", "--missing-ok")
    assert code == 0 and "removed 1 fact; 2 left" in out, err
    export = tmp_path / "share.safetensors"
    code, out, err = neuraldb("db", "export", "--db", directory, export)
    assert code == 0 and export.is_file() and export.with_suffix(".json").is_file(), err
    code, _, err = neuraldb("db", "export", "--db", directory, export)
    assert_one_line_error(code, err, 1, "already exists")
    imported = tmp_path / "imported"
    code, out, err = neuraldb("db", "import", "--db", imported, export, "--model", tiny_model_dir)
    assert code == 0 and "imported 2 facts" in out, err
    with NeuralDB.open(imported / "neuraldb.sqlite") as copy, NeuralDB.open(directory / "neuraldb.sqlite") as original:
        assert sorted(copy) == sorted(original) == ["fact1", "fact2"]
        assert torch.equal(copy.get("fact1").residual, original.get("fact1").residual)
    assert json.loads((imported / "model.json").read_text()) == {"model": str(tiny_model_dir)}
    code, _, err = neuraldb("db", "import", "--db", imported, export, "--model", tiny_model_dir)
    assert_one_line_error(code, err, 1, "already exists")


def test_db_rm_recomputes_the_facts_that_shared_the_removed_facts_residual(neuraldb, tmp_path, tiny_model_dir):
    records = tmp_path / "facts.jsonl"
    records.write_text("\n".join(json.dumps(r) for r in (
        {"prompt": "{} plays the sport", "subject": "Carlos Valderrama", "target_new": "basketball"},
        {"prompt": "{} plays as", "subject": "Carlos Valderrama", "target_new": "quarterback"},
        {"prompt": "{} is located in", "subject": "The Louvre", "target_new": "Berlin"})) + "\n")
    directory = tmp_path / "db"
    # layer 0: an edit at the last layer of the 2-layer model cannot reach later tokens (r = 0)
    code, out, err = neuraldb("edit", "--facts", records, "--db", directory, "--model", tiny_model_dir,
                              "--hparam", "layer=0", "--hparam", "steps=2", "--quiet")
    assert code == 0 and "now holds 3 facts" in out, err
    with NeuralDB.open(directory / "neuraldb.sqlite") as db:
        by_target = {db.get(fact_id).metadata["target_new"]: db.get(fact_id) for fact_id in db}
    sport, position, louvre = (by_target[t] for t in ("basketball", "quarterback", "Berlin"))
    assert sport.metadata["edit"]["shares_residual_with"] == [position.id]
    assert sport.residual.any() and louvre.residual.any()
    assert torch.equal(sport.residual, position.residual) and not torch.equal(sport.residual, louvre.residual)
    code, _, err = neuraldb("db", "rm", "--db", directory, position.id, position.id)
    assert_one_line_error(code, err, 1, "nothing removed", "twice")
    code, out, err = neuraldb("db", "rm", "--db", directory, position.id)
    assert code == 0 and "recomputed the residual of 1 fact(s)" in out and "removed 1 fact; 2 left" in out, err
    with NeuralDB.open(directory / "neuraldb.sqlite") as db:
        assert sorted(db) == sorted([sport.id, louvre.id])
        alone = db.get(sport.id)
        assert alone.metadata["edit"]["shares_residual_with"] == []
        assert not torch.equal(alone.residual, sport.residual)  # recomputed without the removed fact ...
        assert alone.metadata["created_at"] == sport.metadata["created_at"]  # the fact's, kept
        assert alone.metadata["edit"]["hparams"]["steps"] == 2 and alone.metadata["edit"]["steps"] <= 2  # ... as edited
        assert torch.equal(db.get(louvre.id).residual, louvre.residual)  # not touched
    code, out, err = neuraldb("db", "rm", "--db", directory, louvre.id)  # shares nothing: no model needed
    assert code == 0 and "recomputed" not in out and "removed 1 fact; 1 left" in out, err
    more = tmp_path / "more.jsonl"
    more.write_text(json.dumps({"prompt": "{} was born in", "subject": "Carlos Valderrama", "target_new": "Oslo"})
                    + "\n" + json.dumps({"prompt": "{} is a member of", "subject": "Germany", "target_new": "Hamas"}))
    code, out, err = neuraldb("edit", "--facts", more, "--db", directory, "--hparam", "steps=2", "--quiet")
    assert code == 0, err
    assert "edited 2 facts" in out and "(0 already in the database; 1 stored facts of the same subjects" in out
    assert "now holds 3 facts (was 1)" in out
    # "Germany" is one token opening the prompt: its key sits at position 0
    assert "1 facts key on their prompt's first token" in err and "'Germany is a member of'" in err


def test_db_commands_count_and_remove_extra_keys_with_their_fact(neuraldb, tmp_path, tiny_model_dir):
    fingerprint = _fingerprint(tiny_model_dir)
    directory = _db_dir(tmp_path / "db", tiny_model_dir, fingerprint, facts=2)
    with NeuralDB.open(directory / "neuraldb.sqlite") as db:  # fact0 gets an extra key, as the Editor adds
        fact0 = db.get("fact0")
        db.upsert(fact0.key, fact0.residual, "fact0", fact0.metadata, extra_keys=torch.randn(1, fingerprint.d1))
    code, out, err = neuraldb("db", "info", "--db", directory)
    assert code == 0 and "facts        2 (+1 extra keys: bare-prompt queries)" in out, err
    code, out, _ = neuraldb("db", "list", "--db", directory)
    assert "fact0  S0: 'P0' -> 'new' [+1 extra key]" in out and "2 of 2 facts" in out
    code, out, err = neuraldb("db", "rm", "--db", directory, "fact0")
    assert code == 0 and "removed 1 fact; 1 left" in out, err
    with NeuralDB.open(directory / "neuraldb.sqlite") as db:
        assert db.key_rows == 1
        assert list(db) == ["fact1"]


def test_db_import_for_another_model_leaves_nothing(neuraldb, tmp_path, tiny_model_dir):
    foreign = ModelFingerprint(model_type="llama", layer=1, d1=48, d2=32, weights_sha256="0" * 64)
    directory = _db_dir(tmp_path / "db", tiny_model_dir, foreign, facts=1)
    export = tmp_path / "share.safetensors"
    assert neuraldb("db", "export", "--db", directory, export)[0] == 0
    code, _, err = neuraldb("db", "import", "--db", tmp_path / "imported", export, "--model", tiny_model_dir)
    assert_one_line_error(code, err, 1, "built for another model", "weights")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db", "share.json", "share.safetensors"]


def test_plot_and_backends(neuraldb, tmp_path):
    reports = []
    for n, efficacy in ((10, 100.0), (100, 98.0), (1000, 95.0)):
        path = tmp_path / f"r{n}.json"
        path.write_text(json.dumps({"n_facts": n, "before": {"efficacy": 10.0}, "after": {"efficacy": efficacy}}))
        reports.append(path)
    code, out, err = neuraldb("plot", *reports, "--out", tmp_path / "scaling.png")
    assert code == 0, err
    assert (tmp_path / "scaling.png").read_bytes()[:4] == b"\x89PNG"
    code, _, err = neuraldb("plot", tmp_path / "missing.json", "--out", tmp_path / "x.png")
    assert_one_line_error(code, err, 1, "does not exist")
    code, out, err = neuraldb("backends")
    assert code == 0 and "torch: usable on cpu" in out, err


# ------------------------------------------------------------------------------ the workflow


def test_console_script_exit_codes(tmp_path):
    code, _, err = neuraldb_process("edit", "--facts", tmp_path / "missing.json", "--db", tmp_path / "db")
    assert_one_line_error(code, err, 1, "no such file")
    code, _, err = neuraldb_process("eval", "--db", tmp_path, "--data", "x", "--format", "csv")
    assert_one_line_error(code, err, 2, "invalid choice")
    code, out, err = neuraldb_process("backends")
    assert code == 0 and "torch: usable on cpu" in out, err


@pytest.mark.slow
def test_edit_eval_ask_rm_eval(tmp_path, data_dir):
    def neuraldb(*args):
        return neuraldb_process("--threads", "1", *args)

    directory = tmp_path / "db"
    data = data_dir / COUNTERFACT
    code, out, err = neuraldb("edit", "--facts", data, "--format", "counterfact", "--db", directory, "--limit", "2",
                              "--quiet")
    assert code == 0, err
    assert "edited 2 facts" in out and "now holds 2 facts" in out
    assert json.loads((directory / "model.json").read_text()) == {"model": "default"}
    code, out, err = neuraldb("edit", "--facts", data, "--db", directory, "--limit", "2", "--quiet")  # resume
    assert code == 0 and "edited 0 facts" in out and "2 already in the database" in out, err

    report_path = tmp_path / "after_edit.json"
    code, out, err = neuraldb("eval", "--db", directory, "--data", data, "--limit", "2", "--json", report_path,
                              "--quiet")
    assert code == 0, err
    assert "efficacy" in out and "specificity" in out and "consistency: not computable" in out
    report = json.loads(report_path.read_text())
    assert report["n_facts"] == 2 and report["n_cases"] == 2
    assert set(report["after"]) == {"efficacy", "generalization", "specificity", "specificity_unedited_subjects",
                                    "strict_efficacy", "strict_generalization", "strict_specificity",
                                    "gate_fire_rate", "kl"}
    assert report["after"]["efficacy"] == 100.0 and report["before"]["efficacy"] < 100.0
    assert report["before"]["gate_fire_rate"] == 0.0
    code, out, err = neuraldb("eval", "--db", directory, "--data", data, "--limit", "2", "--quiet",
                              "--compare", "token_mean")
    assert code == 0 and "mean per-token log-probabilities" in out, err

    code, out, err = neuraldb("ask", "--db", directory, "The mother tongue of Danielle Darrieux is")
    assert code == 0, err
    assert "without edits:" in out and "with edits:" in out and "facts fired (1)" in out
    with_edits = next(line for line in out.splitlines() if line.startswith("with edits:"))
    assert "English" in with_edits and "Danielle Darrieux" in out

    code, out, _ = neuraldb("db", "list", "--db", directory)
    ids = [line.split()[0] for line in out.splitlines() if "->" in line]
    assert len(ids) == 2
    code, out, err = neuraldb("db", "rm", "--db", directory, *ids)
    assert code == 0 and "0 left" in out, err

    code, out, err = neuraldb("eval", "--db", directory, "--data", data, "--limit", "2", "--json", report_path,
                              "--quiet")
    assert code == 0, err
    report = json.loads(report_path.read_text())
    assert report["n_facts"] == 0 and report["after"] == report["before"]


@pytest.mark.slow
def test_demo_changes_the_edited_answers_and_nothing_else():
    code, out, err = neuraldb_process("--threads", "1", "demo", "--quiet")
    assert code == 0, err
    answers = [line.split("after:", 1)[1] for line in out.splitlines() if "after:" in line]
    assert len(answers) == 10
    for target, answer in zip(["Rome", "Brazil", "chess", "Tokyo", "Rome", "Brazil"], answers):
        assert target in answer, out
    assert answers[6:] and all("(unchanged)" in answer for answer in answers[6:]), out
    assert "4 of 4 unrelated prompts unchanged" in out


def test_db_check_passes_an_intact_database_and_names_a_corrupt_fact(neuraldb, tmp_path, format4_files):
    foreign = ModelFingerprint(model_type="llama", layer=1, d1=48, d2=32, weights_sha256="0" * 64)
    directory = _db_dir(tmp_path / "db", "default", foreign, facts=3)
    code, out, err = neuraldb("db", "check", "--db", directory)
    assert code == 0 and "all 3 facts intact" in out, err
    files = format4_files(directory / "neuraldb.sqlite")  # one residual value changed behind its back
    vectors = bytearray(files.vectors.read_bytes())
    vectors[files.HEADER + files.row("fact1")["slot"] * files.slot_bytes + files.d1 * files.dtype.itemsize + 5] ^= 0x40
    files.vectors.write_bytes(bytes(vectors))
    code, _, err = neuraldb("db", "check", "--db", directory)
    assert_one_line_error(code, err, 1, "fact1")


def test_read_only_commands_work_on_a_read_only_mount(neuraldb, tmp_path):
    mount_point = tmp_path / "mnt"
    mount_point.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN)")
    try:
        foreign = ModelFingerprint(model_type="llama", layer=1, d1=48, d2=32, weights_sha256="0" * 64)
        directory = _db_dir(mount_point / "db", "default", foreign, facts=2)
        subprocess.run(["mount", "-o", "remount,ro", str(mount_point)], check=True)
        for command in (("info",), ("list",), ("check",)):
            code, out, err = neuraldb("db", *command, "--db", directory)
            assert code == 0 and err == "", (command, err)
        assert "2 of 2 facts" in neuraldb("db", "list", "--db", directory)[1]
        code, _, err = neuraldb("db", "rm", "--db", directory, "fact0")
        assert_one_line_error(code, err, 1, "neuraldb.sqlite")
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True)


def test_key_format_option_keeps_answers_and_metrics(neuraldb, tmp_path, tiny_model_dir, monkeypatch):
    """--key-format int8 (ask, eval) retrieves through the store's compressed key index: the same
    answers, firings and metrics as full-precision keys; a bad format is a usage error."""
    import neuraldb_kernels.integration as integration

    directory, records = _tiny_database(neuraldb, tmp_path, tiny_model_dir)
    formats = []
    attach = integration.attach

    def recording_attach(*args, **kwargs):
        formats.append(kwargs.get("key_format"))
        return attach(*args, **kwargs)

    monkeypatch.setattr(integration, "attach", recording_attach)
    outputs = {}
    for options in ((), ("--key-format", "int8")):
        code, out, err = neuraldb("ask", "--db", directory, "The Louvre is located in", *options)
        assert code == 0, err
        report = tmp_path / f"report{len(options)}.json"
        code, _, err = neuraldb("eval", "--db", directory, "--data", records, "--json", report, "--quiet", *options)
        assert code == 0, err
        outputs[options] = (out, json.loads(report.read_text()))
    half = len(formats) // 2  # ask, then eval's attachments: first without, then with the option
    assert half and formats == [None] * half + ["int8"] * half
    assert outputs[()] == outputs[("--key-format", "int8")]
    assert "facts fired (1)" in outputs[()][0]
    code, _, err = neuraldb("ask", "--db", directory, "The Louvre is", "--key-format", "int3")
    assert code == 2 and "expected a key format, one of int8, fp8_e4m3; got 'int3'" in err
