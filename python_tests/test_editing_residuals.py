"""optimize_residuals (batched, frozen prefix cache, replayed lower layers, shared-residual units)
against an independent plain loop: every step a full forward of the whole model over a unit's
contexts and its KL prompt, the residual added by the test's own hook, torch's Adam."""

import dataclasses
import math
from contextlib import contextmanager, nullcontext
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from tiny_models import ARCHS, tiny_model

from neuraldb_kernels.editing import EditHParams, Fact, optimize_residuals, tokenize_fact
from neuraldb_kernels.editing import hparams as hparams_module
from neuraldb_kernels.editing import residuals as residuals_module
from neuraldb_kernels.editing.hparams import residual_matmuls_for, resolve_hparams
from neuraldb_kernels.editing.residuals import unit_passes

PREFIXES = ["A short text about something. ", "Other words before it. "]
FACTS = [
    Fact("{} plays the sport of", "Carlos Valderrama", "basketball"),
    Fact("{} was born in the city of", "Carlos Valderrama", "Oslo"),
    Fact("The mother tongue of {} is", "Danielle Darrieux", "English"),
    Fact("{} is a citizen of", "Carlos Valderrama", "Peru"),
    Fact("{} is a member of", "Germany", "Hamas"),  # one token opening the prompt: position 0
    Fact("In {}, they understand", "Germany", "Tamil"),
]
LAYER = 1


class Plain(NamedTuple):
    """What the plain loop reached: the residual it stopped at, each member's exp(-mean NLL) there,
    the forward passes it took, the worst member's exp(-mean NLL) at every forward and the
    residual of every forward."""

    residual: torch.Tensor
    probs: list
    steps: int
    history: list
    trajectory: list


def assert_unit_matches_plain(result, unit, expected, hparams):
    """Every member f of `unit` holds the plain loop's residual (rtol 1e-3), its own target
    probability under the shared residual (rel 1e-4), the loop's steps and convergence."""
    for member, f in enumerate(unit):
        assert torch.allclose(result.residuals[f], expected.residual, rtol=1e-3,
                              atol=1e-4 * float(expected.residual.norm())), f
        assert result.target_prob[f] == pytest.approx(expected.probs[member], rel=1e-4), f
        assert int(result.steps[f]) == expected.steps, f
        assert bool(result.converged[f]) == (expected.probs[member] >= hparams.stop_prob), f


def plain_unit_residual(model, tokens, hparams, start=None, phases=("float32",)):
    """The residual of one unit sharing it: sum of the members' mean NLL over their contexts (a
    context whose subject is its first token left out unless all are), KL on the first member's KL
    prompt, decay and clamp from the first member's first such context; full forwards only; stops
    once every member's exp(-mean NLL) reaches stop_prob. start: the initial residual (default zeros).
    phases: the products of the layers above hparams.layer in each phase ("bfloat16": inside
    `_bfloat16_products`); a phase ends when the unit stops, the next one continues from there with
    the same Adam, all within steps - 1 updates; the KL reference is the first forward's."""
    rows, at, picks = [], [], []
    for member, fact in enumerate(tokens):
        contexts = [(c, s) for c, s in zip(fact.contexts, fact.subject_last) if s != 0]
        contexts = contexts or list(zip(fact.contexts, fact.subject_last))
        weight = 1.0 / (len(contexts) * len(fact.target))
        for context, s in contexts:
            picks += [(member, len(rows), len(context) - 1 + t, token, weight) for t, token in enumerate(fact.target)]
            rows.append(list(context) + list(fact.target[:-1]))
            at.append(s)
    kl_row = len(rows)
    rows.append(list(tokens[0].kl_ids))
    at.append(tokens[0].kl_subject_last)
    width = max(map(len, rows))
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    module = model.get_submodule(ARCHS["llama"][1].format(hparams.layer))
    r = (torch.zeros(model.config.hidden_size) if start is None else start.clone()).requires_grad_(True)
    optimizer = torch.optim.Adam([r], lr=hparams.lr, betas=(0.9, 0.999), eps=1e-8)
    seen = {}

    def add_r(_module, _args, output):
        seen.setdefault("v", output[0, at[0]].detach().clone())  # (the first forward: no r yet)
        output = output.clone()
        output[torch.arange(len(rows)), torch.tensor(at)] += r
        return output

    handle = module.register_forward_hook(add_r)
    history, trajectory = [], []
    updates = 0
    try:
        reference = None
        for precision in phases:
            upper = model.model.layers[hparams.layer + 1 :]
            products = residuals_module._bfloat16_products(upper) if precision == "bfloat16" else nullcontext()
            with products:  # a phase runs until the unit stops, the next continues the same Adam
                while True:
                    logp = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
                    member_nll = [-sum(weight * logp[row, pos, token] for m, row, pos, token, weight in picks
                                       if m == member) for member in range(len(tokens))]
                    probs = [math.exp(-float(nll.detach())) for nll in member_nll]
                    history.append(min(probs))
                    trajectory.append(r.detach().clone())
                    kl_logp = logp[kl_row, len(rows[kl_row]) - 1]
                    reference = kl_logp.detach() if reference is None else reference
                    kl = F.kl_div(reference, kl_logp, log_target=True, reduction="sum")
                    v_norm = seen["v"].norm()
                    loss = sum(member_nll) + hparams.kl_factor * kl + hparams.weight_decay * r.pow(2).sum() / v_norm**2
                    if min(probs) >= hparams.stop_prob or updates == hparams.steps - 1:
                        break
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    updates += 1
                    with torch.no_grad():
                        limit = hparams.clamp_norm_factor * v_norm
                        if r.norm() > limit:
                            r.mul_(limit / r.norm())
    finally:
        handle.remove()
    return Plain(r.detach(), probs, updates + 1, history, trajectory)


