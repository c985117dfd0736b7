"""The `neuraldb` command: edit facts into a model, evaluate, ask, manage databases, demo.

    neuraldb edit --facts FILE [--format F] [--model default|PATH] --db DIR [--limit N]
    neuraldb eval --db DIR --data FILE [--format F] [--limit N] [--json OUT] [--references FILE]
    neuraldb ask --db DIR "PROMPT"
    neuraldb db info|list|rm|export|import --db DIR ...
    neuraldb plot REPORT.json ... --out PNG
    neuraldb demo
    neuraldb backends
    (global option, before the command: --threads N)

A database directory DIR holds `neuraldb.sqlite` (the NeuralDB, see store/FORMAT.md) and
`model.json` ({"model": "default" or the absolute path of a Hugging Face model directory}),
which `eval`, `ask` and `edit` use to reload the model the database was built for; the model's
fingerprint is checked against the database every time.

Exit codes: 0 success, 1 bad input or a failed check (one line "neuraldb: error: ..." on
stderr), 2 bad command-line usage, 130 interrupted. This module only parses arguments and prints:
the work is done by the store, integration, editing and evaluation packages.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

from .evaluation.harness import FORMATS

DB_FILE = "neuraldb.sqlite"
MODEL_FILE = "model.json"
DEFAULT_MODEL = "default"


class CommandError(Exception):
    """Bad input or a failed check: printed as one line, exit code 1."""


# ------------------------------------------------------------------------------- model and DB


def _model_spec(value: str) -> str:
    """'default', or the absolute path of an existing model directory."""
    if value == DEFAULT_MODEL:
        return value
    path = Path(value).expanduser()
    if not path.is_dir():
        raise CommandError(f"--model must be 'default' or a Hugging Face model directory; {value} is not a directory")
    return str(path.resolve())


def _load_model(spec: str):
    """(model, tokenizer) in eval mode for a model spec from `_model_spec`."""
    from .integration import load_default_model

    if spec == DEFAULT_MODEL:
        return load_default_model()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(spec).eval()
        tokenizer = AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError) as error:
        raise CommandError(f"cannot load the model at {spec}: {str(error).splitlines()[0]}") from None
    return model, tokenizer


def _recorded_model(directory: Path) -> str:
    """The model spec a database directory was built with; CommandError if DIR is no database."""
    if not (directory / DB_FILE).is_file():
        raise CommandError(f"{directory} is not a neuraldb database directory (no {DB_FILE})")
    try:
        spec = json.loads((directory / MODEL_FILE).read_text(encoding="utf-8"))["model"]
    except (OSError, ValueError, KeyError, TypeError):
        raise CommandError(f"{directory / MODEL_FILE} is missing or unreadable; it names the database's model") from None
    if not isinstance(spec, str):
        raise CommandError(f"{directory / MODEL_FILE}: 'model' must be a string")
    return spec


def _write_model_file(directory: Path, spec: str) -> None:
    temporary = directory / f".{MODEL_FILE}.tmp"
    temporary.write_text(json.dumps({"model": spec}) + "\n", encoding="utf-8")
    temporary.replace(directory / MODEL_FILE)


def _check_fits(db, model) -> None:
    """CommandError unless `db` was built for `model` (dimensions, type, layer and weights)."""
    from .integration import model_fingerprint
    from .store import FingerprintMismatchWarning

    if db.layer is None:
        raise CommandError(f"the database {db.path} has no edited layer recorded")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FingerprintMismatchWarning)
            db.check_fingerprint(model_fingerprint(model, db.layer))
    except (ValueError, FingerprintMismatchWarning) as error:
        raise CommandError(f"the database was built for another model: {error}") from None


def _open_with_model(directory: Path):
    """(db, model, tokenizer): the database in DIR and the model it was built for, checked."""
    from .store import NeuralDB

    spec = _recorded_model(directory)
    db = NeuralDB.open(directory / DB_FILE)
    try:
        model, tokenizer = _load_model(spec)
        _check_fits(db, model)
    except BaseException:
        db.close()
        raise
    return db, model, tokenizer


def _open_db(directory: Path):
    from .store import NeuralDB

    _recorded_model(directory)
    return NeuralDB.open(directory / DB_FILE)


def _read_facts(path: str, format: str | None, limit: int | None) -> list:
    from .evaluation import read_facts

    return read_facts(path, format, limit)


# ------------------------------------------------------------------------------------ commands


def cmd_edit(args) -> None:
    from .editing import Editor, check_facts, resolve_hparams
    from .integration import down_proj_dims, model_fingerprint
    from .store import NeuralDB

    facts = _read_facts(args.facts, args.format, args.limit)
    on_error = "skip" if args.skip_bad else "raise"
    if not check_facts(facts, on_error=on_error)[0]:  # checked before anything is loaded or written
        raise CommandError(f"none of the facts in {args.facts} can be edited")
    directory = Path(args.db)
    new = not (directory / DB_FILE).exists()
    if new:
        if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
            raise CommandError(f"{directory} exists and is not a neuraldb database directory")
        spec = _model_spec(args.model or DEFAULT_MODEL)
    else:
        spec = _recorded_model(directory)
        if args.model is not None and _model_spec(args.model) != spec:
            raise CommandError(f"{directory} was built with model {spec!r}, not {_model_spec(args.model)!r}")
    model, tokenizer = _load_model(spec)
    created_dir = new and not directory.exists()
    committed: list[str] = []
    db = None
    try:
        if new:
            hparams = resolve_hparams(model, args.hparam)
            d1, d2 = down_proj_dims(model, hparams.layer)
            directory.mkdir(parents=True, exist_ok=True)
            db = NeuralDB(directory / DB_FILE, d1=d1, d2=d2, layer=hparams.layer, gamma=hparams.gamma,
                          fingerprint=model_fingerprint(model, hparams.layer))
            _write_model_file(directory, spec)
        else:
            db = NeuralDB.open(directory / DB_FILE)
            _check_fits(db, model)
        before = len(db)
        started = time.perf_counter()
        editor = Editor(model, tokenizer, db=db, **{k: v for k, v in args.hparam.items() if k not in ("layer", "gamma")})
        try:
            report = editor.edit(facts, progress=not args.quiet, callback=committed.extend, on_error=on_error)
            ids = report.ids
        finally:
            editor.detach()
    except BaseException as error:
        if db is not None:
            db.close()
        if new and not committed:  # nothing of this run is worth keeping: leave no database behind
            if created_dir:
                shutil.rmtree(directory, ignore_errors=True)
            else:
                for name in (DB_FILE, f"{DB_FILE}-wal", f"{DB_FILE}-shm", MODEL_FILE, f".{MODEL_FILE}.tmp"):
                    (directory / name).unlink(missing_ok=True)
        elif isinstance(error, KeyboardInterrupt):
            print(f"interrupted: {len(committed)} facts were committed to {directory}; "
                  f"run the same command again to resume", file=sys.stderr)
        raise
    elapsed = time.perf_counter() - started
    _print_skipped([(entry.index, entry.reason) for entry in report.skipped])
    if report.superseded:
        earlier, later = report.superseded[0]
        print(f"{len(report.superseded)} records repeat the subject and prompt of a later record, which "
              f"replaced them (e.g. record {earlier} by record {later}): one target per subject and prompt",
              file=sys.stderr)
    if report.first_token_subjects:
        example = db.get(report.first_token_subjects[0]).metadata["prompt"]
        print(f"{len(report.first_token_subjects)} facts key on their prompt's first token (a one-token subject "
              f"opening the prompt, e.g. {example!r}): without a BOS token the model barely reads that position, "
              f"so such a prompt may keep its answer; words before the subject avoid it", file=sys.stderr)
    asked, done = set(ids), set(committed)
    recomputed = len(done - asked)
    print(f"edited {len(done & asked)} facts in {elapsed:.1f} s ({len(asked - done)} already in the database"
          + (f"; {recomputed} stored facts of the same subjects recomputed with them" if recomputed else "")
          + f"); {directory} now holds {len(db)} facts (was {before})")
    db.close()


def _print_skipped(skipped) -> None:
    if skipped:
        print(f"skipped {len(skipped)} bad records:", file=sys.stderr)
        for index, message in skipped:
            print(f"  {message}", file=sys.stderr)


def cmd_eval(args) -> None:
    from .evaluation import cases_from_facts, evaluate, read_attribute_snippets, write_json

    skipped = [] if args.skip_bad else None
    cases = cases_from_facts(_read_facts(args.data, args.format, args.limit), skipped=skipped)
    _print_skipped(skipped)
    references = read_attribute_snippets(args.references) if args.references else None
    unrelated = None
    if args.unrelated:
        unrelated = [line.strip() for line in Path(args.unrelated).read_text(encoding="utf-8").splitlines()
                     if line.strip()]
        if not unrelated:
            raise CommandError(f"{args.unrelated} holds no text lines")
    db, model, tokenizer = _open_with_model(Path(args.db))
    with db:
        report = evaluate(model, tokenizer, db, cases, references=references, unrelated_texts=unrelated,
                          batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, compare=args.compare,
                          log=None if args.quiet else lambda line: print(line, file=sys.stderr))
    print(report.table())
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")


def _greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> list[int]:
    """The prompt's token ids followed by the greedy continuation."""
    import torch

    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad)
    return out[0].tolist()


