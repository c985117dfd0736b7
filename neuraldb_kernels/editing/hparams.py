"""Editing hyperparameters: documented defaults and per-architecture presets.

Every field of `EditHParams` has a default; `preset_for(model)` picks the layer l* and gamma (and
any other field that differs) for known models, identified by (config.model_type, number of
decoder layers, hidden size). Unknown models get layer = round(0.25 * num_layers) and the defaults;
run a small sweep (bench/edit_quality.py) to choose better values for them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch

from ..integration.architectures import decoder_layers, model_type, num_layers


RESIDUAL_MATMULS = ("auto", "float32", "bfloat16", "bfloat16_then_float32")


@dataclasses.dataclass(frozen=True)
class EditHParams:
    """How keys (Eq. 20) and residuals (Eq. 21) are computed.

    layer: decoder layer l* whose FFN down-projection gets the NeuralDB.
    gamma: gate threshold on the cosine between a token's key and a stored key.
    n_prefixes, prefix_length, prefix_seed: N model-written prefixes of `prefix_length` sampled
        tokens, from a fixed seed; keys and the rewriting loss average over them and the bare prompt.
    lr: Adam learning rate for r (units of the residual stream).
    steps: maximum optimisation steps per fact.
    kl_factor: weight of KL(P_edited || P_unedited) on the next token after "{subject} is a".
    weight_decay: weight of ||r||^2 / ||v||^2, v the unedited down-projection output at the
        subject's last token of the bare prompt (of the first prefixed context when the bare
        prompt opens with a one-token subject, see editing.residuals).
    clamp_norm_factor: after every step ||r|| is clamped to clamp_norm_factor * ||v||.
    stop_prob: a fact stops early once exp(-mean NLL of target_new), averaged over contexts and
        target tokens, reaches this probability.
    batch_size: facts computed and committed together (one transaction per batch).
    pass_tokens: the residual optimisation runs a batch's facts in passes of at most this many
        padded suffix tokens (sequences x longest suffix) per forward/backward, their gradients
        summed into one step: it bounds the autograd memory (about 1.5 MB per token on
        SmolLM2-135M at layer 4) whatever batch_size is, and groups facts of similar length.
        The residuals do not depend on it beyond float rounding.
    residual_matmuls: "auto", "float32", "bfloat16" or "bfloat16_then_float32": the input dtype of
        the matrix products (nn.Linear) of the decoder layers above `layer` while residuals are
        optimised. "bfloat16" runs them on bfloat16 copies of the float32 weights (float32
        accumulation; attention, norms, the residual stream, layers 0..layer and the LM head stay
        float32): an optimisation step takes 2.3x less CPU time on an AVX-512 BF16 CPU, but the
        residuals differ by bfloat16 rounding and at 64 CounterFact facts generalization fell 3.1
        points, so it is opt-in. "bfloat16_then_float32" continues each fact in float32 products
        from where bfloat16 stopped it until it meets stop_prob in float32 (editing.residuals):
        at 1,000 CounterFact facts on SmolLM2 it edited 1.49x faster than "float32" with the same
        efficacy and specificity and 0.2 less generalization (bench/RESULTS.md, issue 17). "auto"
        (the default) is "bfloat16_then_float32" where bfloat16 products are fast and the layers'
        weights are float32 (`residual_matmuls_for`: a CPU with AVX512-BF16 or AMX, a CUDA GPU
        with bfloat16 support), else "float32"; the Editor resolves it once, so its hparams and
        every EditRecord name the precision used. Keys, prefixes and the stored rows are float32
        either way (the prefix caches take bfloat16 products in "bfloat16" only, as its steps
        do); GPT-2's Conv1D projections are unaffected.
    kl_template: the prompt of the KL term, "{}" standing for the subject.
    bare_key_below: a fact whose bare-prompt query (no prefix) has cosine < this with its averaged
        key also gets that query as an extra key (same fact, same residual). Prompts that
        start with the subject put it at sequence position 0 in models without a BOS token (SmolLM2,
        GPT-2), where its representation is far from the prefixed contexts' (numbers: bench/RESULTS.md,
        "Editing notes moved from code"): without the second key the edited prompt itself would not
        fire. -1 never adds one.
        A bare-prompt query that is generic (cosine > gamma with the query at some token of the
        model-written prefixes: at gamma it would fire on any text) is added only with
        calibrate_gates, when its cosine with every model-written-text query is below
        1 - 2 * gate_margin (its own threshold then sits between; keys.bare_prompt_keys).
    share_subject_residual: facts with the same subject (exact string) get one residual, optimised
        on all of their prompts together. Their keys are the subject's last token, which in
        prompts that open with the subject ("X plays", "X was born in") is the same for every
        relation, so with a residual each only one of them could win. Editing a fact recomputes
        the stored facts of its subject with it; removing one recomputes the others.
    calibrate_gates: give each key its own gate threshold, calibrated from its fact's contexts
        and from text that must not fire it (see editing.calibration), and raise stored keys that
        new facts' contexts would fire. False: every key uses gamma.
    gate_margin: the least cosine clearance of a calibrated threshold below its fact's worst own
        context (the threshold sits halfway between that and the worst negative, see
        editing.calibration).
    calibration_texts, calibration_text_length: number and length (tokens) of the extra
        model-written texts whose every token is a negative (generated once per model, seeded).
    near_subjects: names near each fact's subject (its first or last word swapped for one of another
        edited or stored subject, a trailing number changed by one; editing.calibration.near_subjects)
        read in the fact's contexts and alone, as negatives: similar entities must not fire it.
        0 (default): at 1,000 CounterFact facts they cost more generalization than the specificity
        they buy (bench/RESULTS.md, "Calibration from the facts' own material").
    other_wordings: the subject read after this many other edited or stored prompts' openings, as
        positives: its keys must keep firing when the subject is worded otherwise.
    rewordings: up to this many rewordings of a fact whose prompt is a question (ends with "?"),
        written by the unedited model (editing.rewordings, seeded by prefix_seed), are extra
        contexts of the residual loss (bare, no prefix; the keys do not read them), so that the new
        answer also follows the question worded otherwise; statements get none. 5 (default): at
        998 ZsRE facts generalization 91.4 against 88.6 at 3, at about 1.45x the editing time of 3
        (bench/RESULTS.md, "More rewordings"); 0: the residual reads the prompt alone.
    """

    layer: int
    gamma: float = 0.65
    n_prefixes: int = 5
    prefix_length: int = 10
    prefix_seed: int = 0
    lr: float = 0.5
    steps: int = 25
    kl_factor: float = 0.0625
    weight_decay: float = 0.01
    clamp_norm_factor: float = 4.0
    stop_prob: float = 0.9
    batch_size: int = 64
    pass_tokens: int = 1024
    residual_matmuls: str = "auto"
    kl_template: str = "{} is a"
    bare_key_below: float = 0.8
    share_subject_residual: bool = True
    calibrate_gates: bool = True
    gate_margin: float = 0.02
    calibration_texts: int = 16
    calibration_text_length: int = 24
    near_subjects: int = 0
    other_wordings: int = 8
    rewordings: int = 5

    def __post_init__(self) -> None:
        checks = {
            "layer": isinstance(self.layer, int) and not isinstance(self.layer, bool) and self.layer >= 0,
            "gamma": isinstance(self.gamma, (int, float)) and -1.0 <= self.gamma <= 1.0,
            "n_prefixes": isinstance(self.n_prefixes, int) and self.n_prefixes >= 0,
            "prefix_length": isinstance(self.prefix_length, int) and self.prefix_length >= 1,
            "prefix_seed": isinstance(self.prefix_seed, int),
            "lr": isinstance(self.lr, (int, float)) and self.lr > 0,
            "steps": isinstance(self.steps, int) and self.steps >= 1,
            "kl_factor": isinstance(self.kl_factor, (int, float)) and self.kl_factor >= 0,
            "weight_decay": isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0,
            "clamp_norm_factor": isinstance(self.clamp_norm_factor, (int, float)) and self.clamp_norm_factor > 0,
            "stop_prob": isinstance(self.stop_prob, (int, float)) and 0 < self.stop_prob <= 1,
            "batch_size": isinstance(self.batch_size, int) and self.batch_size >= 1,
            "pass_tokens": isinstance(self.pass_tokens, int) and self.pass_tokens >= 1,
            "residual_matmuls": self.residual_matmuls in RESIDUAL_MATMULS,
            "kl_template": isinstance(self.kl_template, str) and self.kl_template.count("{}") == 1,
            "bare_key_below": isinstance(self.bare_key_below, (int, float)) and -1.0 <= self.bare_key_below <= 1.0,
            "share_subject_residual": isinstance(self.share_subject_residual, bool),
            "calibrate_gates": isinstance(self.calibrate_gates, bool),
            "gate_margin": isinstance(self.gate_margin, (int, float)) and 0 <= self.gate_margin < 1,
            "calibration_texts": isinstance(self.calibration_texts, int) and self.calibration_texts >= 0,
            "calibration_text_length": isinstance(self.calibration_text_length, int)
            and self.calibration_text_length >= 1,
            "near_subjects": isinstance(self.near_subjects, int) and not isinstance(self.near_subjects, bool)
            and self.near_subjects >= 0,
            "other_wordings": isinstance(self.other_wordings, int) and not isinstance(self.other_wordings, bool)
            and self.other_wordings >= 0,
            "rewordings": isinstance(self.rewordings, int) and not isinstance(self.rewordings, bool)
            and self.rewordings >= 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            values = ", ".join(f"{name}={getattr(self, name)!r}" for name in bad)
            raise ValueError(f"invalid editing hyperparameter(s): {values} (see EditHParams for the valid ranges)")


# (model_type, num_layers, hidden_size) -> preset fields.
# SmolLM2-135M: measured sweeps, see bench/RESULTS.md ("Editing"; layers 3-8 at 1,000 facts: "The layer
# at 1,000 facts"). The others: the paper's Table 3.
PRESETS: dict[tuple[str, int, int], dict[str, Any]] = {
    ("llama", 30, 576): {"layer": 4, "gamma": 0.65, "lr": 1.5},  # SmolLM2-135M(-Instruct)
    ("gpt2", 48, 1600): {"layer": 17, "gamma": 0.65},  # GPT-2 XL
    ("gptj", 28, 4096): {"layer": 8, "gamma": 0.65},  # GPT-J 6B
    ("llama", 32, 4096): {"layer": 7, "gamma": 0.65},  # Llama 3 8B (Instruct)
}


def _hidden_size(model) -> int:
    config = model.config
    for name in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return -1


def preset_for(model, module_path: str | None = None) -> dict[str, Any]:
    """The preset fields for `model` (always includes `layer`)."""
    layers = num_layers(model, module_path)
    key = (model_type(model), layers, _hidden_size(model))
    return dict(PRESETS.get(key, {"layer": round(0.25 * layers)}))


def resolve_hparams(model, overrides: Mapping[str, Any], module_path: str | None = None) -> EditHParams:
    """EditHParams from the model's preset updated with the non-None `overrides`; a TypeError
    naming unknown fields."""
    names = {field.name for field in dataclasses.fields(EditHParams)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"unknown editing hyperparameter(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    values = preset_for(model, module_path)
    values.update({name: value for name, value in overrides.items() if value is not None})
    hparams = EditHParams(**values)
    return dataclasses.replace(hparams, residual_matmuls=residual_matmuls_for(hparams, model, module_path))


def bfloat16_products_fast(device: torch.device) -> bool:
    """Whether bfloat16 matrix products run faster than float32 ones on `device`: a CPU with
    AVX512-BF16 or AMX tiles (as torch reports them), a CUDA GPU with bfloat16 support."""
    if device.type == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return False


def residual_matmuls_for(hparams: EditHParams, model, module_path: str | None = None) -> str:
    """`hparams.residual_matmuls`, with "auto" resolved for `model`: "bfloat16_then_float32" when
    bfloat16 products are fast on the model's device (`bfloat16_products_fast`) and the decoder
    layers above `hparams.layer` hold float32 nn.Linear weights, else "float32"."""
    if hparams.residual_matmuls != "auto":
        return hparams.residual_matmuls
    layers = decoder_layers(model, module_path)[hparams.layer + 1 :]
    weights = [m.weight for layer in layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    if weights and all(w.dtype == torch.float32 for w in weights) and bfloat16_products_fast(weights[0].device):
        return "bfloat16_then_float32"
    return "float32"