@pytest.fixture(scope="module")
def setup(tokenizer):
    model = tiny_model("llama", tokenizer, layers=3)
    # float32 products, as the plain loop computes (the bfloat16 modes are tested against it below)
    hparams = EditHParams(layer=LAYER, steps=4, lr=0.05, stop_prob=1.0, residual_matmuls="float32")
    return model, hparams


UNITS = [[0, 1, 3], [2], [4, 5]]


def stop_prob_reached_midway(model, tokens, hparams):
    """A stop_prob that the unit whose worst member gains most (in the plain loop, never stopping)
    reaches halfway through hparams.steps: the geometric mean of that member's probabilities at
    the two middle steps. The others reach it later or not at all (checked by the test)."""
    never = dataclasses.replace(hparams, stop_prob=1.0)
    histories = [plain_unit_residual(model, [tokens[f] for f in unit], never).history for unit in UNITS]
    top = max(histories, key=lambda history: history[-1] / history[0])
    middle = len(top) // 2
    return math.sqrt(top[middle - 1] * top[middle])


@pytest.mark.parametrize("pass_tokens", [1024, 1], ids=["one pass", "a pass per unit"])
@pytest.mark.parametrize("stopping", ["never", "early"])
@pytest.mark.parametrize("prefixes", [PREFIXES, ()], ids=["prefixes", "bare prompts only"])
def test_shared_units_match_the_plain_loop(setup, tokenizer, prefixes, stopping, pass_tokens):
    model, hparams = setup
    hparams = dataclasses.replace(hparams, pass_tokens=pass_tokens)
    tokens = [tokenize_fact(tokenizer, fact, prefixes, index=i) for i, fact in enumerate(FACTS)]
    assert len(unit_passes(tokens, UNITS, pass_tokens)) == (1 if pass_tokens == 1024 else len(UNITS))
    assert tokens[4].subject_last[0] == 0 and tokens[5].subject_last[0] > 0
    if stopping == "early":  # units stop at different steps: the batch drops them as they do
        hparams = dataclasses.replace(hparams, steps=6, lr=0.5)
        hparams = dataclasses.replace(hparams, stop_prob=stop_prob_reached_midway(model, tokens, hparams))
    result = optimize_residuals(model, tokens, hparams, pad_id=0, units=UNITS)
    for unit in UNITS:
        expected = plain_unit_residual(model, [tokens[f] for f in unit], hparams)
        assert_unit_matches_plain(result, unit, expected, hparams)
    if stopping == "early":  # the setting exercises what it is meant to
        assert int(result.steps.min()) < hparams.steps and result.converged.any() and not result.converged.all()
        assert len(set(result.steps.tolist())) > 1
    else:
        assert torch.equal(result.steps, torch.full((len(FACTS),), hparams.steps))