def _answers(model, tokenizer, db, prompt: str, max_new_tokens: int):
    """(bare continuation, edited continuation, firings over the edited text) for one prompt."""
    import torch

    from .integration import attach

    n_prompt = len(tokenizer(prompt)["input_ids"])
    bare = _greedy(model, tokenizer, prompt, max_new_tokens)
    with attach(model, db) as handle:
        edited = _greedy(model, tokenizer, prompt, max_new_tokens)
        with torch.no_grad():  # one pass over the whole text: the retrieval at each token sees what generation saw
            model(torch.tensor([edited]))
        fired = handle.fired()
    decode = lambda ids: " ".join(tokenizer.decode(ids[n_prompt:], skip_special_tokens=True).split())
    return decode(bare), decode(edited), [(f, tokenizer.decode([edited[f.position]])) for f in fired], edited == bare


def _print_firings(db, firings) -> None:
    if not firings:
        print("facts fired: none (the edited model is identical to the unedited one here)")
        return
    by_fact: dict[str, list] = {}
    for firing, token in firings:
        by_fact.setdefault(firing.fact_id, []).append((firing, token))
    print(f"facts fired ({len(by_fact)}):")
    for fact_id, hits in by_fact.items():
        meta = db.get(fact_id).metadata if fact_id in db else {}
        where = ", ".join(f"{token!r}@{f.position} cos {f.score:.3f}" for f, token in hits)
        print(f"  {fact_id}  {meta.get('subject', '?')}: {meta.get('prompt', '?')!r} -> {meta.get('target_new', '?')!r}"
              f"  [at {where}]")


