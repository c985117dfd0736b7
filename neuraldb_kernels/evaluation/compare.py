"""NeuralDB against MEMIT and AlphaEdit on the same facts, keys and residuals (`neuraldb compare`).

    statistics = preserved_key_statistics(model, tokenizer, layer, general_data)
    result = compare_methods(model, tokenizer, facts, sizes=[100, 1000], statistics=statistics)
    print(result.table()); write_comparison(result, "compare.json")

For each size N, the first N facts:
    neuraldb   a fresh NeuralDB (in memory, or `databases`/facts-N.sqlite, which a rerun resumes)
               edited through the `Editor` (keys, residual optimisation, store), scored with the
               database attached;
    memit      Δ = memit_delta(K1, R, E[k kᵀ], λ) added to the same layer's down-projection;
    alphaedit  Δ = alphaedit_delta(K1, R, P, λ), P the null space of E[k kᵀ] below a threshold;
where K1 (own key of each fact) and R (its residual) are read back from that NeuralDB, so the only
difference between the methods is gated retrieval against a linear Δ. Baseline weight edits are
undone bit for bit after scoring (checked). Every method is scored by the same functions on the
same cases: the probability metrics and strict metrics of `harness.model_metrics`, and optionally
the six general tasks (`harness.general_metrics`).

K0 (the preserved keys) comes from text the model writes itself and the shipped general text
(MMLU dev questions, LAMBADA passages that are not scored), never from the evaluation prompts;
its statistics are computed once per run and can be cached in a file.

Baseline hyperparameters (`BaselineSettings`) are fixed before any evaluation prompt is scored:
MEMIT's λ and AlphaEdit's λ were chosen on SmolLM2-135M-Instruct from the edited facts alone: with
the first 16 CounterFact facts edited, the count of edit prompts (the prompts the residuals are fitted
to) whose greedy next token is the target's first token: MEMIT λ = 15000 (the original GPT-J value)
4/16, λ = 1000 12/16; AlphaEdit λ = 10 (its paper's) 10/16, λ = 1 14/16 (bench/RESULTS.md,
"Baselines"). Paraphrase and neighbourhood prompts played no part.

Timings, wall clock in seconds, per method and size:
    keys_and_residuals  NeuralDB's prefixes, keys and residual optimisation (shared by all three)
    store               NeuralDB's writes to its database
    statistics          K0 statistics (baselines; once per run, counted in each baseline's total)
    projection          AlphaEdit's eigendecomposition of E[k kᵀ] (once per run)
    solve               the baseline's closed-form Δ
    total               everything a user of that method would wait for
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .._files import write_text_atomically
from .general import read_task, subsample
from .harness import GENERAL_LIMIT, cases_from_facts, general_metrics, model_metrics
from .report import METRICS, UNEDITED_LINE, UNITS, load_json_file, plot_metric_panels

METHODS = ("neuraldb", "memit", "alphaedit")
MODEL_WRITTEN_TEXTS = 64  # sampled texts of 64 tokens each: K0 from what the model writes itself
STAGES = ("keys_and_residuals", "store", "statistics", "projection", "solve", "total")  # see the docstring
K0_TOKENS = 100_000  # preserved keys collected at most (d1 is 1536 for SmolLM2; a few minutes on 2 cores)


@dataclasses.dataclass(frozen=True)
class BaselineSettings:
    """MEMIT's and AlphaEdit's hyperparameters (see the module docstring for how they were chosen).

    memit_weight: λ of MEMIT, the weight of E[k kᵀ] against the edited keys (1000).
    alphaedit_regularisation: λ of AlphaEdit, added to P K1ᵀ K1 P (1.0).
    alphaedit_threshold: eigenvalues of E[k kᵀ] below this span AlphaEdit's null space (2e-2, AlphaEdit's).
    """

    memit_weight: float = 1000.0
    alphaedit_regularisation: float = 1.0
    alphaedit_threshold: float = 2e-2


@dataclasses.dataclass(frozen=True)
class MethodResult:
    """One method at one size: `metrics` of the edited model, `seconds` (see the module docstring)."""

    metrics: dict[str, float]
    seconds: dict[str, float]


@dataclasses.dataclass(frozen=True)
class SizeResult:
    """All methods on the first `n_facts` facts (`n_cases` evaluated): the unedited model's
    metrics on the same cases and each method's result, by method name."""

    n_facts: int
    n_cases: int
    unedited: dict[str, float]
    methods: dict[str, MethodResult]
    resumed_facts: int = 0  # facts found already edited in a kept database: their editing is not timed


