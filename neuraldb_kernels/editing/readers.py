"""Readers of fact files: CounterFact (flattened and original schema), ZsRE (MEND split) and plain
JSON Lines, and `read_facts`, which picks one by name (`FORMATS`) or by the file's content.

    facts = read_facts("counterfact-a.json", limit=100)           # recognised by content
    facts = read_facts("my-facts.jsonl", "jsonl")

Every reader returns `Fact`s (not validated here: see `check_facts`); a ValueError names the file
and the record or line that cannot be read. The evaluation builds its cases from these facts, so
it scores exactly the files edits are made from.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable, Mapping
from typing import Any, Optional

from .facts import Fact, _mapping_fact

# the line `neuraldb edit --help` and the README show as the JSONL format
JSONL_EXAMPLE = '{"prompt": "{} is located in", "subject": "The Louvre", "target_new": "Berlin", "target_true": "Paris"}'


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
    answer), answers (the true answers, a list or one string; the first is target_true),
    rephrase, loc, loc_ans -> extras."""
    where = _record_where(source, index)
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    answers = record.get("answers")
    if isinstance(answers, str):  # one answer given as a plain string, not a list of them
        answers = [answers]
    elif answers is not None and not isinstance(answers, list):
        raise ValueError(f"{where}: 'answers' must be a list of strings or one string, got {type(answers).__name__}")
    extras = {key: record[key] for key in ("rephrase", "loc", "loc_ans") if key in record}
    return Fact(prompt=_field(record, "src", where), subject=_field(record, "subject", where),
                target_new=_field(record, "alt", where), target_true=answers[0] if answers else None,
                extras={"source": source, **extras})


def _read_json_array(path: pathlib.Path) -> list:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply to read") from None
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
    target_true, id, extras (see JSONL_EXAMPLE). Blank lines are ignored; errors name the line."""
    path = pathlib.Path(path)
    facts = []
    with path.open(encoding="utf-8") as lines:
        try:
            for number, line in enumerate(lines, start=1):
                if limit is not None and len(facts) >= limit:
                    break
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}: line {number} is not valid JSON ({error})") from None
                except RecursionError:
                    raise ValueError(f"{path}: line {number}: JSON nested too deeply to read") from None
                try:
                    facts.append(_mapping_fact(record))
                except ValueError as error:
                    raise ValueError(f"{path}: line {number}: {error}") from None
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}: not UTF-8 text ({error.reason})") from None
    return facts


def _read_recognised(path: pathlib.Path, limit: Optional[int]) -> list[Fact]:
    """JSON Lines for *.jsonl, else a JSON array of CounterFact or ZsRE records, told apart by the
    first record's fields."""
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


# format name -> reader(path, limit); None: recognised from the file
READERS: dict[str, Callable[[pathlib.Path, Optional[int]], list[Fact]]] = {
    "counterfact": read_counterfact,
    "counterfact-full": read_counterfact,
    "zsre": read_zsre,
    "jsonl": read_jsonl,
}
FORMATS = tuple(READERS)


def read_facts(path, format: Optional[str] = None, limit: Optional[int] = None) -> list[Fact]:
    """Facts from `path` in `format` (one of FORMATS; None: recognised from the file: JSON Lines
    for *.jsonl, else a JSON array of CounterFact or ZsRE records), the first `limit` only.

    FileNotFoundError for a missing file; ValueError for an unknown format, a bad limit, an
    unreadable record (named) or a file without facts.
    """
    if format is not None and format not in READERS:
        raise ValueError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int, got {limit!r}")
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    facts = _read_recognised(path, limit) if format is None else READERS[format](path, limit)
    if not facts:
        raise ValueError(f"{path} holds no facts")
    return facts