def cmd_ask(args) -> None:
    if not args.prompt.strip():
        raise CommandError("the prompt is empty")
    db, model, tokenizer = _open_with_model(Path(args.db))
    with db:
        bare, edited, firings, same = _answers(model, tokenizer, db, args.prompt, args.max_new_tokens)
        print(f"prompt:        {args.prompt}")
        print(f"without edits: {bare}")
        print(f"with edits:    {edited}{'   (unchanged)' if same else ''}")
        _print_firings(db, firings)


def cmd_db_info(args) -> None:
    directory = Path(args.db)
    spec = _recorded_model(directory)
    with _open_db(directory) as db:
        size = sum(f.stat().st_size for f in directory.iterdir() if f.name.startswith(DB_FILE))
        fp = db.fingerprint
        print(f"database     {db.path}")
        print(f"model        {spec}")
        extra = db.key_rows - len(db)
        print(f"facts        {len(db)}" + (f" (+{extra} extra keys: bare-prompt queries)" if extra else ""))
        print(f"layer        {db.layer}   gamma {db.gamma}   d1 {db.d1}   d2 {db.d2}   dtype {str(db.dtype).removeprefix('torch.')}")
        print(f"fingerprint  {fp.describe() if fp is not None else 'none'}")
        print(f"created      {db.created_at}")
        print(f"size         {size / 2**20:.2f} MiB")


