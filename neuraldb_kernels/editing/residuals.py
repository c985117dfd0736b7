"""Residuals (paper Eq. 21): for each fact a vector r (d2 floats), added to the FFN down-projection
output at layer l* at the subject's last token, optimised so that the model gives target_new high
probability after the prompt under every prefix, while the next-token distribution after
"{subject} is a" stays close to the unedited model's.

Per fact, minimised with Adam over r:

    L(r) = mean_c [ -mean_t log P_r(target_t | context_c, target_<t) ]
           + kl_factor * KL(P_r(. | "{subject} is a") || P_0(. | "{subject} is a"))
           + weight_decay * ||r||^2 / ||v||^2

c runs over the bare prompt, the N prefixes and the fact's rewordings if any (editing.rewordings),
v is the unedited down-projection output at the subject's last token of the first of them, and
after every step ||r|| <= clamp_norm_factor * ||v||.
A fact stops once exp(-mean NLL) >= stop_prob.

A context whose subject's last token is its first token (a one-token subject opening the prompt,
in a tokenizer without BOS) is left out of c when the fact has other contexts: the first position
is the model's attention sink, an r added there barely moves the prediction, and its loss would
swamp the other contexts'. (Measurements behind such rules live in bench/RESULTS.md, here "Where
the remaining efficacy misses are", not in code.)

Facts may share one r (`units`: facts about one subject whose keys coincide, see the Editor): the
loss then sums the members' NLL terms, with the KL and decay terms once (from the first member), and
the unit stops once every member's exp(-mean NLL) >= stop_prob. A unit of one fact is the above.

Batched: many units (all their contexts and KL prompts) go through one forward/backward per step
(in passes of bounded size, `unit_passes`, whose gradients are summed), each unit's r injected
only at its own sequences' subject position. What does not depend on r is computed once: every
token BEFORE the subject's last token is unaffected by r at every layer (the model is causal), so
those tokens run once through the whole model and their keys/values are kept as a KV cache
(editing.prefill: an opening that contexts share, such as a model-written prefix, once); each
step runs only the tokens from the subject's last token on, and the LM head only at the positions
the loss reads (target tokens and the KL position). The suffix tokens' pass through layers 0..l*
is frozen as well: after the first step, those layers are replaced (for the
duration of each forward) by stand-ins that replay the recorded output of layer l* plus r, where the
model's decoder layers return plain tensors (see integration.hf_compat). Losses are summed over
units, and Adam is element-wise, so a unit's trajectory does not depend on its batch-mates.

Precision (`EditHParams.residual_matmuls`): with "bfloat16" the matrix products of the decoder
layers above l* in every step take bfloat16 inputs
(`_bfloat16_products`); layers 0..l* (v and the recorded output of l*), attention, norms, the
residual stream and the LM head stay float32. With "float32" everything is float32.
"bfloat16_then_float32" runs two phases: bfloat16 products until every unit stops, then float32
products from each unit's r and Adam state until it meets stop_prob in float32 (most units at
once: the phase first checks every unit without gradients), all within the one budget of `steps`;
the KL reference stays the first phase's (the unedited distribution up to bfloat16 rounding).
Adam keeps per-unit step counts (`_RowAdam`), so a unit resuming in the second phase continues
exactly as a lone unit would. The prefix caches are computed once: with bfloat16 products in
"bfloat16" (as its steps), in float32 otherwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..integration import hf_compat
from ..integration.architectures import decoder_layers, locate_down_proj
from .hparams import EditHParams, residual_matmuls_for
from .prefill import pad_right, prefill
from .tokens import EditTokens


@dataclasses.dataclass(frozen=True)
class ResidualResult:
    """Per fact (members of a unit hold the same residual row and steps). residuals: (n, d2)
    float32 CPU. target_prob: (n,) exp(-mean NLL of target_new) reached at the final r. steps:
    (n,) int64 the fact's unit's Adam updates + 1 (the residuals it evaluated; a later
    phase's first check of the same r does not count). converged: (n,) bool, target_prob >= stop_prob."""

    residuals: torch.Tensor
    target_prob: torch.Tensor
    steps: torch.Tensor
    converged: torch.Tensor


@dataclasses.dataclass
class _Sequences:
    """The sequences of one batch, split at the injection position (the subject's last token).

    prefix: tokens before it (`prefixes`; cached, left-padded by `prefill`); suffix: from it on
    (right-padded, recomputed). pad_id: the token id in padded positions.
    owner[i]: the unit (shared r) of sequence i. Loss reads: targets at (target_seq, target_pos)
    with token target_id and weight target_weight, of fact target_fact; the KL logits at
    (kl_seq[u], kl_pos[u]) for unit u. norm_seq[u]: the first trained sequence of unit u's first
    fact (its injection output gives ||v||).
    """

    suffix_ids: torch.Tensor
    suffix_mask: torch.Tensor
    owner: torch.Tensor
    target_seq: torch.Tensor
    target_pos: torch.Tensor
    target_id: torch.Tensor
    target_weight: torch.Tensor
    target_fact: torch.Tensor
    kl_seq: torch.Tensor
    kl_pos: torch.Tensor
    norm_seq: torch.Tensor
    prefixes: list[list[int]]
    pad_id: int


def _trained_contexts(fact: EditTokens) -> list[tuple[tuple[int, ...], int]]:
    """(context, subject's last token) pairs the loss reads: those with the subject past the first
    token, or all when there are none such (see the module doc); then the fact's rewordings with
    the subject past the first token."""
    pairs = list(zip(fact.contexts, fact.subject_last))
    reworded = [(context, s) for context, s in zip(fact.reworded, fact.reworded_subject_last) if s > 0]
    return ([(context, s) for context, s in pairs if s > 0] or pairs) + reworded


def _build_sequences(tokens: Sequence[EditTokens], units: Sequence[Sequence[int]], pad_id: int,
                     device) -> _Sequences:
    prefixes, suffixes, owner = [], [], []
    target_seq, target_pos, target_id, target_weight, target_fact = [], [], [], [], []
    norm_seq = []
    for u, members in enumerate(units):
        norm_seq.append(len(prefixes))
        for f in members:
            fact = tokens[f]
            target = list(fact.target)
            trained = _trained_contexts(fact)
            weight = 1.0 / (len(target) * len(trained))
            for context, s in trained:
                first = len(context) - 1 - s  # suffix position whose logits predict target[0]
                for t, token in enumerate(target):
                    target_seq.append(len(prefixes))
                    target_pos.append(first + t)
                    target_id.append(token)
                    target_weight.append(weight)
                    target_fact.append(f)
                prefixes.append(list(context[:s]))
                suffixes.append(list(context[s:]) + target[:-1])
                owner.append(u)
    kl_seq, kl_pos = [], []
    for u, members in enumerate(units):
        fact = tokens[members[0]]
        kl_seq.append(len(prefixes))
        kl_pos.append(len(fact.kl_ids) - 1 - fact.kl_subject_last)
        prefixes.append(list(fact.kl_ids[: fact.kl_subject_last]))
        suffixes.append(list(fact.kl_ids[fact.kl_subject_last :]))
        owner.append(u)

    suffix_ids, suffix_mask = pad_right(suffixes, pad_id, device)

    def long(values):
        return torch.tensor(values, dtype=torch.long, device=device)

    return _Sequences(
        suffix_ids, suffix_mask,
        long(owner), long(target_seq), long(target_pos), long(target_id),
        torch.tensor(target_weight, dtype=torch.float32, device=device), long(target_fact),
        long(kl_seq), long(kl_pos), long(norm_seq), prefixes, pad_id)


class _Batch:
    """The frozen part of one batch (prefix KV cache) and the rows of the units still optimised."""

    def __init__(self, model, sequences: _Sequences, layer: int, module_path: Optional[str]):
        self.model = model
        self.layer = layer
        self.decoder_layers = decoder_layers(model, module_path)
        self.recorded_all = None  # layer l*'s output over all suffix rows (r = 0), once recorded
        self.recorded = None
        self.base = model.base_model
        self.lm_head = model.get_output_embeddings()
        self.cache_keyword = hf_compat.cache_keyword(self.base)
        self.all = sequences
        # the prefix tokens' keys/values, left-padded (padded positions zeroed) as prefix_mask marks
        cached = prefill(self.base, sequences.prefixes, pad_id=sequences.pad_id)
        self.kv = None if cached is None else cached.layers
        rows = len(sequences.prefixes)
        self.all_prefix_mask = (cached.mask if cached is not None
                                else torch.zeros((rows, 0), dtype=torch.long, device=sequences.owner.device))
        self.prefix_length = self.all_prefix_mask.sum(1)
        self.every_unit = torch.arange(int(sequences.owner.max()) + 1, device=sequences.owner.device)
        self.select(self.every_unit)

    def select(self, units: torch.Tensor) -> None:
        """Restrict the batch to units `units` (sorted), trimming padding to what they need."""
        seq = self.all
        self.units = units
        local = torch.full((int(seq.owner.max()) + 1,), -1, dtype=torch.long, device=units.device)
        local[units] = torch.arange(len(units), device=units.device)
        rows = torch.nonzero(local[seq.owner] >= 0).squeeze(1)
        row_of = torch.full((len(seq.owner),), -1, dtype=torch.long, device=units.device)
        row_of[rows] = torch.arange(len(rows), device=units.device)
        self.owner = local[seq.owner[rows]]
        width_p = int(self.all_prefix_mask[rows].sum(1).max()) if self.all_prefix_mask.shape[1] else 0
        width_s = int(seq.suffix_mask[rows].sum(1).max())
        start = self.all_prefix_mask.shape[1] - width_p
        self.prefix_mask = self.all_prefix_mask[rows, start:]
        self.suffix_ids = seq.suffix_ids[rows, :width_s]
        self.suffix_mask = seq.suffix_mask[rows, :width_s]
        self.positions = self.prefix_length[rows, None] + torch.arange(width_s, device=units.device)
        self.layers = None
        if self.kv is not None and width_p:
            if len(rows) == len(seq.owner):  # every row: views, not a second copy of the cache
                self.layers = [(k[:, :, start:], v[:, :, start:]) for k, v in self.kv]
            else:
                self.layers = [(k[rows, :, start:], v[rows, :, start:]) for k, v in self.kv]
        keep = local[seq.owner[seq.target_seq]] >= 0
        self.target_rows = row_of[seq.target_seq[keep]]
        self.target_pos = seq.target_pos[keep]
        self.target_id = seq.target_id[keep]
        self.target_weight = seq.target_weight[keep]
        self.target_fact = seq.target_fact[keep]
        self.target_facts = torch.unique(self.target_fact)
        self.target_unit = self.owner[self.target_rows]
        self.kl_rows = row_of[seq.kl_seq[units]]
        self.kl_pos = seq.kl_pos[units]
        self.norm_rows = row_of[seq.norm_seq[units]]
        if self.recorded_all is not None:
            self.recorded = self.recorded_all[rows, :width_s]

    def forward(self, module, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """(target log-probs (T,), KL log-probs (U, V), unedited injection outputs (rows, d2) or
        None once layers 0..l* are replayed) with delta[u] added to `module`'s output at each
        sequence's first suffix token (u: the sequence's unit)."""
        if self.recorded is not None:
            return (*self._run(delta), None)
        seen = {}

        def inject(_module, _args, output):
            seen["v"] = output[:, 0].detach()
            added = output[:, :1] + delta[self.owner].unsqueeze(1).to(output.dtype)
            return torch.cat([added, output[:, 1:]], dim=1)

        def record(_module, _args, output):
            # the first forward runs every row at r = 0: layer l*'s output is the unedited one
            if (hf_compat.decoder_output_is_tensor(output) and not bool(delta.any())
                    and len(self.units) == len(self.all.kl_seq)):
                seen["out"] = output.detach()

        handles = [module.register_forward_hook(inject),
                   self.decoder_layers[self.layer].register_forward_hook(record)]
        try:
            target_logp, kl_logp = self._run(delta)
        finally:
            for handle in handles:
                handle.remove()
        if "out" in seen:
            self.recorded_all = self.recorded = seen["out"]
        return target_logp, kl_logp, seen["v"]

    def _run(self, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(target log-probs, KL log-probs) of one suffix pass, layers 0..l* replayed if recorded."""
        replay = contextlib.nullcontext()
        if self.recorded is not None:
            recorded, owner = self.recorded, self.owner

            def replayed() -> torch.Tensor:  # layer l*'s recorded output plus delta at the first suffix token
                added = recorded[:, :1] + delta[owner].unsqueeze(1).to(recorded.dtype)
                return torch.cat([added, recorded[:, 1:]], dim=1)

            replay = hf_compat.replayed_decoder_layers(self.decoder_layers, self.layer, replayed)
        kwargs = {}
        mask = self.suffix_mask
        if self.layers is not None:
            kwargs[self.cache_keyword] = hf_compat.cache_from_layers(self.model, self.layers)
            mask = torch.cat([self.prefix_mask, self.suffix_mask], dim=1)
        with replay:
            output = self.base(input_ids=self.suffix_ids, attention_mask=mask, position_ids=self.positions,
                               use_cache=self.layers is not None, **kwargs)
        hidden = output[0]
        target_logits = self.lm_head(hidden[self.target_rows, self.target_pos]).float()
        target_logp = target_logits.log_softmax(-1).gather(1, self.target_id.unsqueeze(1)).squeeze(1)
        kl_logp = self.lm_head(hidden[self.kl_rows, self.kl_pos]).float().log_softmax(-1)
        return target_logp, kl_logp


class _BFloat16Linear(torch.nn.Module):
    """Stands in for an nn.Linear with float32 weights: its product takes bfloat16 inputs (the
    input and a bfloat16 copy of the weight; float32 accumulation, output rounded to bfloat16)
    and returns float32, bias added in float32. Gradients flow to the input only."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.weight = linear.weight.detach().to(torch.bfloat16)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x.to(torch.bfloat16), self.weight).to(x.dtype)
        return out if self.bias is None else out + self.bias


@contextlib.contextmanager
def _bfloat16_products(layers: Sequence[torch.nn.Module]):
    """Within the block, every float32 nn.Linear inside `layers` is a `_BFloat16Linear`; the
    original modules are back on exit, also on errors."""
    swapped = []
    try:
        for layer in layers:
            for name, module in list(layer.named_modules()):
                if isinstance(module, torch.nn.Linear) and module.weight.dtype == torch.float32:
                    parent, _, child = name.rpartition(".")
                    owner = layer.get_submodule(parent)
                    swapped.append((owner, child, module))
                    setattr(owner, child, _BFloat16Linear(module))
        yield
    finally:
        for owner, child, module in reversed(swapped):
            setattr(owner, child, module)


def _products(precision: str, layers: Sequence[torch.nn.Module]):
    """The context in which `layers`' products run at `precision` ("float32" or "bfloat16")."""
    return _bfloat16_products(layers) if precision == "bfloat16" else contextlib.nullcontext()


def _suffix_shape(fact: EditTokens) -> tuple[int, int]:
    """(sequences, longest suffix in tokens) that `fact` adds to a batch, its KL prompt included."""
    trained = _trained_contexts(fact)
    width = max(len(context) - s + len(fact.target) - 1 for context, s in trained)
    return len(trained) + 1, max(width, len(fact.kl_ids) - fact.kl_subject_last)


def unit_passes(tokens: Sequence[EditTokens], units: Sequence[Sequence[int]], pass_tokens: int) -> list[list[int]]:
    """The units (indices into `units`) grouped into passes: in order of their longest suffix,
    consecutive units while the pass's padded suffix tokens (sequences x longest suffix) stay
    within `pass_tokens` (a unit larger than that alone)."""
    shapes = []
    for members in units:
        sizes = [_suffix_shape(tokens[f]) for f in members]
        # the KL prompt is the first member's only: the others add their trained contexts
        shapes.append((sum(rows for rows, _ in sizes) - len(members) + 1, max(width for _, width in sizes)))
    passes: list[list[int]] = []
    rows = width = 0
    for u in sorted(range(len(units)), key=lambda u: shapes[u][1]):
        unit_rows, unit_width = shapes[u]
        if passes and (rows + unit_rows) * max(width, unit_width) <= pass_tokens:
            passes[-1].append(u)
            rows, width = rows + unit_rows, max(width, unit_width)
        else:
            passes.append([u])
            rows, width = unit_rows, unit_width
    return passes


class _RowAdam:
    """Adam (torch.optim.Adam's update: betas (0.9, 0.999), eps 1e-8, no weight decay) over the rows
    of `param` (units, d), each row with its own step count: `step(rows)` updates only those rows,
    so a unit that resumes in a later precision phase continues from its own moments and bias
    correction, whatever its batch-mates did meanwhile. count: (units,) int64 updates per row."""

    def __init__(self, param: torch.Tensor, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.param, self.lr, self.betas, self.eps = param, lr, betas, eps
        self.exp_avg = torch.zeros_like(param, requires_grad=False)
        self.exp_avg_sq = torch.zeros_like(param, requires_grad=False)
        self.count = torch.zeros(len(param), dtype=torch.long, device=param.device)

    @torch.no_grad()
    def step(self, rows: torch.Tensor) -> None:
        beta1, beta2 = self.betas
        grad = self.param.grad[rows]
        exp_avg = self.exp_avg[rows].lerp_(grad, 1 - beta1)
        exp_avg_sq = self.exp_avg_sq[rows].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        self.exp_avg[rows], self.exp_avg_sq[rows] = exp_avg, exp_avg_sq
        self.count[rows] += 1
        step = self.count[rows].unsqueeze(1).double()
        step_size = (self.lr / (1 - beta1**step)).float()
        bias_correction2_sqrt = (1 - beta2**step).sqrt().float()
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
        self.param[rows] = self.param[rows] - step_size * exp_avg / denom


class _Descent:
    """Adam over the units' residuals r (units, d2), kept across the precision phases of one
    `optimize_residuals` call: each unit's r (which stays where the unit stopped), ||v|| and the
    KL reference of every pass (from its first forward, at r = 0), and each fact's NLL at its
    unit's last forward."""

    def __init__(self, hparams: EditHParams, unit_of: torch.Tensor, d2: int, device):
        units = int(unit_of.max()) + 1
        self.hparams = hparams
        self.unit_of = unit_of.to(device)
        self.r = torch.zeros(units, d2, device=device, requires_grad=True)
        self.adam = _RowAdam(self.r, hparams.lr)
        self.v_norm = torch.zeros(units, device=device)
        self.fact_nll = torch.zeros(len(unit_of), device=device)
        self.kl_reference: dict[int, torch.Tensor] = {}

    def run(self, module, passes: Sequence[tuple[torch.Tensor, _Batch]]) -> None:
        """Steps until every unit of `passes` (all units selected) has stopped: every member's
        exp(-NLL) >= stop_prob at the unit's current r, or the unit's steps - 1 updates spent."""
        hparams, device = self.hparams, self.r.device
        count, stop_nll = len(self.unit_of), -math.log(hparams.stop_prob)
        running = list(range(len(passes)))
        # a later phase first checks every unit without gradients: most already meet stop_prob
        screening = bool(self.kl_reference)
        while running:
            self.r.grad = None
            still, stepping = [], []
            for number in running:
                group, batch = passes[number]
                local = batch.units
                active = group[local]
                with torch.set_grad_enabled(not screening):
                    target_logp, kl_logp, v = batch.forward(module, self.r[active])
                if number not in self.kl_reference:
                    self.kl_reference[number] = kl_logp.detach()
                    self.v_norm[active] = v[batch.norm_rows].float().norm(dim=1).clamp_min(1e-6)
                terms = -target_logp * batch.target_weight
                facts_here = batch.target_facts
                self.fact_nll[facts_here] = torch.zeros(count, device=device).index_add(
                    0, batch.target_fact, terms.detach())[facts_here]
                worst = torch.full((len(self.r),), -math.inf, device=device).scatter_reduce(
                    0, self.unit_of[facts_here], self.fact_nll[facts_here], reduce="amax")
                # a unit stops once every member reaches stop_prob, or when its updates are spent
                done = (worst[active] <= stop_nll) | (self.adam.count[active] >= hparams.steps - 1)
                if bool(done.all()):
                    continue
                if not screening:
                    delta = self.r[active]
                    nll = torch.zeros(len(local), device=device).index_add(0, batch.target_unit, terms)
                    kl = F.kl_div(self.kl_reference[number][local], kl_logp, log_target=True,
                                  reduction="none").sum(1)
                    decay = hparams.weight_decay * delta.pow(2).sum(1) / self.v_norm[active].pow(2)
                    (nll + hparams.kl_factor * kl + decay).sum().backward()  # into r.grad with the other passes'
                    stepping.append(active[~done])
                if bool(done.any()):
                    batch.select(local[~done])
                still.append(number)
            if not still:
                break
            if stepping:
                rows = torch.cat(stepping)
                self.adam.step(rows)
                with torch.no_grad():
                    limit = hparams.clamp_norm_factor * self.v_norm[rows]
                    scale = (limit / self.r[rows].norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)
                    self.r[rows] = self.r[rows] * scale.unsqueeze(1)
            screening = False
            running = still


def optimize_residuals(model, tokens: Sequence[EditTokens], hparams: EditHParams, *, pad_id: int,
                       module_path: Optional[str] = None,
                       units: Optional[Sequence[Sequence[int]]] = None) -> ResidualResult:
    """Residuals of the tokenised facts, optimised together (see the module doc).

    units: a partition of range(len(tokens)) into facts that share one residual (same subject);
        None: every fact alone.
    The units run in passes of at most `hparams.pass_tokens` padded suffix tokens (`unit_passes`),
    each pass's forward and backward in turn, their gradients summed into one Adam step: the
    autograd memory is one pass's, whatever the number of facts, and units of similar length
    share a pass (less padding). Units never interact, so the passes change nothing but float
    rounding.
    `hparams.residual_matmuls` names the phases ("bfloat16_then_float32": two; "auto" resolved by
    `residual_matmuls_for`); a later phase continues
    every unit from its r and Adam state where the earlier one stopped it, within the same budget
    of steps - 1 updates, so the stored r and target_prob are the last phase's.
    The model must be unedited (no NeuralDB attached); its parameters are not changed and get no
    gradients.
    """
    count = len(tokens)
    units = [[f] for f in range(count)] if units is None else [list(members) for members in units]
    if sorted(f for members in units for f in members) != list(range(count)) or not all(units):
        raise ValueError(f"units must partition the {count} facts into non-empty groups, got {units}")
    module = locate_down_proj(model, hparams.layer, module_path)
    upper_layers = decoder_layers(model, module_path)[hparams.layer + 1 :]
    device = next(model.parameters()).device
    unit_of = torch.empty(count, dtype=torch.long)
    for u, members in enumerate(units):
        unit_of[members] = u
    was_training = model.training
    model.eval()
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        phases = residual_matmuls_for(hparams, model, module_path).split("_then_")
        # r does not change the prefix caches: one for every phase, in bfloat16 products only when
        # every phase is bfloat16 (a float32 phase needs float32 caches)
        passes = []
        with _products(phases[0] if len(phases) == 1 else "float32", upper_layers):
            for group in unit_passes(tokens, units, hparams.pass_tokens):
                sequences = _build_sequences(tokens, [units[u] for u in group], pad_id, device)
                passes.append((torch.tensor(group, device=device),
                               _Batch(model, sequences, hparams.layer, module_path)))
        descent = _Descent(hparams, unit_of, passes[0][1].lm_head.weight.shape[1], device)
        for phase, precision in enumerate(phases):
            if phase:
                for _, batch in passes:
                    batch.select(batch.every_unit)
            with _products(precision, upper_layers):
                descent.run(module, passes)
    finally:
        for p, flag in zip(model.parameters(), requires):
            p.requires_grad_(flag)
        model.train(was_training)
    target_prob = torch.exp(-descent.fact_nll).cpu()
    return ResidualResult(residuals=descent.r.detach().float().cpu()[unit_of], target_prob=target_prob,
                          steps=(descent.adam.count + 1).cpu()[unit_of], converged=target_prob >= hparams.stop_prob)
