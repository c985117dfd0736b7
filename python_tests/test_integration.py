"""attach/detach on tiny randomly initialised models of every supported architecture.

References are independent of the code under test: the FFN down-projections are found by paths
written out here, the expected edit is the bare model with the residual added by a hook of the
test's own, and the expected firing tokens come from float64 cosines of captured activations.
"""

import sys
import warnings

import pytest
import torch
from tiny_models import ARCHS, HIDDEN, tiny_model

from neuraldb_kernels import NeuralDB, attach, available_backends
from neuraldb_kernels.integration import SUPPORTED_MODEL_TYPES, down_proj_dims, locate_down_proj, num_layers
from neuraldb_kernels.store import FingerprintMismatchWarning

GAMMA = 0.95  # high, so that only the planted token fires in random models (checked in float64)
PLANTED = (1, 3)  # (batch row, token) of the planted fact in PROMPTS: " capital" of the second prompt
PROMPTS = [
    "The Eiffel Tower is located in the city of",
    "Paris is the capital of",
]

def down_proj(model, kind, layer):
    return model.get_submodule(ARCHS[kind][1].format(layer))


def capture(model, module, **inputs):
    """(logits, input of `module`, output of `module`) of one bare forward pass."""
    seen = {}

    def hook(_, args, output):
        seen["x"], seen["y"] = args[0].detach().clone(), output.detach().clone()

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
    finally:
        handle.remove()
    return logits, seen["x"], seen["y"]


def with_addition(model, module, additions, **inputs):
    """Logits of the bare model with residual r added to `module`'s output at each (b, t): r of `additions`."""

    def hook(_, args, output):
        output = output.clone()
        for (b, t), residual in additions.items():
            output[b, t] += residual.to(output.dtype)
        return output

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model(**inputs).logits
    finally:
        handle.remove()


def cosines(x, key):
    """float64 cosine of every row of x (..., d1) with `key` (d1,)."""
    x, key = x.double(), key.double()
    return (x @ key) / (x.norm(dim=-1) * key.norm())


def batch(tokenizer, texts, side="right"):
    tokenizer.padding_side = side
    return dict(tokenizer(texts, return_tensors="pt", padding=True))


def planted_db(layer, key, residual, gamma=GAMMA, fact_id="planted"):
    """A database holding one fact (key, residual) for `layer`."""
    db = NeuralDB(d1=key.shape[0], d2=residual.shape[0], layer=layer, gamma=gamma)
    db.add(key.float(), residual.float(), ids=fact_id)
    return db


def plant(model, kind, layer, tokenizer, b=1, t=3, scale=8.0, seed=1):
    """One fact keyed on the down-projection input at token (b, t) of the right-padded PROMPTS, on
    the model's device: (db, inputs, bare logits, down-projection inputs (batch, seq, d1), residual)."""
    device = next(model.parameters()).device
    inputs = {name: value.to(device) for name, value in batch(tokenizer, PROMPTS).items()}
    module = down_proj(model, kind, layer)
    logits, x, y = capture(model, module, **inputs)
    generator = torch.Generator().manual_seed(seed)
    residual = (torch.randn(y.shape[-1], generator=generator) * scale).to(device)
    db = planted_db(layer, x[b, t].cpu(), residual.cpu())
    return db, inputs, logits, x, residual


# -- the architecture table ------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(ARCHS))
def test_table_finds_the_down_projection_of_every_layer(kind, tokenizer):
    model = tiny_model(kind, tokenizer)
    assert kind in SUPPORTED_MODEL_TYPES
    assert num_layers(model) == 2
    for layer in range(2):
        assert locate_down_proj(model, layer) is down_proj(model, kind, layer)
    module = down_proj(model, kind, 0)
    weight = module.weight
    d1, d2 = (weight.shape[0], weight.shape[1]) if kind == "gpt2" else (weight.shape[1], weight.shape[0])
    assert down_proj_dims(model) == (d1, d2)
    assert d2 == HIDDEN


def test_generic_module_path_reaches_the_same_module(tokenizer):
    model = tiny_model("llama", tokenizer)
    path = "model.layers.{layer}.mlp.down_proj"
    assert locate_down_proj(model, 1, module_path=path) is model.model.layers[1].mlp.down_proj
    assert num_layers(model, module_path=path) == 2


