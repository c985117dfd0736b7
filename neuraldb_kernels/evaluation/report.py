"""Before -> after reports: a terminal table, JSON, and a PNG plot of metrics against the number
of edits for scaling runs.

JSON layout (what `neuraldb eval --json` writes):

    {"n_facts": edits in the database, "n_cases": evaluated cases,
     "before": {metric: value}, "after": {metric: value}}

Metrics and units (a metric is absent where the data cannot support it):
    efficacy, generalization, specificity   percent (0-100), teacher-forced probabilities
    specificity_unedited_subjects  percent: specificity over the neighbourhood prompts that name no
                   subject of the database (counterfact.py)
    strict_efficacy, strict_generalization, strict_specificity
                   percent: greedy generation starts with the expected answer (strict.py)
    fluency        ROME's weighted n-gram entropy x 100 (bits x 100, e.g. ~600 for fluent text)
    consistency    TF-IDF cosine x 100
    gate_fire_rate percent of tokens of unrelated text where a gate fires (0 before: no gates)
    kl             mean KL(bare || edited) of next-token distributions, nats per token (0 before)
    general_<task> accuracy on one of the six general-ability tasks (general.py; mmlu, arc_challenge,
                   sciq, commonsense_qa, wsc273, lambada), percent, on a seeded subsample
    general_average the mean of the six task accuracies, percent
    lambada_perplexity  exp(-mean log P(last word)) on the LAMBADA subsample
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .._files import write_text_atomically
from .general import TASKS as GENERAL_TASKS

STRICT_METRIC_NAMES = ("strict_efficacy", "strict_generalization", "strict_specificity")
GENERAL_METRICS = tuple(f"general_{task}" for task in GENERAL_TASKS) + ("general_average", "lambada_perplexity")
METRICS = ("efficacy", "generalization", "specificity", "specificity_unedited_subjects", *STRICT_METRIC_NAMES, "fluency", "consistency",
           "gate_fire_rate", "kl", *GENERAL_METRICS)
UNITS = {"efficacy": "%", "generalization": "%", "specificity": "%", "specificity_unedited_subjects": "%",
         "fluency": "bits x100",
         "consistency": "x100", "gate_fire_rate": "% tokens", "kl": "nats/token",
         **{name: "%" for name in STRICT_METRIC_NAMES}, **{name: "%" for name in GENERAL_METRICS},
         "lambada_perplexity": "perplexity"}


@dataclasses.dataclass(frozen=True)
class EvaluationReport:
    """Metrics of the unedited (`before`) and the edited (`after`) model on the same cases.

    n_facts: facts in the database; n_cases: cases evaluated; notes: lines explaining metrics
    that could not be computed (printed under the table, not part of the JSON).
    """

    n_facts: int
    n_cases: int
    before: Mapping[str, float]
    after: Mapping[str, float]
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """The JSON object (see the module docstring), metrics in `METRICS` order."""
        def ordered(values: Mapping[str, float]) -> dict[str, float]:
            return {name: float(values[name]) for name in METRICS if name in values}

        return {"n_facts": self.n_facts, "n_cases": self.n_cases,
                "before": ordered(self.before), "after": ordered(self.after)}

    @classmethod
    def from_dict(cls, data: Mapping) -> "EvaluationReport":
        """A report from `to_dict`'s JSON object; ValueError naming what is wrong otherwise."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a report must be a JSON object, got {type(data).__name__}")
        for key in ("n_facts", "before", "after"):
            if key not in data:
                raise ValueError(f"a report needs the key {key!r}")
        if not isinstance(data["n_facts"], int) or data["n_facts"] < 0:
            raise ValueError(f"n_facts must be a non-negative int, got {data['n_facts']!r}")
        metrics = []
        for side in ("before", "after"):
            values = data[side]
            if not isinstance(values, Mapping) or not all(
                    name in METRICS and isinstance(v, (int, float)) for name, v in values.items()):
                raise ValueError(f"{side!r} must map metric names ({', '.join(METRICS)}) to numbers")
            metrics.append({name: float(v) for name, v in values.items()})
        return cls(data["n_facts"], int(data.get("n_cases", data["n_facts"])), *metrics)

    def table(self) -> str:
        """A fixed-width before -> after table, one metric per row, then the notes."""
        names = [name for name in METRICS if name in self.before or name in self.after]
        width = max([16] + [len(name) + 2 for name in names])
        lines = [f"{self.n_cases} cases evaluated, {self.n_facts} facts in the database",
                 f"{'metric':<{width}}{'before':>10}{'after':>10}{'change':>10}  unit"]
        for name in names:
            before, after = self.before.get(name, math.nan), self.after.get(name, math.nan)
            digits = {"kl": 4, "gate_fire_rate": 2, "lambada_perplexity": 2}.get(name, 1)
            lines.append(f"{name:<{width}}{before:>10.{digits}f}{after:>10.{digits}f}{after - before:>+10.{digits}f}"
                         f"  {UNITS[name]}")
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)


