"""MEMIT / AlphaEdit baselines: the closed-form updates against independent float64 least-squares
references, the streamed C0 against one matrix product and a hook of the test's own, and the
reversible weight edit bit for bit on tiny random models."""

import os

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig

from neuraldb_kernels.baselines import (
    KeyStatistics,
    alphaedit_delta,
    apply_delta,
    collect_key_statistics,
    general_texts,
    lambada_texts,
    memit_delta,
    mmlu_dev_texts,
    model_written_texts,
    null_space_projection,
)
from neuraldb_kernels.integration import model_fingerprint
from neuraldb_kernels.integration.default_model import load_default_tokenizer
from neuraldb_kernels.store import ModelFingerprint

D1, D2 = 16, 5
TEXTS = ["The Eiffel Tower is located in the city of", "Paris is the capital of France.",
         "A short one"]


def random_matrix(rows, cols, seed):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((rows, cols)))


def ridge_reference(design, targets, penalty_rows):
    """argmin_X ||design X - targets||² + ||penalty_rows X||² by numpy least squares on the
    stacked system [design; penalty_rows] X = [targets; 0] (an independent float64 solver)."""
    stacked = np.vstack([design.numpy(), penalty_rows.numpy()])
    rhs = np.vstack([targets.numpy(), np.zeros((penalty_rows.shape[0], targets.shape[1]))])
    return torch.from_numpy(np.linalg.lstsq(stacked, rhs, rcond=None)[0])


def low_rank_preserved_keys(rank=10, tokens=200, seed=3):
    """K0 (tokens, D1) of exact rank `rank`: its null space has dimension D1 - rank."""
    return random_matrix(tokens, rank, seed) @ random_matrix(rank, D1, seed + 1)


# ------------------------------------------------------------------ MEMIT


def test_memit_maps_every_key_to_its_residual_as_the_weight_goes_to_zero():
    K1, R = random_matrix(8, D1, 0), random_matrix(8, D2, 1)
    K0 = random_matrix(200, D1, 2)
    delta = memit_delta(K1, R, K0.T @ K0, 1e-9)
    assert delta.shape == (D2, D1) and delta.dtype == torch.float64
    assert (delta @ K1.T - R.T).abs().max() <= 1e-6 * R.abs().max()


def test_memit_equals_the_stacked_least_squares_solution():
    K1, R = random_matrix(12, D1, 4), random_matrix(12, D2, 5)
    K0 = random_matrix(100, D1, 6)
    lam = 0.3
    expected = ridge_reference(K1, R, lam ** 0.5 * K0).T  # minimises ||K1 Δᵀ - R||² + λ ||K0 Δᵀ||²
    delta = memit_delta(K1.float(), R.float(), (K0.T @ K0).float(), lam)
    reference_from_float32 = ridge_reference(K1.float().double(), R.float().double(),
                                             lam ** 0.5 * K0).T
    assert torch.allclose(delta, reference_from_float32, rtol=1e-4, atol=1e-6)
    assert torch.allclose(memit_delta(K1, R, K0.T @ K0, lam), expected, rtol=1e-9, atol=1e-12)


def test_memit_without_preservation_and_too_few_keys_is_refused():
    K1, R = random_matrix(3, D1, 0), random_matrix(3, D2, 1)
    with pytest.raises(ValueError, match="not positive definite"):
        memit_delta(K1, R, torch.zeros(D1, D1, dtype=torch.float64), 0.0)


# ------------------------------------------------------------------ AlphaEdit


def test_null_space_projection_is_the_complement_of_the_preserved_keys():
    K0 = low_rank_preserved_keys()
    P = null_space_projection(K0.T @ K0 / K0.shape[0], 1e-8)
    # independent reference: I minus the projection onto K0's row space, from numpy's SVD
    _, singular, vt = np.linalg.svd(K0.numpy())
    row_space = vt[singular > 1e-8 * singular[0]]
    expected = np.eye(D1) - row_space.T @ row_space
    assert row_space.shape[0] == 10
    assert np.abs(P.numpy() - expected).max() < 1e-10


def test_alphaedit_annihilates_the_preserved_keys_and_maps_the_edited_ones():
    K0 = low_rank_preserved_keys()
    P = null_space_projection(K0.T @ K0, 1e-6)
    K1, R = random_matrix(4, D1, 7), random_matrix(4, D2, 8)  # random keys: parts in and out of the null space
    assert (K1 @ (torch.eye(D1, dtype=torch.float64) - P)).norm() > 0.5 * K1.norm()
    delta = alphaedit_delta(K1, R, P, 1e-10)
    assert delta.shape == (D2, D1) and delta.dtype == torch.float64
    assert (delta @ K0.T).norm() <= 1e-12 * delta.norm() * K0.norm()
    assert (delta @ K1.T - R.T).abs().max() <= 1e-6 * R.abs().max()


