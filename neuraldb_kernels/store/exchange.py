"""Export / import of a NeuralDB as a pair of files for sharing (format in FORMAT.md):

- `NAME.safetensors`: tensors "keys" (r, d1), every fact's keys in turn, and "residuals" (m, d2),
  one per fact, in the storage dtype;
- `NAME.json`: format name and version, settings (d1, d2, layer, gamma, dtype, fingerprint),
  the m ids, m key counts (summing to r), m key threshold entries (null, or one number per key)
  and m metadata objects in fact order, and the SHA-256 of the .safetensors file. Version 1
  exports have no key counts (one key per fact); version 1 and 2 exports have no thresholds.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .facts import FactBatch, prepare_batch
from .migrations import versioned_edit_record
from .schema import STORAGE_DTYPES, settings_problem

EXPORT_FORMAT = "neuraldb-export"
# The export pair's own version: 3 since per-key thresholds; the database's format 4 (the vector
# file) changed nothing in it.
EXPORT_VERSION = 3
_SETTINGS = ("d1", "d2", "layer", "gamma", "dtype", "fingerprint")
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def sidecar_of(file: Path) -> Path:
    """The .json sidecar of an export's .safetensors file; ValueError for another suffix."""
    if file.suffix != ".safetensors":
        raise ValueError(f"an export file must end in .safetensors, got {file}")
    return file.with_suffix(".json")


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_export(file: Path, keys: torch.Tensor, residuals: torch.Tensor, key_counts: list[int], ids: list[str],
                 metadata: list[dict[str, Any]], key_gammas: list[list[float] | None],
                 settings: dict[str, Any]) -> Path:
    """Write the pair (never overwriting either file); returns the sidecar path. key_gammas: per
    fact None (the database's gamma) or its key_counts[i] thresholds."""
    sidecar = sidecar_of(file)
    for target in (file, sidecar):
        if target.exists():
            raise FileExistsError(f"{target} already exists; export never overwrites")
    save_file({"keys": keys.contiguous(), "residuals": residuals.contiguous()}, str(file),
              metadata={"format": EXPORT_FORMAT, "format_version": str(EXPORT_VERSION), "count": str(len(ids))})
    document = {"format": EXPORT_FORMAT, "format_version": EXPORT_VERSION, **settings,
                "safetensors_sha256": _sha256(file), "ids": ids, "key_counts": key_counts, "key_gammas": key_gammas,
                "metadata": metadata}
    with open(sidecar, "x", encoding="utf-8") as stream:
        json.dump(document, stream, ensure_ascii=False, allow_nan=False)
    return sidecar