@dataclasses.dataclass(frozen=True)
class Comparison:
    """A whole comparison run: `sizes` in increasing order; `settings` the baselines' hyperparameters;
    `statistics` what K0 was (tokens, sources, seconds, cache file)."""

    sizes: tuple[SizeResult, ...]
    settings: BaselineSettings
    statistics: dict[str, Any]

    def to_dict(self) -> dict:
        """The JSON object `write_comparison` writes."""
        return {"settings": dataclasses.asdict(self.settings), "statistics": dict(self.statistics),
                "sizes": [{"n_facts": size.n_facts, "n_cases": size.n_cases, "resumed_facts": size.resumed_facts,
                           "unedited": size.unedited,
                           "methods": {name: dataclasses.asdict(result) for name, result in size.methods.items()}}
                          for size in self.sizes]}

    @classmethod
    def from_dict(cls, data: Mapping) -> "Comparison":
        """A comparison from `to_dict`'s JSON object; ValueError naming what is wrong otherwise."""
        if not isinstance(data, Mapping) or not isinstance(data.get("sizes"), list):
            raise ValueError("a comparison must be a JSON object with a list 'sizes'")
        try:
            settings = BaselineSettings(**data["settings"])
            sizes = tuple(SizeResult(int(size["n_facts"]), int(size["n_cases"]), _metrics(size["unedited"]),
                                     {name: MethodResult(_metrics(result["metrics"]), _numbers(result["seconds"]))
                                      for name, result in size["methods"].items()},
                                     int(size.get("resumed_facts", 0)))
                          for size in data["sizes"])
        except (KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"not a comparison written by `neuraldb compare --json` ({type(error).__name__}: "
                             f"{error})") from None
        return cls(sizes, settings, dict(data.get("statistics", {})))

    def table(self) -> str:
        """Per size: one row per metric (unedited, then each method), then the timings."""
        lines = []
        for size in self.sizes:
            methods = list(size.methods)
            names = [name for name in METRICS if name in size.unedited
                     or any(name in result.metrics for result in size.methods.values())]
            width = max([20] + [len(name) + 2 for name in names])
            resumed = (f" ({size.resumed_facts} edited by an earlier run: not in the timings)"
                       if size.resumed_facts else "")
            lines.append(f"{size.n_facts} facts, {size.n_cases} cases{resumed}")
            lines.append(f"{'metric':<{width}}{'unedited':>10}" + "".join(f"{m:>11}" for m in methods) + "  unit")
            for name in names:
                values = [size.unedited.get(name, math.nan)] + [size.methods[m].metrics.get(name, math.nan)
                                                                for m in methods]
                lines.append(f"{name:<{width}}" + "".join(f"{v:>{10 if i == 0 else 11}.1f}" for i, v in enumerate(values))
                             + f"  {UNITS[name]}")
            for stage in STAGES:
                values = [size.methods[m].seconds.get(stage) for m in methods]
                if any(v is not None for v in values):
                    lines.append(f"{'seconds: ' + stage:<{width}}{'':>10}"
                                 + "".join(f"{v:>11.1f}" if v is not None else f"{'-':>11}" for v in values))
            lines.append("")
        lines.append(f"K0: {self.statistics['tokens']} tokens from {'; '.join(self.statistics['sources'])}")
        return "\n".join(lines)