def test_units_must_partition_the_facts(setup, tokenizer):
    model, hparams = setup
    tokens = [tokenize_fact(tokenizer, fact, PREFIXES, index=i) for i, fact in enumerate(FACTS)]
    for units in ([[0, 1], [2, 3, 4]], [[0, 1, 5], [1, 2, 3, 4]], [[0, 1, 2, 3, 4, 5], []], [[0, 1, 2, 3, 4, 5, 6]]):
        with pytest.raises(ValueError, match="partition"):
            optimize_residuals(model, tokens, hparams, pad_id=0, units=units)


def test_passes_hold_at_most_pass_tokens_and_group_similar_lengths(tokenizer):
    facts = [Fact("{} is a member of", f"Subject number {i}" + " word" * (i % 4), "Hamas") for i in range(12)]
    tokens = [tokenize_fact(tokenizer, fact, PREFIXES, index=i) for i, fact in enumerate(facts)]
    units = [[i] for i in range(12)]
    rows = [len(PREFIXES) + 2 for _ in units]  # the prompt, each prefix and the KL prompt
    widths = [max(len(c) - s + len(t.target) - 1 for c, s in zip(t.contexts, t.subject_last)) for t in tokens]
    widths = [max(w, len(t.kl_ids) - t.kl_subject_last) for w, t in zip(widths, tokens)]
    for budget in (1, 60, 100, 10_000):
        passes = unit_passes(tokens, units, budget)
        assert sorted(u for group in passes for u in group) == list(range(12))
        for group in passes:
            padded = sum(rows[u] for u in group) * max(widths[u] for u in group)
            assert len(group) == 1 or padded <= budget
        order = [widths[u] for group in passes for u in group]
        assert order == sorted(order)  # similar lengths share a pass
    assert len(unit_passes(tokens, units, 10_000)) == 1


def _upper_linears(model):
    """{name: module} of the nn.Linear modules of the decoder layers above LAYER."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name.startswith("model.layers.")
            and int(name.split(".")[2]) > LAYER}


def test_bfloat16_products_round_only_the_product_inputs(setup):
    model, _ = setup
    linear = next(iter(_upper_linears(model).values()))
    x = torch.randn(5, linear.in_features, dtype=torch.float32, requires_grad=True)
    out = residuals_module._BFloat16Linear(linear)(x)
    assert out.dtype == torch.float32
    x16, w16 = x.detach().bfloat16().double(), linear.weight.detach().bfloat16().double()
    exact = x16 @ w16.T
    # float32 accumulation of the bfloat16 inputs, the result rounded to bfloat16 (8 significant bits)
    bound = (x16.abs() @ w16.abs().T) * 2.0**-8 + 1e-30
    assert bool(((out.double() - exact).abs() <= bound).all())
    grad = torch.randn_like(out)
    out.backward(grad)
    exact_grad = grad.bfloat16().double() @ w16
    grad_bound = (grad.bfloat16().double().abs() @ w16.abs()) * 2.0**-8 + 1e-30
    assert bool(((x.grad.double() - exact_grad).abs() <= grad_bound).all())


def test_bfloat16_products_reach_the_plain_float32_loop_and_leave_the_model_as_it_was(setup, tokenizer):
    model, hparams = setup
    before = _upper_linears(model)
    probe = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        logits = model(probe).logits
    tokens = [tokenize_fact(tokenizer, fact, PREFIXES, index=i) for i, fact in enumerate(FACTS)]
    fast = dataclasses.replace(hparams, residual_matmuls="bfloat16")
    result = optimize_residuals(model, tokens, fast, pad_id=0, units=UNITS)
    for unit in UNITS:
        expected = plain_unit_residual(model, [tokens[f] for f in unit], hparams)
        for member, f in enumerate(unit):
            # bfloat16 keeps 8 significant bits; Adam's normalised steps amplify the rounding of
            # near-zero gradient components, so the residual is compared as a vector
            difference = (result.residuals[f] - expected.residual).norm()
            assert float(difference) <= 5e-2 * float(expected.residual.norm()), f
            assert result.target_prob[f] == pytest.approx(expected.probs[member], rel=1e-2), f
            assert int(result.steps[f]) == expected.steps, f
    assert _upper_linears(model) == before and all(p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(probe).logits, logits)


def test_bfloat16_products_are_undone_on_errors(setup, tokenizer):
    model, hparams = setup
    before = _upper_linears(model)
    tokens = [tokenize_fact(tokenizer, fact, PREFIXES, index=i) for i, fact in enumerate(FACTS)]
    calls = []

    def fail_on_the_second_step(module, args):
        calls.append(type(module.mlp.down_proj).__name__)
        if len(calls) == 2:
            raise KeyboardInterrupt

    layer = model.model.layers[LAYER + 1]
    hook = layer.register_forward_pre_hook(fail_on_the_second_step)
    try:
        with pytest.raises(KeyboardInterrupt):
            optimize_residuals(model, tokens, dataclasses.replace(hparams, residual_matmuls="bfloat16"), pad_id=0,
                               units=UNITS)
    finally:
        hook.remove()
    assert calls[-1] == "_BFloat16Linear"  # the interruption came while the stand-ins were in place
    assert _upper_linears(model) == before


@pytest.mark.parametrize("value", ["float16", "bf16", None])
def test_residual_matmuls_must_be_named(value):
    with pytest.raises(ValueError, match="residual_matmuls"):
        EditHParams(layer=LAYER, residual_matmuls=value)


@contextmanager
def _halved_last_mlp(layers):
    """Stands in for `_bfloat16_products` in the phase test: the last layer's MLP gives half its
    output (a model far from the float32 one, so the finish has work to do). It changes the
    logits but no layer's keys/values, so the float32 prefix caches of `optimize_residuals` and
    the plain loop's full forwards see the same model. Undone on exit."""
    handle = layers[-1].mlp.register_forward_hook(lambda _module, _args, output: output * 0.5)
    try:
        yield
    finally:
        handle.remove()


