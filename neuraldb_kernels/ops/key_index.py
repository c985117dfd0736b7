"""`KeyIndex`: compressed key codes with certified exact rescoring for `gated_retrieve`.

A KeyIndex holds, for m keys K (m, d1), narrow codes of the NORMALISED keys plus the full-precision
keys themselves (which may live on another device, e.g. host memory beside GPU codes). A call
`gated_retrieve(q, index, R, gamma)` reads the codes once to find, per query, a small candidate set
that provably contains every key the full-precision op could pick, rescores only those candidates
with the full-precision backend, and so returns `out`, `index` and `score` identical to
`gated_retrieve(q, K, R, gamma)` with the same backend (see "Identity" below for the backends).

Code formats (one scale per row, symmetric, round to nearest; rows padded with zero codes to a
multiple of 64 features so SIMD loops need no tail):
- "int8": codes c in [-127, 127], s = max|k_hat| / 127. 1 byte per feature (+12 bytes per row).
- "fp8_e4m3": float8 e4m3 codes, s = max|k_hat| / 448; only on CUDA GPUs with fp8 support
  (compute capability >= 8.9). 1 byte per feature; the Triton pass multiplies them in fp32.
Narrower codes were measured and dropped: packed int4 (s = max|k_hat| / 7) has a bound about 18x
wider; on 100k realistic SmolLM2 keys its mean row error was 0.40 and 499 of 500 CounterFact
queries overflowed (bench/RESULTS.md, "Compressed keys"): a scan that only added to the full one.

The certified bound. Notation: k_hat = K_i / |K_i| (0 for a zero row), q_hat = q / |q|; the row's
dequantised key k~ = s * decode(c) and the query's q~ = t * decode(c_q) (queries are quantised
the same way, per call). Stored per row: err_i >= |k_hat - k~|_2 and norm_i >= |k~|_2; per query
qerr >= |q_hat - q~|_2. Then, since |q_hat|_2 = 1,
    q_hat . k_hat - q~ . k~ = q_hat . (k_hat - k~) + (q_hat - q~) . k~,
    |q_hat . k_hat - q~ . k~| <= err_i + qerr * norm_i                     (Cauchy-Schwarz, twice).
The full-precision op does not return q_hat . k_hat but its float rounding; the test suite's
reference derivation (python_tests/conftest.py, `_cosine_tolerance`, Higham eq. 3.5) bounds every
backend's float32 cosine (float64 only does better) by (2 d1 + 8) u + u, u = 2^-24, to first order;
a factor 1.01 covers the second order for d1 up to 80,000. The approximate score a = fl(q~ . k~)
may itself be accumulated in float32 (Triton, torch), which adds at most 1.01 d1 u |q~| |k~| <=
4.04 d1 u, because round-to-nearest with 0 representable never more than doubles an entry
(|k~|, |q~| <= 2), and a few roundings of values <= 4 in the scale products and the bound
arithmetic add less than 32 u. So with
    delta(d1) = 1.01 (2 d1 + 8) u + 4.04 d1 u + 32 u,     eps_i = err_i + qerr * norm_i + delta,
the op's computed score S_i of key i satisfies  a_i - eps_i <= S_i <= a_i + eps_i.
Let L = max_i (a_i - eps_i) over the keys. Every key with a_i + eps_i < L scores below the key
attaining L, so it is neither the best nor tied with it; KEEPING every key with a_i + eps_i >= L
therefore keeps the argmax and every exact tie of it. A key with NaN/Inf gets scale NaN and is
never a candidate (it never wins in the full op either); a zero key has a = 0 and S = 0.
At d1 = 1536, delta = 5.6e-4; the int8 error terms of realistic keys are about 1e-2.

Encoding (err_i, norm_i and qerr are upper bounds, not estimates). Both encoders work in float64
(u_d = 2^-53), row by row: y = x / max|x| (no square of y over- or underflows; a row with NaN/Inf
gets scale NaN, a zero row codes 0 and bounds 0), unit = y / |y|, s = float32(max|unit| / 127),
c = clamp(round(unit / s)), k~ = s c (exact in float64: an 8-bit integer times a float32), then
err = |unit - k~| + 2^-30 and norm = |k~| + 2^-30, each rounded UP to float32. The C++ encoder
(csrc/cpu/key_index_cpu_encode.cpp; int8 on the CPU) multiplies by reciprocals instead of dividing
and sums in any order; the torch one (other devices, fp8) divides. Why 2^-30 covers the rounding,
for d1 < 2^20 (checked; rows of more features are refused):
- unit vs k_hat: every y_j carries one relative rounding of the common factor 1 / max|x| (it
  cancels in the normalisation) and at most one of its own (u_d, or 2^-1075 absolute where y_j
  is subnormal; rows with max|x| < 2^-1000 are first scaled by 2^600, exactly); |y|^2 summed in
  any order is off by at most (d1 + 1) u_d relative, the square root and its reciprocal add 2 u_d,
  the product unit_j = y_j / |y| one more. So every unit_j is k_hat_j (1 + e_j) with
  |e_j| <= (d1 + 8) u_d / 2 + 2 u_d < 2^-32.9 (plus d1 2^-1075 absolute in all), and
  |unit - k_hat| <= 2^-32.9 (|k_hat| = 1).
- The computed |unit - k~| and |k~|: a subtraction, a square, a sum of d1 terms and a square root,
  (d1 + 4) u_d relative at most, of values <= |unit| + |k~| <= 3: below 3 * 2^-33.
So |k_hat - k~| <= computed err + 2^-32.9 + 3 * 2^-33 < computed err + 2^-30, and likewise for the
norm and the query's qerr; rounding up to float32 only widens them. The codes themselves need no
bound: any c gives a valid err, since err is measured after c is chosen.

Rescoring and identity. The candidate sets of the queries (all of them, as one sorted union U of
key rows) are rescored by the chosen backend's full-precision kernel on (q, K[U], R[U], gamma[U])
with the same query rows, then U's local index is mapped back. Keys outside a query's set cannot
beat or tie its best, U is sorted, so the argmax, the lowest-index tie rule and the gate (score >
gamma, or > gamma[index]) are those of the full call, provided the backend computes each
(query, key) score independently of the other keys in the call. The "cpu" kernel does by design
(csrc/cpu/gated_retrieve_cpu_scan.h: one accumulator walking the row, a fixed lane tree; its
filtered prefill path rescores the keys that may win with that same arithmetic), and so
does "triton" on a GPU (the launch plan depends on n and d1 only; keys are split, never mixed). The
"torch" reference multiplies with BLAS, whose rounding of one dot product depends on the matrix
shape (up to 1 ulp here), so through "torch" the result equals the full op except when two keys'
float32 cosines lie within that ulp.
Overflow: a query whose set exceeds the candidate budget is scored by the full op over all keys
(only the overflowed query rows; the keys move to the query's device for that call), and counted in
`CompressedRetrieval`. The
default budget, max(1024, m / 32) keys, keeps rescoring under 1/8 of the int8 scan's bytes; on
SmolLM2's realistic keys a fixed 1024 overflowed a quarter of the queries at m = 1e5
(bench/RESULTS.md, "Compressed keys").
"""

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