# -- exactness -------------------------------------------------------------------------------


# every architecture and layer on CPU; on a GPU, each GPU backend (skipped without one, with the reason)
PLANTED_CASES = ([(kind, layer, "cpu", "auto") for kind in sorted(ARCHS) for layer in (0, 1)]
                 + [("llama", 1, "cuda", backend) for backend in ("triton", "cuda", "torch")])


@pytest.mark.parametrize("kind, layer, device, backend", PLANTED_CASES)
def test_planted_fact_adds_its_residual_at_exactly_that_token(kind, layer, device, backend, tokenizer):
    if device == "cuda":
        reason = available_backends()[backend].reasons.get("cuda")
        if reason is not None:
            pytest.skip(f"{backend} on cuda: {reason}")
    model = tiny_model(kind, tokenizer).to(device)
    b, t = PLANTED
    db, inputs, bare, x, residual = plant(model, kind, layer, tokenizer, b=b, t=t)
    mask = inputs["attention_mask"].bool()
    firing = (cosines(x, x[b, t]) > GAMMA) & mask
    assert firing.nonzero().tolist() == [[b, t]], "test premise: only the planted token is near its key"

    expected = with_addition(model, down_proj(model, kind, layer), {(b, t): residual}, **inputs)
    with attach(model, db, backend=backend) as handle:
        with torch.no_grad():
            edited = model(**inputs).logits
        fired = [(f.batch, f.position, f.fact_id) for f in handle.fired() if mask[f.batch, f.position]]
        assert handle.last.index.device.type == device
    assert torch.equal(edited, expected)
    assert fired == [(b, t, "planted")]
    assert not torch.equal(edited, bare)
    assert torch.equal(edited[0], bare[0]) and torch.equal(edited[b, :t], bare[b, :t])


@pytest.mark.parametrize("kind", sorted(ARCHS))
def test_empty_database_and_closed_gate_are_bit_identical(kind, tokenizer):
    model = tiny_model(kind, tokenizer)
    inputs = batch(tokenizer, PROMPTS)
    with torch.no_grad():
        bare = model(**inputs).logits
    d1, d2 = down_proj_dims(model)
    with attach(model, NeuralDB(d1=d1, d2=d2, layer=1)) as handle:
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, bare)
        assert handle.fired() == [] and bool((handle.last.index == -1).all())
    far_key = -capture(model, down_proj(model, kind, 1), **inputs)[1][0, 0]  # cosine -1 with one token
    db = NeuralDB(d1=d1, d2=d2, layer=1, gamma=0.999)
    db.add(far_key, torch.full((d2,), 100.0))
    with attach(model, db) as handle:
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, bare)
        assert handle.fired() == []


@pytest.mark.parametrize("kind", sorted(ARCHS))
def test_detach_restores_the_model_exactly(kind, tokenizer):
    model = tiny_model(kind, tokenizer)
    db, inputs, bare, _, _ = plant(model, kind, 1, tokenizer)
    modules_before = list(model.named_modules())
    module = down_proj(model, kind, 1)
    hooks_before = [(name, dict(getattr(module, name))) for name in vars(module) if name.endswith("hooks")]
    forward_before = type(module).forward

    handle = attach(model, db)
    with torch.no_grad():
        assert not torch.equal(model(**inputs).logits, bare)
    handle.detach()
    handle.detach()  # a second detach does nothing
    assert not handle.attached
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, bare)
    assert list(model.named_modules()) == modules_before
    assert [(name, dict(getattr(module, name))) for name in vars(module) if name.endswith("hooks")] == hooks_before
    assert type(module).forward is forward_before and "forward" not in vars(module)
    attach(model, db).detach()  # the layer is free again


# -- behaviour -------------------------------------------------------------------------------


def test_live_database_adds_and_deletes_apply_at_the_next_forward(tokenizer):
    model = tiny_model("llama", tokenizer)
    db, inputs, bare, x, residual = plant(model, "llama", 1, tokenizer)
    expected = with_addition(model, down_proj(model, "llama", 1), {PLANTED: residual}, **inputs)
    db.delete("planted")
    with attach(model, db) as handle:
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, bare)
            db.add(x[PLANTED], residual, ids="late")
            assert torch.equal(model(**inputs).logits, expected)
            assert [f.fact_id for f in handle.fired() if inputs["attention_mask"][f.batch, f.position]] == ["late"]
            db.delete("late")
            assert torch.equal(model(**inputs).logits, bare)