def test_alphaedit_equals_ridge_regression_on_the_projected_keys():
    K0 = low_rank_preserved_keys()
    P = null_space_projection(K0.T @ K0, 1e-6)
    K1, R = random_matrix(9, D1, 9), random_matrix(9, D2, 10)  # more facts than null-space dimensions
    lam = 0.5
    # Δᵀ = argmin_Z ||K1 P Z - R||² + λ ||Z||², solved by numpy on the stacked system
    expected = ridge_reference(K1 @ P, R, lam ** 0.5 * torch.eye(D1, dtype=torch.float64)).T
    assert torch.allclose(alphaedit_delta(K1, R, P, lam), expected, rtol=1e-9, atol=1e-12)


def test_null_space_projection_without_small_eigenvalues_is_refused():
    K0 = random_matrix(100, D1, 11)
    with pytest.raises(ValueError, match="null space is empty"):
        null_space_projection(K0.T @ K0, 1e-6)


# ------------------------------------------------------------------ shape and value errors


def test_errors_name_the_shapes():
    K1, R, C0 = random_matrix(4, D1, 0), random_matrix(5, D2, 1), torch.eye(D1, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"keys \(4, 16\) and residuals \(5, 5\)"):
        memit_delta(K1, R, C0, 1.0)
    with pytest.raises(ValueError, match=r"covariance has shape \(8, 8\), expected \(16, 16\)"):
        memit_delta(K1, R[:4], torch.eye(8, dtype=torch.float64), 1.0)
    with pytest.raises(ValueError, match=r"projection has shape \(16, 8\), expected \(16, 16\)"):
        alphaedit_delta(K1, R[:4], torch.zeros(D1, 8, dtype=torch.float64), 1.0)
    with pytest.raises(ValueError, match=r"keys must be 2-D, got shape \(16,\)"):
        memit_delta(K1[0], R[0], C0, 1.0)
    with pytest.raises(ValueError, match="covariance must be square"):
        null_space_projection(torch.zeros(D1, 8, dtype=torch.float64), 1.0)
    with pytest.raises(ValueError, match="NaN or Inf"):
        memit_delta(torch.full((4, D1), float("nan")), R[:4], C0, 1.0)
    with pytest.raises(ValueError, match="regularisation must be > 0"):
        alphaedit_delta(K1, R[:4], C0, 0.0)
    with pytest.raises(ValueError, match="weight must be >= 0"):
        memit_delta(K1, R[:4], C0, -1.0)
    with pytest.raises(ValueError, match="0 rows"):
        memit_delta(K1[:0], R[:0], C0, 1.0)


# ------------------------------------------------------------------ statistics


def fingerprint(d1=D1, layer=1, weights="ab" * 32):
    return ModelFingerprint(model_type="llama", layer=layer, d1=d1, d2=D2, weights_sha256=weights)


def test_streamed_statistics_equal_one_matrix_product():
    K0 = random_matrix(300, D1, 12).float()
    statistics = KeyStatistics.empty(fingerprint())
    for start, stop in [(0, 1), (1, 50), (50, 51), (51, 200), (200, 300)]:
        statistics.add(K0[start:stop])
    expected = K0.double().T @ K0.double()
    assert statistics.token_count == 300
    assert torch.allclose(statistics.sum_outer, expected, rtol=1e-12, atol=1e-10)
    assert torch.allclose(statistics.second_moment(), expected / 300, rtol=1e-12, atol=1e-12)


def test_statistics_errors():
    statistics = KeyStatistics.empty(fingerprint())
    with pytest.raises(ValueError, match=r"keys must have shape \(t, 16\) for d1=16, got \(3, 8\)"):
        statistics.add(torch.zeros(3, 8))
    with pytest.raises(ValueError, match="finite"):
        statistics.add(torch.full((2, D1), float("inf")))
    with pytest.raises(ValueError, match="no tokens"):
        statistics.second_moment()
    with pytest.raises(ValueError, match=r"\(16, 16\) float64"):
        KeyStatistics(fingerprint(), torch.zeros(D1, D1))


def test_saved_statistics_round_trip_and_refuse_another_model(tmp_path):
    statistics = KeyStatistics.empty(fingerprint())
    statistics.add(random_matrix(40, D1, 13))
    statistics.sources.append("random keys")
    path = tmp_path / "c0.safetensors"
    statistics.save(path)
    loaded = KeyStatistics.load(path, fingerprint())
    assert torch.equal(loaded.sum_outer, statistics.sum_outer)
    assert loaded.token_count == 40 and loaded.sources == ["random keys"]
    assert [p.name for p in tmp_path.iterdir()] == ["c0.safetensors"]  # no temporary file left
    with pytest.raises(ValueError, match="were collected for .*weights_sha256=abab.* but the model is .*cdcd"):
        KeyStatistics.load(path, fingerprint(weights="cd" * 32))
    with pytest.raises(ValueError, match="layer=1.* but the model is .*layer=2"):
        KeyStatistics.load(path, fingerprint(layer=2))
    with pytest.raises(ValueError, match="cannot read key statistics"):
        KeyStatistics.load(tmp_path / "missing.safetensors", fingerprint())
    (tmp_path / "other.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read key statistics"):
        KeyStatistics.load(tmp_path / "other.safetensors", fingerprint())