from .contract import FLOAT_DTYPES, _check_tensor, check_gamma, check_key_gamma_values
from .cpu_backend import _cpu as _cpu_kernels
from .dispatch import check_backend_name, get_backend, resolve_backend
from .torch_backend import compressed_candidates as reference_candidates

FORMATS = ("int8", "fp8_e4m3")
# codes= may name a format by torch dtype
_DTYPE_FORMATS = {torch.int8: "int8", torch.float8_e4m3fn: "fp8_e4m3"}
_LEVELS = {"int8": 127.0, "fp8_e4m3": 448.0}  # largest code magnitude
_FEATURE_ALIGN = 64  # codes rows are padded with zeros to a multiple of this many features
_ENCODE_ROWS = 8192  # rows encoded at once (torch: float64 scratch of rows x d1 x 8 bytes)
_ENCODE_PAD = 2.0**-30  # added to each row's error and norm bounds (module docstring, "Encoding")
_ENCODE_MAX_FEATURES = 2**20  # d1 below which _ENCODE_PAD covers the encoders' float64 rounding
_UNIT_ROUNDOFF = 2.0**-24
MIN_CANDIDATE_BUDGET = 1024
CANDIDATE_BUDGET_FRACTION = 32  # default budget: max(MIN_CANDIDATE_BUDGET, m // this)


