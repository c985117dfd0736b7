"""Facts to edit: the `Fact` record, its deterministic id, validation, and readers for CounterFact
(flattened and original schema), ZsRE and plain JSONL.

A fact says "after `prompt`, about `subject`, the model should answer `target_new`". The prompt is
either a template with one "{}" where the subject goes ("The mother tongue of {} is") or the filled
prompt that contains the subject ("The mother tongue of Danielle Darrieux is"); in a filled prompt
the LAST occurrence of the subject is the one the edit keys on.

Ids: a fact without an explicit id gets `fact_id(subject, filled_prompt)`, a short sha256, so
editing the same subject + prompt again addresses the same database row (it is replaced).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
from collections.abc import Iterable, Mapping
from typing import Any, Optional

from .records import METADATA_KEY, EditRecord
from .report import SkippedFact

SUBJECT_SLOT = "{}"
QUOTE_LIMIT = 80  # characters of a user's value that an error message repeats


def quoted(value: Any, limit: int = QUOTE_LIMIT) -> str:
    """repr(value) for an error message, a long string cut to its first `limit` characters and its length."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} characters)"
    return repr(value)


class FactError(ValueError):
    """A fact that cannot be edited; the message names its position in the input and its id."""


def fact_id(subject: str, filled_prompt: str) -> str:
    """The deterministic id of a fact: the first 16 hex digits of sha256(subject NUL filled_prompt)."""
    digest = hashlib.sha256(f"{subject}\x00{filled_prompt}".encode("utf-8")).hexdigest()
    return digest[:16]


@dataclasses.dataclass(frozen=True)
class Fact:
    """One fact to edit.

    prompt: a template with exactly one "{}" for the subject, or the filled prompt containing it.
    subject: the entity the edit keys on (non-empty).
    target_new: the answer the edited model should give (non-empty; tokenised with a leading space).
    target_true: the answer the unedited model is expected to give (optional; used by evaluation).
    id: explicit id; None means `fact_id(subject, filled_prompt)`.
    extras: JSON-serialisable data carried into the database metadata (e.g. evaluation prompts).
    """

    prompt: str
    subject: str
    target_new: str
    target_true: Optional[str] = None
    id: Optional[str] = None
    extras: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def filled_prompt(self) -> str:
        """The prompt with the subject in place."""
        if SUBJECT_SLOT in self.prompt:
            return self.prompt.replace(SUBJECT_SLOT, self.subject)
        return self.prompt

    @property
    def subject_span(self) -> tuple[int, int]:
        """(start, end) character offsets of the keyed subject occurrence in `filled_prompt`."""
        if SUBJECT_SLOT in self.prompt:
            start = self.prompt.index(SUBJECT_SLOT)
        else:
            start = self.prompt.rindex(self.subject)
        return start, start + len(self.subject)

    @property
    def fact_id(self) -> str:
        """The explicit id, or the deterministic one from (subject, filled prompt)."""
        return self.id if self.id is not None else fact_id(self.subject, self.filled_prompt)

    def metadata(self) -> dict[str, Any]:
        """The database metadata of this fact (store fields plus extras)."""
        return {
            **dict(self.extras),
            "subject": self.subject,
            "prompt": self.filled_prompt,
            "target_new": self.target_new,
            "target_true": self.target_true,
        }

    @classmethod
    def from_metadata(cls, fact_id: str, metadata: Mapping[str, Any]) -> "Fact":
        """The fact a database row was edited from: `metadata()` of it (the Editor's "edit" record
        is left out; its subject_start places the subject) and its stored id. A FactError names
        the id when a field is missing."""
        missing = [name for name in ("subject", "prompt", "target_new") if not isinstance(metadata.get(name), str)]
        if missing:
            raise FactError(f"stored fact {fact_id!r} has no {', '.join(missing)} in its metadata: it was not "
                            f"written by the Editor and cannot be recomputed")
        extras = {name: value for name, value in metadata.items() if name not in _METADATA_FIELDS}
        prompt, subject = metadata["prompt"], metadata["subject"]
        # the Editor records where the keyed subject starts: an earlier occurrence than the last
        # one (a template's slot) is given back as a template
        record = EditRecord.from_metadata(metadata, fact_id)
        start = None if record is None else record.subject_start
        if (start is not None and SUBJECT_SLOT not in prompt and prompt[start : start + len(subject)] == subject
                and start != prompt.rfind(subject)):
            prompt = prompt[:start] + SUBJECT_SLOT + prompt[start + len(subject):]
        return cls(prompt=prompt, subject=subject, target_new=metadata["target_new"],
                   target_true=metadata.get("target_true"), id=fact_id, extras=extras)


