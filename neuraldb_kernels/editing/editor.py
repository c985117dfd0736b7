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
  (`EditHParams.bare_key_below`; prompts that start with the subject). A generic one (its cosine
  with a query of the model-written prefixes passes gamma: the first positions of a model without
  a BOS token look alike for every token) is stored only with calibrated thresholds, and only when
  its own threshold can sit between model-written text and its prompt (`keys.bare_prompt_keys`);
  without it such a prompt is won by another fact's key. Facts stored before these rules existed
  keep their keys until `update()` recomputes them.
- Facts with the same subject share one residual (`EditHParams.share_subject_residual`, on by
  default): their keys coincide where the prompt opens with the subject, so separate residuals
  would leave all but one of them unanswered. Editing a fact recomputes, in the same batch and
  transaction, the stored facts of its subject (rebuilt from their metadata); `remove()`
  recomputes the facts that shared a removed fact's residual before deleting it. Each fact keeps
  its own row, keys and metadata (its `EditRecord` under "edit": shares_residual_with lists the
  others, hparams records the hyperparameters it was computed with).
- Each key gets its own gate threshold (`EditHParams.calibrate_gates`, on by default): between the
  queries of model-written text and of the other facts, and those of its fact's own contexts and
  of its subject after other prompts' openings (editing.calibration states the rule; the Editor
  holds the stored facts' subjects and prompt openings and updates them from its own writes, see
  `_StoredPool`); stored keys that a
  new fact's queries would fire are raised in the same transaction. Removing facts leaves the
  other thresholds as they are. `calibrate()` recomputes every stored fact's thresholds.
- Keys, prefixes and residuals are always computed on the UNEDITED model: the Editor keeps one
  attachment for its life (`editor.attachment`) and pauses it while it computes (retrieval is back
  afterwards, also on errors and interruptions). `editor.detach()`, or leaving a `with Editor(...)`
  block, takes the database off the model.
