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

CASES = [(100_000, 14336, 4096, torch.bfloat16), (100_000, 1536, 576, torch.bfloat16),
         (100_000, 1536, 576, torch.float32)]


def event_seconds(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("no CUDA device is visible to torch: the sweep needs a GPU")

    import neuraldb_kernels as nk
    from neuraldb_kernels.ops.triton_backend import LaunchConfig, launch, plan_launch

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    grid = [LaunchConfig(1, bm, bd, False, min(1024, per_sm * sms), warps, stages)
            for bm, bd, per_sm, warps, stages in itertools.product((16, 32, 64), (128, 256, 512), (4, 8), (4, 8),
                                                                   (2, 3, 4))
            if bm * bd <= 16384]
    results = []
    for m, d1, d2, dtype in CASES:
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
        best = {name: float("inf") for name in fns}
        for _ in range(args.rounds):
            for name, fn in fns.items():
                best[name] = min(best[name], event_seconds(fn))
        copy_bandwidth = 2 * K.numel() * K.element_size() / best["copy"]
        case = f"n1-m{m}-d{d1}-{str(dtype).split('.')[-1]}"
        rows = sorted(((best[c], c) for c in configs), key=lambda row: row[0])
        for seconds, config in rows[:8] + [(best[planned], planned)]:
            share = K.numel() * K.element_size() / seconds / copy_bandwidth
            tag = " (current plan)" if config == planned else ""
            print(f"{case} {seconds * 1e3:.3f} ms {100 * share:.1f}% of copy {config}{tag}", flush=True)
            results.append({"case": case, "ms": seconds * 1e3, "share_of_copy": share, "planned": config == planned,
                            "config": config.__dict__, "copy_GBps": copy_bandwidth / 1e9})
        del K, R, src, dst
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M"),
                       "command": " ".join(sys.argv), "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
