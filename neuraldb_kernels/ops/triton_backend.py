"""The "triton" backend of gated_retrieve: a fused two-stage Triton kernel.

Stage 1 (`_partial_best_kernel`), grid (query blocks, key splits): every program takes BLOCK_N
queries and one contiguous split of the keys, walks that split BLOCK_M keys at a time and, for each
key block, loops over d1 in BLOCK_D chunks, accumulating the fp32 dot products and the key sums of
squares from the same K tile while it is in registers (the key norms cost no extra pass over K).
The cosines of each key block are reduced at once to a running (best score, lowest best index) per
query; the program writes one partial (score, index) per (query, split). No n x m score matrix
ever reaches global memory.

Stage 2 (`_finalize_kernel`), grid (queries,): reduces the partials of a query (max score, lowest
index among equal scores, so ties across splits go to the lowest key index), applies the gate
`score > gamma` in fp32 (with per-key thresholds, gamma of the winning key: one load per query, no
pass over the m thresholds) and copies the selected residual row bit for bit (as integers).

Splitting m across programs is what lets a single decode token occupy every SM; a two-stage
reduction was chosen over a packed 64-bit atomic max because it is deterministic, needs no
float-to-ordered-integer encoding, and the partial buffer is tiny (n x splits).

Dot products: for many queries (prefill) `tl.dot` tiles (BLOCK_N x BLOCK_M x BLOCK_D) on tensor
cores with fp32 accumulation; when q and K share a 16-bit dtype the tiles go in natively (their
products are exact in fp32), otherwise both tiles are converted to fp32 and multiplied with
input_precision="ieee" (never TF32). tl.dot needs every tile side >= 16, so for n <= 8 (decode) a
broadcast multiply + tl.sum path is chosen at launch instead of padding the query block.
All pointer offsets are int64: m * d1 exceeds 2^31 at 1M facts x 14336.

CPU tensors run only in Triton's interpreter (TRITON_INTERPRET=1 set before triton is imported);
there every tl.dot tile is converted to fp32 first (the interpreter mishandles bf16 dots).
"""

import functools
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .backend import Backend
from .contract import Gamma

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # triton is optional: the backend reports itself unavailable
    triton = None
    _IMPORT_ERROR: Optional[ImportError] = exc
else:
    _IMPORT_ERROR = None

# Residual rows are copied as integers of the same width, so the copy is bit for bit.
_BIT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
_MAX_SPLITS = 1024  # the finalize kernel reduces all splits of a query in one tile
_BROADCAST_MAX_QUERIES = 8  # n <= this: multiply + tl.sum; above: tl.dot tiles
_BROADCAST_TILE_ELEMENTS = 8192  # BLOCK_N * BLOCK_M * BLOCK_D of the broadcast path


