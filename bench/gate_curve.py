"""Specificity against generalization of ONE edited database as its gate thresholds vary: every key
at one global gamma (its own threshold ignored), against the keys' calibrated per-key thresholds.

For each global gamma in --gammas the database is attached with that gamma for every key; for
each shift in --shifts (default 0: the calibrated thresholds as stored) every key's own threshold
plus the shift (clipped to [-1, 1]; keys without one: the database's gamma plus the shift) on an
in-memory copy, so the database file is only read; for each bound in --at-least, every key's own
threshold raised to at least that bound (the per-key curve over the range of the global gammas).
--include adds the settings of earlier runs' JSON (same --data and --cases; e.g. the global gammas
of the same keys and residuals, which the thresholds do not change) and takes the unedited model's
scores from the first of them with the same --compare. At each setting, on the first --cases
records of --data (scored by neuraldb_kernels.evaluation):
  CounterFact  efficacy, generalization, specificity (percent; --compare, token_mean by default:
               ROME/MEMIT's convention), gate fire rate (percent of tokens) and KL (nats/token)
               on the neighbourhood prompts + true answers (evaluation.preservation)
  ZsRE         the teacher-forced accuracies, fire rate and KL on `loc` + `loc_ans`
plus the unedited model once. The JSON is rewritten after every setting (an interrupted run keeps
what it measured); --plot draws specificity (y) against generalization (x): one curve through the
global gammas, one through the per-key settings, the unedited specificity dashed.

    python bench/gate_curve.py --db DB --data ../shared/data/counterfact/counterfact-a.json --cases 1000 \\
        --gammas 0.55 0.6 0.65 0.7 0.75 0.8 0.85 0.9 --shifts -0.05 0 0.05 --out curve.json --plot curve.png
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time

import torch

from neuraldb_kernels._files import write_text_atomically
from neuraldb_kernels.workspace import load_model, model_spec


def shifted_thresholds(db, shift: float, at_least: float = -1.0):
    """An in-memory copy of `db` (same keys, residuals, settings; no metadata) whose every key's
    threshold is its own (the database's gamma where it has none) plus `shift`, raised to at least
    `at_least`, clipped to [-1, 1]."""
    from neuraldb_kernels import NeuralDB

    copy = NeuralDB(d1=db.d1, d2=db.d2, layer=db.layer, gamma=db.gamma, dtype=db.dtype, fingerprint=db.fingerprint)
    facts = list(db.facts())
    if not facts:
        return copy
    gammas = [(f.key_gammas if f.key_gammas is not None else torch.full((len(f.keys),), db.gamma)).float()
              for f in facts]
    copy.add(torch.stack([f.keys[0] for f in facts]), torch.stack([f.residual for f in facts]), [f.id for f in facts],
             extra_keys=[f.keys[1:] if len(f.keys) > 1 else None for f in facts],
             key_gammas=[torch.clamp(torch.clamp(g + shift, min=at_least), -1.0, 1.0) for g in gammas])
    return copy


def setting_metrics(model, tokenizer, db, cases, texts, *, gamma, compare: str) -> dict[str, float]:
    """The case metrics (percent) with `db` attached at `gamma` (None: each key's own threshold;
    no db: the bare model), and with a db its gate_fire_rate and kl on `texts`."""
    from neuraldb_kernels.evaluation import metrics_from_case_scores, preservation_metrics, zsre
    from neuraldb_kernels.evaluation.counterfact import case_scores
    from neuraldb_kernels.integration import attach

    def scores() -> dict[str, float]:
        if isinstance(cases[0], zsre.ZsRECase):
            return zsre.accuracy_metrics(model, tokenizer, cases)
        return metrics_from_case_scores(case_scores(model, tokenizer, cases, compare=compare))

    if db is None:
        return scores()
    with attach(model, db, gamma=gamma):
        metrics = scores()
    return {**metrics, **preservation_metrics(model, tokenizer, db, texts, attach_options={"gamma": gamma})}


def included_report(path, data: str, cases: int, error) -> dict:
    """The JSON report at `path` (an earlier run's --out), checked to score the same data and cases;
    `error(message)` reports a mismatch or an unreadable file."""
    try:
        report = json.loads(pathlib.Path(path).read_text())
    except (OSError, ValueError) as problem:
        error(f"--include {path}: not a readable gate_curve report ({problem})")
    if (pathlib.Path(report.get("data", "")).name, report.get("cases")) != (pathlib.Path(data).name, cases):
        error(f"--include {path}: it scored {report.get('cases')} cases of {report.get('data')}, "
              f"this run {cases} of {data}")
    return report


def plot_curve(report: dict, path) -> None:
    """PNG at `path`: specificity against generalization, one line per threshold rule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(5.6, 4.4))
    # labels of the global curve above its points, the per-key ones below (they often coincide)
    for name, label, setting, offset, options in (
            ("global", "global gamma", "gamma", (4, 4), {"marker": "o"}),
            ("per_key", "per-key (calibrated; + shift or >= bound)", "shift", (4, -10), {"marker": "s", "color": "tab:red"})):
        points = sorted(report[name], key=lambda p: p["generalization"])
        if not points:
            continue
        ax.plot([p["generalization"] for p in points], [p["specificity"] for p in points], label=label, **options)
        for p in points:
            label_of = (f">={p['at_least']:.2f}" if "at_least" in p else f"{p['shift']:+.2f}") if setting == "shift" \
                else f"{p[setting]:.2f}"
            ax.annotate(label_of,
                        (p["generalization"], p["specificity"]), textcoords="offset points", xytext=offset,
                        fontsize=7)
    if "unedited" in report:
        ax.axhline(report["unedited"]["specificity"], linestyle="--", color="gray", label="unedited specificity")
    ax.set_xlabel("generalization (%)")
    ax.set_ylabel("specificity (%)")
    ax.set_title(f"{report['cases']} cases, {report['facts']} facts in the database")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(pathlib.Path(path), format="png", dpi=120)
    plt.close(figure)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", required=True, help="the edited NeuralDB file (opened read-only)")
    parser.add_argument("--data", required=True, help="CounterFact or ZsRE records with test prompts")
    parser.add_argument("--cases", type=int, default=1000, help="score the first N records of --data")
    parser.add_argument("--gammas", type=float, nargs="*", default=[0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9])
    parser.add_argument("--shifts", type=float, nargs="*", default=[0.0],
                        help="per-key thresholds plus each of these (0: as calibrated)")
    parser.add_argument("--at-least", type=float, nargs="*", default=[], dest="at_least",
                        help="also per-key thresholds raised to at least each of these (a key above it keeps "
                             "its own): the per-key curve over the same range as --gammas")
    parser.add_argument("--compare", choices=["token_mean", "sequence"], default="token_mean")
    parser.add_argument("--model-dir", default=None, help="a Hugging Face model directory (default: SmolLM2)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", required=True, help="write the results as JSON here (after every setting)")
    parser.add_argument("--plot", default=None, help="draw specificity vs generalization into this PNG")
    parser.add_argument("--include", nargs="*", default=[], metavar="JSON",
                        help="earlier --out files of the same --data and --cases (e.g. the global gammas, which "
                             "do not depend on the thresholds): their settings join this report and its plot")
    args = parser.parse_args(argv)
    if args.cases < 1:
        parser.error(f"--cases must be >= 1, got {args.cases}")
    for gamma in args.gammas:
        if not -1.0 <= gamma <= 1.0:
            parser.error(f"--gammas must lie in [-1, 1], got {gamma}")
    for shift in args.shifts:
        if not -2.0 <= shift <= 2.0:
            parser.error(f"--shifts must lie in [-2, 2] (thresholds are cosines), got {shift}")
    for bound in args.at_least:
        if not -1.0 <= bound <= 1.0:
            parser.error(f"--at-least must lie in [-1, 1], got {bound}")
    if not args.gammas and not args.shifts and not args.at_least:
        parser.error("nothing to measure: give --gammas and/or --shifts")
    included = [included_report(path, args.data, args.cases, parser.error) for path in args.include]
    torch.set_num_threads(args.threads)

    from neuraldb_kernels import NeuralDB
    from neuraldb_kernels.evaluation import counterfact, load_cases, zsre

    db = NeuralDB.open(args.db, readonly=True)
    model, tokenizer = load_model(model_spec(args.model_dir or "default"))
    cases = load_cases(args.data, limit=args.cases)
    texts = (zsre if isinstance(cases[0], zsre.ZsRECase) else counterfact).preservation_texts(cases)
    report = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
              "date": time.strftime("%Y-%m-%d %H:%M"), "load_average": os.getloadavg(), "command": " ".join(sys.argv),
              "db": args.db, "facts": len(db), "key_rows": db.key_rows, "db_gamma": db.gamma,
              "has_key_gammas": db.has_key_gammas, "data": args.data, "cases": len(cases), "compare": args.compare,
              "metrics_unit": "percent (kl: nats/token)", "global": [], "per_key": []}

    def measured(entry: dict, name: str) -> None:
        report[name].append(entry)
        write_text_atomically(args.out, json.dumps(report, indent=1))
        print(name, entry, flush=True)

    started = time.perf_counter()
    earlier = [report for report in included if report.get("compare") == args.compare and "unedited" in report]
    if earlier:  # the bare model on the same cases: nothing to recompute
        report["unedited"] = {**earlier[0]["unedited"], "from": args.include[included.index(earlier[0])]}
    else:
        report["unedited"] = setting_metrics(model, tokenizer, None, cases, texts, gamma=None, compare=args.compare)
    print("unedited", report["unedited"], flush=True)
    for gamma in args.gammas:
        measured({"gamma": gamma, **setting_metrics(model, tokenizer, db, cases, texts, gamma=gamma,
                                                    compare=args.compare)}, "global")
    for shift in args.shifts:
        variant = shifted_thresholds(db, shift)
        mean = float(variant.snapshot().gammas.mean()) if len(variant) else float("nan")
        measured({"shift": shift, "mean_threshold": mean,
                  **setting_metrics(model, tokenizer, variant, cases, texts, gamma=None, compare=args.compare)},
                 "per_key")
    for bound in args.at_least:
        variant = shifted_thresholds(db, 0.0, bound)
        mean = float(variant.snapshot().gammas.mean()) if len(variant) else float("nan")
        measured({"shift": 0.0, "at_least": bound, "mean_threshold": mean,
                  **setting_metrics(model, tokenizer, variant, cases, texts, gamma=None, compare=args.compare)},
                 "per_key")
    report["seconds"] = time.perf_counter() - started
    for path, earlier in zip(args.include, included):
        for name in ("global", "per_key"):
            report[name] += [{**entry, "from": path} for entry in earlier[name]]
    write_text_atomically(args.out, json.dumps(report, indent=1))
    if args.plot:
        plot_curve(report, args.plot)
    return report


if __name__ == "__main__":
    main()