def _numbers(values: Mapping) -> dict[str, float]:
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values.values()):
        raise TypeError(f"expected numbers, got {dict(values)!r}")
    return {str(name): float(v) for name, v in values.items()}


def _metrics(values: Mapping) -> dict[str, float]:
    unknown = [name for name in values if name not in METRICS]
    if unknown:
        raise KeyError(f"unknown metrics {unknown}")
    return _numbers(values)


def read_comparison(path: str | Path) -> Comparison:
    """A comparison written by `write_comparison`; FileNotFoundError / ValueError naming the file."""
    try:
        return Comparison.from_dict(load_json_file(path))
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def merge_comparisons(comparisons: Sequence[Comparison]) -> Comparison:
    """The sizes of several comparison runs in one Comparison (increasing number of facts), e.g. to
    plot a 100-fact run and a later 1,000-fact run together; ValueError if two runs measured the
    same size or used other baseline settings. K0 statistics: the first run's."""
    if not comparisons:
        raise ValueError("merge_comparisons needs at least one comparison")
    settings = {c.settings for c in comparisons}
    if len(settings) > 1:
        raise ValueError(f"the runs used different baseline settings: {sorted(map(str, settings))}")
    sizes = sorted((size for c in comparisons for size in c.sizes), key=lambda size: size.n_facts)
    repeated = sorted({a.n_facts for a, b in zip(sizes, sizes[1:]) if a.n_facts == b.n_facts})
    if repeated:
        raise ValueError(f"more than one run measured {repeated} facts: plot them separately")
    return Comparison(tuple(sizes), comparisons[0].settings, comparisons[0].statistics)


def write_comparison(comparison: Comparison, path: str | Path) -> None:
    """`comparison.to_dict()` as JSON at `path`, written whole (a temporary file renamed into place)."""
    write_text_atomically(path, json.dumps(comparison.to_dict(), indent=2) + "\n")


# ------------------------------------------------------------------------------ K0 statistics


def scored_lambada_passages(general_data: str | Path, limit: int | None, seed: int) -> list[str]:
    """The LAMBADA passages a general-ability run with `limit` and `seed` scores (whole passages,
    as the file holds them), to be kept out of K0."""
    return [item.context + item.target for item in subsample(read_task("lambada", Path(general_data)), limit, seed)]


def preserved_key_statistics(model, tokenizer, layer: int, general_data: str | Path | None, *,
                             exclude: Sequence[str] = (), max_tokens: int = K0_TOKENS,
                             model_written: int = MODEL_WRITTEN_TEXTS, cache: str | Path | None = None,
                             module_path: str | None = None):
    """(KeyStatistics, seconds): K0 of `model`'s layer `layer` from `model_written` texts the model
    samples itself, then (when `general_data` is given) the MMLU dev questions and the LAMBADA
    passages not in `exclude`, up to `max_tokens` tokens. With `cache`, statistics saved there for
    the same model layer and the same sources are read instead (seconds then counts the read),
    and new ones are saved there."""
    from ..baselines import KeyStatistics, collect_key_statistics, general_texts, model_written_texts
    from ..integration import model_fingerprint

    started = time.perf_counter()
    sources = [f"{model_written} texts of 64 tokens sampled from the model (seed 0)"]
    if general_data is not None:
        sources.append(f"MMLU dev questions and LAMBADA passages of {general_data} "
                       f"({len(exclude)} scored passages left out)")
    sources.append(f"at most {max_tokens} tokens")
    if cache is not None and Path(cache).is_file():
        statistics = KeyStatistics.load(cache, model_fingerprint(model, layer, module_path))
        if statistics.sources == sources:
            return statistics, time.perf_counter() - started
    texts = model_written_texts(model, tokenizer, model_written) if model_written else []
    if general_data is not None:
        texts += general_texts(general_data, exclude=set(exclude))
    if not texts:
        raise ValueError("no texts for the preserved keys K0: give general data or model-written texts")
    statistics = collect_key_statistics(model, tokenizer, texts, layer, max_tokens=max_tokens,
                                        module_path=module_path, sources=sources)
    if cache is not None:
        statistics.save(cache)
    return statistics, time.perf_counter() - started