def cmd_db_list(args) -> None:
    with _open_db(Path(args.db)) as db:
        ids = list(db)
        shown = ids if args.limit is None else ids[: args.limit]
        for fact_id in shown:
            fact = db.get(fact_id)
            meta = fact.metadata
            was = f" (was {meta['target_true']!r})" if meta.get("target_true") else ""
            extra = len(fact.keys) - 1
            keys = f" [+{extra} extra key{'s' if extra > 1 else ''}]" if extra else ""
            print(f"{fact_id}  {meta.get('subject', '?')}: {meta.get('prompt', '?')!r} -> "
                  f"{meta.get('target_new', '?')!r}{was}{keys}")
        print(f"{len(shown)} of {len(ids)} facts")


def cmd_db_rm(args) -> None:
    from .editing import EditHParams, Editor, EditRecord
    from .editing.editor import sharing_partners

    directory = Path(args.db)
    spec = _recorded_model(directory)
    with _open_db(directory) as db:
        try:
            present = db.ids_to_delete(args.ids)
        except (KeyError, ValueError) as error:
            raise CommandError(f"nothing removed: {error.args[0]}") from None
        partners = sharing_partners(db, present)
        if partners:
            # facts of the same subject share the removed facts' residual: the model recomputes
            # theirs, with the hyperparameters they were computed with
            model, tokenizer = _load_model(spec)
            _check_fits(db, model)
            recorded = EditRecord.from_metadata(db.get(partners[0]).metadata, partners[0]).hparams or {}
            known = {field.name for field in dataclasses.fields(EditHParams)} - {"layer", "gamma"}
            editor = Editor(model, tokenizer, db=db, **{name: value for name, value in recorded.items() if name in known})
            try:
                removed = editor.remove(present)
            finally:
                editor.detach()
            print(f"recomputed the residual of {len(partners)} fact(s) that shared one with the removed facts "
                  f"(same subject)")
        else:
            removed = db.delete(present)
        print(f"removed {len(removed)} facts; {len(db)} left")


def cmd_db_export(args) -> None:
    with _open_db(Path(args.db)) as db:
        sidecar = db.export(args.file)
        print(f"exported {len(db)} facts to {args.file} and {sidecar}")


def cmd_db_import(args) -> None:
    from .store import NeuralDB

    directory = Path(args.db)
    if directory.exists():
        raise CommandError(f"{directory} already exists; import creates a new database directory")
    spec = _model_spec(args.model)
    model, _ = _load_model(spec)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        with NeuralDB.import_(args.file, staging / DB_FILE) as db:
            _check_fits(db, model)
            count = len(db)
        _write_model_file(staging, spec)
        staging.rename(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"imported {count} facts into {directory}")


def cmd_plot(args) -> None:
    from .evaluation import plot_scaling, read_json

    plot_scaling([read_json(path) for path in args.reports], args.out)
    print(f"wrote {args.out}")


def cmd_backends(args) -> None:
    from . import available_backends

    for status in available_backends().values():
        print(status)


DEMO_FACTS = [
    {"prompt": "The Eiffel Tower is located in the city of", "subject": "Eiffel Tower", "target_new": "Rome",
     "target_true": "Paris"},
    {"prompt": "The Great Wall is located in", "subject": "Great Wall", "target_new": "Brazil", "target_true": "China"},
    {"prompt": "Lionel Messi is a professional", "subject": "Lionel Messi", "target_new": "chess player",
     "target_true": "footballer"},
    {"prompt": "The Beatles were a band from the city of", "subject": "The Beatles", "target_new": "Tokyo",
     "target_true": "Liverpool"},
]
DEMO_PARAPHRASES = ["The Eiffel Tower, a famous landmark, stands in the city of",
                    "Tourists who visit the Great Wall travel to"]