"""

from __future__ import annotations

import contextlib
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
from .calibration import (Recalibration, calibrate_thresholds, calibration_rows, colliding_rows, model_written_texts,
                          nearest_rows, raised_thresholds)
from .keys import bare_prompt_keys, context_queries, down_proj_inputs, generic_queries, keys_of, pad_token_id
from .prefixes import generate_prefixes
from .residuals import optimize_residuals
from .rewordings import question_rewordings
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
        self._stored_pool = _StoredPool()
        # the database's own gamma is not passed: it would override the keys' own thresholds
        self.attachment: Attachment = attach(model, db, self.hparams.layer,
                                             None if self.hparams.gamma == db.gamma else self.hparams.gamma,
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
        in_step = self._stored_pool.in_step(self.db)
        deleted = self.db.delete(present)
        if in_step:
            self._stored_pool.drop(deleted, self.db.version)
        return deleted

    # ---------------------------------------------------------------------------------- internals

    def _tokenize(self, indexed: list[tuple[int, Fact]], prefixes, on_error: str,
                  skipped: list[SkippedFact]) -> tuple[list[tuple[int, Fact]], list[EditTokens]]:
        """The facts that tokenise and their tokens (no rewordings yet: `_reworded` adds them per
        batch); the others raise or are added to `skipped`."""
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

    def _fact_tokens(self, fact: Fact, prefixes, index: int, rewordings: Sequence[str] = ()) -> EditTokens:
        """`fact` (and its `rewordings`) tokenised for this model and these hparams (a FactError
        naming input `index`)."""
        return tokenize_fact(self.tokenizer, fact, prefixes, index=index, max_length=model_context_length(self.model),
                             kl_template=self.hparams.kl_template, rewordings=rewordings)

    def _reworded(self, facts: Sequence[Fact], tokens: Sequence[EditTokens], prefixes) -> list[EditTokens]:
        """`tokens` of one batch's `facts` with their model-written rewordings (`EditHParams.rewordings`,
        questions only; the caller pauses the database). Sampled per batch, so that a run commits its
        first batch early and an interrupted run keeps every committed batch. A fact whose rewordings
        would not fit the model's context keeps its tokens without them."""
        found = list(tokens)
        written = question_rewordings(self.model, self.tokenizer, facts, self.hparams.rewordings,
                                      seed=self.hparams.prefix_seed)
        for i, reworded in enumerate(written):
            if reworded:
                with contextlib.suppress(FactError):
                    found[i] = self._fact_tokens(facts[i], prefixes, 0, reworded)
        return found

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
            text_negatives = self._text_negatives(generic, pad_id) if hp.calibrate_gates else None
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
            pool = (self._stored_pool.synced(self.db).with_facts([fact for fact, _ in work], hp.near_subjects > 0)
                    if hp.calibrate_gates else None)
            outcome = _Outcome()
            for number, batch in enumerate(batches, start=1):
                members = [p for unit in batch for p in unit]
                local = {p: i for i, p in enumerate(members)}
                where = f"(batch {number}/{len(batches)})"
                bar.set_description(f"editing: rewordings {where}")
                stage = time.perf_counter()
                batch_facts = [work[p][0] for p in members]
                reworded = self._reworded(batch_facts, [work[p][1] for p in members], prefixes)
                seconds["prefixes"] += time.perf_counter() - stage
                self._commit(batch_facts, reworded,
                             [[local[p] for p in unit] for unit in batch], pad_id, generic, text_negatives,
                             pool, prefixes, callback, outcome,
                             seconds, lambda phase, where=where: bar.set_description(f"editing: {phase} {where}"))
                bar.update(len(members))
        seconds["total"] = time.perf_counter() - started
        return EditReport(
            ids=tuple(fact.fact_id for _, fact in indexed), computed=tuple(outcome.computed),
            companions=tuple(fact.fact_id for fact, _ in work[given:]), already_stored=tuple(already_stored),
            skipped=tuple(sorted(skipped, key=lambda entry: entry.index)), superseded=tuple(superseded_facts(indexed)),
            first_token_subjects=tuple(outcome.first_token_subjects), not_converged=tuple(outcome.not_converged),
            seconds=seconds, threshold_conflicts=tuple(dict.fromkeys(outcome.threshold_conflicts)),
            raised_thresholds=tuple(dict.fromkeys(outcome.raised_thresholds)))

    def _companions(self, facts: list[Fact], prefixes, exclude) -> list[tuple[Fact, EditTokens]]:
        """The stored facts of the subjects of `facts` that are not among them (nor in `exclude`),
        rebuilt from their metadata and tokenised: they are recomputed with `facts`."""
        taken = {fact.fact_id for fact in facts} | set(exclude)
        stored = self.db.metadata_where("subject", sorted({fact.subject for fact in facts}))
        companions = []
        others = [Fact.from_metadata(fact_id, metadata) for fact_id, metadata in stored.items() if fact_id not in taken]
        for fact in others:
            fact_id = fact.fact_id
            try:
                tokens = self._fact_tokens(fact, prefixes, 0)
            except FactError as error:
                raise FactError(f"stored fact {fact_id!r} shares its subject with a fact being edited but cannot "
                                f"be recomputed with it: {error}") from None
            companions.append((fact, tokens))
        return companions

    def _text_negatives(self, generic: torch.Tensor, pad_id: int) -> torch.Tensor:
        """(t, d1) unit queries at every token of model-written text: `generic` (the prefixes') and
        those of `calibration_texts` longer texts (seeded apart from the prefixes)."""
        hp = self.hparams
        texts = model_written_texts(self.model, self.tokenizer, count=hp.calibration_texts,
                                    length=hp.calibration_text_length, seed=hp.prefix_seed + 1)
        bank = generic_queries(self.model, self.tokenizer, texts, hp.layer, pad_id=pad_id, module_path=self.module_path)
        return torch.cat([generic, bank])

    def _calibration_queries(self, facts: Sequence[Fact], prefixes, pool: "_Pool",
                             pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(positives (p, d1), their fact's index into `facts` (p,) int64, negatives (n, d1)): the
        near-subject negatives and other-wording positives of `facts` (calibration.calibration_rows)
        read on the model as it is (the caller pauses the database)."""
        hp = self.hparams
        rows = calibration_rows(self.tokenizer, facts, prefixes, pool.subjects, pool.heads,
                                near_subjects_per_fact=hp.near_subjects, heads_per_fact=hp.other_wordings)

        def read(token_rows, positions):
            """(len(token_rows), d1) at `positions`, or (total tokens, d1) at every token (None)."""
            found = []
            for start in range(0, len(token_rows), 4 * hp.batch_size):
                chosen = slice(start, start + 4 * hp.batch_size)
                found.append(down_proj_inputs(self.model, token_rows[chosen],
                                              None if positions is None else positions[chosen], hp.layer,
                                              pad_id=pad_id, module_path=self.module_path).cpu())
            return torch.cat(found) if found else torch.zeros(0, self.db.d1)

        near = torch.cat([read(rows.negative_rows, rows.negative_positions), read(rows.opening_rows, None)])
        return (read(rows.positive_rows, rows.positive_positions), torch.tensor(rows.positive_owner, dtype=torch.long),
                near)

    def _commit(self, facts: list[Fact], tokens: list[EditTokens], units: list[list[int]], pad_id: int,
                generic: torch.Tensor, text_negatives: Optional[torch.Tensor], pool: Optional["_Pool"], prefixes,
                callback, outcome: "_Outcome", seconds: dict[str, float], phase: Callable[[str], None]) -> None:
        """Compute and store one batch; units: positions of `facts` sharing one residual.
        generic: (t, d1) unit generic queries (see generic_queries); text_negatives: the unit
        queries of model-written text for calibration (None: thresholds not calibrated); pool: the
        subjects and prompt openings near-subject negatives and other wordings come from. Adds to
        `outcome` and to the stages' `seconds`; phase(name) is told each stage as it starts."""
        hp = self.hparams
        phase("keys")
        stage = time.perf_counter()
        queries, counts = context_queries(self.model, tokens, hp.layer, pad_id=pad_id, batch_size=hp.batch_size,
                                          module_path=self.module_path)
        keys, bare = keys_of(queries, counts)
        ids = [fact.fact_id for fact in facts]
        outside = _OtherKeys.of(self.db, set(ids))  # the batch's stored rows are replaced now (companions included)
        unit_of = torch.empty(len(ids), dtype=torch.long)
        for number, unit in enumerate(units):
            unit_of[unit] = number
        # the bare prompt's own query becomes an extra key where it is far from the averaged key or
        # another fact's key would win the bare prompt, unless it is generic and no calibrated
        # threshold can keep it off model-written text
        decided = bare_prompt_keys(keys, bare, generic, below=hp.bare_key_below, gamma=hp.gamma,
                                   text=text_negatives, margin=hp.gate_margin, units=unit_of, stored=outside.keys)
        extra, generic_far = decided.extra.tolist(), (decided.far & decided.generic).tolist()
        fact_keys = [torch.stack([keys[i], bare[i]]) if extra[i] else keys[i : i + 1] for i in range(len(facts))]
        exact = _exact_rows([(extra[i], bool(decided.generic[i])) for i in range(len(facts))],
                            [len(k) for k in fact_keys])
        gates = None
        if text_negatives is not None:
            wordings, wording_fact, near = self._calibration_queries(facts, prefixes, pool, pad_id)
            gates = self._batch_gates(ids, fact_keys, exact, queries, counts, unit_of, outside, text_negatives,
                                      wordings, wording_fact, near)
        seconds["keys"] += time.perf_counter() - stage
        phase("residuals")
        stage = time.perf_counter()
        result = optimize_residuals(self.model, tokens, hp, pad_id=pad_id, module_path=self.module_path, units=units)
        seconds["residuals"] += time.perf_counter() - stage
        phase("store")
        stage = time.perf_counter()
        first_token = [t.subject_last[0] == 0 for t in tokens]  # keyed at position 0 (see edit())
        partners = {i: [ids[j] for j in unit if j != i] for unit in units for i in unit}
        metadata = []
        for i, fact in enumerate(facts):
            record = EditRecord(layer=hp.layer, subject_start=fact.subject_span[0], subject_first_token=first_token[i],
                                target_prob=float(result.target_prob[i]), steps=int(result.steps[i]),
                                converged=bool(result.converged[i]), bare_prompt_key=extra[i],
                                bare_prompt_key_generic=generic_far[i],
                                shares_residual_with=tuple(partners[i]), hparams=dataclasses.asdict(hp),
                                key_floors=None if gates is None else tuple(gates.floors[i].tolist()))
            metadata.append({**fact.metadata(), METADATA_KEY: record.to_json()})
        rows = [k[0] for k in fact_keys]
        residuals = [result.residuals[i].float() for i in range(len(facts))]
        extra_keys = [k[1:] if len(k) > 1 else None for k in fact_keys]
        key_gammas = None if gates is None else list(gates.gammas)
        if gates is not None:  # the raised stored facts, rewritten unchanged but for their thresholds
            for stored, gammas in gates.raised:
                ids.append(stored.id)
                rows.append(stored.keys[0].float())
                residuals.append(stored.residual.float())
                metadata.append(stored.metadata)
                extra_keys.append(stored.keys[1:].float() if len(stored.keys) > 1 else None)
                key_gammas.append(gammas)
        in_step = self._stored_pool.in_step(self.db)
        self.db.upsert(torch.stack(rows), torch.stack(residuals), ids, metadata, extra_keys=extra_keys,
                       key_gammas=key_gammas)
        if in_step:  # the raised stored facts keep their subjects and prompts
            self._stored_pool.put(facts, self.db.version)
        seconds["store"] += time.perf_counter() - stage
        computed = ids[: len(facts)]
        outcome.computed += computed
        outcome.first_token_subjects += [computed[i] for i in range(len(facts)) if first_token[i]]
        outcome.not_converged += [computed[i] for i in range(len(facts)) if not bool(result.converged[i])]
        if gates is not None:
            outcome.threshold_conflicts += gates.conflicts
            outcome.raised_thresholds += [stored.id for stored, _ in gates.raised]
        if callback is not None:
            callback(computed)

    def _batch_gates(self, ids: list[str], fact_keys: list[torch.Tensor], exact: torch.Tensor, queries: torch.Tensor,
                     counts: torch.Tensor, unit_of: torch.Tensor, outside: "_OtherKeys", text_negatives: torch.Tensor,
                     wordings: torch.Tensor, wording_fact: torch.Tensor, near: torch.Tensor) -> "_BatchGates":
        """Thresholds of a batch's keys (fact_keys[i]: (k_i, d1); `exact`: which of their rows, in
        order, are exact-match keys, see editing.calibration) from its context `queries` (counts
        per fact) and other-wording queries `wordings` (of fact wording_fact[j]) against text, the
        near-subject queries `near`, the batch's other units (unit_of[i]: fact i's) and `outside`, the
        key rows of the facts outside the batch; and the stored facts whose thresholds the batch's
        queries require raised (editing.calibration)."""
        hp = self.hparams
        key_fact = torch.repeat_interleave(torch.arange(len(ids)), torch.tensor([len(k) for k in fact_keys]))
        all_keys = torch.cat(fact_keys)
        query_fact = torch.cat([torch.repeat_interleave(torch.arange(len(ids)), counts), wording_fact])
        positives = torch.cat([queries, wordings])
        positive_row = nearest_rows(positives, query_fact, all_keys, key_fact)
        negatives = torch.cat([text_negatives, near, positives, outside.keys])
        negative_unit = torch.cat([torch.full((len(text_negatives) + len(near),), -1), unit_of[query_fact],
                                   torch.full((len(outside.keys),), -1)])
        found = calibrate_thresholds(all_keys, unit_of[key_fact], positives, positive_row, negatives, negative_unit,
                                     gamma=hp.gamma, margin=hp.gate_margin, exact=exact)
        bounds = torch.cumsum(torch.tensor([0] + [len(k) for k in fact_keys]), 0).tolist()
        per_fact = [slice(bounds[i], bounds[i + 1]) for i in range(len(ids))]
        conflicts = [ids[i] for i in range(len(ids)) if bool(found.conflicts[per_fact[i]].any())]
        raised = []
        passing = torch.cat([positives, near])  # what the stored keys must not fire on
        for fact_id in dict.fromkeys(outside.ids[row] for row in colliding_rows(passing, outside.keys, outside.gammas)):
            stored = self.db.get(fact_id)
            record = EditRecord.from_metadata(stored.metadata, fact_id)
            floors = None if record is None or record.key_floors is None else torch.tensor(record.key_floors)
            if floors is None or len(floors) != len(stored.keys):
                continue  # not calibrated: `calibrate()` recomputes it
            current = stored.key_gammas if stored.key_gammas is not None else torch.full((len(stored.keys),),
                                                                                       self.db.gamma)
            change = raised_thresholds(passing, stored.keys, current, floors, margin=hp.gate_margin)
            if change is not None:
                raised.append((stored, change.gammas))
                if change.conflict:
                    conflicts.append(fact_id)
        return _BatchGates([found.gammas[rows] for rows in per_fact], [found.floors[rows] for rows in per_fact],
                           conflicts, raised)

    def calibrate(self, *, progress: bool = True) -> Recalibration:
        """Recompute the thresholds (and floors) of every stored fact the Editor wrote, from all of
        them at once: its contexts' and other wordings' queries on the unedited model against
        model-written text, near-subject names and the other facts' queries (editing.calibration),
        the stored facts being the pool of subjects and prompt openings; one transaction. Facts without an
        EditRecord, or that no longer tokenise, are left as they are (`skipped`)."""
        started = time.perf_counter()
        hp = self.hparams
        pad_id = pad_token_id(self.tokenizer)
        stored, facts, tokens, skipped, groups = [], [], [], [], {}
        with self.attachment.paused():
            prefixes = generate_prefixes(self.model, self.tokenizer, count=hp.n_prefixes, length=hp.prefix_length,
                                         seed=hp.prefix_seed)
            for fact in tqdm(self.db.facts(), total=len(self.db), desc="calibrating: reading", disable=not progress):
                record = EditRecord.from_metadata(fact.metadata, fact.id)
                try:
                    if record is None:
                        raise FactError("no edit record")
                    facts.append(Fact.from_metadata(fact.id, fact.metadata))
                    tokens.append(self._fact_tokens(facts[-1], prefixes, 0))
                except FactError:
                    del facts[len(tokens):]
                    skipped.append(fact.id)
                    continue
                stored.append(fact)
                group = frozenset((fact.id, *record.shares_residual_with))
                groups.setdefault(group, len(groups))
            generic = generic_queries(self.model, self.tokenizer, prefixes, hp.layer, pad_id=pad_id,
                                      module_path=self.module_path)
            text_negatives = self._text_negatives(generic, pad_id)
            queries, counts = context_queries(self.model, tokens, hp.layer, pad_id=pad_id, batch_size=hp.batch_size,
                                              module_path=self.module_path)
            pool = _StoredPool().with_facts(facts, hp.near_subjects > 0)
            wordings, wording_fact, near = self._calibration_queries(facts, prefixes, pool, pad_id)
        if not stored:
            return Recalibration(0, 0, (), (), tuple(skipped), float("nan"), float("nan"),
                                 time.perf_counter() - started)
        unit_of = torch.tensor([groups[frozenset((f.id, *EditRecord.from_metadata(f.metadata, f.id)
                                                  .shares_residual_with))] for f in stored])
        all_keys = torch.cat([f.keys.float() for f in stored])
        key_fact = torch.repeat_interleave(torch.arange(len(stored)), torch.tensor([len(f.keys) for f in stored]))
        query_fact = torch.cat([torch.repeat_interleave(torch.arange(len(stored)), counts), wording_fact])
        positives = torch.cat([queries, wordings])
        positive_row = nearest_rows(positives, query_fact, all_keys, key_fact)
        negatives = torch.cat([text_negatives, near, positives])
        negative_unit = torch.cat([torch.full((len(text_negatives) + len(near),), -1), unit_of[query_fact]])
        records = [EditRecord.from_metadata(f.metadata, f.id) for f in stored]
        exact = _exact_rows([(len(f.keys) > 1 and bool(r.bare_prompt_key), bool(r.bare_prompt_key_generic))
                             for f, r in zip(stored, records)], [len(f.keys) for f in stored])
        found = calibrate_thresholds(all_keys, unit_of[key_fact], positives, positive_row, negatives, negative_unit,
                                     gamma=hp.gamma, margin=hp.gate_margin, exact=exact)
        before = torch.cat([f.key_gammas if f.key_gammas is not None else torch.full((len(f.keys),), self.db.gamma)
                            for f in stored])
        bounds = torch.cumsum(torch.tensor([0] + [len(f.keys) for f in stored]), 0).tolist()
        changed, conflicts, metadata, key_gammas = [], [], [], []
        for i, fact in enumerate(stored):
            rows = slice(bounds[i], bounds[i + 1])
            record = EditRecord.from_metadata(fact.metadata, fact.id)
            floors = tuple(found.floors[rows].tolist())
            if not torch.equal(found.gammas[rows], before[rows]) or record.key_floors != floors:
                changed.append(fact.id)
            if bool(found.conflicts[rows].any()):
                conflicts.append(fact.id)
            record = dataclasses.replace(record, key_floors=floors)
            metadata.append({**fact.metadata, METADATA_KEY: record.to_json()})
            key_gammas.append(found.gammas[rows])
        in_step = self._stored_pool.in_step(self.db)
        self.db.upsert(torch.stack([f.keys[0].float() for f in stored]), torch.stack([f.residual.float() for f in stored]),
                       [f.id for f in stored], metadata,
                       extra_keys=[f.keys[1:].float() if len(f.keys) > 1 else None for f in stored],
                       key_gammas=key_gammas)
        if in_step:  # the same facts, subjects and prompts unchanged
            self._stored_pool.put([], self.db.version)
        return Recalibration(len(stored), len(all_keys), tuple(changed), tuple(conflicts), tuple(skipped),
                             float(before.mean()), float(found.gammas.mean()), time.perf_counter() - started)


def _exact_rows(facts: Sequence[tuple[bool, bool]], key_counts: Sequence[int]) -> torch.Tensor:
    """(rows,) bool over the facts' key rows in order: the exact-match rows (editing.calibration),
    a fact's bare-prompt key (its 2nd row) when it has one and it is generic. facts[i]: (has a
    bare-prompt key, that query is generic); key_counts[i]: fact i's key rows."""
    rows = []
    for (has_bare_key, is_generic), count in zip(facts, key_counts):
        rows += [False] * count
        if has_bare_key and is_generic:
            rows[len(rows) - count + 1] = True
    return torch.tensor(rows, dtype=torch.bool)


@dataclasses.dataclass(frozen=True)
class _OtherKeys:
    """The stored key rows of the facts outside a batch: keys (s, d1) float32, their thresholds
    gammas (s,) float32 and their facts' ids (s,)."""

    keys: torch.Tensor
    gammas: torch.Tensor
    ids: list[str]

    @classmethod
    def of(cls, db: NeuralDB, batch: set[str]) -> "_OtherKeys":
        """The key rows of `db` whose fact is not in `batch`."""
        snapshot = db.snapshot()
        row_ids = snapshot.ids_at(range(len(snapshot.keys)))
        others = torch.tensor([fact_id is not None and fact_id not in batch for fact_id in row_ids], dtype=torch.bool)
        return cls(snapshot.keys[others].float(), snapshot.gammas[others],
                   [fact_id for fact_id, other in zip(row_ids, others.tolist()) if other])


@dataclasses.dataclass
class _BatchGates:
    """One batch's calibration: per fact its keys' thresholds and floors ((k_i,) float32), ids with
    a conflict, and the stored facts to rewrite with raised thresholds."""

    gammas: list[torch.Tensor]
    floors: list[torch.Tensor]
    conflicts: list[str]
    raised: list[tuple[Any, torch.Tensor]]


@dataclasses.dataclass(frozen=True)
class _Pool:
    """The subjects and prompt openings (text before the subject) that one call's calibration draws
    near-subject names and other wordings from: the facts at hand and the stored facts, sorted."""

    subjects: tuple[str, ...]
    heads: tuple[str, ...]


def _subject_and_head(fact: Fact) -> tuple[str, str]:
    return fact.subject, fact.filled_prompt[: fact.subject_span[0]]


class _StoredPool:
    """The subject and prompt opening of every fact of a database that the Editor can read back
    (`Fact.from_metadata`), counted per value so that facts can be added, replaced and removed one at
    a time. `version` is the database version it shows (None: not read yet). The Editor updates it
    by what its own writes wrote or deleted, so an edit call costs O(facts in the call) here
    whatever the number stored; a change made by anyone else (a direct add / delete, another
    connection's commit picked up by `refresh`, a new gamma) shows as a version it does not know,
    and it is read again from the stored metadata (O(m), once). It assumes no other thread writes to
    the database between an Editor's version check and its write."""

    def __init__(self) -> None:
        self.version: Optional[int] = None
        self._of: dict[str, tuple[str, str]] = {}
        self._subjects: dict[str, int] = {}
        self._heads: dict[str, int] = {}

    def in_step(self, db: NeuralDB) -> bool:
        """Whether it shows `db` as it is now."""
        return self.version is not None and self.version == db.version

    def synced(self, db: NeuralDB) -> "_StoredPool":
        """Itself, read again from `db`'s metadata (one read, no vectors) unless it is in step."""
        if not self.in_step(db):
            version = db.version
            self._of.clear()
            self._subjects.clear()
            self._heads.clear()
            facts = []
            for fact_id, metadata in db.metadata().items():
                try:
                    facts.append(Fact.from_metadata(fact_id, metadata))
                except FactError:
                    continue  # not written by the Editor: no subject or prompt to draw from
            self.put(facts, version)
        return self

    def put(self, facts: Sequence[Fact], version: int) -> None:
        """`facts` were written (added or replaced); the database is now at `version`."""
        for fact in facts:
            self._forget(fact.fact_id)
            subject, head = self._of[fact.fact_id] = _subject_and_head(fact)
            self._subjects[subject] = self._subjects.get(subject, 0) + 1
            self._heads[head] = self._heads.get(head, 0) + 1
        self.version = version

    def drop(self, ids: Sequence[str], version: int) -> None:
        """The facts `ids` were deleted; the database is now at `version`."""
        for fact_id in ids:
            self._forget(fact_id)
        self.version = version

    def _forget(self, fact_id: str) -> None:
        entry = self._of.pop(fact_id, None)
        if entry is not None:
            for counts, value in zip((self._subjects, self._heads), entry):
                counts[value] -= 1
                if not counts[value]:
                    del counts[value]

    def with_facts(self, facts: Sequence[Fact], subjects: bool) -> _Pool:
        """The pool of the stored facts and `facts`; its subjects only when asked for (`subjects`:
        near-subject names are drawn from them; listing them costs O(m))."""
        pairs = [_subject_and_head(fact) for fact in facts]
        heads = set(self._heads).union(head for _, head in pairs)
        names = set(self._subjects).union(subject for subject, _ in pairs) if subjects else ()
        return _Pool(tuple(sorted(names)), tuple(sorted(heads)))


@dataclasses.dataclass
class _Outcome:
    """What the committed batches of one call wrote (ids in commit order)."""

    computed: list[str] = dataclasses.field(default_factory=list)
    first_token_subjects: list[str] = dataclasses.field(default_factory=list)
    not_converged: list[str] = dataclasses.field(default_factory=list)
    threshold_conflicts: list[str] = dataclasses.field(default_factory=list)
    raised_thresholds: list[str] = dataclasses.field(default_factory=list)


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
