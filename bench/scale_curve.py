r"""Quality against the number of facts: edit facts incrementally into ONE database and score the
same first cases at every size (the paper's Figure 1).

    python bench/scale_curve.py --sizes 1000 5000 10000 --db /work/runs/curve
    python bench/scale_curve.py --sizes 1000 5000 10000 20000 50000 100000 --db DIR \
        --data ../shared/data/counterfact/counterfact-a.json /tmp/scale_100k.json

The facts are the records of the --data files in order (CounterFact JSON arrays, flattened or
original schema, e.g. counterfact-a/-b and the scale set of bench/scale_facts.py); a record whose
fact id (subject + prompt) repeats an earlier one is left out, so the database at size N holds
exactly the first N facts. At each size, in increasing order, the facts not yet stored are edited
(`Editor.edit`, the model's preset unless --hparam says otherwise), then, with the database
attached, the first --eval-cases facts' cases are scored (efficacy, generalization, specificity
in percent, --compare) and preservation is measured on their neighbourhood prompts + true answers
(gate_fire_rate percent of tokens, kl nats per token; evaluation.preservation).

DIR is a database directory (neuraldb_kernels.workspace: neuraldb.sqlite + model.json) that also
holds
    scale_curve.json   settings, the unedited model's scores, and per size reached: the metrics,
                       facts in the database and how many are synthetic, the editing time per
                       stage (every invocation's segments), evaluation seconds, peak RSS (MB)
    edits.log          one JSON line per committed batch: the ids it wrote
    reports/facts-N.json  one `neuraldb eval --json` report per size (`neuraldb plot` reads them)
    scale_curve.png    the metrics against the number of facts, edited vs unedited

Resumable across interruptions and sessions: every batch is committed before the next starts,
each size's entry is saved as soon as it is measured, and a run started again with the same
arguments (more --sizes may be added) skips the sizes recorded and the facts stored (the Editor
skips a fact stored with the same target), so no fact is edited twice and none is lost. Ctrl-C
(SIGINT) stops after the batch in flight is committed and logged (a second Ctrl-C stops at
once; the database still holds every committed batch). Exit status 130 after an interruption.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import platform
import resource
import signal
import sys
import time

import torch

DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "counterfact"
DEFAULT_DATA = (DATA / "counterfact-a.json", DATA / "counterfact-b.json")
STATE_FILE, LOG_FILE, FIGURE_FILE, REPORTS_DIR = "scale_curve.json", "edits.log", "scale_curve.png", "reports"
PROBABILITY_METRICS = ("efficacy", "generalization", "specificity")
INTERRUPTED = 130  # the shell's status for a SIGINT
EVAL_CASES = 1000


class CurveError(ValueError):
    """Arguments or a database directory that this command cannot run with (a clear message)."""


class Interrupted(Exception):
    """A requested stop, raised at the first safe point after the SIGINT."""


class StopOnSigint:
    """Within the block the first SIGINT only sets `requested` (the run stops at its next safe
    point: after the batch in flight is committed); a second one raises KeyboardInterrupt at once."""

    def __init__(self):
        self.requested = False

    def _handle(self, _signum, _frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print("\nstopping after the batch in flight is committed (Ctrl-C again to stop at once)",
              file=sys.stderr, flush=True)

    def check(self) -> None:
        """Raise `Interrupted` if a stop was requested."""
        if self.requested:
            raise Interrupted

    def __enter__(self) -> "StopOnSigint":
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        signal.signal(signal.SIGINT, self._previous)


@dataclasses.dataclass(frozen=True)
class CurveFacts:
    """The facts of the --data files in order, the first of each fact id; `repeated`: records
    left out because an earlier record has their id; `synthetic[i]`: fact i comes from the scale
    set's generator (its case_id "synthetic-N", see bench/scale_facts.py)."""

    facts: list
    repeated: int
    synthetic: list[bool]