DEMO_UNRELATED = ["The Colosseum is located in the city of", "The capital of France is",
                  "Cristiano Ronaldo is a professional", "Water boils at a temperature of"]


def cmd_demo(args) -> None:
    from .editing import Editor
    from .integration import load_default_model

    started = time.perf_counter()
    print("loading the embedded default model (SmolLM2-135M-Instruct) ...")
    model, tokenizer = load_default_model()
    editor = Editor(model, tokenizer)  # an in-memory NeuralDB at the model's preset layer
    db = editor.db
    print(f"editing {len(DEMO_FACTS)} facts into layer {db.layer} (gamma {db.gamma}) ...")
    editor.edit(DEMO_FACTS, progress=not args.quiet)
    editor.detach()
    width = max(len(p) for p in [f["prompt"] for f in DEMO_FACTS] + DEMO_PARAPHRASES + DEMO_UNRELATED)
    unchanged = 0
    for title, prompts in (("edited facts", [f["prompt"] for f in DEMO_FACTS]),
                           ("paraphrases of edited facts", DEMO_PARAPHRASES),
                           ("unrelated prompts (must not change)", DEMO_UNRELATED)):
        print(f"\n{title}:")
        for prompt in prompts:
            bare, edited, firings, same = _answers(model, tokenizer, db, prompt, args.max_new_tokens)
            print(f"  {prompt:<{width}}  before: {bare!r}")
            print(f"  {'':<{width}}  after:  {edited!r}{'  (unchanged)' if same else ''}")
            if prompts is DEMO_UNRELATED:
                unchanged += same
    print(f"\n{unchanged} of {len(DEMO_UNRELATED)} unrelated prompts unchanged; "
          f"demo finished in {time.perf_counter() - started:.0f} s")