def read_export(file: Path) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor, list[int], list[Any], list[Any],
                                     list[torch.Tensor | None]]:
    """Read and check an export: (settings, keys, residuals, key_counts, ids, metadata, key_gammas).

    Checks format and version (1 to EXPORT_VERSION), the settings, the checksum, tensor names, and
    the shapes and dtype the safetensors header declares before reading any tensor, that ids and
    metadata are lists of the fact count and the key counts positive ints summing to the key
    rows (a version 1 export has one key per fact), and the key thresholds a list of the fact
    count, each null or a list of that fact's key count of numbers (float64 tensors here; a
    version 1 or 2 export has none). The "edit" metadata of a version 1 or 2
    export is brought to the versioned EditRecord. Per-fact checks (finite values, key norms,
    unique ids, metadata types) are left to the batch validation (`read_import`).
    """
    sidecar = sidecar_of(file)
    for source in (file, sidecar):
        if not source.is_file():
            raise FileNotFoundError(f"export file {source} not found")
    try:
        with open(sidecar, encoding="utf-8") as stream:
            document = json.load(stream)
    except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{sidecar} is not valid JSON: {type(error).__name__}: {error}") from None
    if not isinstance(document, dict) or document.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{sidecar} is not a NeuralDB export sidecar (no \"format\": \"{EXPORT_FORMAT}\")")
    version = document.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= EXPORT_VERSION:
        raise ValueError(f"{sidecar} has format_version {version!r}; this neuraldb_kernels reads up to "
                         f"{EXPORT_VERSION} (from 1)")
    missing = [name for name in (*_SETTINGS, "safetensors_sha256", "ids", "metadata") if name not in document]
    if missing:
        raise ValueError(f"{sidecar} lacks the fields {missing}")
    if document["dtype"] not in STORAGE_DTYPES:
        raise ValueError(f"{sidecar} names an unsupported storage dtype {document['dtype']!r}")
    problem = settings_problem(document["d1"], document["d2"], document["layer"], document["gamma"])
    if problem:
        raise ValueError(f"{sidecar} has invalid settings: {problem}")
    if _sha256(file) != document["safetensors_sha256"]:
        raise ValueError(f"{file} does not match its sidecar {sidecar} (SHA-256 differs): the pair was "
                         f"mixed up or a file was modified")
    ids, metadata = document["ids"], document["metadata"]
    if not isinstance(ids, list) or not isinstance(metadata, list):
        raise ValueError(f"{sidecar}: 'ids' and 'metadata' must be lists")
    if version >= 2 and "key_counts" not in document:
        raise ValueError(f"{sidecar} lacks the field 'key_counts' (format version {version})")
    key_counts = document["key_counts"] if version >= 2 else [1] * len(ids)
    if (not isinstance(key_counts, list) or len(key_counts) != len(ids)
            or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in key_counts)):
        raise ValueError(f"{sidecar}: 'key_counts' must be a list of {len(ids)} positive ints (one per id)")
    dtype = STORAGE_DTYPES[document["dtype"]]
    expected = {"keys": (sum(key_counts), document["d1"]), "residuals": (len(ids), document["d2"])}
    with safe_open(str(file), framework="pt") as tensors:
        names = set(tensors.keys())
        if names != {"keys", "residuals"}:
            raise ValueError(f"{file} must hold exactly the tensors 'keys' and 'residuals', holds {sorted(names)}")
        for name in ("keys", "residuals"):  # the header's shapes, checked before anything is allocated
            stored = tensors.get_slice(name)
            stored_dtype, shape = _SAFETENSORS_DTYPES.get(stored.get_dtype()), tuple(stored.get_shape())
            if stored_dtype != dtype or shape != expected[name]:
                raise ValueError(f"{file}: tensor {name!r} is {stored_dtype or stored.get_dtype()} {shape}, the sidecar "
                                 f"describes {dtype} {expected[name]}")
        keys, residuals = tensors.get_tensor("keys"), tensors.get_tensor("residuals")
    if len(metadata) != len(ids):
        raise ValueError(f"{sidecar} has {len(ids)} ids but {len(metadata)} metadata entries")
    key_gammas = _key_gammas(document, version, key_counts, sidecar)
    if version < 3:  # the Editor's "edit" metadata became a versioned EditRecord in format 3
        metadata = [versioned_edit_record(entry) or entry if isinstance(entry, dict) else entry for entry in metadata]
    return {name: document[name] for name in _SETTINGS}, keys, residuals, key_counts, ids, metadata, key_gammas


def _key_gammas(document: dict[str, Any], version: int, key_counts: list[int],
                sidecar: Path) -> list[torch.Tensor | None]:
    """The sidecar's per-fact key thresholds as float64 tensors or None (values are checked by `prepare_batch`)."""
    if version < 3:
        return [None] * len(key_counts)
    entries = document.get("key_gammas")
    if not isinstance(entries, list) or len(entries) != len(key_counts):
        raise ValueError(f"{sidecar}: 'key_gammas' must be a list of {len(key_counts)} entries (one per id, "
                         f"format version {version})")
    out: list[torch.Tensor | None] = []
    for i, (entry, count) in enumerate(zip(entries, key_counts)):
        if entry is None:
            out.append(None)
        elif (isinstance(entry, list) and len(entry) == count
              and all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in entry)):
            out.append(torch.tensor(entry, dtype=torch.float64))
        else:
            raise ValueError(f"{sidecar}: 'key_gammas' entry {i} must be null or a list of {count} numbers "
                             f"(one per key of that fact), got {entry!r:.80}")
    return out


def read_import(file: Path) -> tuple[dict[str, Any], FactBatch]:
    """Read and check an export completely: (settings, the facts as a validated batch)."""
    settings, keys, residuals, key_counts, ids, metadata, key_gammas = read_export(file)
    starts = [0]
    for count in key_counts[:-1]:
        starts.append(starts[-1] + count)
    batch = prepare_batch(keys[starts] if ids else keys, residuals, ids, metadata, d1=settings["d1"],
                          d2=settings["d2"], dtype=STORAGE_DTYPES[settings["dtype"]],
                          extra_keys=[keys[start + 1 : start + count] for start, count in zip(starts, key_counts)],
                          key_gammas=key_gammas)
    return settings, batch
