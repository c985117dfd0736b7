"""Sweep of the triton backend's decode (n = 1) launch configuration on a CUDA GPU.

For each case, times `triton_backend.launch` with every configuration of the grid below and an
HBM copy of the keys' byte size, interleaved, min over rounds of CUDA-event times; prints the
configurations by speed with their share of the copy bandwidth (key bytes / time over
2 * key bytes / copy time), checks each result against the torch backend, and writes JSON.
The chosen configuration goes into `plan_launch`; the record goes into bench/RESULTS.md.

    python bench/triton_decode_sweep.py --out sweep.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

import torch
from retrieval_cases import cuda_event_seconds, interleaved_min_times

CASES = [(100_000, 14336, 4096, torch.bfloat16), (100_000, 1536, 576, torch.bfloat16),
         (100_000, 1536, 576, torch.float32)]


def time_case(m: int, d1: int, d2: int, dtype: torch.dtype, grid: list, rounds: int):
    """(min seconds per config, copy bandwidth B/s, the planned config, configs timed) for one case."""
    import neuraldb_kernels as nk
    from neuraldb_kernels.ops.triton_backend import launch, plan_launch

    gen = torch.Generator(device="cuda").manual_seed(0)
    K = torch.randn(m, d1, generator=gen, device="cuda").to(dtype)
    R = torch.randn(m, d2, generator=gen, device="cuda").to(dtype)
    q = (K[m // 3].float() * 2).to(dtype)[None]
    src = torch.ones(K.numel() * K.element_size() // 4, device="cuda")
    dst = torch.empty_like(src)
    expected = nk.gated_retrieve(q, K, R, 0.5, backend="torch", return_index=True)[1]
    planned = plan_launch(1, m, d1, q.device)
    configs = [planned] + [c for c in grid if c != planned]
    fns = {"copy": lambda: dst.copy_(src)}
    for config in configs:
        index = launch(q, K, R, 0.5, config)[1]  # compiles; checked against the torch backend
        assert torch.equal(index, expected), (config, index, expected)
        fns[config] = lambda config=config: launch(q, K, R, 0.5, config)
    best = interleaved_min_times(fns, rounds, seconds=cuda_event_seconds)
    return best, 2 * src.numel() * src.element_size() / best["copy"], planned, configs


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("no CUDA device is visible to torch: the sweep needs a GPU")

    from neuraldb_kernels.ops.triton_backend import LaunchConfig

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    grid = [LaunchConfig(1, bm, bd, False, min(1024, per_sm * sms), warps, stages)
            for bm, bd, per_sm, warps, stages in itertools.product((16, 32, 64), (128, 256, 512), (4, 8), (4, 8),
                                                                   (2, 3, 4))
            if bm * bd <= 16384]
    results = []
    for m, d1, d2, dtype in CASES:
        best, copy_bandwidth, planned, configs = time_case(m, d1, d2, dtype, grid, args.rounds)
        key_bytes = m * d1 * dtype.itemsize
        case = f"n1-m{m}-d{d1}-{str(dtype).split('.')[-1]}"
        rows = sorted(((best[c], c) for c in configs), key=lambda row: row[0])
        for seconds, config in rows[:8] + [(best[planned], planned)]:
            share = key_bytes / seconds / copy_bandwidth
            tag = " (current plan)" if config == planned else ""
            print(f"{case} {seconds * 1e3:.3f} ms {100 * share:.1f}% of copy {config}{tag}", flush=True)
            results.append({"case": case, "ms": seconds * 1e3, "share_of_copy": share, "planned": config == planned,
                            "config": config.__dict__, "copy_GBps": copy_bandwidth / 1e9})
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M"),
                       "command": " ".join(sys.argv), "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