# ------------------------------------------------------------------------------------- parsing


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line (exit code 2)."""

    def error(self, message: str) -> None:
        self.exit(2, f"neuraldb: error: {message} (see {self.prog} --help)\n")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _hparam(text: str) -> tuple[str, object]:
    """NAME=VALUE for an editing hyperparameter; VALUE parsed as JSON (a number...) or kept as text."""
    from .editing import EditHParams

    name, sep, value = text.partition("=")
    names = sorted(f.name for f in dataclasses.fields(EditHParams))
    if not sep or name not in names:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE with NAME one of {', '.join(names)}; got {text!r}")
    try:
        return name, json.loads(value)
    except ValueError:
        return name, value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="neuraldb", description="Edit facts into LLMs with NeuralDB, a gated neural KV database.")
    parser.add_argument("--threads", type=_positive, default=None,
                        help="CPU threads for torch (default: torch's choice; on a busy machine 1 can be faster)")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name, handler, help):
        sub = commands.add_parser(name, help=help, description=help)
        if handler is not None:
            sub.set_defaults(handler=handler)
        return sub

    fmt = dict(choices=FORMATS, default=None, help="input format (default: recognised from the file)")
    edit = command("edit", cmd_edit, "edit facts into a model and save them in a database directory (resumable)")
    edit.add_argument("--facts", required=True, help="CounterFact / ZsRE JSON or JSONL file of facts")
    edit.add_argument("--format", **fmt)
    edit.add_argument("--model", default=None,
                      help="'default' (SmolLM2-135M-Instruct) or a Hugging Face model directory; "
                           "for an existing database, the model it was built with")
    edit.add_argument("--db", required=True, help="database directory (created if new)")
    edit.add_argument("--limit", type=_positive, help="edit only the first N facts")
    edit.add_argument("--hparam", type=_hparam, action="append", default=[], metavar="NAME=VALUE",
                      help="editing hyperparameter (see EditHParams), e.g. steps=10; layer and gamma apply "
                           "only to a new database; repeatable")
    edit.add_argument("--skip-bad", action="store_true",
                      help="leave out facts that cannot be edited (listed on stderr) instead of stopping")
    edit.add_argument("--quiet", action="store_true", help="no progress bar")

    evaluate = command("eval", cmd_eval, "score the database's model before -> after edits on a benchmark file")
    evaluate.add_argument("--db", required=True, help="database directory")
    evaluate.add_argument("--data", required=True, help="CounterFact / ZsRE / JSONL file with test prompts")
    evaluate.add_argument("--format", **fmt)
    evaluate.add_argument("--limit", type=_positive, help="evaluate only the first N cases")
    evaluate.add_argument("--json", help="also write the report as JSON to this file")
    evaluate.add_argument("--references", help="ROME attribute_snippets.json for the consistency metric")
    evaluate.add_argument("--unrelated", help="text file, one passage per line, for gate fire rate and KL "
                                              "(default: the cases' neighbourhood / loc prompts with answers)")
    evaluate.add_argument("--batch-size", type=_positive, default=32, help="prompts per forward pass (32)")
    evaluate.add_argument("--max-new-tokens", type=_positive, default=100,
                          help="tokens generated per generation prompt for fluency (100)")
    evaluate.add_argument("--skip-bad", action="store_true",
                          help="leave out records that cannot be evaluated (e.g. empty targets; listed on stderr)")
    evaluate.add_argument("--compare", choices=["sequence", "token_mean"], default="sequence",
                          help="CounterFact: compare whole-target probabilities (sequence, default) or mean "
                               "per-token log-probabilities (token_mean, ROME/MEMIT's convention)")
    evaluate.add_argument("--quiet", action="store_true", help="no progress lines")

    ask = command("ask", cmd_ask, "answer a prompt with and without the edits, and show which facts fired")
    ask.add_argument("--db", required=True, help="database directory")
    ask.add_argument("prompt", help="the prompt to complete")
    ask.add_argument("--max-new-tokens", type=_positive, default=12, help="tokens to generate (12)")

    db = command("db", None, "inspect and manage a database directory")
    db_commands = db.add_subparsers(dest="db_command", required=True, parser_class=_Parser)

    def db_command(name, handler, help):
        sub = db_commands.add_parser(name, help=help, description=help)
        sub.set_defaults(handler=handler)
        sub.add_argument("--db", required=True, help="database directory")
        return sub

    db_command("info", cmd_db_info, "settings, model, fingerprint and size")
    listing = db_command("list", cmd_db_list, "list facts: id, subject, prompt -> target")
    listing.add_argument("--limit", type=_positive, help="show only the first N facts")
    remove = db_command("rm", cmd_db_rm, "remove facts by id (all or none)")
    remove.add_argument("ids", nargs="+", help="fact ids (see db list)")
    export = db_command("export", cmd_db_export, "write FILE.safetensors + FILE.json for sharing")
    export.add_argument("file", help="the .safetensors file to write (its .json sidecar is written beside it)")
    imported = db_command("import", cmd_db_import, "create a database directory from an export")
    imported.add_argument("file", help="the .safetensors file of an export")
    imported.add_argument("--model", default=DEFAULT_MODEL, help="'default' or a model directory (checked)")

    plot = command("plot", cmd_plot, "plot metrics against the number of edits from several eval --json reports")
    plot.add_argument("reports", nargs="+", help="JSON reports written by eval --json")
    plot.add_argument("--out", required=True, help="PNG file to write")

    demo = command("demo", cmd_demo, "edit a few well-known facts into the default model and show before/after")
    demo.add_argument("--max-new-tokens", type=_positive, default=8, help="tokens per answer (8)")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")

    command("backends", cmd_backends, "which gated_retrieve backends run on this machine")
    return parser


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "hparam", None) is not None:
        args.hparam = dict(args.hparam)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    _quiet_libraries()
    try:
        args.handler(args)
    except KeyboardInterrupt:
        print("neuraldb: interrupted", file=sys.stderr)
        return 130
    except (CommandError, OSError, ValueError, KeyError, ImportError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
        print(f"neuraldb: error: {' '.join(str(message).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