def certified_slack(d1: int) -> float:
    """delta(d1) of the module docstring: the float-rounding part of eps, for every backend."""
    u = _UNIT_ROUNDOFF
    return 1.01 * (2 * d1 + 8) * u + 4.04 * d1 * u + 32 * u


def format_name(codes: Union[str, torch.dtype]) -> str:
    """"int8" or "fp8_e4m3" for a format name or torch.int8 / torch.float8_e4m3fn."""
    name = _DTYPE_FORMATS.get(codes, codes) if isinstance(codes, torch.dtype) else codes
    if name not in FORMATS:
        raise ValueError(f"KeyIndex: unknown code format {codes!r}; choose one of {FORMATS} (or torch.int8, torch.float8_e4m3fn)")
    return name


def fp8_unsupported_reason(device: torch.device) -> Optional[str]:
    """None when fp8-e4m3 codes are supported on `device`, else why not."""
    if device.type != "cuda":
        return f"fp8_e4m3 codes need a CUDA GPU with fp8 support (compute capability >= 8.9); the codes would live on {device.type}"
    if not torch.cuda.is_available():
        return "fp8_e4m3 codes need a CUDA GPU, and torch.cuda.is_available() is False"
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        return f"fp8_e4m3 codes need compute capability >= 8.9, this GPU has {capability[0]}.{capability[1]}"
    return None