def read_curve_facts(paths) -> CurveFacts:
    from neuraldb_kernels.editing import read_counterfact

    facts, seen, repeated = [], set(), 0
    for path in paths:
        for fact in read_counterfact(path):
            if fact.fact_id in seen:
                repeated += 1
                continue
            seen.add(fact.fact_id)
            facts.append(fact)
    synthetic = [str(fact.extras.get("case_id", "")).startswith("synthetic-") for fact in facts]
    return CurveFacts(facts, repeated, synthetic)


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class CurveState:
    """scale_curve.json: {"settings", "unedited", "sizes": {"N": entry}, "editing": segments of the
    size in progress}; saved atomically (a crash leaves the old file or the new one)."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}

    def save(self) -> None:
        from neuraldb_kernels._files import write_text_atomically

        write_text_atomically(self.path, json.dumps(self.data, indent=1) + "\n")

    def adopt_settings(self, settings: dict) -> None:
        """Record `settings` in a new state; in a resumed one they must equal the recorded ones."""
        recorded = self.data.setdefault("settings", settings)
        changed = sorted(name for name in set(recorded) | set(settings) if recorded.get(name) != settings.get(name))
        if changed:
            details = "; ".join(f"{name}: recorded {recorded.get(name)!r}, given {settings.get(name)!r}"
                                for name in changed)
            raise CurveError(f"{self.path.parent} holds a curve made with other settings ({details}); run it with the "
                             f"recorded ones or use a new --db directory")
        self.data.setdefault("sizes", {})
        self.data.setdefault("editing", [])


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", required=True,
                        help="numbers of facts in the database at which to measure, increasing")
    parser.add_argument("--db", required=True, help="the database directory (created if absent, resumed if not)")
    parser.add_argument("--data", nargs="+", default=[str(path) for path in DEFAULT_DATA],
                        help="CounterFact JSON files, read in order (default: counterfact-a and -b)")
    parser.add_argument("--model", default="default",
                        help="'default' (SmolLM2-135M-Instruct) or a local Hugging Face model directory")
    parser.add_argument("--eval-cases", type=int, default=None,
                        help="the first N facts' cases are scored at every size (default: 1000, or the smallest "
                             "size if lower)")
    parser.add_argument("--compare", choices=["token_mean", "sequence"], default="token_mean",
                        help="target comparison (neuraldb_kernels.evaluation; token_mean: ROME/MEMIT's convention)")
    parser.add_argument("--hparam", action="append", default=[], metavar="NAME=VALUE",
                        help="override an EditHParams field, e.g. --hparam batch_size=128 (JSON values)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    if any(size < 1 for size in args.sizes):
        parser.error(f"--sizes must be positive numbers of facts, got {args.sizes}")
    if args.sizes != sorted(set(args.sizes)):
        parser.error(f"--sizes must be increasing without repeats, got {args.sizes}")
    if args.eval_cases is None:
        args.eval_cases = min(EVAL_CASES, args.sizes[0])
    if args.eval_cases < 1 or args.eval_cases > args.sizes[0]:
        parser.error(f"--eval-cases must be between 1 and the smallest size ({args.sizes[0]}): the same cases are "
                     f"scored at every size, so they must all be edited at the first; got {args.eval_cases}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    missing = [path for path in args.data if not pathlib.Path(path).is_file()]
    if missing:
        parser.error(f"--data file(s) not found: {', '.join(missing)}")
    args.hparams = {}
    for item in args.hparam:
        name, separator, value = item.partition("=")
        if not separator or not name:
            parser.error(f"--hparam takes NAME=VALUE, got {item!r}")
        try:
            args.hparams[name] = json.loads(value)
        except json.JSONDecodeError:
            args.hparams[name] = value  # a plain string, e.g. kl_template
    return args


def open_workspace(directory: pathlib.Path, model: str):
    """The database directory, created for `model` when it holds none."""
    from neuraldb_kernels.workspace import Workspace, WorkspaceError

    try:
        if Workspace.exists(directory):
            return Workspace.open(directory, model=model)
        return Workspace.create(directory, model=model)
    except WorkspaceError as error:
        raise CurveError(str(error)) from None


def edit_to_size(workspace, state: CurveState, curve: CurveFacts, size: int, hparams: dict,
                 stop: StopOnSigint) -> None:
    """Edit the facts among the first `size` that the database lacks, logging each committed batch
    in edits.log and the time in state["editing"] (saved per batch); stops at a requested SIGINT
    once a batch is committed. The first `size` facts are in the database on return."""
    db = workspace.db
    pending = [fact for fact in curve.facts[:size] if fact.fact_id not in db]
    if not pending:
        return
    segment = {"facts": 0, "seconds": 0.0, "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M")}
    state.data["editing"].append(segment)
    started = time.perf_counter()
    log = (workspace.directory / LOG_FILE).open("a")

    def committed(ids) -> None:
        log.write(json.dumps(ids) + "\n")
        log.flush()
        segment["facts"] += len(ids)
        segment["seconds"] = time.perf_counter() - started
        segment["peak_rss_mb"] = peak_rss_mb()
        state.save()
        stop.check()

    try:
        report = workspace.edit(pending, progress=True, callback=committed, **hparams)
    finally:
        log.close()
    segment["stage_seconds"] = dict(report.seconds)
    state.save()
    lacking = [fact.fact_id for fact in curve.facts[:size] if fact.fact_id not in db]
    if lacking:
        raise RuntimeError(f"{len(lacking)} of the first {size} facts are not in the database after editing, "
                           f"e.g. {lacking[0]!r}")


def size_entry(workspace, state: CurveState, curve: CurveFacts, size: int, cases, texts, compare: str) -> dict:
    """Score the cases and preservation with the database attached; the size's entry. The
    specificity over neighbourhood prompts naming no stored subject is scored unedited too (its
    prompts depend on the size): `unedited_subject_metrics`."""
    from neuraldb_kernels.evaluation import case_scores, metrics_from_case_scores, preservation_metrics
    from neuraldb_kernels.evaluation.counterfact import UNEDITED_SUBJECTS_METRIC, stored_subjects
    from neuraldb_kernels.integration import attach

    model, tokenizer, db = workspace.model, workspace.tokenizer, workspace.db
    subjects = stored_subjects(db)
    started = time.perf_counter()
    with attach(model, db):
        metrics = metrics_from_case_scores(case_scores(model, tokenizer, cases, compare=compare,
                                                       edited_subjects=subjects))
    neighbourhood_only = [dataclasses.replace(case, paraphrase_prompts=()) for case in cases]
    unedited = metrics_from_case_scores(case_scores(model, tokenizer, neighbourhood_only, compare=compare,
                                                    edited_subjects=subjects))
    unedited_subject_metrics = {name: unedited[name] for name in (UNEDITED_SUBJECTS_METRIC,) if name in unedited}
    scored = time.perf_counter()
    metrics.update(preservation_metrics(model, tokenizer, db, texts))
    finished = time.perf_counter()
    segments = state.data["editing"]
    stage_seconds: dict[str, float] = {}
    for segment in segments:
        for stage, seconds in segment.get("stage_seconds", {}).items():
            stage_seconds[stage] = stage_seconds.get(stage, 0.0) + seconds
    return {"facts_in_database": len(db), "key_rows": db.key_rows, "synthetic_facts": sum(curve.synthetic[:size]),
            "metrics": metrics, "unedited_subject_metrics": unedited_subject_metrics, "edited_facts": sum(segment["facts"] for segment in segments),
            "edit_seconds": sum(segment["seconds"] for segment in segments), "edit_stage_seconds": stage_seconds,
            "edit_segments": segments, "eval_seconds": {"cases": scored - started, "preservation": finished - scored},
            "peak_rss_mb": peak_rss_mb(), "date": time.strftime("%Y-%m-%d %H:%M")}


def write_reports(directory: pathlib.Path, state: CurveState, cases: int) -> None:
    """One evaluation report per recorded size, and the figure from them."""
    from neuraldb_kernels.evaluation import EvaluationReport, plot_scaling, write_json

    reports = []
    for entry in state.data["sizes"].values():
        before = {**state.data["unedited"], **entry.get("unedited_subject_metrics", {})}
        report = EvaluationReport(n_facts=entry["facts_in_database"], n_cases=cases, before=before,
                                  after=entry["metrics"])
        (directory / REPORTS_DIR).mkdir(exist_ok=True)
        write_json(report, directory / REPORTS_DIR / f"facts-{report.n_facts}.json")
        reports.append(report)
    plot_scaling(reports, directory / FIGURE_FILE)


def run(args) -> dict:
    """The curve of `args` (see parse_args) in args.db; returns the state's data."""
    from neuraldb_kernels.evaluation import case_scores, cases_from_facts, metrics_from_case_scores
    from neuraldb_kernels.evaluation.counterfact import preservation_texts

    torch.set_num_threads(args.threads)
    curve = read_curve_facts(args.data)
    if args.sizes[-1] > len(curve.facts):
        raise CurveError(f"--sizes goes up to {args.sizes[-1]} facts but the --data files hold {len(curve.facts)} "
                         f"distinct facts ({curve.repeated} repeated records left out); add data (e.g. the scale "
                         f"set of bench/scale_facts.py) or lower --sizes")
    directory = pathlib.Path(args.db)
    state = CurveState(directory / STATE_FILE)
    if state.data and not (directory / "neuraldb.sqlite").exists():
        raise CurveError(f"{directory} holds {STATE_FILE} but no database: it cannot be resumed; use a new --db")
    settings = {"data": [str(pathlib.Path(path).resolve()) for path in args.data], "model": args.model,
                "eval_cases": args.eval_cases, "compare": args.compare, "hparams": args.hparams}
    if state.data:
        state.adopt_settings(settings)  # checked before the model loads
    workspace = open_workspace(directory, args.model)
    try:
        state.adopt_settings(settings)
        known = {fact.fact_id for fact in curve.facts}
        foreign = [fact_id for fact_id in workspace.db if fact_id not in known]
        if foreign:
            raise CurveError(f"{directory} holds {len(foreign)} fact(s) that are not in the --data files, e.g. "
                             f"{foreign[0]!r}: it belongs to another curve; use a new --db")
        state.data.update(machine=f"{platform.processor() or platform.machine()}, {args.threads} threads",
                          repeated_records=curve.repeated, distinct_facts=len(curve.facts))
        state.save()
        cases = cases_from_facts(curve.facts[: args.eval_cases])
        texts = preservation_texts(cases)
        model, tokenizer = workspace.model, workspace.tokenizer
        with StopOnSigint() as stop:
            if "unedited" not in state.data:
                unedited = metrics_from_case_scores(case_scores(model, tokenizer, cases, compare=args.compare))
                state.data["unedited"] = {**unedited, "gate_fire_rate": 0.0, "kl": 0.0}
                state.save()
            for size in args.sizes:
                if str(size) in state.data["sizes"]:
                    continue
                stop.check()
                print(f"editing up to {size} facts ({len(workspace.db)} in the database)", flush=True)
                edit_to_size(workspace, state, curve, size, args.hparams, stop)
                stop.check()
                entry = size_entry(workspace, state, curve, size, cases, texts, args.compare)
                state.data["sizes"][str(size)] = entry
                state.data["editing"] = []
                state.save()
                write_reports(directory, state, len(cases))
                print(json.dumps({"size": size, **entry["metrics"], "edit_seconds": entry["edit_seconds"],
                                  "peak_rss_mb": entry["peak_rss_mb"]}), flush=True)
        return state.data
    finally:
        workspace.close()


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except CurveError as error:
        print(f"scale_curve: error: {error}", file=sys.stderr)
        return 2
    except (Interrupted, KeyboardInterrupt):
        print(f"scale_curve: interrupted; every committed batch is in {args.db}: run the same command again to "
              f"resume", file=sys.stderr)
        return INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
