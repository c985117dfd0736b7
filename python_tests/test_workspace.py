"""`Workspace`: a database directory (neuraldb.sqlite + model.json) shared by Python and the CLI,
on the tiny random Llama of conftest (down-projection 48 -> 32): creating and rolling back, opening
and loading the model lazily and checked, refusing hostile model.json files, removing facts."""

import json
import os
import signal

import pytest
import torch

import neuraldb_kernels as nk
from neuraldb_kernels import workspace as workspace_module
from neuraldb_kernels.store import ModelFingerprint, NeuralDB
from neuraldb_kernels.workspace import Removal, Workspace, WorkspaceError


@pytest.fixture
def hang_guard():
    """Fail a test that blocks (a FIFO opened for reading) instead of hanging the suite."""
    def timeout(signum, frame):
        raise AssertionError("blocked for 20 s")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def _no_model_loads(monkeypatch):
    """Make any model load fail the test: refused specs must be refused before loading."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(workspace_module, "load_model", refuse)


def _directory_for(path, spec, fingerprint, facts=0, metadata=None):
    """A database directory laid out by hand (independent of Workspace.create)."""
    path.mkdir()
    (path / "model.json").write_text(json.dumps({"model": spec}))
    with NeuralDB(path / "neuraldb.sqlite", d1=fingerprint.d1, d2=fingerprint.d2, layer=fingerprint.layer,
                  fingerprint=fingerprint) as db:
        if facts:
            db.add(torch.randn(facts, fingerprint.d1), torch.randn(facts, fingerprint.d2),
                   ids=[f"fact{i}" for i in range(facts)],
                   metadata=metadata or [{"subject": f"S{i}", "prompt": f"P{i}", "target_new": "new"}
                                         for i in range(facts)])
    return path


def test_exported_from_the_package():
    assert nk.Workspace is Workspace


def test_create_then_open(tmp_path, tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    directory = tmp_path / "nested" / "ws"
    with Workspace.create(directory, model=tiny_model_dir, layer=1, gamma=0.5) as created:
        assert (created.db.d1, created.db.d2, created.db.layer, created.db.gamma) == (48, 32, 1, 0.5)
    assert sorted(p.name for p in directory.iterdir() if not p.name.startswith("neuraldb.sqlite-")) == [
        "model.json", "neuraldb.sqlite"]
    assert json.loads((directory / "model.json").read_text()) == {"model": str(tiny_model_dir)}
    assert Workspace.exists(directory) and not Workspace.exists(tmp_path)

    loads = []
    real_load = workspace_module.load_model
    monkeypatch.setattr(workspace_module, "load_model", lambda spec, log=None: loads.append(spec) or real_load(spec))
    with Workspace.open(directory) as opened:
        assert opened.model_spec == str(tiny_model_dir) and len(opened.db) == 0
        assert loads == []  # nothing loaded until the model is used
        reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        for (name, mine), (_, theirs) in zip(opened.model.named_parameters(), reference.named_parameters()):
            assert torch.equal(mine, theirs), name
        assert opened.tokenizer("Paris")["input_ids"] and loads == [str(tiny_model_dir)]  # loaded once
    assert opened.db.closed


def test_create_relative_model_path_is_recorded_absolute(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tiny_model_dir.parent)
    with Workspace.create(tmp_path / "ws", model=tiny_model_dir.name, layer=1):
        pass
    assert json.loads((tmp_path / "ws" / "model.json").read_text()) == {"model": str(tiny_model_dir)}


def test_create_refuses_a_used_directory_and_leaves_nothing_on_failure(tmp_path, tiny_model_dir):
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    with pytest.raises(WorkspaceError, match="not a neuraldb database directory"):
        Workspace.create(used, model=tiny_model_dir)
    assert [p.name for p in used.iterdir()] == ["notes.txt"]
    with pytest.raises(ValueError):  # the tiny model has layers 0 and 1
        Workspace.create(tmp_path / "new", model=tiny_model_dir, layer=7)
    assert not (tmp_path / "new").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WorkspaceError, match="is not a directory"):
        Workspace.create(empty, model=tmp_path / "no-model")
    assert empty.is_dir() and not any(empty.iterdir())


def test_open_refuses_what_is_no_database(tmp_path):
    with pytest.raises(WorkspaceError, match="not a neuraldb database directory"):
        Workspace.open(tmp_path)
    (tmp_path / "neuraldb.sqlite").write_bytes(b"")
    with pytest.raises(WorkspaceError, match="model.json is missing"):
        Workspace.open(tmp_path)


def test_a_model_other_than_the_recorded_one_is_refused(tmp_path, tiny_model_dir):
    foreign = ModelFingerprint(model_type="llama", layer=1, d1=48, d2=32, weights_sha256="0" * 64)
    directory = _directory_for(tmp_path / "ws", str(tiny_model_dir), foreign)
    with pytest.raises(WorkspaceError, match="was built with model"):
        Workspace.open(directory, model="default")
    with Workspace.open(directory) as workspace:
        with pytest.raises(WorkspaceError, match="built for another model.*weights"):
            workspace.model


@pytest.mark.parametrize("hostile, fragment", [
    ("gpt2", "neither 'default' nor an absolute path"),           # a hub id: would try the network
    ("models/tiny", "neither 'default' nor an absolute path"),    # relative: depends on the current directory
    ("/nonexistent/model", "does not exist"),
])
def test_model_json_naming_no_local_directory_is_refused(tmp_path, monkeypatch, hostile, fragment):
    fingerprint = ModelFingerprint(model_type="llama", layer=1, d1=48, d2=32, weights_sha256="0" * 64)
    directory = _directory_for(tmp_path / "ws", hostile, fingerprint)
    _no_model_loads(monkeypatch)
    with Workspace.open(directory) as workspace:
        assert workspace.model_spec == hostile  # db info can still show it
        with pytest.raises(WorkspaceError, match=fragment) as error:
            workspace.model
    assert "model.json" in str(error.value)


@pytest.mark.parametrize("plant", ["dev_zero", "fifo"])
def test_model_directory_with_a_device_or_fifo_is_refused(tmp_path, monkeypatch, hang_guard, plant):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    if plant == "dev_zero":
        os.symlink("/dev/zero", model_dir / "model.safetensors")
    else:
        os.mkfifo(model_dir / "model.safetensors")
    fingerprint = ModelFingerprint(model_type="llama", layer=1, d1=48, d2=32, weights_sha256="0" * 64)
    directory = _directory_for(tmp_path / "ws", str(model_dir), fingerprint)
    _no_model_loads(monkeypatch)
    with Workspace.open(directory) as workspace:
        with pytest.raises(WorkspaceError, match="model.json: the model directory .* holds model.safetensors, which is not"):
            workspace.model
    with pytest.raises(WorkspaceError, match="not a regular file"):  # also when named for a new directory
        Workspace.create(tmp_path / "new", model=model_dir)


@pytest.mark.parametrize("plant", ["dev_zero", "fifo", "deep", "not_a_string"])
def test_hostile_model_json_files_are_refused(tmp_path, hang_guard, plant):
    fingerprint = ModelFingerprint(model_type="llama", layer=1, d1=48, d2=32, weights_sha256="0" * 64)
    directory = _directory_for(tmp_path / "ws", "default", fingerprint)
    model_file = directory / "model.json"
    model_file.unlink()
    if plant == "dev_zero":
        os.symlink("/dev/zero", model_file)
    elif plant == "fifo":
        os.mkfifo(model_file)
    elif plant == "deep":
        model_file.write_text('{"model": ' + "[" * 100_000 + "]" * 100_000 + "}")
    else:
        model_file.write_text(json.dumps({"model": ["default"]}))
    with pytest.raises(WorkspaceError, match="model.json"):
        Workspace.open(directory)


def test_models_load_from_local_files_only(tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    seen = {}

    def offline_only(path, **kwargs):
        seen.update(kwargs)
        raise OSError("weights missing")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", offline_only)
    with pytest.raises(WorkspaceError, match=f"cannot load the model at {tiny_model_dir}: weights missing"):
        workspace_module.load_model(str(tiny_model_dir))
    assert seen["local_files_only"] is True


def test_remove_without_residual_partners_loads_no_model(tmp_path, tiny_model_dir, monkeypatch):
    fingerprint = ModelFingerprint(model_type="llama", layer=1, d1=48, d2=32, weights_sha256="0" * 64)
    directory = _directory_for(tmp_path / "ws", str(tiny_model_dir), fingerprint, facts=3)
    _no_model_loads(monkeypatch)
    with Workspace.open(directory) as workspace:
        with pytest.raises(KeyError, match="nope"):
            workspace.remove(["fact0", "nope"])
        assert len(workspace.db) == 3  # all or nothing
        assert workspace.remove(["fact0", "nope"], missing_ok=True) == Removal(removed=("fact0",), recomputed=())
        assert workspace.remove("fact2") == Removal(removed=("fact2",), recomputed=())
    with NeuralDB.open(directory / "neuraldb.sqlite") as db:
        assert list(db) == ["fact1"]


def test_import_builds_a_directory_or_nothing(tmp_path, tiny_model_dir):
    with Workspace.create(tmp_path / "ws", model=tiny_model_dir, layer=1) as workspace:
        workspace.db.add(torch.randn(2, 48), torch.randn(2, 32), ids=["a", "b"])
        export = tmp_path / "share.safetensors"
        workspace.db.export(export)
        residual = workspace.db.get("b").residual
    with Workspace.import_(export, tmp_path / "copy", model=tiny_model_dir) as copy:
        assert sorted(copy.db) == ["a", "b"] and torch.equal(copy.db.get("b").residual, residual)
        assert copy.model_spec == str(tiny_model_dir)
    assert json.loads((tmp_path / "copy" / "model.json").read_text()) == {"model": str(tiny_model_dir)}
    with pytest.raises(WorkspaceError, match="already exists"):
        Workspace.import_(export, tmp_path / "copy", model=tiny_model_dir)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(WorkspaceError, match="built for another model"):
        Workspace.import_(export, tmp_path / "other", model="default")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# ------------------------------------------------- needs the editing branch's Editor (EditReport API)


def test_a_failed_first_edit_leaves_no_directory(tmp_path, tiny_model_dir):
    from neuraldb_kernels.editing import FactError

    workspace = Workspace.create(tmp_path / "ws", model=tiny_model_dir, layer=1)
    too_long = {"prompt": "word " * 300 + "{} is in", "subject": "X", "target_new": "Rome"}
    with pytest.raises(FactError, match="fact 0"):
        workspace.edit([too_long], progress=False)
    assert not (tmp_path / "ws").exists() and workspace.db.closed


def test_edit_reports_and_a_failed_later_edit_keeps_the_facts(tmp_path, tiny_model_dir):
    from neuraldb_kernels.editing import FactError

    fact = {"prompt": "{} is located in", "subject": "The Louvre", "target_new": "Berlin"}
    with Workspace.create(tmp_path / "ws", model=tiny_model_dir, layer=0) as workspace:
        report = workspace.edit([fact], progress=False, steps=2)
        assert len(report.ids) == 1 and report.ids[0] in workspace.db and report.already_stored == ()
        again = workspace.edit([fact], progress=False, steps=2)
        assert again.already_stored == report.ids
        with pytest.raises(FactError):
            workspace.edit([{**fact, "subject": " "}], progress=False)
        assert list(workspace.db) == list(report.ids)
    assert Workspace.exists(tmp_path / "ws")