def test_foreign_or_damaged_statistics_files_are_refused(tmp_path):
    from safetensors.torch import save_file

    good = {"format": "neuraldb-key-statistics", "version": "1", "token_count": "3",
            "fingerprint": fingerprint().to_json(), "sources": "[]"}
    square = {"sum_outer": torch.zeros(D1, D1, dtype=torch.float64)}
    cases = [
        ({"weights": torch.zeros(2)}, {}, "not a key-statistics file"),
        (square, {**good, "version": "9"}, "version '9' is not supported"),
        (square, {**good, "fingerprint": "{"}, "damaged key-statistics metadata"),
        (square, {**good, "token_count": "x"}, "damaged key-statistics metadata"),
        ({"sum_outer": torch.zeros(D1, 8, dtype=torch.float64)}, good,
         r"\(16, 16\) float64 tensor for d1=16, got \(\(16, 8\), torch.float64\)"),
    ]
    for number, (tensors, metadata, message) in enumerate(cases):
        path = tmp_path / f"case{number}.safetensors"
        save_file(tensors, str(path), metadata=metadata)
        with pytest.raises(ValueError, match=message):
            KeyStatistics.load(path, fingerprint())


# ------------------------------------------------------------------ on models


@pytest.fixture(scope="module")
def tokenizer():
    """SmolLM2's tokenizer (NEURALDB_TEST_TOKENIZER may name a saved copy, as in test_integration)."""
    saved = os.environ.get("NEURALDB_TEST_TOKENIZER")
    return AutoTokenizer.from_pretrained(saved) if saved else load_default_tokenizer()


def tiny_llama(tokenizer, seed=0):
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=96, max_position_embeddings=128, vocab_size=len(tokenizer),
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=None,
                         pad_token_id=tokenizer.pad_token_id, initializer_range=0.1)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def captured_inputs(model, module, tokenizer, texts):
    """(tokens, d1) down-projection inputs of every token, each text run alone, by a hook of the test's own."""
    seen = []
    handle = module.register_forward_hook(lambda _m, args, _out: seen.append(args[0][0].detach()))
    try:
        with torch.no_grad():
            for text in texts:
                model(**tokenizer(text, return_tensors="pt"))
    finally:
        handle.remove()
    return torch.cat(seen)


def test_collected_statistics_equal_the_keys_of_each_text_run_alone(tokenizer):
    model = tiny_llama(tokenizer)
    module = model.get_submodule("model.layers.1.mlp.down_proj")
    statistics = collect_key_statistics(model, tokenizer, TEXTS, 1, batch_size=2, sources=["three sentences"])
    K0 = captured_inputs(model, module, tokenizer, TEXTS).double()
    assert statistics.token_count == K0.shape[0] == sum(len(tokenizer(t)["input_ids"]) for t in TEXTS)
    assert torch.allclose(statistics.sum_outer, K0.T @ K0, rtol=1e-5, atol=1e-6)
    assert statistics.fingerprint == model_fingerprint(model, 1) and statistics.sources == ["three sentences"]
    # adding to existing statistics, and refusing statistics of another layer
    more = collect_key_statistics(model, tokenizer, TEXTS[:1], 1, statistics=statistics)
    assert more.token_count == K0.shape[0] + len(tokenizer(TEXTS[0])["input_ids"])
    with pytest.raises(ValueError, match="collected for .*layer=1.* but the model is .*layer=0"):
        collect_key_statistics(model, tokenizer, TEXTS, 0, statistics=statistics)


def test_max_tokens_stops_after_the_batch_that_reaches_it(tokenizer):
    model = tiny_llama(tokenizer)
    first = len(tokenizer(TEXTS[0])["input_ids"])
    statistics = collect_key_statistics(model, tokenizer, TEXTS, 1, batch_size=1, max_tokens=first)
    assert statistics.token_count == first


