"""What the CPU and GPU gated_retrieve benchmarks share: the cases, their random inputs, the naive
code a user would write (against keys normalised once, when stored), and the interleaved
min-of-rounds timer."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import torch
import torch.nn.functional as F

SMOL, GPT2XL, LLAMA3_8B = (1536, 576), (6400, 1600), (14336, 4096)  # (d1, d2) of each model's FFN
F32, BF16 = torch.float32, torch.bfloat16


@dataclasses.dataclass(frozen=True)
class Case:
    """n queries against m keys of width d1 (residuals of width d2), keys stored in key_dtype."""

    n: int
    m: int
    d1: int
    d2: int
    key_dtype: torch.dtype

    @property
    def id(self) -> str:
        kd = {torch.float32: "f32", torch.bfloat16: "bf16"}[self.key_dtype]
        return f"n{self.n}-m{self.m}-d{self.d1}x{self.d2}-{kd}"

    @property
    def key_bytes(self) -> int:
        return self.m * self.d1 * self.key_dtype.itemsize


class CaseInputs:
    """Random (q, K, R) of one Case on `device`, kept while consecutive tests use the same Case.

    Query 0 is twice key m // 3 (one planted match, so the gate opens and the timed op can be
    checked); K is generated in chunks, so bf16 keys never need a full float32 copy.
    """

    CHUNK = 8192

    def __init__(self, device: str, q_dtype: torch.dtype, r_dtype: torch.dtype):
        self.device, self.q_dtype, self.r_dtype = torch.device(device), q_dtype, r_dtype
        self._case, self._data = None, {}

    def get(self, case: Case) -> dict:
        if self._case != case:
            self._case, self._data = None, {}  # free the previous case's tensors before allocating
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            gen = torch.Generator(device=self.device).manual_seed(0)
            K = torch.empty(case.m, case.d1, dtype=case.key_dtype, device=self.device)
            for s in range(0, case.m, self.CHUNK):
                K[s : s + self.CHUNK] = torch.randn(min(self.CHUNK, case.m - s), case.d1, generator=gen,
                                                    device=self.device)
            q = torch.randn(case.n, case.d1, generator=gen, device=self.device)
            q[0] = K[case.m // 3].float() * 2
            R = torch.randn(case.m, case.d2, generator=gen, device=self.device)
            self._data = {"q": q.to(self.q_dtype), "K": K, "R": R.to(self.r_dtype)}
            self._case = case
        return self._data

    def extra(self, case: Case, name: str, build: Callable[[dict], object]):
        """`build(inputs)`, made once per case and kept beside its inputs (an index, a reference buffer)."""
        data = self.get(case)
        if name not in data:
            data[name] = build(data)
        return data[name]


def unit_keys(inputs: dict) -> torch.Tensor:
    """K with unit rows, in K's dtype: what a user stores once, so that no call re-normalises it."""
    return F.normalize(inputs["K"], dim=-1)


def naive(q, K_unit, R, gamma):
    """The code a user would write against keys normalised when stored (`unit_keys`): normalise
    the queries, one matmul in the keys' dtype (torch matmul wants one dtype), max, gather, gate."""
    scores = F.normalize(q.to(K_unit.dtype), dim=-1) @ K_unit.T
    best, index = scores.max(dim=-1)
    return R[index] * (best > gamma)[:, None].to(R.dtype)


def wall_seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cuda_event_seconds(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def interleaved_min_times(fns: dict, rounds: int, seconds: Callable = wall_seconds) -> dict:
    """Min time (s, measured by `seconds(fn)`) of each callable over `rounds` interleaved
    repetitions (A B C A B C ...), after one warm-up call each: load from other processes hits
    every contender alike, and the min rejects the noisy rounds."""
    for fn in fns.values():
        fn()  # warm-up: page faults, thread pools, caches, compilation
    if seconds is cuda_event_seconds:
        torch.cuda.synchronize()
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = min(best[name], seconds(fn))
    return best