def stop_prob_the_finish_works_for(model, tokens, hparams):
    """A stop_prob that some unit's first-phase (`_bfloat16_products`) probability reaches first at
    a residual where its float32 probability is still lower: the middle of the widest such gap
    over the units' first-phase trajectories (plain loop, never stopping)."""
    never = dataclasses.replace(hparams, stop_prob=1.0)
    once = dataclasses.replace(hparams, steps=1)
    best = (0.0, None)
    for unit in UNITS:
        members = [tokens[f] for f in unit]
        first = plain_unit_residual(model, members, never, phases=("bfloat16",))
        for k in range(1, len(first.history)):
            below = max(first.history[:k])  # it must not stop earlier
            in_float32 = min(plain_unit_residual(model, members, once, start=first.trajectory[k]).probs)
            low, high = max(below, in_float32), first.history[k]
            if high > low and math.log(high / low) > best[0]:
                best = (math.log(high / low), math.sqrt(high * low))
    assert best[1] is not None and best[0] > 1e-3  # a gap far wider than float32 rounding
    return best[1]


def test_a_float32_finish_continues_each_unit_where_the_first_phase_stopped_it(setup, tokenizer, monkeypatch):
    model, hparams = setup
    monkeypatch.setattr(residuals_module, "_bfloat16_products", _halved_last_mlp)
    tokens = [tokenize_fact(tokenizer, fact, PREFIXES, index=i) for i, fact in enumerate(FACTS)]
    hparams = dataclasses.replace(hparams, steps=10, lr=0.5)
    hparams = dataclasses.replace(hparams, stop_prob=stop_prob_the_finish_works_for(model, tokens, hparams),
                                  residual_matmuls="bfloat16_then_float32", pass_tokens=40)
    assert len(unit_passes(tokens, UNITS, hparams.pass_tokens)) > 1
    result = optimize_residuals(model, tokens, hparams, pad_id=0, units=UNITS)
    finished = 0
    for unit in UNITS:
        members = [tokens[f] for f in unit]
        expected = plain_unit_residual(model, members, hparams, phases=("bfloat16", "float32"))
        first_phase = plain_unit_residual(model, members, hparams, phases=("bfloat16",))
        finished += expected.steps > first_phase.steps
        assert_unit_matches_plain(result, unit, expected, hparams)
    assert finished  # some unit took float32 steps after the first phase had stopped it


