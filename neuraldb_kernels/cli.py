"""The `neuraldb` command: edit facts into a model, evaluate, ask, manage databases, demo.

    neuraldb edit --facts FILE [--format F] [--model default|PATH] --db DIR [--limit N]
    neuraldb eval --db DIR --data FILE [--format F] [--limit N] [--json OUT] [--references FILE]
                  [--general [--general-data DIR] [--general-limit N]] [--key-format int8]
    neuraldb compare --data FILE --sizes 100,1000 --json OUT [--methods neuraldb,memit,alphaedit] [--plot PNG]
    neuraldb ask --db DIR "PROMPT" [--key-format int8]
    neuraldb serve --db DIR [--host 127.0.0.1] [--port 8000]   (vLLM's OpenAI server; needs the vllm extra)
    neuraldb db info|list|rm|check|export|import --db DIR ...
    neuraldb db split --db DIR|FILE --shards N --out DIR;  neuraldb db merge --manifest FILE --out FILE
    neuraldb plot REPORT.json ... --out PNG        (eval --json reports, or compare --json runs)
    neuraldb demo [--key-format int8]
    neuraldb backends
    (global option, before the command: --threads N)

A database directory DIR is a `Workspace` (workspace.py): `neuraldb.sqlite` (the NeuralDB, see
store/FORMAT.md) and `model.json` naming the model it was built for ("default" or the absolute
path of a local Hugging Face model directory), which `eval`, `ask` and `edit` reload, checked
against the database's fingerprint every time.

Exit codes: 0 success, 1 bad input or a failed check (one line "neuraldb: error: ..." naming the
file and the cause, on stderr), 2 bad command-line usage, 130 interrupted. This module only parses
arguments and prints: the work is done by the workspace, store, editing and evaluation packages.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from .editing.readers import FORMATS, JSONL_EXAMPLE, read_facts
from .workspace import DB_FILE, DEFAULT_MODEL, Workspace

MAX_THREADS = 1024
MAX_ERROR_CHARS = 2000  # an error quoting a huge input (a 20 MB subject) is cut to this


class CommandError(Exception):
    """Bad input or a failed check: printed as one line, exit code 1."""


def _count(n: int, noun: str) -> str:
    """'1 fact', '2 facts'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _progress_line(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _print_skipped(messages) -> None:
    if messages:
        print(f"skipped {_count(len(messages), 'bad record')}:", file=sys.stderr)
        for message in messages:
            print(f"  {message}", file=sys.stderr)


# ------------------------------------------------------------------------------------ commands


def cmd_edit(args) -> None:
    from .editing import check_facts

    facts = read_facts(args.facts, args.format, args.limit)
    on_error = "skip" if args.skip_bad else "raise"
    if not check_facts(facts, on_error=on_error)[0]:  # checked before anything is loaded or written
        raise CommandError(f"none of the facts in {args.facts} can be edited")
    log = None if args.quiet else _progress_line
    hparams = dict(args.hparam)
    layer, gamma = hparams.pop("layer", None), hparams.pop("gamma", None)  # they apply to a new database only
    if Workspace.exists(args.db):
        workspace = Workspace.open(args.db, model=args.model, log=log)
    else:
        workspace = Workspace.create(args.db, model=args.model or DEFAULT_MODEL, layer=layer, gamma=gamma, log=log)
    committed: list[str] = []
    with workspace:
        before = len(workspace.db)
        try:
            report = workspace.edit(facts, on_error=on_error, progress=not args.quiet, callback=committed.extend,
                                    **hparams)
        except KeyboardInterrupt:
            if Workspace.exists(args.db):  # a new directory with nothing committed is gone again
                print(f"interrupted: {_count(len(committed), 'fact')} committed to {args.db}; "
                      f"run the same command again to resume", file=sys.stderr)
            raise
        print_edit_report(report, workspace.db, args.db, before)


def print_edit_report(report, db, directory, before: int) -> None:
    """The summary of one edit: skipped, superseded and first-token facts on stderr (what the user
    may want to fix), the counts on stdout. `report`: the Editor's EditReport; `db` the database
    edited, which held `before` facts."""
    _print_skipped([skipped.reason for skipped in report.skipped])  # each reason names the fact and its id
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
    given, already = set(report.ids), set(report.already_stored)
    companions = len(report.companions)
    print(f"edited {_count(len(given - already), 'fact')} in {report.seconds['total']:.1f} s "
          f"({len(already)} already in the database"
          + (f"; {companions} stored facts of the same subjects recomputed with them" if companions else "")
          + f"); {directory} now holds {_count(len(db), 'fact')} (was {before})")


def _general_data(args) -> Path | None:
    """The general-data folder for --general: --general-data, else the shipped one; None without
    --general. CommandError when neither exists."""
    from .evaluation.harness import default_general_data

    if not args.general:
        return None
    if args.general_data is not None:
        if not Path(args.general_data).is_dir():
            raise CommandError(f"--general-data {args.general_data} is not a directory")
        return Path(args.general_data)
    found = default_general_data()
    if found is None:
        raise CommandError("--general needs the six tasks' data: no ../shared/data/general beside the package "
                           "checkout, so give --general-data DIR")
    return found


def cmd_eval(args) -> None:
    from .evaluation import cases_from_facts, evaluate, read_attribute_snippets, write_json

    general_data = _general_data(args)
    skipped = [] if args.skip_bad else None
    cases = cases_from_facts(read_facts(args.data, args.format, args.limit), skipped=skipped)
    _print_skipped([message for _, message in skipped or ()])
    references = read_attribute_snippets(args.references) if args.references else None
    unrelated = None
    if args.unrelated:
        unrelated = [line.strip() for line in Path(args.unrelated).read_text(encoding="utf-8").splitlines()
                     if line.strip()]
        if not unrelated:
            raise CommandError(f"{args.unrelated} holds no text lines")
    with Workspace.open(args.db, for_reading=True) as workspace:
        report = evaluate(workspace.model, workspace.tokenizer, workspace.db, cases, references=references,
                          attach_options=_attach_options(args), unrelated_texts=unrelated, batch_size=args.batch_size,
                          max_new_tokens=args.max_new_tokens, compare=args.compare, general_data=general_data,
                          general_limit=args.general_limit, general_seed=args.general_seed,
                          log=None if args.quiet else _progress_line)
    print(report.table())
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")


def cmd_compare(args) -> None:
    from .editing import resolve_hparams
    from .evaluation.compare import (BaselineSettings, compare_methods, plot_comparison, preserved_key_statistics,
                                     scored_lambada_passages, write_comparison)
    from .evaluation.harness import default_general_data
    from .workspace import load_model, model_spec

    if args.plot:
        try:
            import matplotlib  # noqa: F401  (checked before the long run, not after it)
        except ImportError:
            raise CommandError("--plot needs matplotlib: pip install matplotlib") from None
    general_data = _general_data(args)
    k0_data = Path(args.general_data) if args.general_data else default_general_data()
    facts = read_facts(args.data, args.format, max(args.sizes))
    if len(facts) < max(args.sizes):
        raise CommandError(f"size {max(args.sizes)} needs {max(args.sizes)} facts but only {len(facts)} were given "
                           f"in {args.data}")
    log = None if args.quiet else _progress_line
    model, tokenizer = load_model(model_spec(args.model), log)
    hparams = dict(args.hparam)
    layer = resolve_hparams(model, {"layer": hparams.pop("layer", None), "gamma": hparams.get("gamma")}).layer
    exclude = (scored_lambada_passages(general_data, args.general_limit, args.general_seed)
               if general_data is not None else [])
    if log:
        texts = f"model-written text and {k0_data}" if k0_data else "model-written text only"
        log(f"collecting K0 statistics at layer {layer} ({texts}) ...")
    cache = args.k0_cache or Path(args.json).with_name(Path(args.json).name + ".k0.safetensors")
    statistics, seconds = preserved_key_statistics(model, tokenizer, layer, k0_data, exclude=exclude,
                                                   max_tokens=args.k0_tokens, cache=cache)
    settings = BaselineSettings(memit_weight=args.memit_weight, alphaedit_regularisation=args.alphaedit_lambda,
                                alphaedit_threshold=args.alphaedit_threshold)
    comparison = compare_methods(model, tokenizer, facts, args.sizes, statistics=statistics,
                                 statistics_seconds=seconds, methods=args.methods, settings=settings,
                                 general_data=general_data, general_limit=args.general_limit,
                                 general_seed=args.general_seed, batch_size=args.batch_size, edit_hparams=hparams,
                                 databases=args.databases, log=log)
    print(comparison.table())
    write_comparison(comparison, args.json)
    print(f"wrote {args.json}")
    if args.plot:
        plot_comparison(comparison, args.plot)
        print(f"wrote {args.plot}")


def _greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> list[int]:
    """The prompt's token ids followed by the greedy continuation."""
    import torch

    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad)
    return out[0].tolist()


