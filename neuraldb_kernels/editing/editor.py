"""The `Editor`: facts in, NeuralDB rows out, live on the model at once.

    editor = Editor(model, tokenizer)                 # a new in-memory NeuralDB, attached
    ids = editor.edit(read_counterfact(path, limit=1000))
    model.generate(...)                               # answers with the edits
    editor.remove(ids[:10])                           # undone at once

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
  its own row, keys and metadata ("edit" / "shares_residual_with" lists the others; "edit" /
  "hparams" records the hyperparameters it was computed with).
- Keys, prefixes and residuals are always computed on the UNEDITED model: the Editor's attachment
  is taken off while it computes and put back afterwards (also on errors and interruptions);
  `editor.handle` is the current attachment (a new object after every edit/update).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from ..integration import attach, down_proj_dims, model_fingerprint
from ..store import NeuralDB
from .facts import Fact, FactError, check_facts
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
    """Ids of the stored facts, other than `ids`, that share a residual with one of `ids` (the
    Editor's "edit" / "shares_residual_with" metadata), in database order."""
    removed = set(ids)
    partners: dict[str, None] = {}
    for fact_id in ids:
        for other in db.get(fact_id).metadata.get("edit", {}).get("shares_residual_with", []):
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
    The database is attached to the model here; a layer that already has a NeuralDB attached is
    an error (detach it, and pass its database as `db`).
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
        self.skipped: list[tuple[int, str]] = []
        self.superseded: list[tuple[int, int]] = []
        self.first_token_subjects: list[str] = []
        self.handle = self._attach()

    def _attach(self):
        return attach(self.model, self.db, self.hparams.layer, self.hparams.gamma, module_path=self.module_path)

    def __repr__(self) -> str:
        return f"Editor(layer={self.hparams.layer}, gamma={self.hparams.gamma}, facts={len(self.db)})"

    # ------------------------------------------------------------------------------------ public

    def edit(self, facts: Iterable[Any], *, on_error: str = "raise", progress: bool = True,
             callback: Optional[Callable[[list[str]], None]] = None) -> list[str]:
        """Edit `facts` (Fact objects or mappings, see `Fact`); returns their ids in input order
        (skipped facts left out). Facts already stored with the same target_new are not redone.
        Facts with the same id (subject and prompt) in one call: the last one is edited, and
        `self.superseded` lists (earlier input index, the later index that replaced it).
        `self.first_token_subjects` lists the ids of computed facts whose prompt opens with a
        one-token subject in a tokenizer without BOS: their key sits at position 0, which the
        model barely reads (an attention sink), so their own prompt often keeps its answer.

        on_error: "raise" (a FactError naming the first bad fact's index and id) or "skip" (bad
            facts are left out and listed in `self.skipped` as (input index, message)).
        progress: show a tqdm bar (facts/s, ETA). callback(ids): called after each committed batch.
        """
        return self._run(facts, on_error=on_error, progress=progress, callback=callback, replace=False)

    def update(self, facts: Iterable[Any], *, on_error: str = "raise", progress: bool = True,
               callback: Optional[Callable[[list[str]], None]] = None) -> list[str]:
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

    def _tokenize(self, indexed: list[tuple[int, Fact]], prefixes, on_error: str):
        kept, tokens = [], []
        for index, fact in indexed:
            try:
                tokens.append(self._fact_tokens(fact, prefixes, index))
                kept.append((index, fact))
            except FactError as error:
                if on_error == "raise":
                    raise
                self.skipped.append((index, str(error)))
        return kept, tokens

    def _fact_tokens(self, fact: Fact, prefixes, index: int) -> EditTokens:
        """`fact` tokenised for this model and these hparams (a FactError naming input `index`)."""
        return tokenize_fact(self.tokenizer, fact, prefixes, index=index, max_length=model_context_length(self.model),
                             kl_template=self.hparams.kl_template)

    def _pending(self, indexed: list[tuple[int, Fact]], replace: bool) -> list[int]:
        """Positions in `indexed` still to compute (the last fact wins when an id repeats)."""
        last_of = {fact.fact_id: position for position, (_, fact) in enumerate(indexed)}
        if replace:
            missing = [fact_id for fact_id in last_of if fact_id not in self.db]
            if missing:
                raise ValueError(f"update: {len(missing)} fact(s) are not in the database, e.g. id {missing[0]!r}; "
                                 f"use edit() to add facts")
            return sorted(last_of.values())
        pending = []
        for fact_id, position in last_of.items():
            if fact_id in self.db:
                stored = self.db.get(fact_id).metadata
                if stored.get("target_new") == indexed[position][1].target_new:
                    continue
            pending.append(position)
        return sorted(pending)

    def _run(self, facts, *, on_error: str, progress: bool, callback, replace: bool,
             exclude: frozenset[str] | set[str] = frozenset()) -> list[str]:
        """Edit (replace=False) or update; `exclude`: stored ids never pulled in as companions."""
        valid, self.skipped = check_facts(facts, on_error=on_error, indexed=True)
        hp = self.hparams
        pad_id = pad_token_id(self.tokenizer)
        self.handle.detach()
        try:
            prefixes = generate_prefixes(self.model, self.tokenizer, count=hp.n_prefixes, length=hp.prefix_length,
                                         seed=hp.prefix_seed)
            indexed, tokens = self._tokenize(valid, prefixes, on_error)
            self.superseded = superseded_facts(indexed)
            self.first_token_subjects = []
            generic = generic_queries(self.model, self.tokenizer, prefixes, hp.layer, pad_id=pad_id,
                                      module_path=self.module_path)
            work = [(indexed[p][1], tokens[p]) for p in self._pending(indexed, replace)]
            if hp.share_subject_residual and work:
                work += self._companions([fact for fact, _ in work], prefixes, exclude)
            units = subject_units([fact for fact, _ in work], hp.share_subject_residual)
            # similar lengths together: less padding per batch
            units.sort(key=lambda unit: max(len(work[p][1].target) + len(work[p][1].contexts[0])
                                            - work[p][1].subject_last[0] for p in unit))
            with tqdm(total=len(work), unit="fact", desc="editing", disable=not progress) as bar:
                for batch in _batches(units, hp.batch_size):
                    positions = [p for unit in batch for p in unit]
                    local = {p: i for i, p in enumerate(positions)}
                    self._commit([work[p][0] for p in positions], [work[p][1] for p in positions],
                                 [[local[p] for p in unit] for unit in batch], pad_id, generic, callback)
                    bar.update(len(positions))
        finally:
            self.handle = self._attach()
        return [fact.fact_id for _, fact in indexed]

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
                generic: torch.Tensor, callback) -> None:
        """Compute and store one batch; units: positions of `facts` sharing one residual.
        generic: (t, d1) unit generic queries (see generic_queries)."""
        hp = self.hparams
        keys, bare = compute_keys(self.model, tokens, hp.layer, pad_id=pad_id, batch_size=hp.batch_size,
                                  module_path=self.module_path)
        result = optimize_residuals(self.model, tokens, hp, pad_id=pad_id, module_path=self.module_path, units=units)
        # the bare prompt's own query becomes an extra key where it is far from the averaged key,
        # unless it is generic (it would pass the gate on arbitrary text)
        far = (torch.nn.functional.cosine_similarity(bare, keys, dim=1) < hp.bare_key_below).tolist()
        is_generic = [False] * len(facts)  # (no prefixes: nothing to compare with)
        if len(generic):
            best = (torch.nn.functional.normalize(bare, dim=1) @ generic.T).max(dim=1).values
            is_generic = (best > hp.gamma).tolist()
        extra = [far[i] and not is_generic[i] for i in range(len(facts))]
        ids = [fact.fact_id for fact in facts]
        first_token = [t.subject_last[0] == 0 for t in tokens]  # keyed at position 0 (see edit())
        self.first_token_subjects += [ids[i] for i in range(len(facts)) if first_token[i]]
        partners = {i: [ids[j] for j in unit if j != i] for unit in units for i in unit}
        metadata = []
        for i, fact in enumerate(facts):
            record = {"layer": hp.layer, "subject_start": fact.subject_span[0], "subject_first_token": first_token[i],
                      "target_prob": float(result.target_prob[i]), "steps": int(result.steps[i]),
                      "converged": bool(result.converged[i]), "bare_prompt_key": extra[i],
                      "bare_prompt_key_generic": far[i] and is_generic[i], "hparams": dataclasses.asdict(hp)}
            if partners[i]:
                record["shares_residual_with"] = partners[i]
            metadata.append({**fact.metadata(), "edit": record})
        self.db.upsert(keys, result.residuals, ids, metadata,
                       extra_keys=[bare[i] if extra[i] else None for i in range(len(facts))])
        if callback is not None:
            callback(ids)


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
