"""The shard manifest: a small JSON file naming the shards of a sharded NeuralDB.

    {"format": "neuraldb-shards", "format_version": 1,
     "num_shards": N,                       # = the world size of the job that serves it
     "owner_function": "blake2b-64le-mod",  # see ownership.py
     "shards": ["shard-00000-of-00004.sqlite", ...],   # N paths, relative to the manifest's folder
     "settings": {"d1": ..., "d2": ..., "layer": ..., "dtype": "bfloat16"}}

Shard i is an ordinary NeuralDB file (store/FORMAT.md) holding exactly the facts whose owner is
i; rank i of the process group serves it. The settings are those every shard must share (each
shard's file records them too, and opening checks they agree); the gate threshold `gamma` and
the model fingerprint live in the shard files.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from .._files import write_text_atomically
from .ownership import OWNER_FUNCTION

MANIFEST_FORMAT = "neuraldb-shards"
MANIFEST_VERSION = 1
MANIFEST_FILE = "manifest.json"
SHARED_SETTINGS = ("d1", "d2", "layer", "dtype")


def shard_file_name(shard: int, num_shards: int) -> str:
    return f"shard-{shard:05d}-of-{num_shards:05d}.sqlite"


@dataclasses.dataclass(frozen=True)
class ShardManifest:
    """A read or written manifest: `path` (the manifest file), `shards` (absolute paths, shard i
    at position i), `settings` (d1, d2, layer, dtype name), `owner_function`."""

    path: Path
    shards: tuple[Path, ...]
    settings: dict[str, Any]
    owner_function: str = OWNER_FUNCTION

    @property
    def num_shards(self) -> int:
        return len(self.shards)


def write_manifest(path: str | os.PathLike, shard_names: list[str], settings: dict[str, Any]) -> ShardManifest:
    """Write the manifest at `path` (atomically; shard names relative to its folder)."""
    path = Path(path)
    document = {"format": MANIFEST_FORMAT, "format_version": MANIFEST_VERSION, "num_shards": len(shard_names),
                "owner_function": OWNER_FUNCTION, "shards": shard_names,
                "settings": {name: settings[name] for name in SHARED_SETTINGS}}
    write_text_atomically(path, json.dumps(document, indent=1) + "\n")
    return read_manifest(path)


def _bad(path: Path, why: str) -> ValueError:
    return ValueError(f"{path}: not a valid NeuralDB shard manifest: {why}")


def read_manifest(path: str | os.PathLike) -> ShardManifest:
    """Read and check a manifest (FileNotFoundError if absent, ValueError naming the problem)."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no shard manifest at {path}")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _bad(path, f"not JSON ({error})") from None
    if not isinstance(document, dict) or document.get("format") != MANIFEST_FORMAT:
        raise _bad(path, f'"format" must be "{MANIFEST_FORMAT}"')
    if document.get("format_version") != MANIFEST_VERSION:
        raise _bad(path, f"format_version {document.get('format_version')!r}; this reader knows {MANIFEST_VERSION}")
    if document.get("owner_function") != OWNER_FUNCTION:
        raise _bad(path, f"owner_function {document.get('owner_function')!r}; this reader knows {OWNER_FUNCTION!r}")
    shards, count = document.get("shards"), document.get("num_shards")
    if not isinstance(shards, list) or not shards or not all(isinstance(name, str) and name for name in shards):
        raise _bad(path, '"shards" must be a non-empty list of file names')
    if isinstance(count, bool) or count != len(shards):
        raise _bad(path, f'"num_shards" ({count!r}) must equal the number of shards listed ({len(shards)})')
    if len(set(shards)) != len(shards):
        raise _bad(path, "a shard file is listed twice")
    settings = document.get("settings")
    if not isinstance(settings, dict) or set(settings) != set(SHARED_SETTINGS):
        raise _bad(path, f'"settings" must hold exactly {", ".join(SHARED_SETTINGS)}')
    return ShardManifest(path, tuple((path.parent / name).resolve() for name in shards), settings, OWNER_FUNCTION)


def check_shard_settings(manifest: ShardManifest, shard: int, db) -> None:
    """ValueError unless the NeuralDB `db` opened as shard `shard` has the manifest's settings."""
    from ..store.schema import dtype_name

    found = {"d1": db.d1, "d2": db.d2, "layer": db.layer, "dtype": dtype_name(db.dtype)}
    if found != manifest.settings:
        raise ValueError(f"shard {shard} ({manifest.shards[shard]}) has settings {found}, but the manifest "
                         f"{manifest.path} says {manifest.settings}")