def _attach_options(args) -> dict:
    """The `attach` options the command line chose: the key format of the retrieval, if given."""
    return {} if args.key_format is None else {"key_format": args.key_format}


def _answers(model, tokenizer, db, prompt: str, max_new_tokens: int, attach_options: dict):
    """(bare continuation, edited continuation, firings over the edited text) for one prompt, the
    database attached with `attach_options`."""
    import torch

    from .integration import attach

    n_prompt = len(tokenizer(prompt)["input_ids"])
    bare = _greedy(model, tokenizer, prompt, max_new_tokens)
    with attach(model, db, **attach_options) as handle:
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
    with Workspace.open(args.db, for_reading=True) as workspace:
        bare, edited, firings, same = _answers(workspace.model, workspace.tokenizer, workspace.db, args.prompt,
                                               args.max_new_tokens, _attach_options(args))
        print(f"prompt:        {args.prompt}")
        print(f"without edits: {bare}")
        print(f"with edits:    {edited}{'   (unchanged)' if same else ''}")
        _print_firings(workspace.db, firings)


def cmd_serve(args) -> None:
    from .serving import serve_command
    from .serving.launch import serve

    command = serve_command(args.db, host=args.host, port=args.port, gamma=args.gamma, backend=args.backend,
                            served_model_name=args.served_model_name, compile=args.compile,
                            vllm_args=args.vllm_arg)
    with Workspace.open(args.db, for_reading=True) as workspace:
        facts = len(workspace.db)
    print(f"serving {args.db} ({_count(facts, 'fact')}) at http://{args.host}:{args.port}/v1 with vLLM; facts that "
          f"neuraldb edit / db rm commit to {args.db} apply to requests submitted afterwards", file=sys.stderr)
    print(" ".join(command), file=sys.stderr, flush=True)
    serve(command)


