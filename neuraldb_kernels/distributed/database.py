"""`ShardedNeuralDB`: one rank's front on a NeuralDB sharded over a torch.distributed process group.

Rank r of the group serves shard r of the manifest (an ordinary NeuralDB file, opened for
writing); the group's world size must equal the number of shards. Facts are owned by
`shard_of(id, num_shards)` (ownership.py).

Writes (`add`, `upsert`, `delete`) may be called on any rank, alone (not collective): the batch
is checked completely first (values, ids, and for add / delete the ids' presence in their
owners), then each owner shard's part is written as one SQLite transaction into that shard's
file: through this rank's open database for its own shard, else by opening the owner's file
for the write (this reads and checks that whole shard, so batch writes to other ranks' shards).
The files must therefore be reachable from every rank that writes (one host, or a shared file
system). A batch spanning several shards is one transaction per shard, not one overall: an
environmental failure (a full disk) part way leaves the earlier shards' parts committed and says
which.

Reads: the distributed attach (integration/distributed_attach.py) runs the collective retrieval
(retrieval.py) and refreshes this rank's shard after its first collective, so a write committed
on any rank before that rank entered a forward is seen by that forward on every rank (the
store's refresh rules, made consistent across ranks).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator, Sequence
from typing import Any, Optional, Union

import torch
import torch.distributed as dist

from ..store import NeuralDB, Snapshot, StoredFact
from ..store.facts import FactBatch, prepare_batch
from ..store.fingerprint import ModelFingerprint
from .collectives import Communicator
from .manifest import ShardManifest, check_shard_settings, read_manifest
from .ownership import shard_of


class ShardedNeuralDB:
    """This rank's front on a sharded NeuralDB; `ShardedNeuralDB.open(manifest)` on every rank.

    Attributes: manifest, rank, num_shards, local (this rank's shard, a NeuralDB), comm.
    d1, d2, layer, dtype, gamma, fingerprint are this rank's shard's (the shards share them).
    """

    def __init__(self, manifest: ShardManifest, local: NeuralDB, comm: Communicator):
        self.manifest = manifest
        self.local = local
        self.comm = comm

    @classmethod
    def open(cls, manifest: Union[str, os.PathLike, ShardManifest], *,
             process_group: Optional[dist.ProcessGroup] = None,
             timeout: Union[float, datetime.timedelta, None] = 60.0) -> "ShardedNeuralDB":
        """Open this rank's shard of `manifest` (its path, or its folder). process_group: the
        group whose rank r serves shard r (default: the default group). timeout: the longest wait
        of any collective (seconds or a timedelta; None: the group's own), after which
        `RankFailureError` is raised. Not collective itself."""
        if not isinstance(manifest, ShardManifest):
            manifest = read_manifest(manifest)
        comm = Communicator.of(process_group, timeout)
        if comm.world_size != manifest.num_shards:
            raise ValueError(f"{manifest.path} has {manifest.num_shards} shards but the process group has "
                             f"{comm.world_size} ranks; serve it with exactly one rank per shard")
        local = NeuralDB.open(manifest.shards[comm.rank])
        try:
            check_shard_settings(manifest, comm.rank, local)
            strays = [fact_id for fact_id in local if shard_of(fact_id, manifest.num_shards) != comm.rank]
            if strays:
                raise ValueError(f"shard {comm.rank} ({manifest.shards[comm.rank]}) holds {len(strays)} fact(s) "
                                 f"owned by other shards, e.g. {strays[0]!r}: it was not written by this "
                                 f"manifest's split or sharded writes")
        except BaseException:
            local.close()
            raise
        return cls(manifest, local, comm)

    # -- settings ------------------------------------------------------------------------------

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def num_shards(self) -> int:
        return self.manifest.num_shards

    @property
    def d1(self) -> int:
        return self.local.d1

    @property
    def d2(self) -> int:
        return self.local.d2

    @property
    def layer(self) -> Optional[int]:
        return self.local.layer

    @property
    def dtype(self) -> torch.dtype:
        return self.local.dtype

    @property
    def gamma(self) -> float:
        return self.local.gamma

    @property
    def fingerprint(self) -> Optional[ModelFingerprint]:
        return self.local.fingerprint

    def check_fingerprint(self, fingerprint: ModelFingerprint, *, allow_weight_mismatch: bool = False) -> None:
        """`NeuralDB.check_fingerprint` of this rank's shard (every shard records the same)."""
        self.local.check_fingerprint(fingerprint, allow_weight_mismatch=allow_weight_mismatch)

    def owner_of(self, fact_id: str) -> int:
        """The shard (= rank) that owns `fact_id`."""
        return shard_of(fact_id, self.num_shards)

    def __repr__(self) -> str:
        return (f"ShardedNeuralDB({self.manifest.path}, rank {self.rank} of {self.num_shards}, "
                f"local facts={len(self.local)}, d1={self.d1}, d2={self.d2}, layer={self.layer})")

    # -- writing -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _owners(self, shards: Sequence[int]) -> Iterator[dict[int, NeuralDB]]:
        """{shard: an open NeuralDB} for `shards`: this rank's own, the others opened for this write."""
        opened: dict[int, NeuralDB] = {}
        try:
            for shard in shards:
                opened[shard] = self.local if shard == self.rank else NeuralDB.open(self.manifest.shards[shard])
            yield opened
        finally:
            for shard, db in opened.items():
                if shard != self.rank:
                    db.close()

    def _by_owner(self, ids: Sequence[str]) -> dict[int, list[int]]:
        """{shard: positions in `ids` of the facts it owns}, shards in increasing order."""
        groups: dict[int, list[int]] = {}
        for position, fact_id in enumerate(ids):
            groups.setdefault(self.owner_of(fact_id), []).append(position)
        return dict(sorted(groups.items()))

    @staticmethod
    def _write_part(db: NeuralDB, batch: FactBatch, positions: list[int], *, upsert: bool) -> None:
        write = db.upsert if upsert else db.add
        write(batch.keys[positions], batch.residuals[positions], [batch.ids[i] for i in positions],
              [batch.metadata[i] for i in positions], extra_keys=[batch.extra_keys[i] for i in positions],
              key_gammas=[batch.key_gammas[i] for i in positions])

    def _write(self, groups: dict[int, list[int]], owners: dict[int, NeuralDB], write) -> None:
        """Run write(db, positions) per owner shard; on a failure, say which shards committed."""
        done: list[int] = []
        for shard, positions in groups.items():
            try:
                write(owners[shard], positions)
            except Exception as error:
                if done:
                    error.add_note(f"while writing shard {shard}; shards {done} of this batch were already committed")
                raise
            done.append(shard)

    def _add_or_upsert(self, keys, residuals, ids, metadata, extra_keys, key_gammas, *, upsert: bool) -> list[str]:
        batch = prepare_batch(keys, residuals, ids, metadata, d1=self.d1, d2=self.d2, dtype=self.dtype,
                              extra_keys=extra_keys, key_gammas=key_gammas)
        groups = self._by_owner(batch.ids)
        with self._owners(list(groups)) as owners:
            if not upsert:
                existing = [batch.ids[i] for shard, positions in groups.items() for i in positions
                            if batch.ids[i] in owners[shard]]
                if existing:
                    raise ValueError(f"{len(existing)} id(s) already in the sharded database, e.g. {existing[0]!r}; "
                                     f"use upsert to replace facts")
            self._write(groups, owners, lambda db, positions: self._write_part(db, batch, positions, upsert=upsert))
        return batch.ids

    def add(self, keys: torch.Tensor, residuals: torch.Tensor, ids: Union[str, Sequence[str], None] = None,
            metadata: Any = None, *, extra_keys: Any = None, key_gammas: Any = None) -> list[str]:
        """`NeuralDB.add`, each fact written to its owner shard (ids None: fresh uuid4 hex ids)."""
        return self._add_or_upsert(keys, residuals, ids, metadata, extra_keys, key_gammas, upsert=False)

    def upsert(self, keys: torch.Tensor, residuals: torch.Tensor, ids: Union[str, Sequence[str]],
               metadata: Any = None, *, extra_keys: Any = None, key_gammas: Any = None) -> list[str]:
        """`NeuralDB.upsert`, each fact written to its owner shard."""
        if ids is None:
            raise ValueError("upsert needs the ids of the facts to insert or replace")
        return self._add_or_upsert(keys, residuals, ids, metadata, extra_keys, key_gammas, upsert=True)

    def delete(self, ids: Union[str, Sequence[str]], *, missing_ok: bool = False) -> list[str]:
        """`NeuralDB.delete`, each id deleted from its owner shard; returns the ids deleted. A
        missing id is a KeyError (nothing deleted anywhere) unless `missing_ok`."""
        if isinstance(ids, str):
            ids = [ids]
        if not isinstance(ids, Sequence) or not all(isinstance(fact_id, str) and fact_id for fact_id in ids):
            raise TypeError("ids must be a str or a sequence of non-empty str")
        ids = list(ids)
        if len(set(ids)) != len(ids):
            raise ValueError("duplicate ids in the batch to delete (an id is given twice)")
        groups = self._by_owner(ids)
        with self._owners(list(groups)) as owners:
            missing = [ids[i] for shard, positions in groups.items() for i in positions if ids[i] not in owners[shard]]
            if missing and not missing_ok:
                raise KeyError(f"{len(missing)} id(s) not in the sharded database, e.g. {missing[0]!r} "
                               f"(pass missing_ok=True to ignore missing ids)")
            deleted: list[str] = []
            self._write(groups, owners, lambda db, positions: deleted.extend(
                db.delete([ids[i] for i in positions], missing_ok=True)))
        return deleted

    # -- reading -------------------------------------------------------------------------------

    def get(self, fact_id: str) -> StoredFact:
        """The fact with this id, read from its owner shard's file (KeyError if absent)."""
        shard = self.owner_of(fact_id)
        if shard == self.rank:
            return self.local.get(fact_id)
        with NeuralDB.open(self.manifest.shards[shard], readonly=True) as owner:
            return owner.get(fact_id)

    def refresh(self) -> bool:
        """Apply to this rank's shard what other processes committed to its file (see NeuralDB.refresh)."""
        return self.local.refresh()

    def snapshot(self, device: Union[torch.device, str, None] = None, dtype: Optional[torch.dtype] = None) -> Snapshot:
        """This rank's shard's snapshot (its rows only; local row i is global row
        `row_offsets[rank] + i` of a retrieval over that state)."""
        return self.local.snapshot(device, dtype)

    def close(self) -> None:
        """Close this rank's shard (snapshots stay valid). The process group is the caller's."""
        self.local.close()

    def __enter__(self) -> "ShardedNeuralDB":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