def write_json(report: EvaluationReport, path: str | Path) -> None:
    """Write `report.to_dict()` to `path` whole (see `write_text_atomically`: a temporary file
    created exclusively beside it, then renamed; nothing planted at a temporary name is followed)."""
    write_text_atomically(path, json.dumps(report.to_dict(), indent=2) + "\n")


def load_json_file(path: str | Path, what: str = "report") -> Any:
    """The JSON value in the file at `path`; FileNotFoundError / ValueError naming the file as
    `what` ("report {path} does not exist")."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{what} {path} is not valid JSON: {error}") from None
    except RecursionError:
        raise ValueError(f"{what} {path}: JSON nested too deeply to read") from None


def read_json(path: str | Path) -> EvaluationReport:
    """A report written by `write_json`."""
    data = load_json_file(path)
    try:
        return EvaluationReport.from_dict(data)
    except ValueError as error:
        raise ValueError(f"report {path}: {error}") from None


UNEDITED_LINE = {"linestyle": "--", "color": "gray", "marker": "x"}  # marked: one size is a point, not a line


def plot_metric_panels(names: Sequence[str], path: str | Path, xlabel: str,
                       series: Callable[[str], list[tuple[str, list[tuple[float, float]], dict]]]) -> None:
    """A PNG at `path`: one panel per metric in `names`; `series(name)` gives that panel's lines as
    (label, [(x, y), ...], matplotlib line options); x on a log scale when it spans 10x or more."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install matplotlib "
                          "(or pip install 'neuraldb_kernels[plots]')") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(3, len(names))
    rows = math.ceil(len(names) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        xs = []
        for label, points, options in series(name):
            if points:
                ax.plot(*zip(*points), label=label, **options)
                xs += [x for x, _ in points]
        if xs and min(xs) > 0 and max(xs) >= 10 * min(xs):
            ax.set_xscale("log")
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(UNITS[name])
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend()
    figure.tight_layout()
    figure.savefig(Path(path), format="png", dpi=120)
    plt.close(figure)


def plot_scaling(reports: Sequence[EvaluationReport], path: str | Path) -> None:
    """A PNG at `path`: one panel per metric, the after values (line) and the unedited model's
    before values (dashed) against the number of facts in the database, in increasing order."""
    if not reports:
        raise ValueError("plot_scaling needs at least one report")
    reports = sorted(reports, key=lambda r: r.n_facts)
    names = [name for name in METRICS if any(name in r.after for r in reports)]
    plot_metric_panels(names, path, "facts in the database", lambda name: [
        ("edited", [(r.n_facts, r.after[name]) for r in reports if name in r.after], {"marker": "o"}),
        ("unedited", [(r.n_facts, r.before[name]) for r in reports if name in r.before], UNEDITED_LINE),
    ])