def cmd_db_info(args) -> None:
    with Workspace.open(args.db, for_reading=True) as workspace:
        db = workspace.db
        size = sum(f.stat().st_size for f in workspace.directory.iterdir() if f.name.startswith(DB_FILE))
        fp = db.fingerprint
        print(f"database     {db.path}")
        print(f"model        {workspace.model_spec}")
        extra = db.key_rows - len(db)
        print(f"facts        {len(db)}" + (f" (+{extra} extra keys: bare-prompt queries)" if extra else ""))
        print(f"layer        {db.layer}   gamma {db.gamma}   d1 {db.d1}   d2 {db.d2}   dtype {str(db.dtype).removeprefix('torch.')}")
        print(f"fingerprint  {fp.describe() if fp is not None else 'none'}")
        print(f"created      {db.created_at}")
        print(f"size         {size / 2**20:.2f} MiB")


def cmd_db_list(args) -> None:
    with Workspace.open(args.db, for_reading=True) as workspace:
        db = workspace.db
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
        print(f"{len(shown)} of {_count(len(ids), 'fact')}")


def cmd_db_rm(args) -> None:
    with Workspace.open(args.db) as workspace:
        try:
            present = workspace.db.ids_to_delete(args.ids, missing_ok=True)  # the store's checks
        except ValueError as error:
            raise CommandError(f"nothing removed: {error}") from None
        missing = [fact_id for fact_id in args.ids if fact_id not in present]
        if missing and not args.missing_ok:
            raise CommandError(f"nothing removed: {_count(len(missing), 'id')} not in {args.db}, e.g. {missing[0]!r} "
                               f"(see neuraldb db list; --missing-ok removes the others)")
        removal = workspace.remove(present)
        if removal.recomputed:
            print(f"recomputed the residual of {len(removal.recomputed)} fact(s) that shared one with the removed "
                  f"facts (same subject)")
        print(f"removed {_count(len(removal.removed), 'fact')}; {len(workspace.db)} left")


