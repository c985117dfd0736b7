"""Consistency (ROME's "reference score"): TF-IDF cosine between what the model generates about a
subject and reference Wikipedia text about the new object.

Reference texts come from ROME's `attribute_snippets.json`: a JSON list of
`{"relation_id", "target_id", "samples": [{"text", ...}, ...]}`; a CounterFact case (original
format, which carries `relation_id` and `target_new.id`) is scored against every snippet text of
(its relation, its new target). The data in ../shared/data has no such file, so consistency is
computable only when the user supplies one (`neuraldb eval --references FILE`).

TF-IDF: lower-cased words of two or more word characters, raw term counts times a smoothed IDF
idf(t) = ln((1 + N) / (1 + df(t))) + 1 fitted on the reference snippets themselves (ROME fits it
on a Wikipedia dump that is not available here), L2-normalised; the score is the cosine of the
two vectors (0 when either text has no known word).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from .report import load_json_file

_TERM = re.compile(r"\b\w\w+\b")


def terms(text: str) -> list[str]:
    """Lower-cased words of at least two word characters."""
    return _TERM.findall(text.lower())


class TfidfModel:
    """Smoothed IDF weights fitted on a corpus of documents (see the module docstring)."""

    def __init__(self, documents: Iterable[str]):
        document_frequency: Counter[str] = Counter()
        n = 0
        for document in documents:
            document_frequency.update(set(terms(document)))
            n += 1
        if n == 0:
            raise ValueError("a TF-IDF model needs at least one document")
        self.idf = {term: math.log((1 + n) / (1 + df)) + 1 for term, df in document_frequency.items()}

    def vector(self, text: str) -> dict[str, float]:
        """The L2-normalised TF-IDF vector of `text` over the fitted vocabulary (empty when none)."""
        weights = {term: count * self.idf[term] for term, count in Counter(terms(text)).items() if term in self.idf}
        norm = math.sqrt(sum(w * w for w in weights.values()))
        return {} if norm == 0 else {term: w / norm for term, w in weights.items()}

    def cosine(self, a: str, b: str) -> float:
        """Cosine of the TF-IDF vectors of `a` and `b`, in [0, 1]."""
        va, vb = self.vector(a), self.vector(b)
        return sum(w * vb[term] for term, w in va.items() if term in vb)


def read_attribute_snippets(path: str | Path) -> dict[tuple[str, str], list[str]]:
    """(relation_id, target_id) -> snippet texts, from a ROME `attribute_snippets.json` file."""
    path = Path(path)
    records = load_json_file(path, "reference file")
    if not isinstance(records, list):
        raise ValueError(f"reference file {path} must hold a JSON list of snippet records")
    snippets: dict[tuple[str, str], list[str]] = {}
    for i, record in enumerate(records):
        try:
            key = (str(record["relation_id"]), str(record["target_id"]))
            texts = [sample["text"] for sample in record["samples"]]
        except (KeyError, TypeError):
            raise ValueError(f"reference record {i} of {path} lacks relation_id, target_id or samples[].text") from None
        snippets.setdefault(key, []).extend(str(text) for text in texts)
    if not snippets:
        raise ValueError(f"reference file {path} holds no snippets")
    return snippets


def consistency(model: TfidfModel, generated: Sequence[str], references: Sequence[str]) -> float:
    """ROME's reference score of one case: cosine of all generated texts joined and all its
    reference texts joined, in [0, 1]."""
    if not generated or not references:
        raise ValueError("consistency needs generated texts and reference texts")
    return model.cosine(" ".join(generated), " ".join(references))