# --------------------------------------------------------------------------------- the run


def _scores(model, tokenizer, cases, general_data, general_limit, general_seed, batch_size) -> dict[str, float]:
    metrics = model_metrics(model, tokenizer, cases, batch_size=batch_size,
                            edited_subjects={case.subject for case in cases})
    if general_data is not None:
        metrics.update(general_metrics(model, tokenizer, general_data, limit=general_limit, seed=general_seed))
    return metrics


def _stored_keys_and_residuals(db) -> tuple[torch.Tensor, torch.Tensor]:
    """(K1 (n, d1), R (n, d2)): each stored fact's own key and its residual, in store order."""
    facts = [db.get(fact_id) for fact_id in db]
    return torch.stack([fact.keys[0] for fact in facts]), torch.stack([fact.residual for fact in facts])


def _baseline(model, tokenizer, delta: torch.Tensor, layer: int, score: Callable[[], dict[str, float]],
              module_path: str | None) -> dict[str, float]:
    """`score()` with Δ added to layer `layer`'s down-projection; the original weight is back bit
    for bit afterwards (a RuntimeError otherwise)."""
    from ..baselines import apply_delta
    from ..integration.architectures import locate_down_proj

    weight = locate_down_proj(model, layer, module_path).weight
    original = weight.detach().clone()
    with apply_delta(model, delta, layer, module_path):
        metrics = score()
    if not torch.equal(weight, original):
        raise RuntimeError(f"the down-projection of layer {layer} was not restored exactly after a baseline edit")
    return metrics


def _size_database(databases: Path, n: int, model, layer: int, module_path: str | None):
    """The kept database of size `n` in the directory `databases`: opened when an earlier run left
    it (a ValueError when it was built for another model or layer), else a new one for the model."""
    from ..integration import model_fingerprint
    from ..store import NeuralDB

    path = databases / f"facts-{n}.sqlite"
    if not path.exists():
        databases.mkdir(parents=True, exist_ok=True)
        return NeuralDB.for_model(model, layer=layer, path=path, module_path=module_path)
    return NeuralDB.open(path, fingerprint=model_fingerprint(model, layer, module_path))