def cmd_db_check(args) -> None:
    with Workspace.open(args.db, for_reading=True) as workspace:
        report = workspace.db.verify()
        if not report.ok:
            raise CommandError(f"{workspace.db.path}: {_count(len(report.corrupt), 'fact')} of {report.checked} "
                               f"fail their integrity checks, e.g. {report.corrupt[0]!r}; all of them: "
                               f"{', '.join(report.corrupt)}")
        print(f"{workspace.db.path}: all {_count(report.checked, 'fact')} intact (checksums, sizes, values)")


def cmd_db_calibrate(args) -> None:
    with Workspace.open(args.db, log=None if args.quiet else _progress_line) as workspace:
        result = workspace.calibrate(progress=not args.quiet)
    print(f"calibrated the gate thresholds of {_count(result.facts, 'fact')} ({result.keys} keys) in "
          f"{result.seconds:.1f} s: {len(result.changed)} changed; mean threshold {result.mean_before:.4f} -> "
          f"{result.mean_after:.4f}")
    if result.conflicts:
        print(f"{_count(len(result.conflicts), 'fact')} with a key that text or other facts would pass but that "
              f"its own contexts need lower (kept firing on its contexts), e.g. {result.conflicts[0]!r}")
    if result.skipped:
        print(f"{_count(len(result.skipped), 'fact')} left as they were (not written by the editor, or no longer "
              f"tokenising), e.g. {result.skipped[0]!r}")


def cmd_db_export(args) -> None:
    with Workspace.open(args.db, for_reading=True) as workspace:
        sidecar = workspace.db.export(args.file)
        print(f"exported {_count(len(workspace.db), 'fact')} to {args.file} and {sidecar}")


def cmd_db_import(args) -> None:
    with Workspace.import_(args.file, args.db, model=args.model) as workspace:
        print(f"imported {_count(len(workspace.db), 'fact')} into {args.db}")


def cmd_db_split(args) -> None:
    from .distributed import split_database

    source = Path(args.db) / DB_FILE if Path(args.db).is_dir() else Path(args.db)
    report = split_database(source, args.shards, args.out)
    counts = ", ".join(str(count) for count in report.facts_per_shard)
    print(f"split {_count(sum(report.facts_per_shard), 'fact')} of {source} into {_count(args.shards, 'shard')} "
          f"({counts}); manifest {report.manifest.path}")


def cmd_db_merge(args) -> None:
    from .distributed import merge_shards

    report = merge_shards(args.manifest, args.out)
    print(f"merged {_count(sum(report.facts_per_shard), 'fact')} from {_count(len(report.facts_per_shard), 'shard')} "
          f"into {report.path}")