def padded_features(d1: int) -> int:
    """d1 rounded up to a multiple of 64: the feature count of one codes row."""
    return -(-d1 // _FEATURE_ALIGN) * _FEATURE_ALIGN


def _round_up_f32(x: torch.Tensor) -> torch.Tensor:
    """float64 -> the float32 at or above it (a bound stays a bound after narrowing)."""
    narrow = x.to(torch.float32)
    return torch.where(narrow.to(torch.float64) < x, torch.nextafter(narrow, torch.full_like(narrow, float("inf"))), narrow)


def _encode(unit: torch.Tensor, fmt: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Unit rows (rows, d_pad) float64 -> (codes, scale float32 (rows,)); codes are int8 or
    float8_e4m3fn (rows, d_pad)."""
    scale = (unit.abs().amax(dim=1) / _LEVELS[fmt]).to(torch.float32)
    s = scale.to(torch.float64)[:, None]
    scaled = torch.where(s > 0, unit / torch.where(s > 0, s, 1.0), 0.0)
    if fmt == "fp8_e4m3":
        return scaled.clamp(-448.0, 448.0).to(torch.float8_e4m3fn), scale
    return torch.round(scaled).clamp(-_LEVELS[fmt], _LEVELS[fmt]).to(torch.int8), scale


@dataclass(frozen=True)
class EncodedRows:
    """Codes of some rows and their certified bounds (module docstring): codes (rows, code bytes);
    scale (rows,) float32 s (NaN for a row with NaN/Inf); error (rows,) float32 >= |k_hat - k~|;
    norm (rows,) float32 >= |k~|."""

    codes: torch.Tensor
    scale: torch.Tensor
    error: torch.Tensor
    norm: torch.Tensor


def _encode_rows_cpu(x: torch.Tensor, capacity: int = 0) -> EncodedRows:
    """int8 codes of x's rows by the C++ encoder (csrc/cpu/key_index_cpu_encode.cpp), in blocks
    of 8192 rows (bfloat16/float16 blocks are widened to float32, exactly), into buffers of
    max(rows, capacity) rows (the rows past x's left uninitialised)."""
    rows, d1 = x.shape
    size = max(rows, capacity)
    codes = torch.empty(size, padded_features(d1), dtype=torch.int8)
    scale, error, norm = (torch.empty(size, dtype=torch.float32) for _ in range(3))
    for start in range(0, rows, _ENCODE_ROWS):
        end = min(rows, start + _ENCODE_ROWS)
        block = x[start:end]
        block = block if block.dtype in (torch.float32, torch.float64) else block.to(torch.float32)
        _cpu_kernels.int8_encode_rows(block.contiguous(), codes[start:end], scale[start:end], error[start:end], norm[start:end], torch.get_num_threads())
    return EncodedRows(codes, scale, error, norm)


def encode_rows(x: torch.Tensor, fmt: str, capacity: int = 0) -> EncodedRows:
    """Normalise the rows of x (rows, d1), any float dtype, and encode them in `fmt`, on x's
    device: int8 rows on the CPU by the C++ encoder when the extension is built, otherwise by
    float64 torch work (module docstring, "Encoding"). The results have max(rows, capacity) rows,
    those past x's uninitialised (room to grow without a copy)."""
    if x.shape[1] >= _ENCODE_MAX_FEATURES:
        raise ValueError(f"KeyIndex: rows of {x.shape[1]} features; the certified bounds hold below {_ENCODE_MAX_FEATURES} features")
    if fmt == "int8" and x.device.type == "cpu" and _cpu_kernels is not None:
        return _encode_rows_cpu(x, capacity)
    encoded = _encode_rows_torch(x, fmt)
    if capacity <= x.shape[0]:
        return encoded

    def grown(t: torch.Tensor) -> torch.Tensor:
        buffer = torch.empty((capacity, *t.shape[1:]), dtype=t.dtype, device=t.device)
        buffer[: t.shape[0]] = t
        return buffer

    return EncodedRows(*(grown(getattr(encoded, f)) for f in ("codes", "scale", "error", "norm")))


def _encode_rows_torch(x: torch.Tensor, fmt: str) -> EncodedRows:
    """encode_rows in float64 torch work, on x's device, in blocks of 8192 rows."""
    d_pad = padded_features(x.shape[1])
    parts = []
    for start in range(0, x.shape[0], _ENCODE_ROWS):
        rows = x[start : start + _ENCODE_ROWS].to(torch.float64)
        finite = torch.isfinite(rows).all(dim=1)
        rows = torch.where(finite[:, None], rows, 0.0)
        largest = rows.abs().amax(dim=1, keepdim=True)  # rows / largest: no square over- or underflows
        rows = torch.where(largest > 0, rows / torch.where(largest > 0, largest, 1.0), 0.0)
        norms = torch.linalg.vector_norm(rows, dim=1, keepdim=True)
        unit = torch.nn.functional.pad(torch.where(norms > 0, rows / torch.where(norms > 0, norms, 1.0), 0.0), (0, d_pad - x.shape[1]))
        codes, scale = _encode(unit, fmt)
        dequantised = codes.to(torch.float64) * scale.to(torch.float64)[:, None]  # exact
        nonzero = norms.squeeze(1) > 0
        pad = torch.where(nonzero, _ENCODE_PAD, 0.0)
        error = _round_up_f32(torch.linalg.vector_norm(unit - dequantised, dim=1) + pad)
        norm = _round_up_f32(torch.linalg.vector_norm(dequantised, dim=1) + pad)
        scale = torch.where(finite, scale, torch.full_like(scale, float("nan")))
        parts.append(EncodedRows(codes, scale, error, norm))
    if not parts:
        dtype = {"int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn}[fmt]
        empty = torch.empty(0, dtype=torch.float32, device=x.device)
        return EncodedRows(torch.empty(0, d_pad, dtype=dtype, device=x.device), empty, empty, empty)
    return EncodedRows(*(torch.cat([getattr(p, f) for p in parts]) for f in ("codes", "scale", "error", "norm")))


@dataclass(frozen=True)
class QueryCodes:
    """Per-call query codes: codes (n, d_pad) in the index's format (int8 or float8_e4m3fn);
    scale (n,) float32 t (NaN for a NaN/Inf query row: it gets no candidates); error (n,) float32
    >= |q_hat - q~|."""

    codes: torch.Tensor
    scale: torch.Tensor
    error: torch.Tensor


def quantise_queries(q2d: torch.Tensor, fmt: str) -> QueryCodes:
    """Queries (n, d1) -> their codes in `fmt`."""
    rows = encode_rows(q2d, fmt)
    return QueryCodes(rows.codes, rows.scale, rows.error)


@dataclass(frozen=True)
class CandidateSets:
    """Per query, the keys that may win: keys (total,) int64 ascending within each query, the
    query's slice keys[offsets[j] : offsets[j + 1]]; offsets (n + 1,) int64; overflowed (n,) bool
    (more than the budget: that query's slice is empty and it is scored over all keys)."""

    keys: torch.Tensor
    offsets: torch.Tensor
    overflowed: torch.Tensor


@dataclass(frozen=True)
class CompressedRetrieval:
    """The result of a retrieval through a KeyIndex: out (..., d2), index (...) int64 and score
    (...) float32 exactly as gated_retrieve defines them; candidates (...) int64, the number of
    keys rescored at full precision for each query (m for an overflowed query, 0 for a NaN/Inf
    query); overflowed (...) bool, queries whose candidate set exceeded the budget; backend, the
    backend that rescored."""

    out: torch.Tensor
    index: torch.Tensor
    score: torch.Tensor
    candidates: torch.Tensor
    overflowed: torch.Tensor
    backend: str


class KeyIndex:
    """Compressed codes of m keys (module docstring) plus the full-precision keys for rescoring.

    Build with `KeyIndex.from_keys(K, codes=torch.int8)`; keep in sync with `append`, `overwrite`,
    `move_and_truncate` and `swap_remove` (capacity doubles on growth: amortised O(d1) per row).
    Attributes: m, d1, format ("int8" | "fp8_e4m3"), device (of the codes: queries must be
    there), key_device (of the full-precision keys), key_dtype, candidate_budget (None: the default,
    max(1024, m // 32), follows m; `budget()` gives the number in force).
    """

    def __init__(self, keys: torch.Tensor, encoded: EncodedRows, fmt: str, device: torch.device, candidate_budget: Optional[int]):
        self.format = fmt
        self.device = device
        self.d1 = keys.shape[1]
        self.candidate_budget = candidate_budget
        self._m = keys.shape[0]
        self._keys = keys  # (capacity, d1); rows >= m are spare
        self._owns_keys = False  # False while _keys is the caller's K (copied before any write)
        self._codes, self._scale, self._error, self._norm = (t.to(device) for t in (encoded.codes, encoded.scale, encoded.error, encoded.norm))

    @classmethod
    def from_keys(
        cls,
        K: torch.Tensor,
        codes: Union[str, torch.dtype] = torch.int8,
        *,
        device=None,
        candidate_budget: Optional[int] = None,
    ) -> "KeyIndex":
        """Index the keys K (m, d1) (float32/float16/bfloat16/float64, any device; m may be 0).

        codes: "int8" (torch.int8) or "fp8_e4m3" (torch.float8_e4m3fn; CUDA
        GPUs with compute capability >= 8.9 only). device: where the codes live and queries must
        be (default K's device); K stays where it is. The index references K itself (no copy)
        until the first append: do not modify K in place meanwhile. candidate_budget: the most
        candidates a query may have before it is scored over all keys (>= 1); None: max(1024, m // 32)."""
        if not isinstance(K, torch.Tensor):
            raise TypeError(f"KeyIndex.from_keys: K must be a torch.Tensor, got {type(K).__name__}")
        if K.dtype not in FLOAT_DTYPES:
            raise TypeError(f"KeyIndex.from_keys: K has dtype {K.dtype}; supported dtypes are float32, float16, bfloat16 and float64")
        if K.dim() != 2 or K.shape[1] == 0:
            raise ValueError(f"KeyIndex.from_keys: K must be 2-D (m, d1) with d1 >= 1, got shape {tuple(K.shape)}")
        if candidate_budget is not None and (isinstance(candidate_budget, bool) or not isinstance(candidate_budget, int) or candidate_budget < 1):
            raise ValueError(f"KeyIndex.from_keys: candidate_budget must be an int >= 1, got {candidate_budget!r}")
        fmt = format_name(codes)
        device = torch.device(device) if device is not None else K.device
        if fmt == "fp8_e4m3":
            why = fp8_unsupported_reason(device)
            if why is not None:
                raise ValueError(f"KeyIndex.from_keys: {why}")
        return cls(K.contiguous(), encode_rows(K, fmt), fmt, device, candidate_budget)

    # ---------------------------------------------------------------- state

    @property
    def m(self) -> int:
        """Number of keys indexed."""
        return self._m

    @property
    def key_dtype(self) -> torch.dtype:
        return self._keys.dtype

    @property
    def key_device(self) -> torch.device:
        return self._keys.device

    @property
    def keys(self) -> torch.Tensor:
        """The full-precision keys (m, d1), on key_device (a view of the index's buffer)."""
        return self._keys[: self._m]

    @property
    def codes(self) -> torch.Tensor:
        """(m, d1 padded to a multiple of 64): int8 or float8_e4m3fn codes on `device`."""
        return self._codes[: self._m]

    @property
    def row_scale(self) -> torch.Tensor:
        return self._scale[: self._m]

    @property
    def row_error(self) -> torch.Tensor:
        return self._error[: self._m]

    @property
    def row_norm(self) -> torch.Tensor:
        return self._norm[: self._m]

    def budget(self) -> int:
        """The candidate budget in force: candidate_budget, or max(1024, m // 32) when it is None."""
        if self.candidate_budget is not None:
            return self.candidate_budget
        return max(MIN_CANDIDATE_BUDGET, self._m // CANDIDATE_BUDGET_FRACTION)

    def code_bytes_per_key(self) -> int:
        """Bytes one key costs in the scan: its codes row plus scale, error and norm (float32)."""
        return self._codes.shape[1] * self._codes.element_size() + 12

    def __repr__(self) -> str:
        return f"KeyIndex(m={self.m}, d1={self.d1}, format={self.format!r}, device={self.device}, key_device={self.key_device}, key_dtype={self.key_dtype})"

    # ---------------------------------------------------------------- incremental updates

    def _check_rows(self, keys: torch.Tensor, what: str) -> None:
        if not isinstance(keys, torch.Tensor) or keys.dtype not in FLOAT_DTYPES:
            raise TypeError(f"KeyIndex.{what}: keys must be a float tensor (float32/float16/bfloat16/float64)")
        if keys.dim() != 2 or keys.shape[1] != self.d1:
            raise ValueError(f"KeyIndex.{what}: keys must have shape (rows, {self.d1}), got {tuple(keys.shape)}")

    def _reserve(self, rows: int) -> None:
        capacity = self._keys.shape[0]
        if rows <= capacity and self._owns_keys:
            return
        capacity = max(rows, 2 * capacity, 16)

        def grown(t: torch.Tensor) -> torch.Tensor:
            bigger = torch.zeros((capacity, *t.shape[1:]), dtype=t.dtype, device=t.device)
            bigger[: self._m] = t[: self._m]
            return bigger

        self._keys = grown(self._keys)
        self._codes, self._scale, self._error, self._norm = (grown(t) for t in (self._codes, self._scale, self._error, self._norm))
        self._owns_keys = True

    def append(self, keys: torch.Tensor) -> None:
        """Add rows (rows, d1) at the end (indices m .. m + rows - 1), converted to key_dtype."""
        self._check_rows(keys, "append")
        end = self._m + keys.shape[0]
        self._reserve(end)
        self._write(slice(self._m, end), keys)
        self._m = end

    def overwrite(self, rows: torch.Tensor, keys: torch.Tensor) -> None:
        """Replace the keys at row indices `rows` (r,) int64 with `keys` (r, d1)."""
        self._check_rows(keys, "overwrite")
        rows = torch.as_tensor(rows, dtype=torch.int64)
        if rows.shape != (keys.shape[0],) or (rows.numel() and not (0 <= int(rows.min()) and int(rows.max()) < self._m)):
            raise ValueError(f"KeyIndex.overwrite: rows must be {keys.shape[0]} indices in [0, {self._m}), got {rows.tolist()}")
        self._reserve(self._m)  # a referenced K is copied before it is written
        self._write(rows, keys)

    def move_and_truncate(self, sources: torch.Tensor, targets: torch.Tensor, count: int) -> None:
        """Row targets[j] takes row sources[j]'s key and codes, then only the first `count` rows
        remain (what the store's views do to fill the holes of deleted rows)."""
        sources = torch.as_tensor(sources, dtype=torch.int64)
        targets = torch.as_tensor(targets, dtype=torch.int64)
        if sources.shape != targets.shape or not 0 <= count <= self._m:
            raise ValueError(f"KeyIndex.move_and_truncate: sources/targets must match and 0 <= count <= {self._m}")
        self._reserve(self._m)
        for name in ("_keys", "_codes", "_scale", "_error", "_norm"):
            buffer = getattr(self, name)
            buffer[targets.to(buffer.device)] = buffer[sources.to(buffer.device)]
        self._m = count

    def swap_remove(self, rows) -> None:
        """Delete the given row indices; the last rows move into the holes (O(d1) per row)."""
        rows = torch.unique(torch.as_tensor(rows, dtype=torch.int64))
        if rows.numel() and not (0 <= int(rows[0]) and int(rows[-1]) < self._m):
            raise ValueError(f"KeyIndex.swap_remove: rows must be indices in [0, {self._m}), got {rows.tolist()}")
        count = self._m - rows.numel()
        holes = rows[rows < count]
        kept_tail = torch.arange(count, self._m)
        kept_tail = kept_tail[~torch.isin(kept_tail, rows)]
        self.move_and_truncate(kept_tail, holes, count)

    def _write(self, rows, keys: torch.Tensor) -> None:
        keys = keys.to(self._keys.device, self._keys.dtype)  # the codes encode the stored keys
        encoded = encode_rows(keys, self.format)
        self._keys[rows] = keys
        rows_here = rows.to(self.device) if isinstance(rows, torch.Tensor) else rows
        self._codes[rows_here] = encoded.codes.to(self.device)
        self._scale[rows_here] = encoded.scale.to(self.device)
        self._error[rows_here] = encoded.error.to(self.device)
        self._norm[rows_here] = encoded.norm.to(self.device)


def candidate_sets(query_rows: torch.Tensor, key_rows: torch.Tensor, n: int, overflowed: torch.Tensor) -> CandidateSets:
    """CandidateSets from (query, key) pairs in any order: pairs of overflowed queries are dropped."""
    keep = ~overflowed[query_rows]
    query_rows, key_rows = query_rows[keep], key_rows[keep]
    order = torch.argsort(query_rows * (int(key_rows.max()) + 1 if key_rows.numel() else 1) + key_rows)
    counts = torch.bincount(query_rows, minlength=n)
    offsets = torch.zeros(n + 1, dtype=torch.int64, device=counts.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return CandidateSets(key_rows[order], offsets, overflowed)


def _check_call(q, index: KeyIndex, R, gamma):
    """Validate a retrieval through `index`: q (..., d1) and R (m, d2) float tensors on
    index.device, gamma a number or a (m,) float32 tensor there. Returns gamma (float or tensor)."""
    for name, t in (("q", q), ("R", R)):
        _check_tensor(name, t)
    if q.dim() == 0 or q.shape[-1] != index.d1:
        raise ValueError(f"gated_retrieve: q must have shape (..., d1) with d1 = {index.d1} (the KeyIndex's), got {tuple(q.shape)}")
    if R.dim() != 2 or R.shape[0] != index.m:
        raise ValueError(f"gated_retrieve: R must have shape (m, d2) with m = {index.m} (the KeyIndex's rows), got {tuple(R.shape)}")
    if q.device != index.device or R.device != index.device:
        raise ValueError(f"gated_retrieve: q and R must be on the KeyIndex's device {index.device}, got q on {q.device}, R on {R.device}")
    if not isinstance(gamma, torch.Tensor):
        return check_gamma(gamma)
    if gamma.dtype != torch.float32 or gamma.shape != (index.m,) or gamma.device != index.device:
        raise ValueError(
            f"gated_retrieve: per-key gamma must be a float32 tensor of shape ({index.m},) on {index.device}, "
            f"one threshold per indexed key; got {gamma.dtype} of shape {tuple(gamma.shape)} on {gamma.device}"
        )
    return gamma.contiguous()


def retrieve(q: torch.Tensor, index: KeyIndex, R: torch.Tensor, gamma, *, backend: str = "auto") -> CompressedRetrieval:
    """gated_retrieve(q, K, R, gamma, backend=backend) through `index` (built from K), with the
    candidate counts; see the module docstring. Shapes and rules as gated_retrieve's, with the
    KeyIndex in place of K: q, R and a per-key gamma on index.device. No autograd here
    (gated_retrieve adds the gradient to R)."""
    if not isinstance(index, KeyIndex):
        raise TypeError(f"retrieve: index must be a KeyIndex, got {type(index).__name__}")
    gamma = _check_call(q, index, R, gamma)
    check_backend_name(backend)
    per_key = isinstance(gamma, torch.Tensor)
    if per_key:
        check_key_gamma_values(gamma)
    lead = q.shape[:-1]
    n, m = q[..., 0].numel(), index.m
    name = resolve_backend(backend, q.device, (q.dtype, index.key_dtype, R.dtype))
    if n == 0 or m == 0:  # nothing to scan: the full op's own answer
        from .gated_retrieve import _retrieve  # (gated_retrieve imports this module)

        out, found, score = _retrieve(q, index.keys.to(q.device), R, gamma, name)
        nothing = torch.zeros(lead, dtype=torch.int64, device=q.device)
        return CompressedRetrieval(out, found, score, nothing, nothing.bool(), name)
    record = get_backend(name)
    q2d = q.reshape(n, index.d1).contiguous()
    find = record.candidates if index.format in record.candidate_formats else reference_candidates
    sets = find(quantise_queries(q2d, index.format), index, index.budget())
    overflowed = sets.overflowed
    # sorted: the lowest-index tie rule carries over (one query's keys already are, and distinct)
    union = sets.keys if n == 1 else torch.unique(sets.keys)
    if union.numel() == 0:  # every key or every query row has NaN/Inf: any key gives that answer
        union = torch.zeros(1, dtype=torch.int64, device=q.device)
    out = index_out = score = None
    if not bool(overflowed.all()):
        keys = index.keys[union.to(index.key_device)].to(q.device)
        out, local, score = record.run(q2d, keys, R[union].contiguous(), gamma[union] if per_key else gamma)
        index_out = torch.where(local >= 0, union[local.clamp_min(0)], local)
    if bool(overflowed.any()):  # only the overflowed rows are scored over every key
        rows = torch.nonzero(overflowed).squeeze(1)
        full = record.run(q2d[rows].contiguous(), index.keys.to(q.device).contiguous(), R.contiguous(), gamma)
        if out is None:
            out, index_out, score = full
        else:
            out[rows], index_out[rows], score[rows] = full
    counts = torch.where(overflowed, m, sets.offsets[1:] - sets.offsets[:-1])
    d2 = R.shape[1]
    return CompressedRetrieval(
        out.reshape(*lead, d2), index_out.reshape(lead), score.reshape(lead), counts.reshape(lead), overflowed.reshape(lead), name
    )