if triton is not None:

    @triton.jit
    def _inverse_norm(sum_of_squares):
        """1 / sqrt(sum_of_squares), and 0 for a zero vector (cosine 0 with everything)."""
        nonzero = sum_of_squares > 0
        return tl.where(nonzero, 1.0 / tl.sqrt_rn(tl.where(nonzero, sum_of_squares, 1.0)), 0.0)

    @triton.jit
    def _partial_best_kernel(
        q_ptr,  # (n, d1) contiguous, fp32/fp16/bf16
        k_ptr,  # (m, d1) contiguous, fp32/fp16/bf16
        part_score_ptr,  # (n, num_splits) fp32: best cosine of the split; NaN for a NaN/Inf query
        part_index_ptr,  # (n, num_splits) int64: its lowest index; -1 for a NaN/Inf query
        n,
        m,
        d1,
        keys_per_split,  # a multiple of BLOCK_M
        num_splits,
        BLOCK_N: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_D: tl.constexpr,
        USE_DOT: tl.constexpr,
        DOT_IN_FP32: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < n
        q_rows = q_ptr + rows.to(tl.int64)[:, None] * d1

        # Query norms and finiteness: one pass over the (small) query block.
        q_sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
        q_nonfinite = tl.zeros((BLOCK_N,), dtype=tl.int32)
        for d0 in range(0, d1, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            x = tl.load(q_rows + cols[None, :], mask=row_ok[:, None] & (cols[None, :] < d1), other=0.0)
            x = x.to(tl.float32)
            q_sq += tl.sum(x * x, axis=1)
            q_nonfinite += tl.sum(tl.where(tl.abs(x) < float("inf"), 0, 1), axis=1)  # NaN fails too
        q_inv = _inverse_norm(q_sq)

        split_start = pid_s * keys_per_split
        split_end = tl.minimum(split_start + keys_per_split, m)
        best = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
        best_index = tl.full((BLOCK_N,), 0, dtype=tl.int64) + split_start
        for block_start in range(split_start, split_end, BLOCK_M):
            keys = block_start + tl.arange(0, BLOCK_M)
            key_ok = keys < split_end
            k_rows = k_ptr + keys.to(tl.int64)[:, None] * d1
            dots = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            k_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for d0 in range(0, d1, BLOCK_D):
                cols = d0 + tl.arange(0, BLOCK_D)
                col_ok = cols[None, :] < d1
                k = tl.load(k_rows + cols[None, :], mask=key_ok[:, None] & col_ok, other=0.0)
                x = tl.load(q_rows + cols[None, :], mask=row_ok[:, None] & col_ok, other=0.0)
                k32 = k.to(tl.float32)
                k_sq += tl.sum(k32 * k32, axis=1)  # key norms from the tile already in registers
                if USE_DOT:
                    if DOT_IN_FP32:
                        dots = tl.dot(x.to(tl.float32), tl.trans(k32), dots, input_precision="ieee")
                    else:
                        dots = tl.dot(x, tl.trans(k), dots)
                else:
                    dots += tl.sum(x.to(tl.float32)[:, None, :] * k32[None, :, :], axis=2)
            k_inv = _inverse_norm(k_sq)
            cos = dots * q_inv[:, None] * k_inv[None, :]
            # Padding keys, and keys whose cosine is NaN (a NaN/Inf key), never win.
            cos = tl.where(key_ok[None, :] & (cos == cos), cos, float("-inf"))
            block_best, block_arg = tl.max(cos, axis=1, return_indices=True, return_indices_tie_break_left=True)
            better = block_best > best  # strict: an earlier block keeps its ties
            best = tl.where(better, block_best, best)
            best_index = tl.where(better, block_start + block_arg, best_index)

        finite = q_nonfinite == 0
        best = tl.where(finite, best, float("nan"))
        best_index = tl.where(finite, best_index, -1)
        part = rows.to(tl.int64) * num_splits + pid_s
        tl.store(part_score_ptr + part, best, mask=row_ok)
        tl.store(part_index_ptr + part, best_index, mask=row_ok)

    @triton.jit
    def _finalize_kernel(
        part_score_ptr,  # (n, num_splits) fp32
        part_index_ptr,  # (n, num_splits) int64
        r_bits_ptr,  # (m, d2) residuals viewed as same-width integers
        out_bits_ptr,  # (n, d2) output viewed as same-width integers
        index_ptr,  # (n,) int64
        score_ptr,  # (n,) fp32
        num_splits,
        d2,
        gamma,  # fp32, the threshold of every key unless PER_KEY
        key_gamma_ptr,  # (m,) fp32 per-key thresholds when PER_KEY, else None
        BLOCK_S: tl.constexpr,
        BLOCK_D2: tl.constexpr,
        PER_KEY: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        splits = tl.arange(0, BLOCK_S)
        split_ok = splits < num_splits
        scores = tl.load(part_score_ptr + row * num_splits + splits, mask=split_ok, other=float("-inf"))
        indices = tl.load(part_index_ptr + row * num_splits + splits, mask=split_ok, other=0)
        best = tl.max(scores, axis=0)
        # Splits cover increasing key ranges; among equal scores the lowest key index wins.
        best_index = tl.min(tl.where(scores == best, indices, 9223372036854775807), axis=0)
        finite = tl.load(part_index_ptr + row * num_splits) != -1
        if PER_KEY:  # a finite query's best index is a valid key; a NaN/Inf row reads key 0, unused
            fired = finite & (best > tl.load(key_gamma_ptr + tl.where(finite, best_index, 0)))
        else:
            fired = finite & (best > gamma)
        tl.store(score_ptr + row, tl.where(finite, best, float("nan")))
        tl.store(index_ptr + row, tl.where(fired, best_index, -1))
        src = r_bits_ptr + tl.where(fired, best_index, 0) * d2
        dst = out_bits_ptr + row * d2
        for c0 in range(0, d2, BLOCK_D2):
            cols = c0 + tl.arange(0, BLOCK_D2)
            col_ok = cols < d2
            bits = tl.load(src + cols, mask=col_ok, other=0)  # row 0 when closed (m >= 1)
            tl.store(dst + cols, tl.where(fired, bits, 0), mask=col_ok)

    @triton.jit
    def _approximate_bounds_kernel(
        q_codes_ptr,  # (n, d_pad) int8 or float8_e4m3fn query codes
        q_scale_ptr,  # (n,) fp32 t (NaN: no candidates)
        q_error_ptr,  # (n,) fp32
        k_codes_ptr,  # (m, d_pad) codes of the same kind
        k_scale_ptr,  # (m,) fp32 s (NaN: never a candidate)
        k_error_ptr,  # (m,) fp32
        k_norm_ptr,  # (m,) fp32
        upper_ptr,  # (n, m) fp32 out: a + eps (-inf where NaN)
        part_lower_ptr,  # (n, num_splits) fp32 out: the split's best a - eps
        n,
        m,
        d_pad,
        keys_per_split,
        num_splits,
        slack,
        BLOCK_N: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_D: tl.constexpr,
        USE_DOT: tl.constexpr,
        INTEGER_CODES: tl.constexpr,
    ):
        """The certified bounds of key_index.py for one query block and one split of the keys:
        integer codes multiply exactly in int32, fp8 codes in fp32 (within the bound's slack)."""
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < n
        q_rows = q_codes_ptr + rows.to(tl.int64)[:, None] * d_pad
        t = tl.load(q_scale_ptr + rows, mask=row_ok, other=0.0)
        t_error = tl.load(q_error_ptr + rows, mask=row_ok, other=0.0)
        best_lower = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
        split_start = pid_s * keys_per_split
        split_end = tl.minimum(split_start + keys_per_split, m)
        for block_start in range(split_start, split_end, BLOCK_M):
            keys = block_start + tl.arange(0, BLOCK_M)
            key_ok = keys < split_end
            k_rows = k_codes_ptr + keys.to(tl.int64)[:, None] * d_pad
            if INTEGER_CODES:
                dots = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
            else:
                dots = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for d0 in range(0, d_pad, BLOCK_D):
                cols = d0 + tl.arange(0, BLOCK_D)
                k = tl.load(k_rows + cols[None, :], mask=key_ok[:, None], other=0)
                x = tl.load(q_rows + cols[None, :], mask=row_ok[:, None], other=0)
                if INTEGER_CODES:
                    if USE_DOT:
                        dots = tl.dot(x, tl.trans(k), dots)
                    else:
                        dots += tl.sum(x.to(tl.int32)[:, None, :] * k.to(tl.int32)[None, :, :], axis=2)
                else:
                    if USE_DOT:
                        dots = tl.dot(x.to(tl.float32), tl.trans(k.to(tl.float32)), dots, input_precision="ieee")
                    else:
                        dots += tl.sum(x.to(tl.float32)[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
            s = tl.load(k_scale_ptr + keys, mask=key_ok, other=float("nan"))
            approx = dots.to(tl.float32) * (t[:, None] * s[None, :])
            eps = tl.load(k_error_ptr + keys, mask=key_ok, other=0.0)[None, :] + t_error[:, None] * tl.load(
                k_norm_ptr + keys, mask=key_ok, other=0.0
            )[None, :] + slack
            lower = approx - eps
            upper = approx + eps
            lower = tl.where(lower == lower, lower, float("-inf"))  # NaN (NaN/Inf rows, padding)
            upper = tl.where(upper == upper, upper, float("-inf"))
            best_lower = tl.maximum(best_lower, tl.max(lower, axis=1))
            out = upper_ptr + rows.to(tl.int64)[:, None] * m + keys[None, :]
            tl.store(out, upper, mask=row_ok[:, None] & key_ok[None, :])
        tl.store(part_lower_ptr + rows.to(tl.int64) * num_splits + pid_s, best_lower, mask=row_ok)


@functools.lru_cache(maxsize=None)  # fixed when triton is imported
def _interpreting() -> bool:
    """True when the kernels were created by Triton's interpreter (TRITON_INTERPRET=1 at import)."""
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_partial_best_kernel, InterpretedFunction)


def _requirement(device: torch.device) -> Optional[str]:
    if triton is None:
        return f"triton is not installed or does not import ({_IMPORT_ERROR}); `pip install triton`"
    if device.type == "cuda" and not torch.cuda.is_available():
        return "tensors are on CUDA but torch.cuda.is_available() is False"
    if device.type == "cpu" and not _interpreting():
        return (
            "Triton runs on CPU tensors only in its interpreter, and TRITON_INTERPRET=1 was not set "
            "before triton was imported"
        )
    return None


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and the key split of one launch.

    block_n queries x block_m keys x block_d features per tile; use_dot picks tl.dot tiles (every
    side >= 16) over multiply + tl.sum; num_splits programs share the keys of each query block;
    num_warps and num_stages (software-pipelined loads in flight) go to Triton's compiler.
    """

    block_n: int
    block_m: int
    block_d: int
    use_dot: bool
    num_splits: int
    num_warps: int = 4
    num_stages: int = 3


def _pow2_at_least(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


@functools.lru_cache(maxsize=None)
def target_programs(device: torch.device) -> int:
    """Programs that fill `device` (4 per SM on a GPU), looked up once per device."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return 4 * torch.cuda.get_device_properties(index).multi_processor_count
    return 4  # the interpreter runs programs one after another: a few splits, still exercised


def plan_launch(n: int, m: int, d1: int, device: torch.device) -> LaunchConfig:
    """Heuristic tiles by n (decode vs prefill) and enough key splits to fill the device.

    Planned once per (n bucket, m bucket, d1, device), buckets being the powers of two at least
    n and m, so that decoding re-plans nothing; `launch` fits the splits to the exact m."""
    return _plan_for_buckets(_pow2_at_least(n), _pow2_at_least(m), d1, device)


@functools.lru_cache(maxsize=1024)
def _plan_for_buckets(n: int, m: int, d1: int, device: torch.device) -> LaunchConfig:
    if n <= _BROADCAST_MAX_QUERIES:
        # 16 keys x 512 features: the fastest decode tiles of the sweep in bench/RESULTS.md
        block_n, block_m, use_dot = n, 16, False
        block_d = min(512, _BROADCAST_TILE_ELEMENTS // (block_n * block_m), max(16, _pow2_at_least(d1)))
    else:
        block_n, block_m, use_dot = (16 if n <= 16 else 32 if n <= 32 else 64), 64, True
        block_d = min(64, max(16, _pow2_at_least(d1)))
    query_blocks = -(-n // block_n)
    key_blocks = -(-m // block_m)
    num_splits = max(1, min(key_blocks, -(-target_programs(device) // query_blocks), _MAX_SPLITS))
    return LaunchConfig(block_n, block_m, block_d, use_dot, num_splits)


def launch(
    q2d: torch.Tensor, K: torch.Tensor, R: torch.Tensor, gamma: Gamma, config: LaunchConfig
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run both stages with explicit tiles; inputs and outputs as for `Backend.run` (backend.py)."""
    n, d1 = q2d.shape
    m, d2 = R.shape
    if config.use_dot and min(config.block_n, config.block_m, config.block_d) < 16:
        raise ValueError(f"gated_retrieve[triton]: tl.dot tiles need every side >= 16, got {config}")
    if not 1 <= config.num_splits <= _MAX_SPLITS:
        raise ValueError(f"gated_retrieve[triton]: num_splits must be in [1, {_MAX_SPLITS}], got {config}")
    key_blocks = -(-m // config.block_m)
    blocks_per_split = -(-key_blocks // config.num_splits)
    keys_per_split = blocks_per_split * config.block_m
    num_splits = -(-m // keys_per_split)  # no empty split
    interpreting = _interpreting()
    dot_in_fp32 = interpreting or q2d.dtype != K.dtype or q2d.dtype == torch.float32

    part_score = torch.empty((n, num_splits), dtype=torch.float32, device=q2d.device)
    part_index = torch.empty((n, num_splits), dtype=torch.int64, device=q2d.device)
    _partial_best_kernel[(-(-n // config.block_n), num_splits)](
        q2d, K, part_score, part_index, n, m, d1, keys_per_split, num_splits,
        BLOCK_N=config.block_n, BLOCK_M=config.block_m, BLOCK_D=config.block_d,
        USE_DOT=config.use_dot, DOT_IN_FP32=dot_in_fp32, num_warps=config.num_warps,
        num_stages=config.num_stages,
    )  # fmt: skip

    out = torch.empty((n, d2), dtype=R.dtype, device=q2d.device)
    index = torch.empty(n, dtype=torch.int64, device=q2d.device)
    score = torch.empty(n, dtype=torch.float32, device=q2d.device)
    bits = _BIT_VIEW[R.dtype]
    per_key = isinstance(gamma, torch.Tensor)
    _finalize_kernel[(n,)](
        part_score, part_index, R.view(bits), out.view(bits), index, score, num_splits, d2,
        0.0 if per_key else float(gamma), gamma if per_key else None,
        BLOCK_S=max(2, _pow2_at_least(num_splits)), BLOCK_D2=min(1024, max(16, _pow2_at_least(d2))),
        PER_KEY=per_key,
    )  # fmt: skip
    return out, index, score


def _run(q2d: torch.Tensor, K: torch.Tensor, R: torch.Tensor, gamma: Gamma) -> Tuple[torch.Tensor, ...]:
    """Cosines accumulated in fp32, with the planned tiles."""
    return launch(q2d, K, R, gamma, plan_launch(q2d.shape[0], K.shape[0], q2d.shape[1], q2d.device))


_CANDIDATE_QUERY_GROUP = 16  # queries per bounds launch: bounds memory n x m x 4 bytes stays small


def compressed_candidates(queries, index, budget: int):
    """The certified candidate pass over a KeyIndex's int8 or fp8 codes (key_index.py): one read of
    the codes per group of up to 16 queries writes every key's upper bound and each split's best
    lower bound; the keys whose upper bound reaches the best lower bound are then selected in
    torch. Tiles as for the full op's decode/prefill plans. Returns key_index.CandidateSets."""
    from .key_index import candidate_sets, certified_slack

    n, m, d_pad = queries.codes.shape[0], index.m, queries.codes.shape[1]
    slack = certified_slack(index.d1)
    query_rows, key_rows = [], []
    for g0 in range(0, n, _CANDIDATE_QUERY_GROUP):
        g = min(_CANDIDATE_QUERY_GROUP, n - g0)
        config = plan_launch(g, m, d_pad, queries.codes.device)
        block_d = min(config.block_d, d_pad & -d_pad)  # a power of two dividing d_pad: no column mask
        key_blocks = -(-m // config.block_m)
        keys_per_split = -(-key_blocks // config.num_splits) * config.block_m
        num_splits = -(-m // keys_per_split)
        upper = torch.empty((g, m), dtype=torch.float32, device=queries.codes.device)
        part_lower = torch.empty((g, num_splits), dtype=torch.float32, device=queries.codes.device)
        _approximate_bounds_kernel[(-(-g // config.block_n), num_splits)](
            queries.codes[g0 : g0 + g], queries.scale[g0 : g0 + g], queries.error[g0 : g0 + g], index.codes,
            index.row_scale, index.row_error, index.row_norm, upper, part_lower, g, m, d_pad, keys_per_split,
            num_splits, slack, BLOCK_N=config.block_n, BLOCK_M=config.block_m, BLOCK_D=block_d,
            USE_DOT=config.use_dot, INTEGER_CODES=index.format == "int8", num_warps=config.num_warps,
        )  # fmt: skip
        keep = (upper >= part_lower.amax(dim=1)[:, None]) & (upper > float("-inf"))  # -inf: NaN/Inf rows
        rows, cols = torch.nonzero(keep, as_tuple=True)
        query_rows.append(rows + g0)
        key_rows.append(cols)
    query_rows, key_rows = torch.cat(query_rows), torch.cat(key_rows)
    overflowed = torch.bincount(query_rows, minlength=n) > budget
    return candidate_sets(query_rows, key_rows, n, overflowed)


BACKEND = Backend(
    "triton", (torch.float32, torch.float16, torch.bfloat16), ("cuda", "cpu"), _run, _requirement,
    candidates=compressed_candidates, candidate_formats=("int8", "fp8_e4m3"),
)  # fmt: skip
