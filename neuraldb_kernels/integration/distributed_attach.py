"""Attach a sharded NeuralDB to a model replicated on every rank (data-parallel serving).

Every rank runs the same model on its own inputs; the hook on the layer's FFN down-projection
runs the sharded retrieval (distributed/retrieval.py) on the projection input x (..., d1):

    y = down_proj(x) + out,   out = the single-process gated_retrieve over every shard's rows

with each rank's own queries, so every rank computes exactly what one process with all the
facts computes (bit for bit: same winner, same residual bits, same torch.where as `attach`). The
forward is collective: every rank must run a forward at the same time (a rank with no tokens
passes an empty batch or runs a forward on padding), with the hook attached and not paused on
all of them; `generate(..., synced_gpus=True)` keeps ranks stepping until every rank is done.
Writes from any rank (`ShardedNeuralDB.add` ...) are seen from the next forward. Inference only:
no gradient reaches the residuals through the collectives.

Tensor-parallel models (not implemented here). A row-parallel down-projection splits its input
x (d1) over T ranks, x_t of d1/T values each, and all-reduces the partial outputs. A cosine
needs the whole x: cos(x, k) = sum_t x_t.k_t / (sqrt(sum_t |x_t|^2) |k|). Two ways:
  - all-gather x before the retrieval: n d1 values per token (Llama-3-8B, d1 = 14336, bf16:
    28 KB per token), each rank receiving (T-1)/T of it; then retrieval runs as here, over keys
    sharded by rows (this module's scheme) or replicated. That is 3.5x the bytes of the layer's
    own output all-reduce (d2 = 4096 bf16 = 8 KB per token), but one collective of fixed size.
  - partial dot products: keep keys split by columns like x; each rank computes x_t.K_t^T (n, m)
    and |x_t|^2, all-reduced: n m values per token (m = 1M facts: 4 MB float32 per token,
    500x the first way), so only for small m.
The residual must then be added once: after the output all-reduce (bit-identical to the
replicated case) or on one rank before it (a different float sum order).
"""

from __future__ import annotations

from typing import List, Optional

import torch

from ..distributed import ShardedNeuralDB
from ..distributed.collectives import Communicator
from ..distributed.retrieval import DEFAULT_EXCHANGE, EXCHANGES, ShardRows, ShardedRetrieval, retrieve_sharded
from .attach import Attachment, Firing, ForwardRecord, firings, hook_target


class DistributedAttachment(Attachment):
    """An `Attachment` whose retrieval is sharded over a process group.

    `last` holds the `ForwardRecord` of the last forward (index: global rows, shard-major;
    snapshot: this rank's shard as that forward read it) and `last_retrieval` its
    `ShardedRetrieval` (owners, communication stats). `fired()` is collective.
    """

    def __init__(self, model, db: ShardedNeuralDB, layer, module, gamma, backend, key_dtype, comm: Communicator,
                 exchange: str):
        self.comm = comm
        self.exchange = exchange
        self.last_retrieval: Optional[ShardedRetrieval] = None
        super().__init__(model, db, layer, module, gamma, backend, key_dtype)

    @torch.compiler.disable
    def _retrieve(self, hidden: torch.Tensor, dtype: torch.dtype):
        read = []

        def rows() -> ShardRows:
            self.db.refresh()  # after the first collective: every write committed before it is seen
            snapshot, keys = self._views(hidden.device, dtype)
            read.append(snapshot)
            return ShardRows(keys.keys, snapshot.residuals, self._gate(keys))

        result = retrieve_sharded(hidden, rows, self.comm, backend=self.backend, exchange=self.exchange)
        self.last = ForwardRecord(result.index, result.score, read[0])
        self.last_retrieval = result
        return result.out, result.index

    def fired(self) -> List[Firing]:
        """Collective (every rank calls it after the same forward): this rank's tokens where a fact
        fired in the last forward, in (batch, position) order, ids gathered from their owners."""
        served = {} if self.last_retrieval is None else self.last_retrieval.served
        snapshot = None if self.last is None else self.last.snapshot
        local = dict(zip(served, snapshot.ids_at(list(served.values())))) if served else {}
        ids = {row: fact_id for part in self.comm.all_gather_object(local, "fired() ids") for row, fact_id in part.items()}
        if self.last is None:
            return []
        return firings(self.last, lambda rows: [ids[row] for row in rows.tolist()])

    def __repr__(self) -> str:
        state = ("paused" if self.is_paused else "attached") if self.attached else "detached"
        return (f"DistributedAttachment({state}, rank {self.comm.rank} of {self.comm.world_size}, layer={self.layer}, "
                f"module={type(self.module).__name__}, local facts={len(self.db.local)}, gamma={self.gamma}, "
                f"backend={self.backend!r}, exchange={self.exchange!r})")


def attach_sharded(model: torch.nn.Module, db: ShardedNeuralDB, layer: Optional[int] = None,
                   gamma: Optional[float] = None, *, module_path: Optional[str] = None, backend: str = "auto",
                   key_dtype: Optional[torch.dtype] = None, allow_weight_mismatch: bool = False,
                   process_group=None, exchange: Optional[str] = None) -> DistributedAttachment:
    """`attach` for a `ShardedNeuralDB` (called by `attach`; same arguments and checks).
    process_group: the group of the retrieval collectives, in which rank r serves shard r
    (default: the database's). exchange: "allreduce" or "gather" (see distributed/retrieval.py)."""
    if not isinstance(db, ShardedNeuralDB):
        raise TypeError(f"db must be a ShardedNeuralDB, got {type(db).__name__}")
    exchange = DEFAULT_EXCHANGE if exchange is None else exchange
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")
    comm = db.comm if process_group is None else Communicator.of(process_group, db.comm.timeout)
    if (comm.rank, comm.world_size) != (db.rank, db.num_shards):
        raise ValueError(f"process_group has this process as rank {comm.rank} of {comm.world_size}, but it serves "
                         f"shard {db.rank} of {db.num_shards}: rank r of the group must serve shard r")
    layer, module, gamma = hook_target(model, db, layer, gamma, module_path=module_path, backend=backend,
                                       key_dtype=key_dtype, allow_weight_mismatch=allow_weight_mismatch)
    return DistributedAttachment(model, db, layer, module, gamma, backend, key_dtype, comm, exchange)