def cmd_plot(args) -> None:
    from .evaluation import merge_comparisons, plot_comparison, plot_scaling, read_comparison, read_json
    from .evaluation.report import load_json_file

    kinds = {path: "comparison" if isinstance(data := load_json_file(path), dict) and "sizes" in data else "report"
             for path in args.reports}
    if len(set(kinds.values())) > 1:
        raise CommandError("plot takes either `eval --json` reports or `compare --json` comparisons, not both: "
                           + ", ".join(f"{path} is a {kind}" for path, kind in kinds.items()))
    if "comparison" in kinds.values():
        plot_comparison(merge_comparisons([read_comparison(path) for path in args.reports]), args.out)
    else:
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
    with Editor(model, tokenizer) as editor:  # an in-memory NeuralDB at the model's preset layer
        db = editor.db
        print(f"editing {len(DEMO_FACTS)} facts into layer {db.layer} (gamma {db.gamma}) ...")
        editor.edit(DEMO_FACTS, progress=not args.quiet)
    width = max(len(p) for p in [f["prompt"] for f in DEMO_FACTS] + DEMO_PARAPHRASES + DEMO_UNRELATED)
    unchanged = 0
    for title, prompts in (("edited facts", [f["prompt"] for f in DEMO_FACTS]),
                           ("paraphrases of edited facts", DEMO_PARAPHRASES),
                           ("unrelated prompts (must not change)", DEMO_UNRELATED)):
        print(f"\n{title}:")
        for prompt in prompts:
            bare, edited, firings, same = _answers(model, tokenizer, db, prompt, args.max_new_tokens,
                                                   _attach_options(args))
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


def _threads(text: str) -> int:
    value = _positive(text)
    if value > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_THREADS} threads, got {text}")
    return value


