"""Sharded retrieval against world size: per-token latency, its compute and communication parts,
and the bytes each rank moves per token, at one total number of facts (random unit keys).

    python bench/sharded_retrieval.py [--facts 1000000] [--d1 1536] [--d2 576] [--dtype bfloat16]
                                      [--worlds 1,2,4] [--steps 20] [--threads-total 2]

For each world size W, W local processes (gloo on 127.0.0.1) each hold facts/W rows (the rows
of a single-process database split shard-major) and decode `steps` tokens: every rank brings one
query per step (data-parallel serving); every fourth step's queries equal a stored key (the gate
fires and a residual travels), the others are random (no gate fires: the common case). Reported
per token (medians over steps, rank 0's view):
  total_ms       the whole sharded_gated_retrieve call;
  compute_ms     the local fused op alone on this rank's rows for the W gathered queries, timed
                 separately in the same process;
  comm_only_ms   the same retrieval over empty shards: the collectives with no compute and no
                 skew between ranks (three: nothing fires);
  comm_only_fire_{allreduce,gather}_ms  over one-row shards holding each rank's query: all
                 four collectives, every query fires, with either residual exchange;
  bytes          sent + received by rank 0 per token (CommunicationStats), for a firing and a
                 non-firing step, and the residual exchange ("allreduce" vs "gather") on firing steps.
W = 1 also runs the plain single-process op (`single_op_ms`), the baseline. The processes share
--threads-total cores (threads per process = max(1, threads_total // W)): on a 2-core machine
more ranks do not add compute, so the communication columns are the point.
Prints one JSON line per world size and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from neuraldb_kernels import gated_retrieve
from neuraldb_kernels.distributed import sharded_gated_retrieve
from neuraldb_kernels.distributed.retrieval import ShardRows, local_candidates

GAMMA = 0.8
CHUNK = 1 << 14  # rows generated at a time (bounds the float32 temporaries to ~100 MB at d1 = 1536)


def shard_rows(rank: int, world: int, facts: int, d1: int, d2: int, dtype: torch.dtype):
    """This rank's contiguous slice of the global rows, generated chunk by chunk from per-chunk
    seeds, so every world size holds the same global rows: unit keys, random residuals."""
    start, stop = rank * facts // world, (rank + 1) * facts // world
    keys = torch.empty(stop - start, d1, dtype=dtype)
    residuals = torch.empty(stop - start, d2, dtype=dtype)
    for chunk_start in range(start - start % CHUNK, stop, CHUNK):
        generator = torch.Generator().manual_seed(chunk_start)
        block = torch.randn(min(CHUNK, facts - chunk_start), d1, generator=generator)
        block = torch.nn.functional.normalize(block, dim=1)
        values = torch.randn(block.shape[0], d2, generator=generator)
        lo, hi = max(start, chunk_start), min(stop, chunk_start + block.shape[0])
        keys[lo - start : hi - start] = block[lo - chunk_start : hi - chunk_start]
        residuals[lo - start : hi - start] = values[lo - chunk_start : hi - chunk_start]
    return keys, residuals


def query(step: int, rank: int, facts: int, d1: int, d2: int, dtype: torch.dtype) -> torch.Tensor:
    """Rank's query at `step`: a stored key every fourth step, else a random direction."""
    generator = torch.Generator().manual_seed(1_000_003 * step + rank)
    if step % 4 == 0:
        row = int(torch.randint(0, facts, (1,), generator=generator))
        chunk_start = row - row % CHUNK
        block = torch.randn(min(CHUNK, facts - chunk_start), d1, generator=torch.Generator().manual_seed(chunk_start))
        return torch.nn.functional.normalize(block[row - chunk_start], dim=0)[None].to(dtype)
    return torch.randn(1, d1, generator=generator).to(dtype)


