"""The `Editor`: facts in, NeuralDB rows out, live on the model at once.

    with Editor(model, tokenizer) as editor:          # a new in-memory NeuralDB, attached
        report = editor.edit(read_counterfact(path, limit=1000))
        model.generate(...)                           # answers with the edits
        editor.remove(report.ids[:10])                # undone at once
    # leaving the block detaches the database: the model is the unedited one again

Semantics:
- A fact's id is its explicit id, else a hash of (subject, filled prompt). Editing a subject +
  prompt that is already in the database REPLACES that row (upsert), unless the stored row has
  the same target_new: then it is complete and is skipped, which is how an interrupted edit
  resumes without redoing finished facts. `update()` recomputes and replaces unconditionally.
- Facts are processed in batches of `batch_size`; each batch's rows are written to the database
  in one transaction before the next batch starts, so an interruption loses at most one batch.
- A fact may hold an extra key beside its averaged one (the store keeps several keys per fact,
  one residual): the query of its bare prompt, stored when that is far from the averaged key
  (`EditHParams.bare_key_below`; prompts that start with the subject), unless it is generic: its
  cosine with a query of the model-written prefixes passes gamma, so it would fire on any text
  (the first position of a model without a BOS token looks alike for every token). Facts stored
  before these rules existed keep their keys until `update()` recomputes them.
- Facts with the same subject share one residual (`EditHParams.share_subject_residual`, on by
  default): their keys coincide where the prompt opens with the subject, so separate residuals
  would leave all but one of them unanswered. Editing a fact recomputes, in the same batch and
  transaction, the stored facts of its subject (rebuilt from their metadata); `remove()`
  recomputes the facts that shared a removed fact's residual before deleting it. Each fact keeps
  its own row, keys and metadata (its `EditRecord` under "edit": shares_residual_with lists the
  others, hparams records the hyperparameters it was computed with).
- Keys, prefixes and residuals are always computed on the UNEDITED model: the Editor keeps one
  attachment for its life (`editor.attachment`) and pauses it while it computes (retrieval is back
  afterwards, also on errors and interruptions). `editor.detach()`, or leaving a `with Editor(...)`
  block, takes the database off the model.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from ..integration import Attachment, attach, down_proj_dims, model_fingerprint
from ..store import NeuralDB
from .facts import Fact, FactError, check_facts, given_id
from .records import METADATA_KEY, EditRecord
from .report import EditReport, SkippedFact
from .hparams import resolve_hparams
from .keys import compute_keys, generic_queries, pad_token_id
from .prefixes import generate_prefixes
from .residuals import optimize_residuals
from .tokens import EditTokens, model_context_length, tokenize_fact


def superseded_facts(indexed: Iterable[tuple[int, Fact]]) -> list[tuple[int, int]]:
    """(earlier index, later index) for each fact that a later one with the same id (subject and
    prompt) replaces, given (index, fact) pairs in input order."""
    last: dict[str, int] = {}
    pairs = []
    for index, fact in indexed:
        if fact.fact_id in last:
            pairs.append((last[fact.fact_id], index))
        last[fact.fact_id] = index
    return pairs


def sharing_partners(db: NeuralDB, ids: Sequence[str]) -> list[str]:
    """Ids of the stored facts, other than `ids`, that share a residual with one of `ids` (their
    `EditRecord.shares_residual_with`), in the order the records list them."""
    removed = set(ids)
    partners: dict[str, None] = {}
    for fact_id in ids:
        record = EditRecord.from_metadata(db.get(fact_id).metadata, fact_id)
        for other in () if record is None else record.shares_residual_with:
            if other not in removed and other in db:
                partners[other] = None
    return list(partners)


def subject_units(facts: Sequence[Fact], share: bool = True) -> list[list[int]]:
    """Positions of `facts` grouped into residual-sharing units: by subject (first-appearance
    order) when `share`, else one unit per fact."""
    if not share:
        return [[position] for position in range(len(facts))]
    units: dict[str, list[int]] = {}
    for position, fact in enumerate(facts):
        units.setdefault(fact.subject, []).append(position)
    return list(units.values())


class Editor:
    """Edits facts into `model` through a NeuralDB at one FFN layer.

    model, tokenizer: a Hugging Face causal LM of a supported type and its fast tokenizer.
    db: the NeuralDB to write to; None creates an in-memory one for this model (use a NeuralDB
        with a path to keep the edits). Its layer/gamma are used when `layer`/`gamma` are None.
    layer, gamma, **hparams: override the model's preset (see `EditHParams` for every field).
    module_path: for a model type without a preset location (see integration.architectures).
    The database is attached to the model here, once, as `attachment`; a layer that already has
    a NeuralDB attached is an error (detach it, and pass its database as `db`). `detach()` or the
    end of a `with Editor(...) as editor:` block takes it off.
    """

    def __init__(self, model, tokenizer, db: Optional[NeuralDB] = None, layer: Optional[int] = None,
                 gamma: Optional[float] = None, *, module_path: Optional[str] = None, **hparams: Any):
        if db is not None and not isinstance(db, NeuralDB):
            raise TypeError(f"db must be a NeuralDB or None, got {type(db).__name__}")
        if db is not None:
            if layer is not None and db.layer is not None and layer != db.layer:
                raise ValueError(f"layer={layer} but the database was built for layer {db.layer}")
            layer = db.layer if layer is None else layer
            gamma = db.gamma if gamma is None else gamma
        self.model = model
        self.tokenizer = tokenizer
        self.module_path = module_path
        self.hparams = resolve_hparams(model, {**hparams, "layer": layer, "gamma": gamma}, module_path)
        d1, d2 = down_proj_dims(model, self.hparams.layer, module_path)
        if db is None:
            db = NeuralDB(d1=d1, d2=d2, layer=self.hparams.layer, gamma=self.hparams.gamma,
                          fingerprint=model_fingerprint(model, self.hparams.layer, module_path))
        elif (db.d1, db.d2) != (d1, d2):
            raise ValueError(f"the database holds d1={db.d1}, d2={db.d2} but layer {self.hparams.layer} of the "
                             f"model has d1={d1}, d2={d2}")
        self.db = db
        self.attachment: Attachment = attach(model, db, self.hparams.layer, self.hparams.gamma,
                                             module_path=module_path)

    def detach(self) -> None:
        """Take the database off the model (the model is then exactly as before); edits made
        afterwards are still computed and stored, but not live on the model."""
        self.attachment.detach()

    def __enter__(self) -> "Editor":
        return self

    def __exit__(self, *exc_info) -> None:
        self.detach()

    def __repr__(self) -> str:
        state = "attached" if self.attachment.attached else "detached"
        return f"Editor({state}, layer={self.hparams.layer}, gamma={self.hparams.gamma}, facts={len(self.db)})"

    # ------------------------------------------------------------------------------------ public

    def edit(self, facts: Iterable[Any], *, on_error: str = "raise", progress: bool = True,
             callback: Optional[Callable[[list[str]], None]] = None) -> EditReport:
        """Edit `facts` (Fact objects or mappings, see `Fact`); returns an `EditReport` (`.ids`:
        their ids in input order, skipped facts left out). Facts already stored with the same
        target_new are not redone (`already_stored`). Facts with the same id (subject and prompt)
        in one call: the last one is edited (`superseded`: (earlier input index, the later index
        that replaced it)). `first_token_subjects`: computed facts whose prompt opens with a
        one-token subject in a tokenizer without BOS: their key sits at position 0, which the
        model barely reads (an attention sink), so their own prompt often keeps its answer.

        on_error: "raise" (a FactError naming the first bad fact's index and id) or "skip" (bad
            facts are left out and listed in the report's `skipped`).
        progress: a tqdm bar (facts/s and ETA over the whole call) whose description names the
            phase running (prefixes, generic queries, then keys / residuals / store per batch).
        callback(ids): called after each committed batch with the ids it wrote.
        """
        return self._run(facts, on_error=on_error, progress=progress, callback=callback, replace=False)

    def update(self, facts: Iterable[Any], *, on_error: str = "raise", progress: bool = True,
               callback: Optional[Callable[[list[str]], None]] = None) -> EditReport:
        """Recompute and replace facts that are already in the database (a ValueError listing the
        ids that are not); same arguments as `edit`."""
        return self._run(facts, on_error=on_error, progress=progress, callback=callback, replace=True)

    def remove(self, ids: str | Sequence[str], *, missing_ok: bool = False) -> list[str]:
        """Delete facts by id (one transaction); effective at the model's next forward. Returns
        the ids deleted; a bad or missing id is an error (nothing changed, see
        `NeuralDB.ids_to_delete`) unless missing_ok allows it. Facts
        that shared a removed fact's residual are recomputed without it first (a progress-free
        `update`), so that their residual no longer carries its target."""
        present = self.db.ids_to_delete(ids, missing_ok=missing_ok)  # the store's checks, before any work
        partners = sharing_partners(self.db, present)
        if partners:
            facts = [Fact.from_metadata(fact_id, self.db.get(fact_id).metadata) for fact_id in partners]
            self._run(facts, on_error="raise", progress=False, callback=None, replace=True, exclude=set(present))
        return self.db.delete(present)

    # ---------------------------------------------------------------------------------- internals

    def _tokenize(self, indexed: list[tuple[int, Fact]], prefixes, on_error: str,
                  skipped: list[SkippedFact]) -> tuple[list[tuple[int, Fact]], list[EditTokens]]:
        """The facts that tokenise and their tokens; the others raise or are added to `skipped`."""
        kept, tokens = [], []
        for index, fact in indexed:
            try:
                tokens.append(self._fact_tokens(fact, prefixes, index))
                kept.append((index, fact))
            except FactError as error:
                if on_error == "raise":
                    raise
                skipped.append(SkippedFact(index, given_id(fact), str(error)))
        return kept, tokens

    def _fact_tokens(self, fact: Fact, prefixes, index: int) -> EditTokens:
        """`fact` tokenised for this model and these hparams (a FactError naming input `index`)."""
        return tokenize_fact(self.tokenizer, fact, prefixes, index=index, max_length=model_context_length(self.model),
                             kl_template=self.hparams.kl_template)

    def _pending(self, indexed: list[tuple[int, Fact]], replace: bool) -> tuple[list[int], list[str]]:
        """(positions in `indexed` still to compute, the last fact winning when an id repeats;
        ids already stored with the same target_new, not redone)."""
        last_of = {fact.fact_id: position for position, (_, fact) in enumerate(indexed)}
        if replace:
            missing = [fact_id for fact_id in last_of if fact_id not in self.db]
            if missing:
                raise ValueError(f"update: {len(missing)} fact(s) are not in the database, e.g. id {missing[0]!r}; "
                                 f"use edit() to add facts")
            return sorted(last_of.values()), []
        pending, stored = [], []
        for fact_id, position in last_of.items():
            if fact_id in self.db:
                if self.db.get(fact_id).metadata.get("target_new") == indexed[position][1].target_new:
                    stored.append(fact_id)
                    continue
            pending.append(position)
        return sorted(pending), stored

    def _run(self, facts, *, on_error: str, progress: bool, callback, replace: bool,
             exclude: frozenset[str] | set[str] = frozenset()) -> EditReport:
        """Edit (replace=False) or update; `exclude`: stored ids never pulled in as companions."""
        started = time.perf_counter()
        seconds = dict.fromkeys(("prefixes", "keys", "residuals", "store"), 0.0)
        valid, skipped = check_facts(facts, on_error=on_error, indexed=True)
        hp = self.hparams
        pad_id = pad_token_id(self.tokenizer)
        # the bar starts now and averages over the whole call (smoothing=0), so its s/fact counts
        # the prefixes and generic queries too
        with self.attachment.paused(), tqdm(total=None, unit="fact", desc="editing: prefixes", disable=not progress,
                                            smoothing=0) as bar:
            stage = time.perf_counter()
            prefixes = generate_prefixes(self.model, self.tokenizer, count=hp.n_prefixes, length=hp.prefix_length,
                                         seed=hp.prefix_seed)
            indexed, tokens = self._tokenize(valid, prefixes, on_error, skipped)
            seconds["prefixes"] += time.perf_counter() - stage
            bar.set_description("editing: generic queries")
            stage = time.perf_counter()
            generic = generic_queries(self.model, self.tokenizer, prefixes, hp.layer, pad_id=pad_id,
                                      module_path=self.module_path)
            seconds["keys"] += time.perf_counter() - stage
            positions, already_stored = self._pending(indexed, replace)
            work = [(indexed[p][1], tokens[p]) for p in positions]
            given = len(work)
            if hp.share_subject_residual and work:
                work += self._companions([fact for fact, _ in work], prefixes, exclude)
            units = subject_units([fact for fact, _ in work], hp.share_subject_residual)
            # similar lengths together: less padding per batch
            units.sort(key=lambda unit: max(len(work[p][1].target) + len(work[p][1].contexts[0])
                                            - work[p][1].subject_last[0] for p in unit))
            bar.total = len(work)
            bar.refresh()
            batches = list(_batches(units, hp.batch_size))
            outcome = _Outcome()
            for number, batch in enumerate(batches, start=1):
                members = [p for unit in batch for p in unit]
                local = {p: i for i, p in enumerate(members)}
                where = f"(batch {number}/{len(batches)})"
                self._commit([work[p][0] for p in members], [work[p][1] for p in members],
                             [[local[p] for p in unit] for unit in batch], pad_id, generic, callback, outcome,
                             seconds, lambda phase, where=where: bar.set_description(f"editing: {phase} {where}"))
                bar.update(len(members))
        seconds["total"] = time.perf_counter() - started
        return EditReport(
            ids=tuple(fact.fact_id for _, fact in indexed), computed=tuple(outcome.computed),
            companions=tuple(fact.fact_id for fact, _ in work[given:]), already_stored=tuple(already_stored),
            skipped=tuple(sorted(skipped, key=lambda entry: entry.index)), superseded=tuple(superseded_facts(indexed)),
            first_token_subjects=tuple(outcome.first_token_subjects), not_converged=tuple(outcome.not_converged),
            seconds=seconds)

    def _companions(self, facts: list[Fact], prefixes, exclude) -> list[tuple[Fact, EditTokens]]:
        """The stored facts of the subjects of `facts` that are not among them (nor in `exclude`),
        rebuilt from their metadata and tokenised: they are recomputed with `facts`."""
        taken = {fact.fact_id for fact in facts} | set(exclude)
        stored = self.db.metadata_where("subject", sorted({fact.subject for fact in facts}))
        companions = []
        for fact_id, metadata in stored.items():
            if fact_id in taken:
                continue
            fact = Fact.from_metadata(fact_id, metadata)
            try:
                tokens = self._fact_tokens(fact, prefixes, 0)
            except FactError as error:
                raise FactError(f"stored fact {fact_id!r} shares its subject with a fact being edited but cannot "
                                f"be recomputed with it: {error}") from None
            companions.append((fact, tokens))
        return companions

    def _commit(self, facts: list[Fact], tokens: list[EditTokens], units: list[list[int]], pad_id: int,
                generic: torch.Tensor, callback, outcome: "_Outcome", seconds: dict[str, float],
                phase: Callable[[str], None]) -> None:
        """Compute and store one batch; units: positions of `facts` sharing one residual.
        generic: (t, d1) unit generic queries (see generic_queries). Adds to `outcome` and to the
        stages' `seconds`; phase(name) is told each stage as it starts."""
        hp = self.hparams
        phase("keys")
        stage = time.perf_counter()
        keys, bare = compute_keys(self.model, tokens, hp.layer, pad_id=pad_id, batch_size=hp.batch_size,
                                  module_path=self.module_path)
        # the bare prompt's own query becomes an extra key where it is far from the averaged key,
        # unless it is generic (it would pass the gate on arbitrary text)
        far = (torch.nn.functional.cosine_similarity(bare, keys, dim=1) < hp.bare_key_below).tolist()
        is_generic = [False] * len(facts)  # (no prefixes: nothing to compare with)
        if len(generic):
            best = (torch.nn.functional.normalize(bare, dim=1) @ generic.T).max(dim=1).values
            is_generic = (best > hp.gamma).tolist()
        extra = [far[i] and not is_generic[i] for i in range(len(facts))]
        seconds["keys"] += time.perf_counter() - stage
        phase("residuals")
        stage = time.perf_counter()
        result = optimize_residuals(self.model, tokens, hp, pad_id=pad_id, module_path=self.module_path, units=units)
        seconds["residuals"] += time.perf_counter() - stage
        phase("store")
        stage = time.perf_counter()
        ids = [fact.fact_id for fact in facts]
        first_token = [t.subject_last[0] == 0 for t in tokens]  # keyed at position 0 (see edit())
        partners = {i: [ids[j] for j in unit if j != i] for unit in units for i in unit}
        metadata = []
        for i, fact in enumerate(facts):
            record = EditRecord(layer=hp.layer, subject_start=fact.subject_span[0], subject_first_token=first_token[i],
                                target_prob=float(result.target_prob[i]), steps=int(result.steps[i]),
                                converged=bool(result.converged[i]), bare_prompt_key=extra[i],
                                bare_prompt_key_generic=far[i] and is_generic[i],
                                shares_residual_with=tuple(partners[i]), hparams=dataclasses.asdict(hp))
            metadata.append({**fact.metadata(), METADATA_KEY: record.to_json()})
        self.db.upsert(keys, result.residuals, ids, metadata,
                       extra_keys=[bare[i] if extra[i] else None for i in range(len(facts))])
        seconds["store"] += time.perf_counter() - stage
        outcome.computed += ids
        outcome.first_token_subjects += [ids[i] for i in range(len(facts)) if first_token[i]]
        outcome.not_converged += [ids[i] for i in range(len(facts)) if not bool(result.converged[i])]
        if callback is not None:
            callback(ids)


@dataclasses.dataclass
class _Outcome:
    """What the committed batches of one call wrote (ids in commit order)."""

    computed: list[str] = dataclasses.field(default_factory=list)
    first_token_subjects: list[str] = dataclasses.field(default_factory=list)
    not_converged: list[str] = dataclasses.field(default_factory=list)


def _batches(units: list[list[int]], batch_size: int) -> Iterable[list[list[int]]]:
    """Consecutive units grouped into batches of at most batch_size facts (a larger unit alone)."""
    batch: list[list[int]] = []
    size = 0
    for unit in units:
        if batch and size + len(unit) > batch_size:
            yield batch
            batch, size = [], 0
        batch.append(unit)
        size += len(unit)
    if batch:
        yield batch
