"""The eager paths' shortcuts (issue 19, host overhead): the op passes a 2-D query to the kernel
without reshapes, and the attached hook reuses its last snapshot while the database version, the
layer's device and dtype are unchanged, checking per-key thresholds once per snapshot.

References are independent of the code under test: the float64 op reference (conftest) for the op,
and for the hook the bare model with the residuals added by a hook of the test's own at the tokens
whose float64 cosine with the fact's key clears its threshold (test_integration's helpers).
"""

import dataclasses
import sys

import pytest
import torch
from test_integration import GAMMA, PLANTED, batch, capture, cosines, down_proj, plant, tilted, with_addition
from tiny_models import HIDDEN, tiny_model

from neuraldb_kernels import NeuralDB, attach, gated_retrieve

BACKENDS = ("cpu", "torch")


# -- the op ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_and_batched_queries_match_the_float64_reference(backend, assert_matches_reference):
    # a 2-D query goes to the kernel as it is (made contiguous), others are flattened and restored
    generator = torch.Generator().manual_seed(3)
    K, R = torch.randn(9, 24, generator=generator), torch.randn(9, 5, generator=generator)
    wide = torch.randn(4, 48, generator=generator)
    wide[1, ::2] = K[6] * 2  # row 1 of the strided query matches key 6
    strided = wide[:, ::2]
    batched = torch.randn(24, 3, 2, generator=generator).permute(1, 2, 0)  # (3, 2, 24), not contiguous
    batched[2, 1] = K[4]
    single = K[2] * 3  # one (d1,) row
    for q in (strided, batched, single):
        out, index, score = gated_retrieve(q, K, R, 0.5, backend=backend, return_index=True)
        assert_matches_reference(q, K, R, 0.5, out, index, score)
    out, index, _ = gated_retrieve(strided, K, R, 0.5, backend=backend, return_index=True)
    assert index[1].item() == 6 and torch.equal(out[1], R[6])
    out, index, _ = gated_retrieve(batched, K, R, 0.5, backend=backend, return_index=True)
    assert index[2, 1].item() == 4 and torch.equal(out[2, 1], R[4])
    out, index, _ = gated_retrieve(single, K, R, 0.5, backend=backend, return_index=True)
    assert index.shape == () and index.item() == 2 and torch.equal(out, R[2])


# -- the hook's views --------------------------------------------------------------------------


def _count_snapshots(monkeypatch, db):
    """A list that grows by one at every `db.snapshot` call."""
    taken, real = [], db.snapshot

    def snapshot(device=None, dtype=None):
        taken.append(dtype)
        return real(device, dtype)

    monkeypatch.setattr(db, "snapshot", snapshot)
    return taken


def test_every_kind_of_write_between_forwards_is_seen_at_the_next(tokenizer, monkeypatch):
    model = tiny_model("llama", tokenizer)
    db, inputs, bare, x, residual = plant(model, "llama", 1, tokenizer)
    module = down_proj(model, "llama", 1)
    taken = _count_snapshots(monkeypatch, db)

    planted = with_addition(model, module, {PLANTED: residual}, **inputs)
    negated = with_addition(model, module, {PLANTED: -residual}, **inputs)
    other = with_addition(model, module, {(0, 2): residual}, **inputs)

    def forward():
        with torch.no_grad():
            return model(**inputs).logits

    with attach(model, db) as handle:
        assert torch.equal(forward(), planted)
        first = handle.last.snapshot
        assert torch.equal(forward(), planted)
        assert handle.last.snapshot is first and len(taken) == 1  # unchanged: reused

        db.upsert(x[PLANTED], -residual, "planted")  # rewritten in place: same row, same key count
        assert torch.equal(forward(), negated)
        assert torch.equal(first.residuals[0], residual)  # the earlier snapshot still shows its version
        db.upsert(x[PLANTED], residual, "planted", key_gammas=torch.tensor([0.999]))  # its own threshold
        assert cosines(x[PLANTED], x[PLANTED]).item() > 0.999, "test premise"
        assert torch.equal(forward(), planted)
        db.upsert(x[PLANTED], residual, "planted", key_gammas=torch.tensor([1.0]))  # nothing clears 1
        assert torch.equal(forward(), bare)
        db.upsert(x[PLANTED], residual, "planted")  # back to the database's gamma
        db.gamma = 1.0
        assert torch.equal(forward(), bare)
        db.gamma = GAMMA
        assert torch.equal(forward(), planted)
        db.delete("planted")
        assert torch.equal(forward(), bare)
        db.add(x[0, 2], residual, ids="other")
        assert torch.equal(forward(), other)
        assert [f.fact_id for f in handle.fired() if inputs["attention_mask"][f.batch, f.position]] == ["other"]
        assert handle.last.snapshot.version == db.version