# metadata() fields that are not extras ("edit": what the Editor records about the computation)
_METADATA_FIELDS = ("subject", "prompt", "target_new", "target_true", METADATA_KEY)


def _input_id(fact: Any) -> Any:
    """The id of an input fact as given (a Fact's, or a mapping's "id" or "case_id"), else None."""
    ident = None
    if isinstance(fact, Fact):
        ident = fact.id
        if ident is None and isinstance(fact.subject, str) and isinstance(fact.prompt, str):
            try:
                ident = fact.fact_id
            except (TypeError, ValueError):
                ident = None
    elif isinstance(fact, Mapping):
        ident = fact.get("id", fact.get("case_id"))
    return ident


def given_id(fact: Any) -> Optional[str]:
    """The id of an input fact (a Fact, or a mapping's "id" or "case_id") as a str, else None."""
    ident = _input_id(fact)
    return None if ident is None else str(ident)


def _describe(index: int, fact: Any) -> str:
    ident = _input_id(fact)
    return f"fact {index}" + (f" (id {quoted(ident)})" if ident is not None else "")


def check_fact(fact: Fact, index: int) -> Fact:
    """`fact` itself if it can be edited; a FactError naming `index` and its id otherwise.

    Checks: str fields, non-empty subject and target_new, a template with at most one "{}", and
    the subject present in a filled prompt. (The context length needs the tokenizer; the editor
    checks it.)
    """
    where = _describe(index, fact)
    for name in ("prompt", "subject", "target_new"):
        if not isinstance(getattr(fact, name), str):
            raise FactError(f"{where}: {name} must be a str, got {type(getattr(fact, name)).__name__}")
    for name in ("target_true", "id"):
        value = getattr(fact, name)
        if value is not None and not isinstance(value, str):
            raise FactError(f"{where}: {name} must be a str or None, got {type(value).__name__}")
    if not fact.subject.strip():
        raise FactError(f"{where}: the subject is empty")
    if not fact.target_new.strip():
        raise FactError(f"{where}: target_new is empty")
    if fact.id is not None and not fact.id:
        raise FactError(f"{where}: the id is an empty string")
    slots = fact.prompt.count(SUBJECT_SLOT)
    if slots > 1:
        raise FactError(f"{where}: the prompt template {quoted(fact.prompt)} has {slots} '{{}}' slots; it needs one")
    if slots == 0 and fact.subject not in fact.prompt:
        raise FactError(f"{where}: the subject {quoted(fact.subject)} does not occur in the prompt "
                        f"{quoted(fact.prompt)}")
    if not fact.filled_prompt.strip():
        raise FactError(f"{where}: the prompt is empty")
    return fact


def as_fact(value: Any, index: int) -> Fact:
    """A `Fact` from a Fact or a mapping with keys prompt, subject, target_new and optionally
    target_true, id, extras; a FactError naming `index` otherwise."""
    if isinstance(value, Fact):
        return check_fact(value, index)
    try:
        fact = _mapping_fact(value)
    except ValueError as error:
        raise FactError(f"{_describe(index, value)}: {error}") from None
    return check_fact(fact, index)


_FIELDS = ("prompt", "subject", "target_new", "target_true", "id", "extras")


def _mapping_fact(value: Any) -> Fact:
    """A Fact from a mapping of Fact fields; a ValueError for a non-mapping, missing or unknown fields."""
    if not isinstance(value, Mapping):
        raise ValueError(f"expected a Fact or a mapping, got {type(value).__name__}")
    missing = [name for name in ("prompt", "subject", "target_new") if name not in value]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)}")
    unknown = sorted(set(value) - set(_FIELDS))
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)} (put extra data under 'extras')")
    return Fact(**{name: value[name] for name in value})


