"""A database directory as one object: `neuraldb.sqlite` (the NeuralDB, see store/FORMAT.md) and
`model.json` ({"model": "default" or the absolute path of a local Hugging Face model directory}),
the model the database was built for. The `neuraldb` command and Python use the same object.

    with Workspace.create("edits", model="default") as ws:      # loads the model, makes the directory
        report = ws.edit(read_facts("facts.jsonl"), steps=20)
    with Workspace.open("edits") as ws:                          # the model loads on first use, checked
        ws.model.generate(...)                                   # (attach(ws.model, ws.db) to answer with the edits)
        ws.remove(["3f2a..."])

A model is loaded from local files only (never the hub): `model.json` may name only "default" or an
existing absolute directory whose files are all regular files, because a database directory is
shared and so untrusted. Every loaded model is checked against the database's fingerprint
(dimensions, type, layer and weights) before it is used with it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Optional

from ._files import write_text_atomically

DB_FILE = "neuraldb.sqlite"
MODEL_FILE = "model.json"
DEFAULT_MODEL = "default"
MODEL_FILE_LIMIT = 64 * 1024  # bytes; model.json holds one short JSON object


class WorkspaceError(ValueError):
    """A directory that is not a usable database directory, or a model that cannot be used with it;
    the message names the file and the cause."""


@dataclasses.dataclass(frozen=True)
class Removal:
    """What `Workspace.remove` did: the ids deleted, and the stored facts whose shared residual was
    recomputed without them (same subject; empty when none shared one)."""

    removed: tuple[str, ...]
    recomputed: tuple[str, ...]


# ------------------------------------------------------------------------------------- models


def _check_model_directory(path: Path, where: Optional[Path] = None) -> str:
    """str(path) if every entry under it, links followed, is a directory or a regular file: a link
    to a device such as /dev/zero would exhaust memory and a FIFO would hang the load. `where`:
    the model.json that named it, for the message."""
    prefix = f"{where}: " if where is not None else ""
    for root, directories, files in os.walk(path):
        for name in directories + files:
            entry = Path(root) / name
            try:
                mode = entry.stat().st_mode
            except OSError as error:
                raise WorkspaceError(f"{prefix}the model directory {path}: cannot read {entry.relative_to(path)} "
                                     f"({error.strerror})") from None
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise WorkspaceError(f"{prefix}the model directory {path} holds {entry.relative_to(path)}, which is "
                                     f"not a regular file (a device, FIFO or socket); refusing to load it")
    return str(path)


def model_spec(value: str | os.PathLike) -> str:
    """What a database directory records for a model the user names: "default", or the absolute
    path of a local model directory (a relative one is resolved against the current directory
    now). WorkspaceError for anything else (hub ids included: models load from disk only)."""
    if value == DEFAULT_MODEL:
        return DEFAULT_MODEL
    path = Path(value).expanduser()
    if not path.is_dir():
        raise WorkspaceError(f"the model must be 'default' or a local Hugging Face model directory; "
                             f"{value} is not a directory")
    return _check_model_directory(path.resolve())


def _recorded_spec(spec: str, where: Path) -> str:
    """The model spec read from `where` (a model.json) if it is "default" or an existing absolute
    directory of regular files; a relative path would depend on the current directory and a hub
    id on the network, so both are refused."""
    if spec == DEFAULT_MODEL:
        return spec
    if not os.path.isabs(spec):
        raise WorkspaceError(f"{where}: the model {spec!r} is neither 'default' nor an absolute path of a local "
                             f"model directory (hub ids and relative paths are refused)")
    if not os.path.isdir(spec):
        raise WorkspaceError(f"{where}: the model directory {spec} does not exist")
    return _check_model_directory(Path(spec), where)


def _read_model_file(directory: Path) -> str:
    """The model spec in DIR/model.json (a string; checked by `_recorded_spec` before a load), read
    without following the file into a device or a FIFO."""
    path = directory / MODEL_FILE
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opens at once instead of hanging
    except FileNotFoundError:
        raise WorkspaceError(f"{path} is missing; it names the database's model") from None
    with os.fdopen(descriptor, "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size > MODEL_FILE_LIMIT:
            raise WorkspaceError(f"{path} is not a small regular file; it must hold {{\"model\": ...}}")
        text = file.read(MODEL_FILE_LIMIT + 1)
    try:
        spec = json.loads(text.decode("utf-8"))["model"]
    except (ValueError, KeyError, TypeError, RecursionError):
        raise WorkspaceError(f"{path} is unreadable; it must hold {{\"model\": \"default\"}} or the absolute path "
                             f"of a model directory") from None
    if not isinstance(spec, str):
        raise WorkspaceError(f"{path}: 'model' must be a string, got {type(spec).__name__}")
    return spec


def load_model(spec: str, log: Optional[Callable[[str], None]] = None):
    """(model, tokenizer) in eval mode for a spec from `model_spec` (local files only);
    WorkspaceError naming the directory when it cannot be loaded. `log` hears what is loading."""
    say = log or (lambda line: None)
    if spec == DEFAULT_MODEL:
        from .integration import load_default_model

        say("loading the default model (SmolLM2-135M-Instruct) ...")
        return load_default_model()
    import pickle

    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    say(f"loading the model at {spec} ...")
    try:
        model = AutoModelForCausalLM.from_pretrained(spec, local_files_only=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(spec, local_files_only=True)
    except (OSError, ValueError, TypeError, RecursionError, MemoryError, pickle.UnpicklingError,
            SafetensorError) as error:
        cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise WorkspaceError(f"cannot load the model at {spec}: {cause}") from None
    return model, tokenizer


def _check_fits(db, model) -> None:
    """WorkspaceError unless `db` was built for `model` (dimensions, type, layer and weights)."""
    from .integration import model_fingerprint
    from .store import FingerprintMismatchWarning

    if db.layer is None:
        raise WorkspaceError(f"the database {db.path} has no edited layer recorded")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FingerprintMismatchWarning)
            db.check_fingerprint(model_fingerprint(model, db.layer))
    except (ValueError, FingerprintMismatchWarning) as error:
        raise WorkspaceError(f"the database {db.path} was built for another model: {error}") from None


def _recorded_hparams(db, fact_id: str) -> dict[str, Any]:
    """The editing hyperparameters a stored fact was computed with, less layer and gamma (the
    database's own); {} when none are recorded."""
    from .editing import EditHParams, EditRecord

    record = EditRecord.from_metadata(db.get(fact_id).metadata, fact_id)
    recorded = record.hparams if record is not None else None
    known = {field.name for field in dataclasses.fields(EditHParams)} - {"layer", "gamma"}
    return {name: value for name, value in (recorded or {}).items() if name in known}


# ---------------------------------------------------------------------------------- workspace


class Workspace:
    """A database directory: `db` (its NeuralDB, open), `model_spec` (what model.json names), and
    `model` / `tokenizer`, loaded on first use and checked against the database.

    Make one with `Workspace.create` or `Workspace.open`; close it (or use `with`) to close the
    database. `log` (a callable taking one line) hears the long steps: loading a model, starting an edit.
    """

    def __init__(self, directory: Path, db, spec: str, *, log: Optional[Callable[[str], None]] = None,
                 new: bool = False, made_directory: bool = False, model=None, tokenizer=None):
        self.directory = directory
        self.db = db
        self.model_spec = spec
        self._log = log or (lambda line: None)
        self._new = new  # created by this object: discarded again if a failure leaves it empty
        self._made_directory = made_directory
        self._model, self._tokenizer = model, tokenizer

    def __repr__(self) -> str:
        return f"Workspace({str(self.directory)!r}, model={self.model_spec!r}, facts={len(self.db)})"

    @staticmethod
    def exists(directory: str | os.PathLike) -> bool:
        """Whether `directory` holds a database (a file named neuraldb.sqlite)."""
        return (Path(directory) / DB_FILE).exists()

    @classmethod
    def create(cls, directory: str | os.PathLike, *, model: str | os.PathLike = DEFAULT_MODEL,
               layer: Optional[int] = None, gamma: Optional[float] = None,
               log: Optional[Callable[[str], None]] = None) -> "Workspace":
        """A new database directory for `model` ("default" or a local model directory) at `layer`
        with `gamma` (None: the model's preset). `directory` must not exist or be empty. The model
        is loaded (it sets the database's dimensions and fingerprint) before anything is written;
        a failure leaves nothing behind."""
        directory = Path(directory)
        if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
            raise WorkspaceError(f"{directory} exists and is not a neuraldb database directory (a new one needs "
                                 f"a new or empty directory)")
        from .editing import resolve_hparams
        from .integration import down_proj_dims, model_fingerprint
        from .store import NeuralDB

        spec = model_spec(model)
        loaded, tokenizer = load_model(spec, log)
        hparams = resolve_hparams(loaded, {"layer": layer, "gamma": gamma})
        d1, d2 = down_proj_dims(loaded, hparams.layer)
        made_directory = not directory.exists()
        directory.mkdir(parents=True, exist_ok=True)
        db = None
        try:
            db = NeuralDB(directory / DB_FILE, d1=d1, d2=d2, layer=hparams.layer, gamma=hparams.gamma,
                          fingerprint=model_fingerprint(loaded, hparams.layer))
            write_text_atomically(directory / MODEL_FILE, json.dumps({"model": spec}) + "\n")
        except BaseException:
            if db is not None:
                db.close()
            _remove_database_files(directory, made_directory)
            raise
        return cls(directory, db, spec, log=log, new=True, made_directory=made_directory, model=loaded,
                   tokenizer=tokenizer)

    @classmethod
    def open(cls, directory: str | os.PathLike, *, model: str | os.PathLike | None = None,
             for_reading: bool = False, log: Optional[Callable[[str], None]] = None) -> "Workspace":
        """The database directory at `directory`; the model loads on first use of `model`. A
        `model` given here must be the one recorded (checked before anything loads).
        for_reading: the caller only reads; where the database file or its directory cannot be
        written (a read-only mount, permissions) it is then opened read-only instead of failing
        (a writable one is opened as usual, so an older format is still migrated)."""
        from .store import NeuralDB

        directory = Path(directory)
        path = directory / DB_FILE
        if not path.is_file():
            raise WorkspaceError(f"{directory} is not a neuraldb database directory (no {DB_FILE})")
        spec = _read_model_file(directory)
        if model is not None and model_spec(model) != spec:
            raise WorkspaceError(f"{directory} was built with model {spec!r}, not {model_spec(model)!r}")
        readonly = for_reading and not (os.access(path, os.W_OK) and os.access(directory, os.W_OK))
        return cls(directory, NeuralDB.open(path, readonly=readonly), spec, log=log)

    @classmethod
    def import_(cls, export: str | os.PathLike, directory: str | os.PathLike, *,
                model: str | os.PathLike = DEFAULT_MODEL, log: Optional[Callable[[str], None]] = None) -> "Workspace":
        """A new database directory at `directory` (which must not exist) from an export written by
        `NeuralDB.export`, for `model` (loaded and checked against the export's fingerprint). It
        is built in a temporary directory beside `directory` and renamed into place, so a failure
        leaves nothing."""
        import tempfile

        from .store import NeuralDB

        directory = Path(directory)
        if directory.exists():
            raise WorkspaceError(f"{directory} already exists; import creates a new database directory")
        spec = model_spec(model)
        loaded, tokenizer = load_model(spec, log)
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
        try:
            with NeuralDB.import_(export, staging / DB_FILE) as db:
                _check_fits(db, loaded)
            write_text_atomically(staging / MODEL_FILE, json.dumps({"model": spec}) + "\n")
            staging.rename(directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return cls(directory, NeuralDB.open(directory / DB_FILE), spec, log=log, model=loaded, tokenizer=tokenizer)

    # ------------------------------------------------------------------------------ the model

    def _load(self) -> None:
        if self._model is None:
            model, tokenizer = load_model(_recorded_spec(self.model_spec, self.directory / MODEL_FILE), self._log)
            _check_fits(self.db, model)
            self._model, self._tokenizer = model, tokenizer

    @property
    def model(self):
        """The model the database was built for (loaded and checked on first use)."""
        self._load()
        return self._model

    def model_directory(self) -> Path:
        """The local Hugging Face model directory of the recorded model, for engines that load one
        (the default model's cache directory, built on first use); checked as a load is."""
        spec = _recorded_spec(self.model_spec, self.directory / MODEL_FILE)
        if spec == DEFAULT_MODEL:
            from .integration.default_model import default_model_directory

            return default_model_directory()
        return Path(spec)

    @property
    def tokenizer(self):
        """The model's tokenizer (loaded with the model)."""
        self._load()
        return self._tokenizer

    # ------------------------------------------------------------------------------- editing

    def editor(self, **hparams: Any):
        """An `Editor` writing to this database at its layer and gamma; `hparams` override the
        model's preset (see `EditHParams`; layer and gamma must match the database's)."""
        from .editing import Editor

        return Editor(self.model, self.tokenizer, db=self.db, **hparams)

    def edit(self, facts: Iterable[Any], *, on_error: str = "raise", progress: bool = True,
             callback: Optional[Callable[[list[str]], None]] = None, **hparams: Any):
        """`Editor.edit` on this database with `hparams` (the `EditReport`); the editor is detached
        afterwards, and `log` hears when the model is loaded and the edit starts. If this workspace
        was created here and a failure leaves it without a fact, the directory is removed again
        (nothing of the run is worth keeping) and the workspace closed."""
        facts = list(facts)
        try:
            with self.editor(**hparams) as editor:
                self._log(f"editing {len(facts)} fact(s) into layer {self.db.layer} of {self.directory} "
                          f"(model-written prefixes first, then batches of facts) ...")
                return editor.edit(facts, on_error=on_error, progress=progress, callback=callback)
        except BaseException:
            if self._new and len(self.db) == 0:
                self.db.close()
                _remove_database_files(self.directory, self._made_directory)
            raise

    def remove(self, ids: str | Sequence[str], *, missing_ok: bool = False) -> Removal:
        """Delete facts by id in one transaction (the store's checks: a missing id is a KeyError
        unless `missing_ok`). Stored facts that shared a removed fact's residual (same subject) are
        first recomputed without it, with the hyperparameters they were computed with; only then
        is the model loaded."""
        from .editing.editor import sharing_partners

        present = self.db.ids_to_delete(ids, missing_ok=missing_ok)
        partners = sharing_partners(self.db, present)
        if not partners:
            return Removal(removed=tuple(self.db.delete(present)), recomputed=())
        with self.editor(**_recorded_hparams(self.db, partners[0])) as editor:
            removed = editor.remove(present)
        return Removal(removed=tuple(removed), recomputed=tuple(partners))

    def calibrate(self, *, progress: bool = True):
        """Recompute the gate threshold of every stored fact's keys (`Editor.calibrate`, with the
        hyperparameters the first fact was computed with); returns its `Recalibration`."""
        recorded = _recorded_hparams(self.db, next(iter(self.db))) if len(self.db) else {}
        with self.editor(**recorded) as editor:
            self._log(f"calibrating the gate thresholds of {len(self.db)} fact(s) in {self.directory} ...")
            return editor.calibrate(progress=progress)

    # ------------------------------------------------------------------------------- closing

    def close(self) -> None:
        """Close the database (idempotent); the loaded model stays usable."""
        self.db.close()

    def __enter__(self) -> "Workspace":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _remove_database_files(directory: Path, made_directory: bool) -> None:
    """Undo a new database directory: the whole directory if it was made for it, else its files."""
    if made_directory:
        shutil.rmtree(directory, ignore_errors=True)
        return
    for name in (DB_FILE, f"{DB_FILE}-vectors", f"{DB_FILE}-wal", f"{DB_FILE}-shm", f"{DB_FILE}-journal", MODEL_FILE):
        (directory / name).unlink(missing_ok=True)
