"""A NeuralDB sharded over a torch.distributed process group (gloo on CPU, NCCL on GPUs).

    ownership    shard_of(id, N): the stable owner of a fact
    manifest     the JSON file naming the N shard files (each an ordinary NeuralDB)
    split_merge  split_database / merge_shards: one file <-> N shards, bit for bit
    collectives  bounded-time collectives; RankFailureError when a rank dies or hangs
    retrieval    sharded_gated_retrieve: the single-process op over the union of every rank's rows
    database     ShardedNeuralDB: rank r's front (writes routed to the owner, collective retrieve)

Launch one process per shard, e.g. `torchrun --nproc-per-node 4 serve.py`, where serve.py calls
`torch.distributed.init_process_group("gloo")` (or "nccl" with one GPU per rank), then
`ShardedNeuralDB.open(manifest)` and `attach(model, sharded_db)`.
"""

from .collectives import RankFailureError
from .database import ShardedNeuralDB
from .manifest import ShardManifest, read_manifest
from .ownership import shard_of
from .retrieval import CommunicationStats, ShardedRetrieval, sharded_gated_retrieve
from .split_merge import MergeReport, SplitReport, merge_shards, split_database

__all__ = [
    "CommunicationStats",
    "MergeReport",
    "RankFailureError",
    "ShardManifest",
    "ShardedNeuralDB",
    "ShardedRetrieval",
    "SplitReport",
    "merge_shards",
    "read_manifest",
    "shard_of",
    "sharded_gated_retrieve",
    "split_database",
]
