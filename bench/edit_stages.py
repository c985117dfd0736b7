"""Time the Editor's stages on the first N CounterFact facts, and compare two such runs.

One `Editor.edit` call on SmolLM2-135M-Instruct (fresh in-memory database, the preset's
hyperparameters unless --hparam overrides them), no evaluation. Written to --out as JSON: the
seconds of each stage (EditReport.seconds: prefixes, keys, residuals, store, total), the process's
CPU seconds and peak RSS (also apart: inside the residual optimisation and outside it), the load
average before and after, and per fact (input order) the target probability and steps its
residual reached; with --rows also the residual rows (beside --out, as .pt).

Made for same-run ratios between two source trees: run it from each tree (PYTHONPATH picks the
package) at the same time or one after the other, then compare:

    PYTHONPATH=/work/main  nice -n 10 python bench/edit_stages.py --facts 16 --out /tmp/main.json --rows &
    PYTHONPATH=$PWD        nice -n 10 python bench/edit_stages.py --facts 16 --out /tmp/new.json --rows
    python bench/edit_stages.py --compare /tmp/main.json /tmp/new.json

--compare prints per stage the seconds and old/new ratio, and per fact the largest differences
of target probability, steps and (when both saved them) residual rows.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import sys
import time

import torch

from neuraldb_kernels.cli import hparam_argument

DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "counterfact" / "counterfact-a.json"


def resident_peak_mb(reset: bool = False) -> float | None:
    """This process's peak resident set size (VmHWM) since start or the last reset, in MB; reset:
    start a new peak from the current RSS (Linux: /proc/self/clear_refs). None where unavailable."""
    try:
        status = pathlib.Path("/proc/self/status").read_text()
        peak = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) / 1024
        if reset:
            pathlib.Path("/proc/self/clear_refs").write_text("5")
        return peak
    except (OSError, StopIteration):
        return None


class StagePeaks:
    """Peak RSS inside and outside the residual optimisation, by wrapping the Editor's
    `optimize_residuals`: the peak is reset on entry and exit, so each call's peak and the peak of
    the work between calls (prefixes, keys, calibration, store writes) are read apart."""

    def __init__(self):
        self.residuals_mb = self.outside_mb = None

    def wrap(self, optimize):
        def measured(*args, **kwargs):
            self.outside_mb = _larger(self.outside_mb, resident_peak_mb(reset=True))
            try:
                return optimize(*args, **kwargs)
            finally:
                self.residuals_mb = _larger(self.residuals_mb, resident_peak_mb(reset=True))

        return measured

    def finish(self) -> dict:
        self.outside_mb = _larger(self.outside_mb, resident_peak_mb())
        return {"residuals": self.residuals_mb, "outside_residuals": self.outside_mb}


def _larger(a, b):
    return b if a is None else a if b is None else max(a, b)


def run(args) -> dict:
    from neuraldb_kernels.editing import Editor, read_counterfact
    from neuraldb_kernels.editing import editor as editor_module
    from neuraldb_kernels.integration import load_default_model

    torch.set_num_threads(args.threads)
    overrides = dict(args.hparam)
    model, tokenizer = load_default_model()
    facts = read_counterfact(args.data, limit=args.facts)
    load_before = os.getloadavg()
    cpu_before = time.process_time()
    peaks = StagePeaks()
    resident_peak_mb(reset=True)
    optimize = editor_module.optimize_residuals
    editor_module.optimize_residuals = peaks.wrap(optimize)
    try:
        with Editor(model, tokenizer, **overrides) as editor:
            report = editor.edit(facts, progress=False)
            stage_peaks = peaks.finish()
            records = [editor.db.get(fact_id).metadata["edit"] for fact_id in report.ids]
            if args.rows:
                residuals = torch.stack([editor.db.get(fact_id).residual.float() for fact_id in report.ids])
                torch.save({"ids": list(report.ids), "residuals": residuals}, pathlib.Path(args.out).with_suffix(".pt"))
    finally:
        editor_module.optimize_residuals = optimize
    result = {
        "package": str(pathlib.Path(sys.modules["neuraldb_kernels"].__file__).parent),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "facts": len(facts), "threads": args.threads,
        "hparams": overrides, "stage_seconds": report.seconds, "cpu_seconds": time.process_time() - cpu_before,
        # (resetting VmHWM resets ru_maxrss too: the process's peak is the largest of them)
        "peak_rss_mb": max(filter(None, [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                                         *stage_peaks.values()])),
        "peak_rss_mb_by_stage": stage_peaks,
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "facts_per_s": len(facts) / report.seconds["total"],
        "target_prob": [record["target_prob"] for record in records],
        "steps": [record["steps"] for record in records],
    }
    pathlib.Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({key: value for key, value in result.items() if key not in ("target_prob", "steps")}))
    return result


def compare(old_path: str, new_path: str) -> dict:
    old, new = (json.loads(pathlib.Path(path).read_text()) for path in (old_path, new_path))
    if old["facts"] != new["facts"]:
        raise SystemExit(f"the runs edited different numbers of facts: {old['facts']} and {new['facts']}")
    stages = {stage: {"old_s": seconds, "new_s": new["stage_seconds"].get(stage),
                      "ratio": seconds / new["stage_seconds"][stage] if new["stage_seconds"].get(stage) else None}
              for stage, seconds in old["stage_seconds"].items()}
    probs = torch.tensor([old["target_prob"], new["target_prob"]], dtype=torch.float64)
    steps = torch.tensor([old["steps"], new["steps"]])
    summary = {"stages": stages, "peak_rss_mb": [old["peak_rss_mb"], new["peak_rss_mb"]],
               "peak_rss_mb_by_stage": [old.get("peak_rss_mb_by_stage"), new.get("peak_rss_mb_by_stage")],
               "target_prob_mean": probs.mean(1).tolist(),
               "target_prob_max_abs_diff": float((probs[0] - probs[1]).abs().max()),
               "steps_total": steps.sum(1).tolist(), "facts_with_other_steps": int((steps[0] != steps[1]).sum()),
               "target_prob_at_least_0.9": [int((probs[i] >= 0.9).sum()) for i in range(2)]}
    rows = [pathlib.Path(path).with_suffix(".pt") for path in (old_path, new_path)]
    if all(path.exists() for path in rows):
        a, b = (torch.load(path)["residuals"].double() for path in rows)
        relative = (a - b).norm(dim=1) / a.norm(dim=1).clamp_min(1e-12)
        summary["residual_relative_diff"] = {"max": float(relative.max()), "median": float(relative.median())}
    print(json.dumps(summary, indent=1))
    return summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--facts", type=int, default=16, help="edit the first N facts of --data in one call")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--hparam", type=hparam_argument, action="append", default=[], metavar="NAME=VALUE",
                        help="override an EditHParams field (JSON value), e.g. --hparam batch_size=128")
    parser.add_argument("--out", help="write the run's JSON here")
    parser.add_argument("--rows", action="store_true", help="also save the residual rows (--out with .pt)")
    parser.add_argument("--compare", nargs=2, metavar=("OLD_JSON", "NEW_JSON"), help="compare two runs instead")
    args = parser.parse_args(argv)
    if args.compare:
        compare(*args.compare)
    elif not args.out:
        parser.error("give --out (a run) or --compare OLD NEW")
    else:
        run(args)


if __name__ == "__main__":
    main()