def compare_methods(model, tokenizer, facts: Sequence, sizes: Sequence[int], *, statistics,
                    statistics_seconds: float = 0.0, methods: Sequence[str] = METHODS,
                    settings: BaselineSettings = BaselineSettings(), general_data: str | Path | None = None,
                    general_limit: int | None = GENERAL_LIMIT, general_seed: int = 0, batch_size: int = 32,
                    edit_hparams: Mapping[str, Any] | None = None, module_path: str | None = None,
                    databases: str | Path | None = None,
                    log: Callable[[str], None] | None = None) -> Comparison:
    """Each of `methods` on the first N of `facts` (as `read_facts` returns them) for every N in
    `sizes` (see the module docstring). statistics: the `KeyStatistics` of K0 at the edited layer
    (`preserved_key_statistics`), computed in `statistics_seconds`. edit_hparams: NeuralDB's editing
    hyperparameters (`EditHParams`; the layer must match the statistics'). databases: a directory
    keeping NeuralDB's database of each size as facts-N.sqlite; a rerun resumes an interrupted
    size and times only the facts it edits (`SizeResult.resumed_facts` counts the others). The
    model is left as it was: NeuralDB detached, every baseline Δ undone."""
    from ..baselines import alphaedit_delta, memit_delta, null_space_projection
    from ..editing import Editor
    from ..integration import attach

    methods = list(dict.fromkeys(methods))
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown or no methods {unknown or methods}; choose from {', '.join(METHODS)}")
    sizes = sorted(set(sizes))
    if not sizes or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes):
        raise ValueError(f"sizes must be positive ints, got {sizes!r}")
    if sizes[-1] > len(facts):
        raise ValueError(f"size {sizes[-1]} needs {sizes[-1]} facts but only {len(facts)} were given")
    say = log or (lambda line: None)
    layer = statistics.fingerprint.layer
    covariance = statistics.second_moment()
    projection, projection_seconds = None, 0.0
    if "alphaedit" in methods:
        started = time.perf_counter()
        projection = null_space_projection(covariance, settings.alphaedit_threshold)
        projection_seconds = time.perf_counter() - started
    results = []
    for n in sizes:
        cases = cases_from_facts(facts[:n])
        score = lambda: _scores(model, tokenizer, cases, general_data, general_limit, general_seed, batch_size)
        started = time.perf_counter()
        unedited = score()
        say(f"{n} facts: unedited model scored in {time.perf_counter() - started:.1f} s")
        db = None if databases is None else _size_database(Path(databases), n, model, layer, module_path)
        with Editor(model, tokenizer, db, layer=layer, module_path=module_path,
                    **dict(edit_hparams or {})) as editor:
            report = editor.edit(facts[:n], progress=False)
        db = editor.db
        shared = sum(report.seconds.get(stage, 0.0) for stage in ("prefixes", "keys", "residuals"))
        say(f"{n} facts: NeuralDB edited in {report.seconds['total']:.1f} s")
        by_method: dict[str, MethodResult] = {}
        if "neuraldb" in methods:
            with attach(model, db, layer, module_path=module_path):  # each key's own threshold
                metrics = score()
            by_method["neuraldb"] = MethodResult(metrics, {"keys_and_residuals": shared,
                                                           "store": report.seconds.get("store", 0.0),
                                                           "total": report.seconds["total"]})
        keys, residuals = _stored_keys_and_residuals(db)
        for method in methods:
            if method == "neuraldb":
                continue
            started = time.perf_counter()
            if method == "memit":
                delta = memit_delta(keys, residuals, covariance, settings.memit_weight)
                once = {"statistics": statistics_seconds}
            else:
                delta = alphaedit_delta(keys, residuals, projection, settings.alphaedit_regularisation)
                once = {"statistics": statistics_seconds, "projection": projection_seconds}
            solve = time.perf_counter() - started
            metrics = _baseline(model, tokenizer, delta, layer, score, module_path)
            seconds = {"keys_and_residuals": shared, **once, "solve": solve}
            by_method[method] = MethodResult(metrics, {**seconds, "total": sum(seconds.values())})
            say(f"{n} facts: {method} solved in {solve:.1f} s and scored")
        db.close()
        results.append(SizeResult(n, len(cases), unedited, by_method, len(report.already_stored)))
    return Comparison(tuple(results), settings,
                      {"tokens": statistics.token_count, "sources": list(statistics.sources),
                       "seconds": statistics_seconds})


def plot_comparison(comparison: Comparison, path: str | Path) -> None:
    """A PNG at `path`: one panel per metric, each method's value against the number of facts
    (the unedited model dashed), as the paper's Figure 1."""
    sizes = comparison.sizes
    methods = list(dict.fromkeys(m for size in sizes for m in size.methods))
    names = [name for name in METRICS if any(name in size.methods[m].metrics for size in sizes for m in size.methods)]
    plot_metric_panels(names, path, "edited facts", lambda name: [
        *[(method, [(size.n_facts, size.methods[method].metrics.get(name, math.nan)) for size in sizes],
           {"marker": "o"}) for method in methods],
        ("unedited", [(size.n_facts, size.unedited.get(name, math.nan)) for size in sizes], UNEDITED_LINE),
    ])
