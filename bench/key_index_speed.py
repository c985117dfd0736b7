"""The compressed key index (int8 codes + certified exact rescoring) against the "cpu" backend on
full-precision keys (float32, or bfloat16), decode shape (n = 1), in one run.

    PYTHONPATH=$PWD python bench/key_index_speed.py [--m 100000 1000000] [--rounds 9] [--threads 1]
        [--d2 576] [--key-dtype float32|bfloat16] [--mapped-keys DIR]

Per m (keys of width d1 = 1536, residuals of width --d2, float32; the residual width only sets
how many bytes the one fired row copies, so a narrow one saves memory at large m):
- "full":  gated_retrieve(q, K, R, gamma, backend="cpu"), the full-precision op;
- "int8":  gated_retrieve(q, index, R, gamma, backend="cpu") with index = KeyIndex.from_keys(K),
           the whole call (query quantisation, the C++ candidate pass, the rescoring);
- "pass":  the C++ candidate pass alone (`cpu_backend.compressed_candidates`), what reads the codes;
interleaved round by round (same load for all); median times, their ratio, and the key bytes
each reads per token: full precision m * d1 * (4 or 2); int8 m * (codes row + 12 bytes of scale,
error and norm) plus the candidates' full-precision keys. --key-dtype bfloat16 keeps the
full-precision keys (and so the "full" op) in bfloat16: half the memory at m = 1e6;
--mapped-keys DIR keeps them in a memory-mapped file (written on each run), so that only the
codes take process memory: the full op and K.sum are then not timed (they would read the page
cache), every result is still asserted identical to the full op's. Keys are
clustered (64 directions + noise) and queries are noisy copies of stored keys, so the gate fires
and candidate sets are not trivial; identity of every result with the full op is asserted. The
candidate counts are printed.

The machine's read bandwidth is measured in the same rounds, on the same threads: `K.sum()` over
the full-precision keys (far beyond the caches), timed between the op calls; the int8 read rates
(key bytes per token over the time of the whole call, and of the pass alone) are reported as a
share of it. Times are wall clock; on a shared machine the calling thread's CPU time
(`time.thread_time`, one thread only) is printed beside them: it leaves out the time the thread
waited for a core (not the memory contention).
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
from neuraldb_kernels.ops.cpu_backend import compressed_candidates

D1, GAMMA = 1536, 0.5


def clustered_keys(m: int, gen: torch.Generator, dtype: torch.dtype, mapped_file: str | None) -> torch.Tensor:
    """m keys around 64 shared directions in `dtype`, built in blocks (no m x d1 temporary beyond
    K); with mapped_file, K is that file memory-mapped (written here), so it takes page cache,
    not process memory."""
    centres = torch.randn(64, D1, generator=gen)
    if mapped_file is None:
        K = torch.empty(m, D1, dtype=dtype)
    else:
        K = torch.from_file(mapped_file, shared=True, size=m * D1, dtype=dtype).view(m, D1)
    for start in range(0, m, 65536):
        rows = min(65536, m - start)
        block = centres[torch.randint(0, 64, (rows,), generator=gen)] + 0.5 * torch.randn(rows, D1, generator=gen)
        K[start : start + rows] = block.to(dtype)
    if mapped_file is not None:
        os.sync()  # written back now, not while the rounds read candidate rows
    return K


def timed(call) -> tuple:
    """(wall seconds, this thread's CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.thread_time()
    call()
    return time.perf_counter() - wall, time.thread_time() - cpu


def bench(m: int, rounds: int, d2: int, key_dtype: torch.dtype, mapped_file: str | None) -> None:
    gen = torch.Generator().manual_seed(m)
    K = clustered_keys(m, gen, key_dtype, mapped_file)
    R = torch.randn(m, d2, generator=gen)
    started = time.perf_counter()
    index = nk.KeyIndex.from_keys(K)
    build = time.perf_counter() - started
    queries = K[torch.randint(0, m, (rounds,), generator=gen)].float() + 0.3 * torch.randn(rounds, D1, generator=gen)
    # memory-mapped keys: the full op and K.sum would read the page cache, so the reference read
    # rate is a sum over the codes (the same bytes the pass reads, reinterpreted as float32)
    sides = ("int8", "pass", "codes sum") if mapped_file else ("full", "int8", "pass", "sum")
    codes_as_float = index.codes.view(torch.float32)
    times = {side: [] for side in sides}
    counts = []
    for r in range(rounds):
        q = queries[r : r + 1]
        result = ki.retrieve(q, index, R, GAMMA, backend="cpu")  # untimed: the counts and identity
        out, found, score = nk.gated_retrieve(q, K, R, GAMMA, backend="cpu", return_index=True)
        assert torch.equal(result.index, found) and torch.equal(result.score, score) and torch.equal(result.out, out)
        counts.append(int(result.candidates.sum()))
        codes = ki.quantise_queries(q, "int8")
        calls = {
            "full": lambda: nk.gated_retrieve(q, K, R, GAMMA, backend="cpu"),
            "int8": lambda: nk.gated_retrieve(q, index, R, GAMMA, backend="cpu"),
            "pass": lambda: compressed_candidates(codes, index, index.budget()),
            "sum": K.sum,
            "codes sum": codes_as_float.sum,
        }
        for side in sides[r % len(sides) :] + sides[: r % len(sides)]:  # the order rotates
            times[side].append(timed(calls[side]))
    wall = {side: statistics.median(t[0] for t in times[side]) for side in sides}
    cpu = {side: statistics.median(t[1] for t in times[side]) for side in sides}
    key_bytes = K.element_size() * D1
    bytes_full = m * key_bytes
    bytes_pass = m * index.code_bytes_per_key()
    bytes_int8 = bytes_pass + statistics.median(counts) * key_bytes
    name = str(key_dtype).replace("torch.", "")
    for clock, t in (("wall", wall), ("thread CPU", cpu)):
        if mapped_file:
            machine = m * index.codes.shape[1] / t["codes sum"]
            print(
                f"m={m:>8} {clock:>10}: int8 call {t['int8'] * 1e3:8.2f} ms (pass {t['pass'] * 1e3:8.2f} ms)  read rates: "
                f"int8 call {bytes_int8 / t['int8'] / 1e9:5.1f} GB/s ({100 * bytes_int8 / t['int8'] / machine:3.0f} %), pass "
                f"{bytes_pass / t['pass'] / 1e9:5.1f} GB/s ({100 * bytes_pass / t['pass'] / machine:3.0f} %) of the codes sum's {machine / 1e9:5.1f} GB/s",
                flush=True,
            )
            continue
        machine = bytes_full / t["sum"]
        print(
            f"m={m:>8} {clock:>10}: {name} op {t['full'] * 1e3:8.2f} ms  int8 call {t['int8'] * 1e3:8.2f} ms "
            f"(pass {t['pass'] * 1e3:8.2f} ms)  speed-up x{t['full'] / t['int8']:5.2f}  "
            f"read rates: {name} op {bytes_full / t['full'] / 1e9:5.1f} GB/s, int8 call {bytes_int8 / t['int8'] / 1e9:5.1f} GB/s "
            f"({100 * bytes_int8 / t['int8'] / machine:3.0f} %), pass {bytes_pass / t['pass'] / 1e9:5.1f} GB/s "
            f"({100 * bytes_pass / t['pass'] / machine:3.0f} %) of K.sum's {machine / 1e9:5.1f} GB/s",
            flush=True,
        )
    print(
        f"m={m:>8} key bytes/token {name} {bytes_full / 1e6:8.1f} MB, int8 {bytes_int8 / 1e6:7.1f} MB "
        f"(x{m * D1 * 4 / bytes_int8:4.2f} fewer than float32, x{m * D1 * 2 / bytes_int8:4.2f} than bf16)  "
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
    parser.add_argument("--key-dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--mapped-keys", metavar="DIR",
                        help="keep the full-precision keys in a memory-mapped file in DIR (page cache, not process memory); "
                             "the int8 call and pass are then compared with a sum over the codes only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"d2 {args.d2}, threads {args.threads}, load average {os.getloadavg()}, ISAs {_cpu.available_int8_isas()}")
    for m in args.m:
        mapped_file = None if args.mapped_keys is None else os.path.join(args.mapped_keys, f"keys_{m}_{args.key_dtype}.bin")
        bench(m, args.rounds, args.d2, getattr(torch, args.key_dtype), mapped_file)


if __name__ == "__main__":
    main()