def test_a_write_between_the_key_and_residual_views_is_retried_until_both_agree(tokenizer, monkeypatch):
    # keys in another dtype than the residuals take two snapshots: a writer that lands between
    # them makes the hook take both again, so K and R always come from one database version
    model = tiny_model("llama", tokenizer)
    db, inputs, _, x, residual = plant(model, "llama", 1, tokenizer)
    db.delete("planted")
    expected = with_addition(model, down_proj(model, "llama", 1), {PLANTED: residual}, **inputs)
    taken, real_snapshot = [], db.snapshot

    def snapshot_raced_by_a_writer(device=None, dtype=None):
        taken.append(dtype)
        if len(taken) == 2:  # the key view, right after the residual view
            db.add(x[PLANTED], residual, ids="late")
        return real_snapshot(device, dtype)

    monkeypatch.setattr(db, "snapshot", snapshot_raced_by_a_writer)
    with attach(model, db, key_dtype=torch.bfloat16) as handle, torch.no_grad():
        assert torch.equal(model(**inputs).logits, expected)
        assert taken == [torch.float32, torch.bfloat16, torch.float32, torch.bfloat16]
        assert [f.fact_id for f in handle.fired() if inputs["attention_mask"][f.batch, f.position]] == ["late"]
        assert handle.last.snapshot.version == real_snapshot().version


def test_paused_runs_the_bare_model_and_puts_retrieval_back(tokenizer):
    model = tiny_model("llama", tokenizer)
    db, inputs, bare, _, residual = plant(model, "llama", 1, tokenizer)
    expected = with_addition(model, down_proj(model, "llama", 1), {PLANTED: residual}, **inputs)
    with attach(model, db) as handle, torch.no_grad():
        assert torch.equal(model(**inputs).logits, expected) and handle.fired()
        with handle.paused() as same:
            assert same is handle and handle.is_paused and handle.attached and handle.fired() == []
            assert torch.equal(model(**inputs).logits, bare) and handle.last is None
            with handle.paused():  # blocks nest: the outer one still pauses afterwards
                assert torch.equal(model(**inputs).logits, bare)
            assert handle.is_paused and torch.equal(model(**inputs).logits, bare)
            assert "paused" in repr(handle)
            with pytest.raises(ValueError, match="already has a NeuralDB attached"):
                attach(model, db)  # a paused attachment still holds its layer
        assert not handle.is_paused and torch.equal(model(**inputs).logits, expected)
        with pytest.raises(RuntimeError, match="inside"), handle.paused():
            raise RuntimeError("inside")
        assert torch.equal(model(**inputs).logits, expected)  # back after an error too
        with handle.paused():
            handle.detach()
        assert not handle.attached and not handle.is_paused and torch.equal(model(**inputs).logits, bare)