def test_bfloat16_then_float32_stores_residuals_that_meet_the_float32_criterion(setup, tokenizer):
    model, hparams = setup
    tokens = [tokenize_fact(tokenizer, fact, PREFIXES, index=i) for i, fact in enumerate(FACTS)]
    hparams = dataclasses.replace(hparams, steps=10, lr=0.5)
    hparams = dataclasses.replace(hparams, stop_prob=stop_prob_reached_midway(model, tokens, hparams),
                                  residual_matmuls="bfloat16_then_float32")
    result = optimize_residuals(model, tokens, hparams, pad_id=0, units=UNITS)
    at_result = dataclasses.replace(hparams, steps=1)  # one float32 forward at the stored residual
    for unit in UNITS:
        for f in unit:
            measured = plain_unit_residual(model, [tokens[g] for g in unit], at_result, start=result.residuals[f])
            member = unit.index(f)
            assert result.target_prob[f] == pytest.approx(measured.probs[member], rel=1e-4), f
            if int(result.steps[f]) < hparams.steps:  # it stopped: every member meets stop_prob in float32
                assert min(measured.probs) >= hparams.stop_prob, f
    assert int(result.steps.min()) < hparams.steps


@pytest.mark.parametrize("fast, weights, expected", [
    (True, torch.float32, "bfloat16_then_float32"),
    (False, torch.float32, "float32"),
    (True, torch.bfloat16, "float32"),  # bfloat16 weights: the bfloat16 modes would change nothing
])
def test_auto_residual_matmuls_follow_the_device_and_the_weights(tokenizer, monkeypatch, fast, weights, expected):
    monkeypatch.setattr(hparams_module, "bfloat16_products_fast", lambda device: fast)
    model = tiny_model("llama", tokenizer, layers=3).to(weights)
    auto = EditHParams(layer=LAYER)
    assert auto.residual_matmuls == "auto"
    assert residual_matmuls_for(auto, model) == expected
    for named in ("float32", "bfloat16", "bfloat16_then_float32"):  # a named mode is kept as given
        assert residual_matmuls_for(dataclasses.replace(auto, residual_matmuls=named), model) == named
    # the Editor's hparams (and so every EditRecord) name the mode that runs, never "auto"
    assert resolve_hparams(model, {"layer": LAYER}).residual_matmuls == expected


@pytest.mark.parametrize("fast, mode", [(False, "float32"), (True, "bfloat16_then_float32")])
def test_optimize_residuals_runs_auto_as_the_mode_it_resolves_to(setup, tokenizer, monkeypatch, fast, mode):
    model, hparams = setup
    monkeypatch.setattr(hparams_module, "bfloat16_products_fast", lambda device: fast)
    tokens = [tokenize_fact(tokenizer, fact, PREFIXES, index=i) for i, fact in enumerate(FACTS)]
    auto = optimize_residuals(model, tokens, dataclasses.replace(hparams, residual_matmuls="auto"), pad_id=0, units=UNITS)
    named = optimize_residuals(model, tokens, dataclasses.replace(hparams, residual_matmuls=mode), pad_id=0, units=UNITS)
    assert torch.equal(auto.residuals, named.residuals) and torch.equal(auto.steps, named.steps)
    other = "float32" if mode != "float32" else "bfloat16"
    different = optimize_residuals(model, tokens, dataclasses.replace(hparams, residual_matmuls=other), pad_id=0,
                                   units=UNITS)
    assert not torch.equal(auto.residuals, different.residuals)  # the two modes are told apart here


def test_bfloat16_products_are_fast_only_where_the_hardware_has_them(monkeypatch):
    assert not hparams_module.bfloat16_products_fast(torch.device("meta"))
    for flags, expected in [((False, False), False), ((True, False), True), ((False, True), True)]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: flags[0], raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: flags[1], raising=False)
        assert hparams_module.bfloat16_products_fast(torch.device("cpu")) is expected
