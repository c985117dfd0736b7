"""Editing: facts in -> keys (Eq. 20) and residuals (Eq. 21) -> NeuralDB rows, behind `Editor`.

    facts.py      Fact, deterministic fact ids, validation
    readers.py    fact files: CounterFact, ZsRE, JSONL; read_facts and its FORMATS
    prefixes.py   model-written random prefixes, generated once per model
    tokens.py     contexts, the subject's last token (from character offsets), target tokens
    keys.py       Eq. 20: down-projection input at the subject's last token, averaged
    calibration.py  per-key gate thresholds from positive and negative queries
    residuals.py  Eq. 21: batched optimisation of the residuals with a cached frozen prefix
    hparams.py    EditHParams (documented defaults) and per-architecture presets
    records.py    EditRecord: the versioned "edit" metadata of a stored fact
    report.py     EditReport / SkippedFact: what one edit or update call did
    editor.py     Editor: edit / update / remove, batched commits, resume
"""

import importlib

from .._hf_extra import require_hf_extra

# public name -> the module defining it, imported on first access: reading fact files needs
# nothing beyond the core install, the rest runs models (the "hf" extra)
_LAZY = {
    **dict.fromkeys(("Fact", "FactError", "check_facts", "fact_id"), "facts"),
    **dict.fromkeys(("FORMATS", "counterfact_fact", "read_counterfact", "read_facts", "read_jsonl", "read_zsre",
                     "zsre_fact"), "readers"),
    **dict.fromkeys(("EditRecord", "EditRecordError"), "records"),
    **dict.fromkeys(("EditReport", "SkippedFact"), "report"),
    "Editor": "editor",
    **dict.fromkeys(("PRESETS", "EditHParams", "preset_for", "resolve_hparams"), "hparams"),
    "compute_keys": "keys",
    **dict.fromkeys(("KeyThresholds", "Recalibration", "calibrate_thresholds"), "calibration"),
    "generate_prefixes": "prefixes",
    **dict.fromkeys(("ResidualResult", "optimize_residuals"), "residuals"),
    **dict.fromkeys(("EditTokens", "subject_last_token", "tokenize_fact"), "tokens"),
}
_CORE_MODULES = {"facts", "readers", "records", "report"}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if module not in _CORE_MODULES:
        require_hf_extra(f"neuraldb_kernels.editing.{name}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


__all__ = list(_LAZY)
