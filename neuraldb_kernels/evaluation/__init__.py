"""Evaluation of edited models: CounterFact (efficacy, generalization, specificity, fluency,
consistency), ZsRE (teacher-forced accuracy), preservation (gate fire rate, KL on unrelated text),
always as before -> after on the same cases, with terminal / JSON / PNG reports; the strict
(greedy-generation) metric; general abilities on lm-evaluation-harness's six tasks; NeuralDB side
by side with MEMIT and AlphaEdit on the same keys and residuals (compare.py, `neuraldb compare`).

    from neuraldb_kernels.evaluation import load_cases, evaluate
    report = evaluate(model, tokenizer, db, load_cases(path, "counterfact", limit=100))
"""

from .compare import (BaselineSettings, Comparison, compare_methods, merge_comparisons, plot_comparison,
                      preserved_key_statistics, read_comparison, write_comparison)
from .consistency import TfidfModel, read_attribute_snippets
from .counterfact import (CounterFactCase, case_scores, generation_metrics, metrics_from_case_scores,
                          probability_metrics)
from .fluency import fluency, generate_texts, ngram_entropy, text_fluency
from ..editing.readers import FORMATS, read_facts
from .general import TASKS as GENERAL_TASKS
from .general import TaskScore, general_abilities
from .harness import cases_from_facts, default_general_data, evaluate, general_metrics, load_cases, model_metrics
from .preservation import preservation_metrics
from .report import METRICS, UNITS, EvaluationReport, plot_scaling, read_json, write_json
from .scoring import TargetScores, score_targets
from .strict import StrictScores, strict_metrics
from .zsre import ZsRECase, accuracy_metrics

__all__ = [
    "BaselineSettings", "Comparison", "compare_methods", "default_general_data", "general_metrics",
    "merge_comparisons", "plot_comparison", "read_comparison", "preserved_key_statistics", "write_comparison",
    "FORMATS", "GENERAL_TASKS", "METRICS", "UNITS", "CounterFactCase", "EvaluationReport", "StrictScores",
    "TargetScores", "TaskScore", "TfidfModel", "ZsRECase", "accuracy_metrics", "case_scores", "cases_from_facts",
    "evaluate", "fluency", "general_abilities", "generate_texts", "generation_metrics", "load_cases",
    "metrics_from_case_scores", "model_metrics", "ngram_entropy", "plot_scaling",
    "preservation_metrics", "probability_metrics", "read_attribute_snippets", "read_facts", "read_json",
    "score_targets", "strict_metrics", "text_fluency", "write_json",
]