def test_a_write_by_another_connection_is_seen_after_refresh(tokenizer, tmp_path):
    model = tiny_model("llama", tokenizer)
    inputs = batch(tokenizer, ["The Eiffel Tower is located in the city of", "Paris is the capital of"])
    module = down_proj(model, "llama", 1)
    bare, x, _ = capture(model, module, **inputs)
    residual = torch.full((HIDDEN,), 3.0)
    path = tmp_path / "facts.sqlite"
    planted = with_addition(model, module, {PLANTED: residual}, **inputs)
    reader = NeuralDB(path, d1=x.shape[-1], d2=HIDDEN, layer=1, gamma=GAMMA)
    writer = NeuralDB.open(path)
    try:
        with attach(model, reader), torch.no_grad():
            assert torch.equal(model(**inputs).logits, bare)
            writer.add(x[PLANTED], residual, ids="from-writer")
            assert torch.equal(model(**inputs).logits, bare)  # not refreshed: this connection's state
            assert reader.refresh()
            assert torch.equal(model(**inputs).logits, planted)
    finally:
        writer.close()
        reader.close()


def test_a_new_dtype_takes_a_new_snapshot_in_that_dtype(tokenizer, monkeypatch):
    model = tiny_model("llama", tokenizer)
    db, inputs, _, x, residual = plant(model, "llama", 1, tokenizer)
    taken = _count_snapshots(monkeypatch, db)
    with attach(model, db) as handle, torch.no_grad():
        for dtype in (torch.float32, torch.float64, torch.float32):
            model.to(dtype)
            with handle.paused():
                expected = with_addition(model, down_proj(model, "llama", 1), {PLANTED: residual}, **inputs)
            assert torch.equal(model(**inputs).logits, expected)
            assert handle.last.snapshot.residuals.dtype == dtype
    assert taken == [torch.float32, torch.float64, torch.float32]


def test_a_closed_database_fails_the_next_forward(tokenizer):
    model = tiny_model("llama", tokenizer)
    db, inputs, *_ = plant(model, "llama", 1, tokenizer)
    with attach(model, db), torch.no_grad():
        model(**inputs)
        db.close()
        with pytest.raises(ValueError, match="this NeuralDB is closed"):
            model(**inputs)


def test_per_key_thresholds_are_checked_once_per_snapshot_and_a_bad_one_fails_every_forward(tokenizer, monkeypatch):
    attach_module = sys.modules["neuraldb_kernels.integration.attach"]  # the module, not the function
    model = tiny_model("llama", tokenizer)
    db, inputs, _, x, residual = plant(model, "llama", 1, tokenizer)
    db.upsert(x[PLANTED], residual, "planted", key_gammas=torch.tensor([0.9]))
    checked, real_check = [], attach_module.check_key_gamma_values

    def check(gamma):
        checked.append(gamma)
        real_check(gamma)

    monkeypatch.setattr(attach_module, "check_key_gamma_values", check)
    expected = with_addition(model, down_proj(model, "llama", 1), {PLANTED: residual}, **inputs)
    with attach(model, db), torch.no_grad():
        for _ in range(3):
            assert torch.equal(model(**inputs).logits, expected)
        assert len(checked) == 1
        db.add(x[0, 2] * -1, residual, ids="far")  # cosine -1 with its token: fires nowhere
        assert torch.equal(model(**inputs).logits, expected)
        assert len(checked) == 2

    # a threshold outside [-1, 1] (the store refuses to write one: here a snapshot is altered)
    real_snapshot = db.snapshot

    def corrupted(device=None, dtype=None):
        snapshot = real_snapshot(device, dtype)
        return dataclasses.replace(snapshot, gammas=torch.full_like(snapshot.gammas, 1.5))

    monkeypatch.setattr(db, "snapshot", corrupted)
    with attach(model, db), torch.no_grad():
        for _ in range(2):  # never kept: every forward checks again and fails
            with pytest.raises(ValueError, match=r"per-key gamma values must be finite numbers in \[-1, 1\]"):
                model(**inputs)