def rank_main(rank, world, port, options, out_path):
    torch.set_num_threads(max(1, options["threads_total"] // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    dtype = getattr(torch, options["dtype"])
    facts, d1, d2 = options["facts"], options["d1"], options["d2"]
    keys, residuals = shard_rows(rank, world, facts, d1, d2, dtype)
    empty_keys, empty_residuals = keys[:0], residuals[:0]
    rows = ShardRows(keys, residuals, GAMMA)
    records = {name: [] for name in ("total", "compute", "comm_only", "comm_only_fire_allreduce",
                                      "comm_only_fire_gather", "single", "allreduce", "gather")}
    bytes_seen = {}
    for step in range(options["steps"] + 1):  # step 0 warms up
        q = query(step, rank, facts, d1, d2, dtype)
        fires = step % 4 == 0
        exchanges = ("allreduce", "gather") if fires else ("allreduce",)
        for exchange in exchanges:
            dist.barrier()
            started = time.perf_counter()
            result = sharded_gated_retrieve(q, keys, residuals, GAMMA, exchange=exchange)
            elapsed = time.perf_counter() - started
            if step:
                if exchange == "allreduce":
                    records["total"].append(elapsed)
                if fires:
                    records[exchange].append(elapsed)
                stats = result.communication
                bytes_seen[(fires, exchange)] = stats.bytes_sent + stats.bytes_received
            if fires:
                assert int(result.index) >= 0, "a stored key must fire"
        dist.barrier()
        started = time.perf_counter()
        sharded_gated_retrieve(q, empty_keys, empty_residuals, GAMMA)
        if step:
            records["comm_only"].append(time.perf_counter() - started)
        for exchange in ("allreduce", "gather"):  # one-row shards holding each rank's query: all fire
            dist.barrier()
            started = time.perf_counter()
            sharded_gated_retrieve(q, q.clone(), residuals[:1], GAMMA, exchange=exchange)
            if step:
                records[f"comm_only_fire_{exchange}"].append(time.perf_counter() - started)
        gathered = q.repeat(world, 1)  # the W queries every rank scans
        started = time.perf_counter()
        local_candidates(gathered, rows, GAMMA, "auto")
        if step:
            records["compute"].append(time.perf_counter() - started)
        if world == 1:
            started = time.perf_counter()
            gated_retrieve(q, keys, residuals, GAMMA, return_index=True)
            if step:
                records["single"].append(time.perf_counter() - started)
    if rank == 0:
        median_ms = {name: 1e3 * statistics.median(values) for name, values in records.items() if values}
        summary = {"world": world, "facts": facts, "d1": d1, "d2": d2, "dtype": options["dtype"],
                   "threads_per_rank": torch.get_num_threads(), "steps": options["steps"],
                   "total_ms": median_ms["total"], "compute_ms": median_ms["compute"],
                   "comm_only_ms": median_ms["comm_only"], "single_op_ms": median_ms.get("single"),
                   "comm_only_fire_allreduce_ms": median_ms["comm_only_fire_allreduce"],
                   "comm_only_fire_gather_ms": median_ms["comm_only_fire_gather"],
                   "firing_allreduce_ms": median_ms["allreduce"], "firing_gather_ms": median_ms["gather"],
                   "bytes_no_fire": bytes_seen[(False, "allreduce")],
                   "bytes_fire_allreduce": bytes_seen[(True, "allreduce")],
                   "bytes_fire_gather": bytes_seen[(True, "gather")]}
        with open(out_path, "w") as file:
            json.dump(summary, file)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--facts", type=int, default=1_000_000)
    parser.add_argument("--d1", type=int, default=1536)
    parser.add_argument("--d2", type=int, default=576)
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--worlds", default="1,2,4")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads-total", type=int, default=2)
    args = parser.parse_args()
    options = {"facts": args.facts, "d1": args.d1, "d2": args.d2, "dtype": args.dtype, "steps": args.steps,
               "threads_total": args.threads_total}
    rows = []
    for world in [int(part) for part in args.worlds.split(",")]:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        with tempfile.TemporaryDirectory() as folder:
            out_path = os.path.join(folder, "rank0.json")
            mp.spawn(rank_main, args=(world, port, options, out_path), nprocs=world)
            with open(out_path) as file:
                rows.append(json.load(file))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end; {sys.argv[1:]}")
    print("| ranks | threads/rank | total ms/token | compute ms | comm-only ms | comm-only firing: all-reduce / "
          "gather ms | single-process op ms | firing: all-reduce ms | firing: gather ms | bytes/token no fire | "
          "firing all-reduce | firing gather |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        single = "—" if row["single_op_ms"] is None else f"{row['single_op_ms']:.1f}"
        print(f"| {row['world']} | {row['threads_per_rank']} | {row['total_ms']:.1f} | {row['compute_ms']:.1f} | "
              f"{row['comm_only_ms']:.2f} | {row['comm_only_fire_allreduce_ms']:.2f} / "
              f"{row['comm_only_fire_gather_ms']:.2f} | {single} | {row['firing_allreduce_ms']:.1f} | {row['firing_gather_ms']:.1f} | "
              f"{row['bytes_no_fire']} | {row['bytes_fire_allreduce']} | {row['bytes_fire_gather']} |")


if __name__ == "__main__":
    main()