def test_apply_and_restore_give_back_the_exact_weight_bits(tokenizer):
    model = tiny_llama(tokenizer)
    module = model.get_submodule("model.layers.1.mlp.down_proj")
    ids = tokenizer(TEXTS[0], return_tensors="pt")
    with torch.no_grad():
        before_logits = model(**ids).logits
    original = module.weight.detach().clone()
    delta = random_matrix(64, 96, 14) * 1e-3
    with apply_delta(model, delta, 1) as applied:
        assert applied.active
        assert torch.equal(module.weight, (original.double() + delta).float())
        with torch.no_grad():
            assert not torch.equal(model(**ids).logits, before_logits)
    assert not applied.active
    assert torch.equal(module.weight.view(torch.int32), original.view(torch.int32))
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, before_logits)
    with pytest.raises(RuntimeError, match="already restored"):
        applied.restore()


def test_a_memit_edit_adds_each_residual_at_its_key(tokenizer):
    model = tiny_llama(tokenizer)
    module = model.get_submodule("model.layers.1.mlp.down_proj")
    K0 = captured_inputs(model, module, tokenizer, TEXTS).double()
    K1, R = K0[:4], random_matrix(4, 64, 15) * 0.1  # four tokens' keys get new residuals
    written = model_written_texts(model, tokenizer, 8, new_tokens=24)  # 192 tokens > d1 = 96: C0 has full rank
    statistics = collect_key_statistics(model, tokenizer, written, 1)
    delta = memit_delta(K1, R, statistics.sum_outer, 1e-6)
    with torch.no_grad():
        bare = module(K1.float()).double()
        applied = apply_delta(model, delta, 1)
        edited = module(K1.float()).double()
        applied.restore()
    assert torch.allclose(edited - bare, R, atol=1e-4)


def test_conv1d_down_projections_get_the_transposed_delta(tokenizer):
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=len(tokenizer))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    module = model.get_submodule("transformer.h.0.mlp.c_proj")  # weight stored (d1, d2) = (128, 32)
    x = torch.randn(3, 128)
    delta = random_matrix(32, 128, 16) * 1e-2
    with torch.no_grad():
        bare = module(x).double()
        with apply_delta(model, delta, 0):
            edited = module(x).double()
    assert torch.allclose(edited - bare, x.double() @ delta.T, atol=1e-5)


def test_apply_delta_errors_name_the_shapes(tokenizer):
    model = tiny_llama(tokenizer)
    original = model.get_submodule("model.layers.0.mlp.down_proj").weight.detach().clone()
    with pytest.raises(ValueError, match=r"delta has shape \(96, 64\) but layer 0's down-projection needs "
                                         r"\(d2, d1\) = \(64, 96\)"):
        apply_delta(model, torch.zeros(96, 64), 0)
    with pytest.raises(ValueError, match="finite"):
        apply_delta(model, torch.full((64, 96), float("nan")), 0)
    assert torch.equal(model.get_submodule("model.layers.0.mlp.down_proj").weight, original)


def test_model_written_texts_are_seeded_and_leave_the_global_rng_alone(tokenizer):
    model = tiny_llama(tokenizer)
    state = torch.random.get_rng_state()
    first = model_written_texts(model, tokenizer, 3, new_tokens=6, seed=1, batch_size=2)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert len(first) == 3 and all(isinstance(text, str) and text for text in first)
    assert model_written_texts(model, tokenizer, 3, new_tokens=6, seed=1, batch_size=2) == first
    assert model_written_texts(model, tokenizer, 3, new_tokens=6, seed=2, batch_size=2) != first
    with pytest.raises(ValueError, match="count must be a positive int"):
        model_written_texts(model, tokenizer, 0)


# ------------------------------------------------------------------ general text and the real model


def test_general_texts_leave_out_the_excluded_passages(data_dir):
    root = data_dir / "general"
    lambada = lambada_texts(root)
    assert len(lambada) == 5153 and len(mmlu_dev_texts(root)) == 285
    scored = set(lambada[:10])
    texts = general_texts(root, exclude=scored)
    assert len(texts) == 285 + 5153 - 10 and not scored & set(texts)
    with pytest.raises(FileNotFoundError, match="MMLU dev"):
        mmlu_dev_texts(data_dir)


def test_smollm2_statistics_over_general_text_are_symmetric_positive_semidefinite(data_dir):
    from neuraldb_kernels.integration import load_default_model

    model, tokenizer = load_default_model()
    texts = lambada_texts(data_dir / "general")[:4]
    statistics = collect_key_statistics(model, tokenizer, texts, 4, batch_size=2, max_length=128)
    C0 = statistics.sum_outer
    assert C0.shape == (1536, 1536)
    assert statistics.token_count == sum(min(len(tokenizer(t)["input_ids"]), 128) for t in texts)
    assert torch.equal(C0, C0.T)
    eigenvalues = torch.linalg.eigvalsh(C0)
    assert eigenvalues.min() >= -1e-9 * eigenvalues.max()
    # rank at most the token count: AlphaEdit's null space is non-empty over this few tokens
    assert null_space_projection(statistics.second_moment(), 1e-6).trace() >= 1536 - statistics.token_count - 1e-6
