"""`EditRecord`: what the Editor records about how a stored fact was computed, kept in the fact's
database metadata under "edit" (store format 3, schema version 1; see FORMAT.md).

The JSON object always holds every key of the schema: "version" (1), "layer", "subject_start",
"subject_first_token", "target_prob", "steps", "converged", "bare_prompt_key",
"bare_prompt_key_generic", "shares_residual_with" (a list, [] when the residual is not shared),
"hparams" (EditHParams as an object) and "key_floors" (a list of numbers, one per key row, or null). Reading refuses another version, a missing key or a value of
the wrong type with an `EditRecordError` naming the fact.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, Optional

METADATA_KEY = "edit"


class EditRecordError(ValueError):
    """A stored "edit" record that this version cannot read (another schema version, a missing key
    or a value of the wrong type)."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _optional(check):
    return lambda value: value is None or check(value)


# key -> (check of its JSON value, the type in words for errors)
_SCHEMA = {
    "layer": (_is_int, "an int"),
    "subject_start": (_optional(_is_int), "an int or null"),
    "subject_first_token": (_optional(lambda v: isinstance(v, bool)), "a bool or null"),
    "target_prob": (_optional(lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)), "a number or null"),
    "steps": (_optional(_is_int), "an int or null"),
    "converged": (_optional(lambda v: isinstance(v, bool)), "a bool or null"),
    "bare_prompt_key": (_optional(lambda v: isinstance(v, bool)), "a bool or null"),
    "bare_prompt_key_generic": (_optional(lambda v: isinstance(v, bool)), "a bool or null"),
    "shares_residual_with": (lambda v: isinstance(v, list) and all(isinstance(i, str) for i in v),
                             "a list of fact ids"),
    "hparams": (_optional(lambda v: isinstance(v, Mapping)), "an object or null"),
    "key_floors": (_optional(lambda v: isinstance(v, list) and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)), "a list of numbers or null"),
}


@dataclasses.dataclass(frozen=True)
class EditRecord:
    """How one stored fact was computed (None: not recorded).

    layer: the decoder layer l* of the key and residual.
    subject_start: character offset of the keyed subject in the filled prompt.
    subject_first_token: the subject is the prompt's first token (no BOS): the key sits at position 0.
    target_prob: exp(-mean NLL of target_new) at the final residual; steps: optimisation steps taken;
        converged: target_prob reached stop_prob.
    bare_prompt_key: the bare prompt's query was stored as an extra key; bare_prompt_key_generic:
        it was far from the averaged key and generic, so stored only with a calibrated threshold
        above model-written text (see EditHParams.bare_key_below).
    shares_residual_with: ids of the facts that share this fact's residual (same subject).
    hparams: the EditHParams fields the fact was computed with.
    key_floors: per key row (stored order), the lowest cosine between the row and the fact's own
        contexts assigned to it (editing.calibration); a recalibration keeps the row's threshold
        below floor - gate_margin. None: the thresholds were not calibrated.
    """

    VERSION: ClassVar[int] = 1

    layer: int
    subject_start: Optional[int] = None
    subject_first_token: Optional[bool] = None
    target_prob: Optional[float] = None
    steps: Optional[int] = None
    converged: Optional[bool] = None
    bare_prompt_key: Optional[bool] = None
    bare_prompt_key_generic: Optional[bool] = None
    shares_residual_with: tuple[str, ...] = ()
    hparams: Optional[Mapping[str, Any]] = None
    key_floors: Optional[tuple[float, ...]] = None

    def to_json(self) -> dict[str, Any]:
        """The JSON object stored under metadata["edit"] (every key present)."""
        return {
            "version": self.VERSION,
            **{name: getattr(self, name) for name in _SCHEMA},
            "shares_residual_with": list(self.shares_residual_with),
            "hparams": None if self.hparams is None else dict(self.hparams),
            "key_floors": None if self.key_floors is None else list(self.key_floors),
        }

    @classmethod
    def from_json(cls, value: Any, fact_id: Optional[str] = None) -> "EditRecord":
        """The record stored as `value`; an EditRecordError (naming `fact_id`) when it is not a
        version-1 record with every key of the right type. Unknown keys are ignored."""
        where = f"the edit record of stored fact {fact_id!r}" if fact_id is not None else "an edit record"
        if not isinstance(value, Mapping):
            raise EditRecordError(f"{where} is not a JSON object but {type(value).__name__}")
        version = value.get("version")
        if version is None:
            raise EditRecordError(f"{where} has no schema version: it predates store format 3; open the "
                                  f"database with NeuralDB.open to migrate it")
        if version != cls.VERSION:
            raise EditRecordError(f"{where} has schema version {version!r}; this version of neuraldb_kernels "
                                  f"reads version {cls.VERSION} only (a newer release wrote it?)")
        missing = [name for name in _SCHEMA if name not in value]
        if missing:
            raise EditRecordError(f"{where} lacks the key(s) {', '.join(missing)}")
        wrong = [f"{name} must be {words}" for name, (check, words) in _SCHEMA.items() if not check(value[name])]
        if wrong:
            raise EditRecordError(f"{where} is malformed: {'; '.join(wrong)}")
        fields = {name: value[name] for name in _SCHEMA}
        fields["shares_residual_with"] = tuple(fields["shares_residual_with"])
        if fields["target_prob"] is not None:
            fields["target_prob"] = float(fields["target_prob"])
        if fields["hparams"] is not None:
            fields["hparams"] = dict(fields["hparams"])
        if fields["key_floors"] is not None:
            fields["key_floors"] = tuple(float(x) for x in fields["key_floors"])
        return cls(**fields)

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any], fact_id: Optional[str] = None) -> Optional["EditRecord"]:
        """The record in a fact's metadata, or None for a fact the Editor did not write (no "edit")."""
        if METADATA_KEY not in metadata:
            return None
        return cls.from_json(metadata[METADATA_KEY], fact_id)