def tilted(key, cosine, seed=0):
    """A vector whose float64 cosine with `key` is `cosine`."""
    key = key.double() / key.double().norm()
    other = torch.randn(key.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    other = other - (other @ key) * key
    return (cosine * key + (1 - cosine**2) ** 0.5 * other / other.norm()).float()


def test_gamma_defaults_to_the_database_and_follows_it(tokenizer):
    model = tiny_model("llama", tokenizer)
    inputs = batch(tokenizer, PROMPTS)
    bare, x, _ = capture(model, down_proj(model, "llama", 1), **inputs)
    db = planted_db(1, tilted(x[PLANTED], 0.97), torch.full((HIDDEN,), 4.0))
    mask = inputs["attention_mask"].bool()

    def fired_ids(handle):
        with torch.no_grad():
            logits = model(**inputs).logits
        return logits, [f.fact_id for f in handle.fired() if mask[f.batch, f.position]]

    with attach(model, db) as handle:
        assert handle.gamma == GAMMA
        assert fired_ids(handle)[1] == ["planted"]  # 0.97 > 0.95
        db.gamma = 0.98  # read at the next forward
        logits, fired = fired_ids(handle)
        assert fired == [] and torch.equal(logits, bare)
    with attach(model, db, gamma=0.9) as handle:  # an explicit gamma overrides the database's
        assert handle.gamma == 0.9
        assert fired_ids(handle)[1] == ["planted"]


def test_fired_reports_ids_and_scores_from_the_snapshot_the_forward_read(tokenizer):
    model = tiny_model("llama", tokenizer)
    db, inputs, _, x, residual = plant(model, "llama", 1, tokenizer)
    db.add(x[0, 2], -residual, ids="second")
    mask = inputs["attention_mask"].bool()
    with attach(model, db) as handle:
        with torch.no_grad():
            model(**inputs)
        db.delete("planted")  # after the forward: the report still names what fired then
        fired = [f for f in handle.fired() if mask[f.batch, f.position]]
    assert [(f.batch, f.position, f.fact_id) for f in fired] == [(0, 2, "second"), (*PLANTED, "planted")]
    for f in fired:
        assert f.score == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("kind", sorted(ARCHS))
def test_generate_with_cache_equals_greedy_decoding_without_cache(kind, tokenizer):
    """A fact keyed on a token produced during decoding fires inside a cached decoding step."""
    model = tiny_model(kind, tokenizer)
    module = down_proj(model, kind, 0)
    prompt = tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    steps, fire_at = 6, prompt.shape[1] + 2  # the key of the 3rd generated token's step

    def greedy_without_cache():
        sequence, logits = prompt, []
        with torch.no_grad():
            for _ in range(steps):
                step_logits = model(input_ids=sequence, use_cache=False).logits[:, -1]
                logits.append(step_logits)
                sequence = torch.cat([sequence, step_logits.argmax(-1, keepdim=True)], dim=1)
        return sequence, torch.stack(logits, 1)

    bare_sequence, bare_logits = greedy_without_cache()
    _, x, y = capture(model, module, input_ids=bare_sequence)
    residual = torch.randn(y.shape[-1], generator=torch.Generator().manual_seed(3)) * 8
    db = planted_db(0, x[0, fire_at], residual)
    with attach(model, db):
        expected_sequence, expected_logits = greedy_without_cache()
        with torch.no_grad():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=steps,
                                 do_sample=False, use_cache=True, return_dict_in_generate=True, output_logits=True)
    assert torch.equal(out.sequences, expected_sequence)
    torch.testing.assert_close(torch.stack(out.logits, 1), expected_logits, rtol=1e-4, atol=1e-4)
    first_changed = fire_at - prompt.shape[1] + 1  # the step whose logits the edit reaches first
    torch.testing.assert_close(expected_logits[:, :first_changed], bare_logits[:, :first_changed], rtol=0, atol=0)
    assert not torch.allclose(expected_logits[:, first_changed], bare_logits[:, first_changed])


@pytest.mark.parametrize("kind", sorted(ARCHS))
def test_left_padded_batch_generates_like_each_prompt_alone(kind, tokenizer):
    model = tiny_model(kind, tokenizer)
    db, *_ = plant(model, kind, 0, tokenizer, b=1, t=3)  # on PROMPTS[1], the shorter prompt
    left = batch(tokenizer, PROMPTS, side="left")
    pad = int((left["attention_mask"][1] == 0).sum())
    assert pad > 0, "test premise: the planted prompt is left-padded"
    with attach(model, db) as handle, torch.no_grad():
        positions = (left["attention_mask"].cumsum(-1) - 1).clamp_min(0)
        model(**left, position_ids=positions)
        assert (1, pad + 3, "planted") in [(f.batch, f.position, f.fact_id) for f in handle.fired()]
        together = model.generate(**left, max_new_tokens=4, do_sample=False)
        alone = [model.generate(**tokenizer(p, return_tensors="pt"), max_new_tokens=4, do_sample=False)
                 for p in PROMPTS]
    for row, single in enumerate(alone):
        assert torch.equal(together[row, -4:], single[0, -4:])