def _port(text: str) -> int:
    value = _positive(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 1..65535, got {text}")
    return value


def _float_where(text: str, accepts, expected: str) -> float:
    """`text` as a float that `accepts(value)`; else an argparse error "expected <expected>"."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")  # accepted by no range check
    if not accepts(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def _gamma(text: str) -> float:
    return _float_where(text, lambda value: -1 <= value <= 1, "a gate threshold in [-1, 1]")


def _key_format(text: str) -> str:
    from .ops.key_index import FORMATS  # imported only when the option is given: it loads torch

    if text not in FORMATS:
        raise argparse.ArgumentTypeError(f"expected a key format, one of {', '.join(FORMATS)}; got {text!r}")
    return text


def _key_format_option(sub) -> None:
    sub.add_argument("--key-format", type=_key_format, default=None, metavar="FORMAT",
                     help="retrieve through compressed key codes: int8 (or fp8_e4m3 on CUDA GPUs with fp8), "
                          "rescored exactly, so the answers are the same with ~4x fewer key bytes per token "
                          "(README, Key formats); default: full-precision keys")


def _positive_list(text: str) -> list[int]:
    """"100,1000" -> [100, 1000]."""
    return [_positive(part.strip()) for part in text.split(",")]


def _methods(text: str) -> list[str]:
    from .evaluation.compare import METHODS

    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(METHODS)}; got {text!r}")
    return names


def _positive_float(text: str) -> float:
    return _float_where(text, lambda value: 0 < value < float("inf"), "a positive number")


def hparam_argument(text: str) -> tuple[str, object]:
    """NAME=VALUE for an editing hyperparameter (an argparse type, also used by bench/ scripts);
    VALUE parsed as JSON (a number...) or kept as text."""
    from .editing import EditHParams

    name, sep, value = text.partition("=")
    names = sorted(f.name for f in dataclasses.fields(EditHParams))
    if not sep or name not in names:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE with NAME one of {', '.join(names)}; got {text!r}")
    try:
        return name, json.loads(value)
    except ValueError:
        return name, value


EDIT_FACTS_HELP = f"""\
a JSONL facts file holds one JSON object per line:
  prompt       the prompt, with "{{}}" where the subject goes (or the filled prompt containing it)
  subject      the entity the edit keys on
  target_new   the answer the edited model should give
  target_true  optional: the answer it gave before (used by eval)
  id, extras   optional: an explicit fact id; an object of extra data kept with the fact
for example:
  {JSONL_EXAMPLE}
CounterFact and ZsRE JSON arrays are read as published (see --format)."""


def _general_options(sub) -> None:
    from .evaluation.harness import GENERAL_LIMIT

    sub.add_argument("--general", action="store_true",
                     help="also score the six general-ability tasks (MMLU, ARC-Challenge, SciQ, CommonsenseQA, "
                          "WSC273, LAMBADA) before -> after")
    sub.add_argument("--general-data", metavar="DIR",
                     help="their data folder (default: ../shared/data/general beside the package checkout)")
    sub.add_argument("--general-limit", "--limit-general", type=_positive, default=GENERAL_LIMIT, metavar="N",
                     help=f"items per general task, a seeded subsample ({GENERAL_LIMIT})")
    sub.add_argument("--general-seed", type=int, default=0, help="seed of that subsample (0)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="neuraldb", description="Edit facts into LLMs with NeuralDB, a gated neural KV database.")
    parser.add_argument("--threads", type=_threads, default=None, metavar="N",
                        help="CPU threads for torch and the kernels (default: the cores the 1-minute load average "
                             "leaves idle, at least 1; the environment variable NEURALDB_THREADS overrides it)")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name, handler, help, epilog=None):
        sub = commands.add_parser(name, help=help, description=help, epilog=epilog,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        if handler is not None:
            sub.set_defaults(handler=handler)
        return sub

    fmt = dict(choices=FORMATS, default=None, help="input format (default: recognised from the file)")
    edit = command("edit", cmd_edit, "edit facts into a model and save them in a database directory (resumable)",
                   epilog=EDIT_FACTS_HELP)
    edit.add_argument("--facts", required=True, help="CounterFact / ZsRE JSON or JSONL file of facts (see below)")
    edit.add_argument("--format", **fmt)
    edit.add_argument("--model", default=None,
                      help="'default' (SmolLM2-135M-Instruct) or a Hugging Face model directory; "
                           "for an existing database, the model it was built with")
    edit.add_argument("--db", required=True, help="database directory (created if new)")
    edit.add_argument("--limit", type=_positive, help="edit only the first N facts")
    edit.add_argument("--hparam", type=hparam_argument, action="append", default=[], metavar="NAME=VALUE",
                      help="editing hyperparameter (see EditHParams), e.g. steps=10; layer and gamma apply "
                           "only to a new database; repeatable")
    edit.add_argument("--skip-bad", action="store_true",
                      help="leave out facts that cannot be edited (listed on stderr) instead of stopping")
    edit.add_argument("--quiet", action="store_true", help="no progress bar and no lines saying what runs")

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
    _general_options(evaluate)
    _key_format_option(evaluate)
    evaluate.add_argument("--quiet", action="store_true", help="no progress lines")

    from .evaluation.compare import K0_TOKENS, BaselineSettings

    baseline = BaselineSettings()
    compare = command("compare", cmd_compare, "edit the same facts with NeuralDB, MEMIT and AlphaEdit (same keys and "
                                              "residuals, same layer) and score all of them side by side")
    compare.add_argument("--data", required=True, help="CounterFact / ZsRE / JSONL file of facts with test prompts")
    compare.add_argument("--format", **fmt)
    compare.add_argument("--sizes", type=_positive_list, required=True, metavar="N,N,...",
                         help="numbers of facts (the first N of the file), each edited afresh, e.g. 100,1000")
    compare.add_argument("--methods", type=_methods, default=["neuraldb", "memit", "alphaedit"],
                         metavar="M,M,...", help="any of neuraldb,memit,alphaedit (all three)")
    compare.add_argument("--json", required=True, help="write the comparison as JSON to this file")
    compare.add_argument("--plot", help="also write a PNG of the metrics against the number of facts")
    compare.add_argument("--model", default=DEFAULT_MODEL,
                         help="'default' (SmolLM2-135M-Instruct) or a Hugging Face model directory")
    compare.add_argument("--hparam", type=hparam_argument, action="append", default=[], metavar="NAME=VALUE",
                         help="NeuralDB editing hyperparameter (see EditHParams), e.g. layer=10; repeatable")
    compare.add_argument("--memit-weight", type=_positive_float, default=baseline.memit_weight, metavar="LAMBDA",
                         help=f"MEMIT's λ on E[k kᵀ] ({baseline.memit_weight:g}; chosen by efficacy on the "
                              f"edited prompts only, see evaluation/compare.py)")
    compare.add_argument("--alphaedit-lambda", type=_positive_float, default=baseline.alphaedit_regularisation,
                         metavar="LAMBDA", help=f"AlphaEdit's λ ({baseline.alphaedit_regularisation:g})")
    compare.add_argument("--alphaedit-threshold", type=_positive_float, default=baseline.alphaedit_threshold,
                         help=f"eigenvalues of E[k kᵀ] below this form AlphaEdit's null space "
                              f"({baseline.alphaedit_threshold:g})")
    compare.add_argument("--k0-tokens", type=_positive, default=K0_TOKENS,
                         help=f"tokens of preserved text for the baselines' K0 statistics ({K0_TOKENS})")
    compare.add_argument("--k0-cache", help="file caching the K0 statistics (default: next to --json, "
                                            "JSON.k0.safetensors; reused for the same model, layer and texts)")
    compare.add_argument("--batch-size", type=_positive, default=32, help="prompts per forward pass (32)")
    compare.add_argument("--databases", metavar="DIR",
                         help="keep NeuralDB's database of each size in DIR/facts-N.sqlite; a rerun resumes "
                              "an interrupted size without re-editing its stored facts")
    _general_options(compare)
    compare.add_argument("--quiet", action="store_true", help="no progress lines")

    ask = command("ask", cmd_ask, "answer a prompt with and without the edits, and show which facts fired")
    ask.add_argument("--db", required=True, help="database directory")
    ask.add_argument("prompt", help="the prompt to complete")
    ask.add_argument("--max-new-tokens", type=_positive, default=12, help="tokens to generate (12)")
    _key_format_option(ask)

    serving = command("serve", cmd_serve, "serve the database's model with its facts through vLLM's OpenAI-compatible "
                                          "server; edit the database meanwhile to change answers live")
    serving.add_argument("--db", required=True, help="database directory")
    serving.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1: this machine only)")
    serving.add_argument("--port", type=_port, default=8000, help="port (8000)")
    serving.add_argument("--gamma", type=_gamma, default=None,
                         help="one gate threshold for every key (default: the database's, per-key where set)")
    serving.add_argument("--backend", default="auto", help="gated_retrieve backend (auto)")
    serving.add_argument("--served-model-name", default=None, help="model name in the API (the directory's name)")
    serving.add_argument("--compile", action="store_true",
                         help="let vLLM torch.compile the model, with piecewise CUDA graphs on a GPU (the retrieval runs "
                              "eagerly between the captured pieces); default: eager; on a CPU compiling takes minutes")
    serving.add_argument("--vllm-arg", action="append", default=[], metavar="ARG",
                         help="an option passed to `vllm serve` as is, e.g. --vllm-arg=--max-num-seqs=8; repeatable")

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
    remove = db_command("rm", cmd_db_rm, "remove facts by id (all or none, unless --missing-ok)")
    remove.add_argument("ids", nargs="+", help="fact ids (see db list)")
    remove.add_argument("--missing-ok", action="store_true", help="remove the ids that are present, ignore the others")
    db_command("check", cmd_db_check, "verify every fact row (checksums, sizes, finite values, key norms)")
    calibrate = db_command("calibrate", cmd_db_calibrate,
                           "recompute every key's gate threshold from the facts' contexts and model-written text")
    calibrate.add_argument("--quiet", action="store_true", help="no progress bar")
    export = db_command("export", cmd_db_export, "write FILE.safetensors + FILE.json for sharing")
    export.add_argument("file", help="the .safetensors file to write (its .json sidecar is written beside it)")
    imported = db_command("import", cmd_db_import, "create a database directory from an export")
    imported.add_argument("file", help="the .safetensors file of an export")
    imported.add_argument("--model", default=DEFAULT_MODEL, help="'default' or a model directory (checked)")
    split = db_commands.add_parser("split", help="split a database into N shard files and a manifest (one shard per "
                                                 "rank of a torch.distributed job)")
    split.set_defaults(handler=cmd_db_split)
    split.add_argument("--db", required=True, help="database directory or NeuralDB file")
    split.add_argument("--shards", type=_positive, required=True, metavar="N", help="number of shards (= ranks)")
    split.add_argument("--out", required=True, help="new folder for the shard files and manifest.json")
    merge = db_commands.add_parser("merge", help="merge the shards of a manifest back into one NeuralDB file")
    merge.set_defaults(handler=cmd_db_merge)
    merge.add_argument("--manifest", required=True, help="manifest.json written by db split (or its folder)")
    merge.add_argument("--out", required=True, help="the NeuralDB file to write (never overwritten)")

    plot = command("plot", cmd_plot, "plot metrics against the number of edits from several eval --json reports, "
                                     "or from compare --json runs (their sizes in one figure)")
    plot.add_argument("reports", nargs="+", help="JSON reports written by eval --json, or comparisons by compare --json")
    plot.add_argument("--out", required=True, help="PNG file to write")

    demo = command("demo", cmd_demo, "edit a few well-known facts into the default model and show before/after")
    demo.add_argument("--max-new-tokens", type=_positive, default=8, help="tokens per answer (8)")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    _key_format_option(demo)

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


def _failure_line(error: Exception, args) -> str | None:
    """The one line that names the file and the cause of an expected failure; None for an error
    that is a bug (its traceback is printed)."""
    import pickle
    import sqlite3

    try:
        from safetensors import SafetensorError
    except ImportError:  # safetensors comes with transformers; without it no such error arises
        SafetensorError = ()
    database = Path(args.db) / DB_FILE if getattr(args, "db", None) else "the database"
    if isinstance(error, KeyError):
        return str(error.args[0]) if error.args else "KeyError"
    if isinstance(error, sqlite3.Error):
        cause = str(error) or type(error).__name__
        if "locked" in cause:
            cause += " (another process holds its write lock; try again when it has finished)"
        elif isinstance(error, sqlite3.DatabaseError) and not isinstance(error, sqlite3.OperationalError):
            cause += " (the file is damaged or not a NeuralDB database)"
        return f"{database}: {cause}"
    if isinstance(error, SafetensorError):
        where = getattr(args, "file", None) or "a .safetensors file"
        return f"{where}: safetensors: {error}"  # reading or writing (a full disk shows here too)
    if isinstance(error, pickle.UnpicklingError):
        return f"a pickled file cannot be read safely: {error}"
    if isinstance(error, RecursionError):
        return "an input file is nested too deeply to read (RecursionError)"
    if isinstance(error, MemoryError):
        detail = f" ({error})" if str(error) else ""
        return f"out of memory{detail}: an input or the model is too large for this machine"
    if isinstance(error, (CommandError, OSError, ValueError, ImportError, TypeError)):
        return str(error) or type(error).__name__
    return None


def main(argv: list[str] | None = None) -> int:
    """Run the `neuraldb` command; returns the exit code: 0 success, 1 a failure (one line
    "neuraldb: error: ..." on stderr), 2 bad usage (argparse), 130 interrupted."""
    args = build_parser().parse_args(argv)
    if getattr(args, "hparam", None) is not None:
        args.hparam = dict(args.hparam)
    _quiet_libraries()
    try:
        import torch

        from .threads import default_threads

        torch.set_num_threads(args.threads if args.threads is not None else default_threads())
        args.handler(args)
    except KeyboardInterrupt:
        print("neuraldb: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        line = _failure_line(error, args)
        if line is None:
            raise
        line = " ".join(line.split())
        if len(line) > MAX_ERROR_CHARS:
            line = f"{line[:MAX_ERROR_CHARS]} ... ({len(line) - MAX_ERROR_CHARS} more characters left out)"
        print(f"neuraldb: error: {line}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
