"""Editing: facts in -> keys (Eq. 20) and residuals (Eq. 21) -> NeuralDB rows, behind `Editor`.

    facts.py      Fact, deterministic fact ids, validation
    readers.py    fact files: CounterFact, ZsRE, JSONL; read_facts and its FORMATS
    prefixes.py   model-written random prefixes, generated once per model
    tokens.py     contexts, the subject's last token (from character offsets), target tokens
    keys.py       Eq. 20: down-projection input at the subject's last token, averaged
    residuals.py  Eq. 21: batched optimisation of the residuals with a cached frozen prefix
    hparams.py    EditHParams (documented defaults) and per-architecture presets
    records.py    EditRecord: the versioned "edit" metadata of a stored fact
    report.py     EditReport / SkippedFact: what one edit or update call did
    editor.py     Editor: edit / update / remove, batched commits, resume
"""

from .._hf_extra import require_hf_extra

require_hf_extra("neuraldb_kernels.editing")

from .editor import Editor
from .facts import Fact, FactError, check_facts, fact_id
from .hparams import PRESETS, EditHParams, preset_for, resolve_hparams
from .keys import compute_keys
from .prefixes import generate_prefixes
from .readers import FORMATS, counterfact_fact, read_counterfact, read_facts, read_jsonl, read_zsre, zsre_fact
from .records import EditRecord, EditRecordError
from .report import EditReport, SkippedFact
from .residuals import ResidualResult, optimize_residuals
from .tokens import EditTokens, subject_last_token, tokenize_fact

__all__ = [
    "Editor", "FORMATS", "Fact", "FactError", "check_facts", "counterfact_fact", "fact_id", "read_counterfact",
    "read_facts", "read_jsonl", "read_zsre", "zsre_fact", "PRESETS", "EditHParams", "preset_for", "resolve_hparams",
    "compute_keys", "generate_prefixes", "ResidualResult", "optimize_residuals", "EditTokens",
    "subject_last_token", "tokenize_fact", "EditRecord", "EditRecordError", "EditReport", "SkippedFact",
]