@pytest.mark.parametrize("kind", sorted(ARCHS))
def test_right_padded_batch_matches_each_prompt_alone(kind, tokenizer):
    model = tiny_model(kind, tokenizer)
    db, right, *_ = plant(model, kind, 0, tokenizer, b=1, t=3)
    with attach(model, db) as handle, torch.no_grad():
        padded = model(**right).logits
        mask = right["attention_mask"].bool()
        fired = [(f.batch, f.position) for f in handle.fired() if mask[f.batch, f.position]]
        for row, prompt in enumerate(PROMPTS):
            alone = model(**tokenizer(prompt, return_tensors="pt")).logits[0]
            torch.testing.assert_close(padded[row, : alone.shape[0]], alone, rtol=1e-4, atol=1e-5)
    assert fired == [(1, 3)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_half_precision_models(kind, dtype, tokenizer):
    model = tiny_model(kind, tokenizer, dtype=dtype)
    module = down_proj(model, kind, 1)
    inputs = batch(tokenizer, PROMPTS)
    bare, x, y = capture(model, module, **inputs)
    residual = torch.randn(y.shape[-1], generator=torch.Generator().manual_seed(1)) * 8
    d1, d2 = down_proj_dims(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fresh database has no fingerprint: no warning either
        empty = attach(model, NeuralDB(d1=d1, d2=d2, layer=1))
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, bare)
    empty.detach()
    db = planted_db(1, x[PLANTED], residual)
    expected = with_addition(model, module, {PLANTED: residual}, **inputs)
    with attach(model, db) as handle, torch.no_grad():
        edited = model(**inputs).logits
        assert edited.dtype == dtype
        mask = inputs["attention_mask"].bool()
        assert [(f.batch, f.position) for f in handle.fired() if mask[f.batch, f.position]] == [PLANTED]
    # the database is float32: its residual, rounded to the model dtype, is what the hook adds
    assert torch.equal(edited, expected)


def test_key_dtype_option_keeps_results(tokenizer):
    model = tiny_model("llama", tokenizer)
    db, inputs, _, _, residual = plant(model, "llama", 1, tokenizer)
    expected = with_addition(model, down_proj(model, "llama", 1), {PLANTED: residual}, **inputs)
    with attach(model, db, key_dtype=torch.bfloat16) as handle, torch.no_grad():
        assert torch.equal(model(**inputs).logits, expected)
        assert handle.last.snapshot.keys.dtype == torch.float32  # residual view; keys came in bfloat16
    with pytest.raises(TypeError, match="key_dtype"):
        attach(model, db, key_dtype=torch.int8)


def test_key_format_option_keeps_results_and_follows_the_database(tokenizer):
    """attach(key_format="int8"): the retrieval scans codes and rescores exactly (ops/key_index.py),
    so the logits are those of the full-precision keys, before and after the database changes."""
    model = tiny_model("llama", tokenizer)
    db, inputs, bare, x, residual = plant(model, "llama", 1, tokenizer)
    expected = with_addition(model, down_proj(model, "llama", 1), {PLANTED: residual}, **inputs)
    with attach(model, db, key_format="int8") as handle, torch.no_grad():
        assert torch.equal(model(**inputs).logits, expected)
        db.delete("planted")
        assert torch.equal(model(**inputs).logits, bare)
        db.add(x[PLANTED], residual, ids="late")
        assert torch.equal(model(**inputs).logits, expected)
        assert [f.fact_id for f in handle.fired() if inputs["attention_mask"][f.batch, f.position]] == ["late"]
    with pytest.raises(ValueError, match="unknown code format"):
        attach(model, db, key_format="int3")


def test_torch_compile(tokenizer):
    """The hook's database read and retrieval run eagerly (torch.compiler.disable: they take the
    database lock and read Python state), so the hooked layer splits the graph once; the rest of the
    model compiles. One layer only: dynamo re-traces every enclosing frame at the split, slowly."""
    model = tiny_model("llama", tokenizer, layers=1)
    db, inputs, bare, x, residual = plant(model, "llama", 0, tokenizer)
    expected = with_addition(model, down_proj(model, "llama", 0), {PLANTED: residual}, **inputs)
    mask = inputs["attention_mask"].bool()
    with attach(model, db) as handle:
        compiled = torch.compile(model, backend="aot_eager")
        with torch.no_grad():
            edited = compiled(**inputs).logits
            assert [(f.batch, f.position) for f in handle.fired() if mask[f.batch, f.position]] == [PLANTED]
            db.delete("planted")  # the live database still applies
            assert torch.equal(compiled(**inputs).logits, bare)
    torch.testing.assert_close(edited, expected, rtol=1e-5, atol=1e-5)


# -- fingerprints and errors -----------------------------------------------------------------


def test_fingerprint_checks_on_attach(tokenizer):
    from neuraldb_kernels.integration import model_fingerprint

    model = tiny_model("llama", tokenizer)
    d1, d2 = down_proj_dims(model)
    db = NeuralDB(d1=d1, d2=d2, fingerprint=model_fingerprint(model, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attach(model, db).detach()  # same weights: silent, layer from the fingerprint
    other = tiny_model("llama", tokenizer, seed=5)
    with pytest.warns(FingerprintMismatchWarning):
        attach(other, db).detach()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attach(other, db, allow_weight_mismatch=True).detach()
    with pytest.raises(ValueError, match="layer"):
        attach(model, db, layer=0)  # built for layer 1


def test_errors(tokenizer):
    model = tiny_model("llama", tokenizer)
    d1, d2 = down_proj_dims(model)
    db = NeuralDB(d1=d1, d2=d2, layer=1)
    with pytest.raises(ValueError, match=r"d1|dimension|match"):
        attach(model, NeuralDB(d1=d1 + 1, d2=d2, layer=1))
    with pytest.raises(ValueError, match=r"d2|dimension|match"):
        attach(model, NeuralDB(d1=d1, d2=d2 + 1, layer=1))
    with pytest.raises(ValueError, match="out of range"):
        attach(model, db, layer=2)
    with pytest.raises(ValueError, match="no layer"):
        attach(model, NeuralDB(d1=d1, d2=d2))
    for gamma in (1.5, -1.01, float("nan")):
        with pytest.raises(ValueError, match="gamma"):
            attach(model, db, gamma=gamma)
    with pytest.raises(TypeError, match="NeuralDB"):
        attach(model, object())
    with pytest.raises(ValueError, match="backend"):
        attach(model, db, backend="nope")
    with pytest.raises(ValueError, match="has no submodule 'block'"):
        attach(model, db, module_path="model.block.{layer}.mlp.down_proj")
    with pytest.raises(ValueError, match="placeholder"):
        attach(model, db, module_path="model.layers.1.mlp.down_proj")
    with pytest.raises(TypeError, match="not a linear projection"):
        attach(model, db, module_path="model.layers.{layer}.mlp.act_fn")

    handle = attach(model, db)
    with pytest.raises(ValueError, match="already has a NeuralDB attached"):
        attach(model, NeuralDB(d1=d1, d2=d2, layer=1))
    with pytest.raises(ValueError, match="already has a NeuralDB attached"):
        attach(model, db, module_path="model.layers.{layer}.mlp.down_proj")
    with attach(model, NeuralDB(d1=d1, d2=d2, layer=0)):  # another layer is fine
        pass
    handle.detach()


def test_unsupported_model_type_names_the_supported_ones_and_the_generic_path(tokenizer):
    model = tiny_model("llama", tokenizer)
    model.config.model_type = "my_llama"
    db = NeuralDB(d1=96, d2=HIDDEN, layer=1)
    with pytest.raises(ValueError) as error:
        attach(model, db)
    message = str(error.value)
    assert "'my_llama'" in message and "module_path" in message
    assert all(kind in message for kind in SUPPORTED_MODEL_TYPES)
    with attach(model, db, module_path="model.layers.{layer}.mlp.down_proj") as handle:
        assert handle.module is model.model.layers[1].mlp.down_proj
    with pytest.raises(TypeError, match="config.model_type"):
        attach(torch.nn.Linear(4, 4), db)


# -- per-key thresholds ----------------------------------------------------------------------


def test_each_fact_is_gated_by_its_own_thresholds(tokenizer):
    # "strict" sits at cosine 0.97 from its token with threshold 0.98 (the database's 0.95 would
    # fire it); "loose" at 0.90 with threshold 0.85 (0.95 would not); "plain" has none: db.gamma
    model = tiny_model("llama", tokenizer)
    inputs = batch(tokenizer, PROMPTS)
    module = down_proj(model, "llama", 1)
    bare, x, _ = capture(model, module, **inputs)
    mask = inputs["attention_mask"].bool()
    at = {"strict": PLANTED, "loose": (0, 2), "plain": (1, 1)}
    keys = {"strict": tilted(x[PLANTED], 0.97, seed=1), "loose": tilted(x[0, 2], 0.90, seed=2),
            "plain": tilted(x[1, 1], 0.96, seed=3)}
    own = {"strict": 0.98, "loose": 0.85, "plain": None}
    generator = torch.Generator().manual_seed(4)
    residuals = {name: torch.randn(HIDDEN, generator=generator) * 4 for name in keys}
    db = NeuralDB(d1=x.shape[-1], d2=HIDDEN, layer=1, gamma=GAMMA)
    db.add(torch.stack(list(keys.values())), torch.stack(list(residuals.values())), list(keys),
           key_gammas=[None if own[name] is None else torch.tensor([own[name]]) for name in keys])

    def expected_firing(gamma_of):
        """{(b, t): fact} in float64: the token's best key fires when its cosine is above that key's threshold."""
        names = list(keys)
        scores = torch.stack([cosines(x, keys[name]) for name in names], dim=-1)
        best, index = scores.max(dim=-1)
        return {(b, t): names[index[b, t]] for b, t in mask.nonzero().tolist()
                if best[b, t] > gamma_of(names[index[b, t]])}

    def run(**options):
        with attach(model, db, **options) as handle, torch.no_grad():
            return model(**inputs).logits, {(f.batch, f.position): f.fact_id for f in handle.fired()
                                             if mask[f.batch, f.position]}

    per_key = expected_firing(lambda name: db.gamma if own[name] is None else own[name])
    assert per_key == {at["loose"]: "loose", at["plain"]: "plain"}, "test premise"
    logits, fired = run()
    assert fired == per_key
    assert torch.equal(logits, with_addition(model, module, {at[n]: residuals[n] for n in per_key.values()}, **inputs))

    db.gamma = 0.99  # moves "plain" only
    per_key = expected_firing(lambda name: db.gamma if own[name] is None else own[name])
    assert per_key == {at["loose"]: "loose"}, "test premise"
    logits, fired = run()
    assert fired == per_key
    assert torch.equal(logits, with_addition(model, module, {at["loose"]: residuals["loose"]}, **inputs))

    overridden = expected_firing(lambda name: GAMMA)  # a gamma given to attach is every key's
    assert overridden == {at["strict"]: "strict", at["plain"]: "plain"}, "test premise"
    logits, fired = run(gamma=GAMMA)
    assert fired == overridden
    assert torch.equal(logits, with_addition(model, module, {at[n]: residuals[n] for n in overridden.values()},
                                             **inputs))


def test_without_thresholds_the_hook_passes_the_number_and_equal_thresholds_change_nothing(tokenizer, monkeypatch):
    attach_module = sys.modules["neuraldb_kernels.integration.attach"]  # the module, not the function
    model = tiny_model("llama", tokenizer)
    db, inputs, _, x, residual = plant(model, "llama", 1, tokenizer)
    db.add(tilted(x[0, 2], 0.96, seed=5), -residual, ids="second")
    seen = []

    def spy(real):
        def call(q, K, R, gamma, **options):
            seen.append(gamma)
            return real(q, K, R, gamma, **options)
        return call

    # per-key thresholds go to gated_retrieve_prechecked (the hook checks them once per snapshot)
    for name in ("gated_retrieve", "gated_retrieve_prechecked"):
        monkeypatch.setattr(attach_module, name, spy(getattr(attach_module, name)))
    with attach(model, db), torch.no_grad():
        scalar = model(**inputs).logits
    assert seen == [GAMMA] and isinstance(seen[0], float)  # as before per-key thresholds existed
    expected = with_addition(model, down_proj(model, "llama", 1), {PLANTED: residual, (0, 2): -residual}, **inputs)
    assert torch.equal(scalar, expected)

    db.upsert(x[PLANTED], residual, "planted", key_gammas=torch.tensor([GAMMA]))  # the same threshold, its own
    with attach(model, db), torch.no_grad():
        per_key = model(**inputs).logits
    assert isinstance(seen[1], torch.Tensor) and seen[1].tolist() == [torch.tensor(GAMMA).item()] * 2
    assert torch.equal(per_key, scalar)
