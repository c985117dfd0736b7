"""Statistics of the preserved keys K0: C0 = K0ᵀ K0 over the tokens a model reads, at one layer.

The preserved keys are the inputs of the edited layer's FFN down-projection (size d1) at every
token of some texts; MEMIT and AlphaEdit keep Δ k0 small (or zero) on them. `KeyStatistics`
accumulates the token count N and the sum of outer products C0 = Σ_t k_t k_tᵀ (d1, d1) in float64,
batch by batch, so any number of tokens fits in d1² doubles; `collect_key_statistics` runs a model
over texts and feeds it. Saved statistics carry the model fingerprint of the edited layer
(`integration.model_fingerprint`) and are refused for any other model or layer.

File format (safetensors): one tensor "sum_outer" (d1, d1) float64; metadata "format"
("neuraldb-key-statistics"), "version" ("1"), "token_count" (decimal), "fingerprint" (the
ModelFingerprint's JSON), "sources" (a JSON list of strings describing where the texts came from).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from ..store import ModelFingerprint

FORMAT = "neuraldb-key-statistics"
VERSION = "1"


@dataclass
class KeyStatistics:
    """Streaming C0 of one model's layer.

    fingerprint: the edited layer's `ModelFingerprint` (d1 is its key size).
    sum_outer: Σ_t k_t k_tᵀ, (d1, d1) float64 on the CPU.
    token_count: N, how many keys were added.
    sources: free-form descriptions of the texts (informational, saved with the statistics).
    """

    fingerprint: ModelFingerprint
    sum_outer: torch.Tensor
    token_count: int = 0
    sources: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        d1, value = self.fingerprint.d1, self.sum_outer
        if not isinstance(value, torch.Tensor) or value.dtype != torch.float64 or tuple(value.shape) != (d1, d1):
            shape = (tuple(value.shape), value.dtype) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"sum_outer must be a ({d1}, {d1}) float64 tensor for d1={d1}, got {shape}")
        if isinstance(self.token_count, bool) or not isinstance(self.token_count, int) or self.token_count < 0:
            raise ValueError(f"token_count must be a non-negative int, got {self.token_count!r}")

    @classmethod
    def empty(cls, fingerprint: ModelFingerprint) -> "KeyStatistics":
        """No tokens yet: a zero (d1, d1) sum."""
        return cls(fingerprint, torch.zeros(fingerprint.d1, fingerprint.d1, dtype=torch.float64))

    def add(self, keys: torch.Tensor) -> None:
        """Add the keys K (t, d1) of t tokens: sum_outer += Kᵀ K in float64, token_count += t."""
        d1 = self.fingerprint.d1
        if not isinstance(keys, torch.Tensor) or keys.dim() != 2 or keys.shape[1] != d1:
            shape = tuple(keys.shape) if isinstance(keys, torch.Tensor) else type(keys).__name__
            raise ValueError(f"keys must have shape (t, {d1}) for d1={d1}, got {shape}")
        if not keys.is_floating_point() or not torch.isfinite(keys).all():
            raise ValueError("keys must be finite floating-point values")
        k64 = keys.detach().to(torch.float64)
        gram = k64.T @ k64
        self.sum_outer += ((gram + gram.T) / 2).cpu()  # exactly symmetric whatever the BLAS blocking
        self.token_count += keys.shape[0]

    def second_moment(self) -> torch.Tensor:
        """E[k kᵀ] = C0 / N, (d1, d1) float64 (what MEMIT and AlphaEdit call the covariance)."""
        if self.token_count == 0:
            raise ValueError("the statistics hold no tokens yet")
        return self.sum_outer / self.token_count

    def save(self, path: os.PathLike) -> None:
        """Write to `path` (safetensors), atomically: a temporary file in the same folder renamed
        into place, so an interrupted save never leaves a half-written file."""
        from safetensors.torch import save_file

        path = Path(path)
        metadata = {"format": FORMAT, "version": VERSION, "token_count": str(self.token_count),
                    "fingerprint": self.fingerprint.to_json(), "sources": json.dumps(list(self.sources))}
        descriptor, temporary = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        os.close(descriptor)
        try:
            save_file({"sum_outer": self.sum_outer.contiguous()}, temporary, metadata=metadata)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: os.PathLike, fingerprint: ModelFingerprint) -> "KeyStatistics":
        """Read statistics saved by `save`, for the model layer whose fingerprint is `fingerprint`;
        a ValueError naming both fingerprints when they differ in any field (model type, layer,
        sizes or weights), or naming the problem when the file is not such statistics."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as reader:
                metadata = reader.metadata() or {}
                names = set(reader.keys())
                if metadata.get("format") != FORMAT or names != {"sum_outer"}:
                    raise ValueError(f"{path} is not a key-statistics file (format {metadata.get('format')!r}, "
                                     f"tensors {sorted(names)})")
                if metadata.get("version") != VERSION:
                    raise ValueError(f"{path}: key-statistics version {metadata.get('version')!r} is not "
                                     f"supported (this version reads {VERSION!r})")
                sum_outer = reader.get_tensor("sum_outer")
        except (OSError, RuntimeError, SafetensorError) as error:  # missing file, or not safetensors
            raise ValueError(f"cannot read key statistics from {path}: {error}") from None
        try:
            stored = ModelFingerprint.from_json(metadata["fingerprint"])
            token_count, sources = int(metadata["token_count"]), json.loads(metadata["sources"])
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path}: damaged key-statistics metadata: {error!r}") from None
        if stored != fingerprint:
            raise ValueError(f"key statistics in {path} were collected for [{stored.describe()}] "
                             f"but the model is [{fingerprint.describe()}]; collect them again for this model")
        return cls(stored, sum_outer, token_count, sources)


def _token_rows(tokenizer, texts: Iterable[str], max_length: int) -> list[list[int]]:
    rows = []
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"texts must be strings, got {type(text).__name__}")
        ids = tokenizer(text, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
        if ids:
            rows.append(list(ids))
    return rows


def collect_key_statistics(model, tokenizer, texts: Sequence[str], layer: int, *, batch_size: int = 16,
                           max_length: int = 256, max_tokens: Optional[int] = None,
                           module_path: Optional[str] = None, sources: Sequence[str] = (),
                           statistics: Optional[KeyStatistics] = None) -> KeyStatistics:
    """C0 of `model`'s layer `layer` over every token of `texts` (each cut to `max_length` tokens),
    run in right-padded batches of `batch_size` texts; padding is never counted. The forward pass
    stops at the layer's down-projection (nothing above it runs). With `max_tokens`, no further
    batch runs once the statistics hold at least that many tokens. Adds to `statistics` when
    given (it must be for the same model layer), else starts empty; returns the statistics."""
    from ..editing.keys import down_proj_inputs, pad_token_id
    from ..integration import model_fingerprint

    for name, value in (("batch_size", batch_size), ("max_length", max_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    fingerprint = model_fingerprint(model, layer, module_path)
    if statistics is None:
        statistics = KeyStatistics.empty(fingerprint)
    elif statistics.fingerprint != fingerprint:
        raise ValueError(f"the statistics were collected for [{statistics.fingerprint.describe()}] but the "
                         f"model is [{fingerprint.describe()}]")
    statistics.sources.extend(sources)
    rows = _token_rows(tokenizer, texts, max_length)
    pad_id = pad_token_id(tokenizer)
    for start in range(0, len(rows), batch_size):
        if max_tokens is not None and statistics.token_count >= max_tokens:
            break
        statistics.add(down_proj_inputs(model, rows[start : start + batch_size], None, layer,
                                        pad_id=pad_id, module_path=module_path))
    return statistics