def check_facts(facts: Iterable[Any], *, on_error: str = "raise", indexed: bool = False):
    """(valid, skipped) from Facts or mappings; valid holds Facts, or (input index, Fact) pairs
    when `indexed`.

    on_error="raise": the first bad fact raises its FactError; on_error="skip": bad facts are left
    out and listed in `skipped` as `SkippedFact`s (input index, id if any, error message).
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if isinstance(facts, (Fact, Mapping, str)):
        raise TypeError("facts must be a list (or another iterable) of Fact objects or mappings")
    valid, skipped = [], []
    for index, value in enumerate(facts):
        try:
            fact = as_fact(value, index)
            valid.append((index, fact) if indexed else fact)
        except FactError as error:
            if on_error == "raise":
                raise
            skipped.append(SkippedFact(index, given_id(value), str(error)))
    return valid, skipped


# ---------------------------------------------------------------------------------------- readers


def _field(record: Mapping, path: str, where: str) -> Any:
    value: Any = record
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise ValueError(f"{where}: missing field {path!r}")
        value = value[part]
    return value


def _record_where(source: str, index: int) -> str:
    return f"{source}: record {index}"


def counterfact_fact(record: Mapping, index: int = 0, source: str = "counterfact") -> Fact:
    """A Fact from one CounterFact record, flattened or original schema.

    Flattened: prompt (subject filled in), subject, target_new, ground_truth, rephrase_prompt,
    locality_prompt, locality_ground_truth, case_id. Original: requested_rewrite {prompt with
    "{}", subject, target_new.str, target_true.str}, paraphrase_prompts, neighborhood_prompts, ....
    The evaluation prompts go to `extras` (and, from the original schema, relation_id and
    target_new_id: the keys of the consistency metric's reference texts). Not validated here (see
    `check_fact`).
    """
    where = _record_where(source, index)
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "requested_rewrite" in record:
        rewrite = _field(record, "requested_rewrite", where)
        extras = {key: record[key] for key in ("case_id", "paraphrase_prompts", "neighborhood_prompts",
                                               "attribute_prompts", "generation_prompts") if key in record}
        if "relation_id" in rewrite:
            extras["relation_id"] = str(rewrite["relation_id"])
        if isinstance(rewrite.get("target_new"), Mapping) and "id" in rewrite["target_new"]:
            extras["target_new_id"] = str(rewrite["target_new"]["id"])
        return Fact(prompt=_field(rewrite, "prompt", where), subject=_field(rewrite, "subject", where),
                    target_new=_field(rewrite, "target_new.str", where),
                    target_true=_field(rewrite, "target_true.str", where),
                    extras={"source": source, **extras})
    extras = {key: record[key] for key in ("case_id", "rephrase_prompt", "locality_prompt", "locality_ground_truth")
              if key in record}
    return Fact(prompt=_field(record, "prompt", where), subject=_field(record, "subject", where),
                target_new=_field(record, "target_new", where), target_true=record.get("ground_truth"),
                extras={"source": source, **extras})


def zsre_fact(record: Mapping, index: int = 0, source: str = "zsre") -> Fact:
    """A Fact from one ZsRE record: src (question containing the subject), subject, alt (new
    answer), answers (true answers; the first is target_true), rephrase, loc, loc_ans -> extras."""
    where = _record_where(source, index)
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    answers = record.get("answers") or [None]
    extras = {key: record[key] for key in ("rephrase", "loc", "loc_ans") if key in record}
    return Fact(prompt=_field(record, "src", where), subject=_field(record, "subject", where),
                target_new=_field(record, "alt", where), target_true=answers[0],
                extras={"source": source, **extras})


def _read_json_array(path: pathlib.Path) -> list:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON array of records, got {type(records).__name__}")
    return records


def read_counterfact(path, limit: Optional[int] = None) -> list[Fact]:
    """Facts from a CounterFact JSON array (flattened or original schema), the first `limit` only."""
    records = _read_json_array(pathlib.Path(path))[:limit]
    return [counterfact_fact(record, index) for index, record in enumerate(records)]


def read_zsre(path, limit: Optional[int] = None) -> list[Fact]:
    """Facts from a ZsRE JSON array (MEND split), the first `limit` only."""
    records = _read_json_array(pathlib.Path(path))[:limit]
    return [zsre_fact(record, index) for index, record in enumerate(records)]


def read_jsonl(path, limit: Optional[int] = None) -> list[Fact]:
    """Facts from JSON Lines: one object per line with prompt, subject, target_new and optionally
    target_true, id, extras. Blank lines are ignored; errors name the line number."""
    path = pathlib.Path(path)
    facts = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if limit is not None and len(facts) >= limit:
                break
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: line {number} is not valid JSON ({error})") from None
            try:
                facts.append(_mapping_fact(record))
            except ValueError as error:
                raise ValueError(f"{path}: line {number}: {error}") from None
    return facts


def read_facts(path, limit: Optional[int] = None) -> list[Fact]:
    """Facts from any supported file, recognised by content: JSON Lines (*.jsonl), or a JSON array
    of CounterFact (flattened/original schema) or ZsRE records."""
    path = pathlib.Path(path)
    if path.suffix == ".jsonl":
        return read_jsonl(path, limit)
    records = _read_json_array(path)[:limit]
    first = records[0] if records else {}
    if isinstance(first, Mapping) and "src" in first and "alt" in first:
        return [zsre_fact(record, index) for index, record in enumerate(records)]
    if isinstance(first, Mapping) and ("requested_rewrite" in first or "target_new" in first):
        return [counterfact_fact(record, index) for index, record in enumerate(records)]
    raise ValueError(f"{path}: unrecognised records: expected CounterFact (prompt/subject/target_new or "
                     f"requested_rewrite) or ZsRE (src/alt/subject) objects")
