"""The compressed key index (int8 codes + certified exact rescoring) against the float32 "cpu"
backend on full-precision keys, decode shape (n = 1), in one run.

    PYTHONPATH=$PWD python bench/key_index_speed.py [--m 100000 1000000] [--rounds 9] [--threads 1]
        [--d2 576]

Per m (keys of width d1 = 1536, residuals of width --d2, float32; the residual width only sets
how many bytes the one fired row copies, so a narrow one saves memory at large m):
- "fp32":  gated_retrieve(q, K, R, gamma, backend="cpu"), the full-precision op;
- "int8":  gated_retrieve(q, index, R, gamma, backend="cpu") with index = KeyIndex.from_keys(K),
           the whole call (query quantisation, the C++ candidate pass, the rescoring);
interleaved round by round (same load for both); median times, their ratio, and the key bytes
each reads per token: fp32 m * d1 * 4; int8 m * (codes row + 12 bytes of scale, error and norm)
plus the candidates' float32 keys. Keys are clustered (64 directions + noise) and queries are
noisy copies of stored keys, so the gate fires and candidate sets are not trivial; identity of
every result with the fp32 op is asserted. The candidate counts are printed.

The machine's read bandwidth is measured in the same rounds, on the same threads: `K.sum()` over
the float32 keys (m * d1 * 4 bytes, far beyond the caches), timed between the two op calls; the
int8 pass's read rate (its key bytes per token over its time) is reported as a share of it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import neuraldb_kernels as nk
from neuraldb_kernels import _cpu
from neuraldb_kernels.ops import key_index as ki

D1, GAMMA = 1536, 0.5


def clustered_keys(m: int, gen: torch.Generator) -> torch.Tensor:
    """m keys around 64 shared directions, built in blocks (no m x d1 temporary beyond K)."""
    centres = torch.randn(64, D1, generator=gen)
    K = torch.empty(m, D1)
    for start in range(0, m, 65536):
        rows = min(65536, m - start)
        K[start : start + rows] = centres[torch.randint(0, 64, (rows,), generator=gen)] + 0.5 * torch.randn(rows, D1, generator=gen)
    return K


def timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def bench(m: int, rounds: int, d2: int) -> None:
    gen = torch.Generator().manual_seed(m)
    K = clustered_keys(m, gen)
    R = torch.randn(m, d2, generator=gen)
    started = time.perf_counter()
    index = nk.KeyIndex.from_keys(K)
    build = time.perf_counter() - started
    queries = K[torch.randint(0, m, (rounds,), generator=gen)] + 0.3 * torch.randn(rounds, D1, generator=gen)
    fp32, int8, summed, counts = [], [], [], []
    for r in range(rounds):
        q = queries[r : r + 1]
        result = ki.retrieve(q, index, R, GAMMA, backend="cpu")  # untimed: the counts and identity
        out, found, score = nk.gated_retrieve(q, K, R, GAMMA, backend="cpu", return_index=True)
        assert torch.equal(result.index, found) and torch.equal(result.score, score) and torch.equal(result.out, out)
        counts.append(int(result.candidates.sum()))
        fp32.append(timed(lambda: nk.gated_retrieve(q, K, R, GAMMA, backend="cpu")))
        summed.append(timed(K.sum))
        int8.append(timed(lambda: nk.gated_retrieve(q, index, R, GAMMA, backend="cpu")))
    t32, t8 = statistics.median(fp32), statistics.median(int8)
    bytes32 = m * D1 * 4
    bytes8 = m * index.code_bytes_per_key() + statistics.median(counts) * D1 * 4
    bandwidth = bytes32 / statistics.median(summed)
    print(
        f"m={m:>8}  fp32 {t32 * 1e3:8.2f} ms  int8 {t8 * 1e3:8.2f} ms  speed-up x{t32 / t8:5.2f}  "
        f"key bytes/token fp32 {bytes32 / 1e6:8.1f} MB int8 {bytes8 / 1e6:7.1f} MB (x{bytes32 / bytes8:4.2f} fewer)  "
        f"read rate int8 {bytes8 / t8 / 1e9:5.1f} GB/s fp32 {bytes32 / t32 / 1e9:5.1f} GB/s, machine (K.sum) "
        f"{bandwidth / 1e9:5.1f} GB/s: int8 at {100 * bytes8 / t8 / bandwidth:3.0f} %  "
        f"candidates median {statistics.median(counts):.0f} max {max(counts)}  index build {build:.1f} s  "
        f"load average after {os.getloadavg()[0]:.1f}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--m", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--d2", type=int, default=576)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"d2 {args.d2}, threads {args.threads}, load average {os.getloadavg()}, ISAs {_cpu.available_int8_isas()}")
    for m in args.m:
        bench(m, args.rounds, args.d2)


if __name__ == "__main__":
    main()
