"""Facts to edit: the `Fact` record, its deterministic id and validation (files of facts are read
by readers.py).

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
