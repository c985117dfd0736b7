"""Split a NeuralDB into N shard files (with a manifest) and merge shards back into one file.

Both copy every fact exactly: its id, all its keys (own key first) and residual bit for bit in
the storage dtype, its per-key thresholds (`key_gammas`, float32) or their absence, and its
metadata (the EditRecord included) as the same JSON text. The settings (d1, d2, layer, gamma,
dtype, model fingerprint) are copied into every output file.

Order: split keeps each shard's facts in the source's order; merge writes shard 0's facts, then
shard 1's, ... (each in its own order). A freshly opened merged database therefore has the
shard-major global row order of the sharded retrieval (retrieval.py): on the same facts its
single-process results equal the sharded ones, ties included.

Nothing is left half-written: each output is built under a temporary name in its folder and
hard-linked into place when complete (an existing file is never overwritten); the manifest is
written last. On any error the outputs made so far are removed and the source is untouched.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from ..store import NeuralDB, StoredFact
from ..store.schema import database_files, dtype_name, remove_database_files
from .manifest import MANIFEST_FILE, ShardManifest, check_shard_settings, read_manifest, shard_file_name, write_manifest
from .ownership import shard_of

COPY_BATCH = 1024  # facts per write transaction while copying


@dataclasses.dataclass(frozen=True)
class SplitReport:
    """manifest: the written manifest; facts_per_shard: facts in shard i at position i."""

    manifest: ShardManifest
    facts_per_shard: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class MergeReport:
    """path: the merged database file; facts_per_shard: facts copied from shard i at position i."""

    path: Path
    facts_per_shard: tuple[int, ...]


def _add_facts(db: NeuralDB, facts: list[StoredFact]) -> None:
    """Add stored facts to `db` in one transaction, exactly as they are."""
    db.add(torch.stack([fact.keys[0] for fact in facts]), torch.stack([fact.residual for fact in facts]),
           [fact.id for fact in facts], [fact.metadata for fact in facts],
           extra_keys=[fact.keys[1:] if fact.keys.shape[0] > 1 else None for fact in facts],
           key_gammas=[fact.key_gammas for fact in facts])


def _new_like(source: NeuralDB, path: Path) -> NeuralDB:
    return NeuralDB(path, d1=source.d1, d2=source.d2, layer=source.layer, gamma=source.gamma, dtype=source.dtype,
                    fingerprint=source.fingerprint)


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.partial")


def _link_into_place(temporary: Path, path: Path) -> None:
    """Move the closed database `temporary` (its SQLite file and vector file) to `path`, never
    overwriting (FileExistsError); the SQLite file is linked last, so `path` never names a
    database without its vectors."""
    linked = []
    try:
        for source, target in reversed(list(zip(database_files(temporary), database_files(path)))[:2]):
            if source.exists():
                os.link(source, target)
                linked.append(target)
    except BaseException:
        for target in linked:
            target.unlink(missing_ok=True)
        raise
    remove_database_files(temporary)


def _copy_into(target: NeuralDB, facts: Iterable[StoredFact]) -> int:
    batch: list[StoredFact] = []
    count = 0
    for fact in facts:
        batch.append(fact)
        if len(batch) == COPY_BATCH:
            _add_facts(target, batch)
            count, batch = count + len(batch), []
    if batch:
        _add_facts(target, batch)
    return count + len(batch)


def split_database(source: str | os.PathLike, num_shards: int, out_dir: str | os.PathLike) -> SplitReport:
    """Split the NeuralDB file `source` into `num_shards` shard files and a manifest in `out_dir`
    (created, and removed again on failure; it must not exist or be empty). Fact f goes to shard `shard_of(f.id, num_shards)`."""
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"the number of shards must be a positive int, got {num_shards!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not an empty folder; split writes into a new one")
    names = [shard_file_name(shard, num_shards) for shard in range(num_shards)]
    finals = [out_dir / name for name in names]
    temporaries = [_temporary(path) for path in finals]
    with NeuralDB.open(source, readonly=True) as db:
        created = not out_dir.exists()
        out_dir.mkdir(parents=True, exist_ok=True)
        shards: list[NeuralDB] = []
        try:
            shards.extend(_new_like(db, path) for path in temporaries)
            pending: list[list[StoredFact]] = [[] for _ in range(num_shards)]
            counts = [0] * num_shards
            for fact in db.facts():
                shard = shard_of(fact.id, num_shards)
                pending[shard].append(fact)
                counts[shard] += 1
                if len(pending[shard]) == COPY_BATCH:
                    _add_facts(shards[shard], pending[shard])
                    pending[shard] = []
            for shard, facts in enumerate(pending):
                if facts:
                    _add_facts(shards[shard], facts)
            for shard_db in shards:
                shard_db.close()
            for temporary, final in zip(temporaries, finals):
                _link_into_place(temporary, final)
            settings = {"d1": db.d1, "d2": db.d2, "layer": db.layer, "dtype": dtype_name(db.dtype)}
            manifest = write_manifest(out_dir / MANIFEST_FILE, names, settings)
        except BaseException:
            for shard_db in shards:
                shard_db.close()
            for path in temporaries + finals:
                remove_database_files(path)
            if created:
                out_dir.rmdir()
            raise
    return SplitReport(manifest, tuple(counts))


def merge_shards(manifest: str | os.PathLike | ShardManifest, out: str | os.PathLike) -> MergeReport:
    """Merge the shards named by `manifest` (a path or a read manifest) into the new NeuralDB file
    `out` (FileExistsError if it exists). The shards must share d1, d2, layer, dtype (the
    manifest's), gamma and model fingerprint."""
    if not isinstance(manifest, ShardManifest):
        manifest = read_manifest(manifest)
    out = Path(out)
    if os.path.lexists(out):
        raise FileExistsError(f"{out} already exists; merge writes a new database file")
    shards = []
    try:
        for shard, path in enumerate(manifest.shards):
            shards.append(NeuralDB.open(path, readonly=True))
            check_shard_settings(manifest, shard, shards[-1])
            if (shards[-1].gamma, shards[-1].fingerprint) != (shards[0].gamma, shards[0].fingerprint):
                raise ValueError(f"shard {shard} ({path}) has gamma {shards[-1].gamma} and fingerprint "
                                 f"{shards[-1].fingerprint}, shard 0 has {shards[0].gamma} and "
                                 f"{shards[0].fingerprint}; merge needs them equal")
        temporary = _temporary(out)
        try:
            with _new_like(shards[0], temporary) as merged:
                counts = tuple(_copy_into(merged, shard_db.facts()) for shard_db in shards)
            _link_into_place(temporary, out)
        except BaseException:
            remove_database_files(temporary)
            raise
    finally:
        for shard_db in shards:
            shard_db.close()
    return MergeReport(out, counts)
