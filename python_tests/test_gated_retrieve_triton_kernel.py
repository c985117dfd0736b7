"""Triton-specific tests of the "triton" gated_retrieve backend: the split-m two-stage reduction,
tile and split boundaries, both dot paths (multiply + tl.sum for decode, tl.dot for prefill), the
strict fp32 gate and the bit-for-bit row copy. The generic contract tests live in
test_gated_retrieve.py; these drive the launcher with explicit tiles so that tiny shapes cross
many program boundaries. Without a GPU they run in Triton's interpreter (conftest.py sets
TRITON_INTERPRET=1), so every shape is tiny.

Reference and tolerance: the conftest fixtures `float64_cosines`, `cosine_tolerance` and
`assert_matches_reference` (float64 math on the exact input values, one derived bound).
"""

import os
import subprocess
import sys

import pytest
import torch

from neuraldb_kernels.ops import get_backend, triton_backend
from neuraldb_kernels.ops.triton_backend import LaunchConfig, launch, plan_launch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TRITON = get_backend("triton")
_WHY = TRITON.unavailable_reason(DEVICE)
pytestmark = [
    pytest.mark.skipif(_WHY is not None, reason=f"triton backend unavailable on {DEVICE}: {_WHY}"),
    # Inf * 0 inside the interpreter's numpy code warns; the kernel masks those lanes on purpose.
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]

DECODE_TILES = LaunchConfig(block_n=2, block_m=16, block_d=16, use_dot=False, num_splits=5)
PREFILL_TILES = LaunchConfig(block_n=16, block_m=16, block_d=32, use_dot=True, num_splits=3)


def random_case(n, m, d1, d2, q_dtype, k_dtype, r_dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d1, generator=gen)
    K = torch.randn(m, d1, generator=gen)
    R = torch.randn(m, d2, generator=gen)
    for row in range(0, n, 2):  # planted near-copies: open gates next to closed ones
        K[(7 * row + 3) % m] = q[row] * 0.7 + 0.2 * torch.randn(d1, generator=gen)
    return (q.to(q_dtype).to(DEVICE), K.to(k_dtype).to(DEVICE), R.to(r_dtype).to(DEVICE))


@pytest.mark.parametrize(
    "n,m,d1,q_dtype,k_dtype,r_dtype,config",
    [
        # decode path, 5 splits of 16-key blocks, d1 not a multiple of BLOCK_D
        (1, 300, 67, torch.float32, torch.float32, torch.float32, DECODE_TILES),
        (3, 7, 5, torch.bfloat16, torch.bfloat16, torch.bfloat16, DECODE_TILES),
        (3, 300, 130, torch.float16, torch.bfloat16, torch.float32, DECODE_TILES),
        # prefill path (tl.dot), padded query block, mixed dtypes
        (17, 300, 130, torch.bfloat16, torch.bfloat16, torch.float16, PREFILL_TILES),
        (17, 7, 67, torch.float32, torch.float16, torch.bfloat16, PREFILL_TILES),
        (3, 300, 5, torch.bfloat16, torch.float32, torch.float32, PREFILL_TILES),
    ],
)
def test_split_reduction_matches_float64_reference(
    assert_matches_reference, n, m, d1, q_dtype, k_dtype, r_dtype, config
):
    q, K, R = random_case(n, m, d1, 6, q_dtype, k_dtype, r_dtype, seed=n * m + d1)
    out, index, score = launch(q, K, R, 0.5, config)
    assert_matches_reference(q, K, R, 0.5, out, index, score)
    assert (index >= 0).any(), "the planted near-copies should open some gates"


def test_planned_launch_matches_reference(assert_matches_reference):
    """The heuristic tiles of `retrieve` (as the dispatcher runs it), decode and prefill."""
    for n in (1, 17):
        q, K, R = random_case(n, 300, 130, 5, torch.bfloat16, torch.bfloat16, torch.bfloat16, seed=n)
        assert_matches_reference(q, K, R, 0.4, *TRITON.retrieve(q, K, R, 0.4))


@pytest.mark.parametrize("config", [DECODE_TILES, PREFILL_TILES], ids=["decode", "prefill"])
def test_exact_ties_across_splits_pick_lowest_index(config):
    """Integer-valued vectors make every dot product and norm exact, so copies tie bit for bit."""
    gen = torch.Generator().manual_seed(5)
    m, d1 = 96, 20  # 6 key blocks of 16 -> 3 splits of 32 keys (decode) / 3 of 32 keys (prefill)
    K = torch.randint(-3, 4, (m, d1), generator=gen).float()
    target = torch.randint(-3, 4, (d1,), generator=gen).float()
    target[0] = 5.0  # not a copy of any random key
    # copies in the same block (33, 40), a later block of the same split (50) and later splits
    for row in (40, 50, 70, 95, 33):
        K[row] = target
    q = torch.stack([target, 2 * target, -target]).to(DEVICE)
    R = torch.randn(m, 3, generator=gen).to(DEVICE)
    out, index, score = launch(q, K.to(DEVICE), R, 0.9, config)
    assert index[:2].tolist() == [33, 33]
    assert torch.equal(out[:2].cpu(), R[[33, 33]].cpu())
    assert index[2] == -1


@pytest.mark.parametrize("config", [DECODE_TILES, PREFILL_TILES], ids=["decode", "prefill"])
def test_per_key_thresholds_of_exact_ties_across_splits(config, float64_cosines):
    """Copies of one key in three splits tie bit for bit (integer-valued vectors); the finalize
    stage reads the threshold of the lowest copy only, whatever the other copies' thresholds."""
    gen = torch.Generator().manual_seed(6)
    m, d1 = 96, 20
    K = torch.randint(-3, 4, (m, d1), generator=gen).float()
    target = torch.randint(-3, 4, (d1,), generator=gen).float()
    target[0] = 5.0
    for row in (33, 70, 95):  # splits 1 and 2 of 3
        K[row] = target
    q = torch.stack([target + torch.randint(-1, 2, (d1,), generator=gen).float(), 3 * target - 2])
    best, best_index = float64_cosines(q, K).max(dim=1)
    assert best_index.tolist() == [33, 33] and (best < 0.98).all(), "case changed"
    R = torch.randn(m, 3, generator=gen)
    gamma = torch.full((m,), -1.0)
    gamma[33] = 0.99  # the lowest copy closes the gate; the later copies would open it
    out, index, score = launch(q.to(DEVICE), K.to(DEVICE), R.to(DEVICE), gamma.to(DEVICE), config)
    assert index.tolist() == [-1, -1] and not out.cpu().any()
    gamma[33], gamma[70], gamma[95] = -1.0, 0.99, 0.99
    out, index, score = launch(q.to(DEVICE), K.to(DEVICE), R.to(DEVICE), gamma.to(DEVICE), config)
    assert index.tolist() == [33, 33] and torch.equal(out.cpu(), R[[33, 33]])


@pytest.mark.parametrize(
    "n,m,d1,config",
    [
        (3, 300, 67, DECODE_TILES),
        (17, 300, 130, PREFILL_TILES),
        (4, 40, 5, LaunchConfig(block_n=2, block_m=16, block_d=16, use_dot=False, num_splits=1)),
    ],
    ids=["decode", "prefill", "one-split"],
)
def test_per_key_thresholds_match_float64_reference(assert_matches_reference, float64_cosines, n, m, d1, config):
    q, K, R = random_case(n, m, d1, 4, torch.float32, torch.bfloat16, torch.float16, seed=n + m)
    best, best_index = float64_cosines(q, K).max(dim=1)
    gamma = torch.full((m,), 0.3)
    gamma[best_index] = (best + torch.where(torch.arange(n) % 3 == 0, 0.02, -0.02)).clamp(-1, 1).float()
    out, index, score = launch(q, K, R, gamma.to(DEVICE), config)
    assert_matches_reference(q, K, R, gamma, out, index, score)
    expected = torch.where(best > gamma.double()[best_index], best_index, -1)
    assert torch.equal(index.cpu(), expected) and (expected >= 0).any() and (expected == -1).any()


def test_zero_query_ties_every_key_and_takes_key_zero():
    """A zero query has cosine 0 with all keys (every split ties): with gamma < 0 key 0 wins."""
    q = torch.zeros(2, 9, device=DEVICE)
    q[1, 3] = 1.0
    K = torch.randn(80, 9, device=DEVICE)
    K[:, 3] = 0.0  # every key is orthogonal to q[1] too
    R = torch.randn(80, 4, device=DEVICE)
    out, index, score = launch(q, K, R, -0.5, DECODE_TILES)
    assert index.tolist() == [0, 0] and score.tolist() == [0.0, 0.0]
    assert torch.equal(out.cpu(), R[[0, 0]].cpu())


def test_nan_inf_and_zero_rows_across_splits(assert_matches_reference):
    gen = torch.Generator().manual_seed(9)
    K = torch.randn(70, 33, generator=gen)
    K[50] = 0.0  # a zero key: cosine 0, never the winner here
    q = torch.randn(6, 33, generator=gen)
    q[0, 32] = float("nan")
    q[1, 0] = float("inf")
    q[2, 16] = float("-inf")
    q[3] = 0.0
    K[64] = q[4] * 3  # the winner sits in the last split, near the end of its block
    q, K, R = q.to(DEVICE), K.to(DEVICE), torch.randn(70, 5, generator=gen).to(DEVICE)
    for config in (DECODE_TILES, PREFILL_TILES):
        out, index, score = launch(q, K, R, 0.3, config)
        assert index[:4].tolist() == [-1, -1, -1, -1] and torch.isnan(score[:3]).all()
        assert score[3] == 0.0 and index[4] == 64
        assert_matches_reference(q, K, R, 0.3, out, index, score)


@pytest.mark.parametrize("m", [15, 16, 17, 31, 33])
def test_winner_at_block_and_split_edges(m):
    """Winners at the first/last key of blocks and splits, with m around the 16-key block size."""
    gen = torch.Generator().manual_seed(m)
    d1 = 33  # BLOCK_D + 1: one full feature tile and a one-element tail
    K = torch.randn(m, d1, generator=gen)
    rows = sorted({0, m - 1, min(16, m - 1), 15 if m > 15 else 0})
    q = K[rows] * 2.0
    R = torch.randn(m, 3, generator=gen)
    config = LaunchConfig(block_n=4, block_m=16, block_d=32, use_dot=False, num_splits=2)
    out, index, score = launch(q.to(DEVICE), K.to(DEVICE), R.to(DEVICE), 0.99, config)
    assert index.tolist() == rows


def test_gate_is_strict_in_float32():
    gen = torch.Generator().manual_seed(3)
    K = torch.randn(40, 24, generator=gen).to(DEVICE)
    q = (K[17] + 0.3 * torch.randn(24, generator=gen).to(DEVICE))[None]
    R = torch.randn(40, 2, generator=gen).to(DEVICE)
    _, index, score = launch(q, K, R, -1.0, DECODE_TILES)
    s = score.item()  # a float32 value, so passing it as gamma is exact
    assert index.item() == 17
    assert launch(q, K, R, s, DECODE_TILES)[1].item() == -1
    below = torch.nextafter(torch.tensor(s), torch.tensor(-2.0)).item()
    assert launch(q, K, R, below, DECODE_TILES)[1].item() == 17


@pytest.mark.parametrize("r_dtype,bits", [(torch.bfloat16, torch.int16), (torch.float32, torch.int32)])
def test_selected_row_is_copied_bit_for_bit(r_dtype, bits):
    """Signalling-NaN payloads and -0.0 survive the copy (it moves integers, not floats)."""
    K = torch.eye(4, 8, device=DEVICE)
    q = K[[2, 3]].clone()
    raw = torch.arange(4 * 5, dtype=bits).reshape(4, 5)
    raw[2, 0] = 0x7F81 if bits == torch.int16 else 0x7F800001  # signalling NaN patterns
    raw[2, 1] = -0x8000 if bits == torch.int16 else -0x80000000  # -0.0
    R = raw.view(r_dtype).to(DEVICE)
    out, index, _ = launch(q, K, R, 0.5, DECODE_TILES)
    assert index.tolist() == [2, 3]
    assert torch.equal(out.view(bits).cpu(), raw[[2, 3]])


def test_plan_picks_dot_tiles_only_for_prefill_and_fills_splits():
    for n, use_dot in ((1, False), (8, False), (9, True), (300, True)):
        config = plan_launch(n, 100_000, 14336, DEVICE)
        assert config.use_dot is use_dot
        if use_dot:
            assert min(config.block_n, config.block_m, config.block_d) >= 16
        assert 1 <= config.num_splits <= -(-100_000 // config.block_m)
    assert plan_launch(1, 5, 3, DEVICE).num_splits == 1  # one key block: nothing to split


@pytest.fixture
def fake_h200(monkeypatch):
    """torch.cuda.get_device_properties answers 132 SMs and records each device it is asked
    about; the plan caches start and end empty."""
    asked = []

    class Properties:
        multi_processor_count = 132

    def get_device_properties(index):
        asked.append(index)
        return Properties()

    monkeypatch.setattr(torch.cuda, "get_device_properties", get_device_properties)
    triton_backend.target_programs.cache_clear()
    triton_backend._plan_for_buckets.cache_clear()
    yield asked
    triton_backend.target_programs.cache_clear()
    triton_backend._plan_for_buckets.cache_clear()


def test_launch_plan_is_cached_per_bucket_and_the_device_asked_once(fake_h200):
    gpu0, gpu1 = torch.device("cuda", 0), torch.device("cuda", 1)
    decode = plan_launch(1, 100_000, 1536, gpu0)
    assert decode.num_splits == 4 * 132 and not decode.use_dot
    for m in (65_537, 100_001, 131_072):  # the same m bucket: the very same plan object
        assert plan_launch(1, m, 1536, gpu0) is decode
    assert plan_launch(3, 5_000, 1536, gpu0).block_n == 4
    assert plan_launch(64, 100_000, 1536, gpu0).use_dot
    assert fake_h200 == [0]
    plan_launch(1, 100_000, 1536, gpu1)
    assert fake_h200 == [0, 1]
    assert triton_backend._plan_for_buckets.cache_info().misses == 4


def test_a_gpu_sized_plan_launches_correctly_on_fewer_keys(fake_h200, assert_matches_reference):
    """A plan made for a bucket (more splits than key blocks of the exact m) still covers every key."""
    config = plan_launch(2, 300, 40, torch.device("cuda", 0))
    assert config.num_splits > -(-300 // config.block_m)
    q, K, R = random_case(2, 300, 40, 3, torch.float32, torch.bfloat16, torch.float32, seed=21)
    K[299] = (q[1] * 4).to(K.dtype)
    out, index, score = launch(q, K, R, 0.5, config)
    assert_matches_reference(q, K, R, 0.5, out, index, score)
    assert index[1].item() == 299


def test_bad_launch_configs_and_float64_are_refused():
    q, K, R = torch.randn(1, 4, device=DEVICE), torch.randn(3, 4, device=DEVICE), torch.randn(3, 2, device=DEVICE)
    with pytest.raises(ValueError, match="tl.dot tiles need every side >= 16"):
        launch(q, K, R, 0.5, LaunchConfig(block_n=1, block_m=16, block_d=16, use_dot=True, num_splits=1))
    with pytest.raises(ValueError, match="num_splits must be in"):
        launch(q, K, R, 0.5, LaunchConfig(block_n=1, block_m=16, block_d=16, use_dot=False, num_splits=0))
    with pytest.raises(TypeError, match="K has dtype torch.float64"):
        TRITON.retrieve(q, K.double(), R, 0.5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the triton backend needs no interpreter")
def test_cpu_tensors_need_the_interpreter():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import torch; from neuraldb_kernels.ops import get_backend; "
        "print(get_backend('triton').unavailable_reason(torch.device('cpu')))"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "TRITON_INTERPRET=1 was not set before triton was imported" in result.stdout


# Ahead-of-time compilation for real GPUs: the interpreter accepts code that the GPU compiler may
# reject (tile shapes, dtypes of tl.dot, int64 loop bounds), so the kernels are also compiled to
# cubins for sm_80 and sm_90 here, in a child process where TRITON_INTERPRET is unset.
_AOT_SCRIPT = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from neuraldb_kernels.ops import triton_backend as tb

assert not tb._interpreting()
stage1 = dict(part_score_ptr="*fp32", part_index_ptr="*i64", n="i32", m="i32", d1="i32",
              keys_per_split="i32", num_splits="i32")
tiles = ("BLOCK_N", "BLOCK_M", "BLOCK_D", "USE_DOT", "DOT_IN_FP32")
for arch in (80, 90):
    target = GPUTarget("cuda", arch, 32)
    for q, k, config, wants_mma in (
        ("bf16", "bf16", (1, 32, 256, False, False), False),   # decode
        ("bf16", "bf16", (64, 64, 64, True, False), True),     # prefill, native tensor-core tiles
        ("fp32", "fp16", (16, 64, 64, True, True), False),     # prefill, mixed dtypes in fp32
    ):
        signature = dict(q_ptr="*" + q, k_ptr="*" + k, **stage1, **{t: "constexpr" for t in tiles})
        src = ASTSource(fn=tb._partial_best_kernel, signature=signature, constexprs=dict(zip(tiles, config)))
        ptx = triton.compile(src, target=target, options={"num_warps": 4}).asm["ptx"]
        assert ("mma" in ptx) == wants_mma, (arch, q, k, config)
    for per_key in (False, True):  # one gamma; per-key thresholds (a pointer, else None)
        signature = dict(part_score_ptr="*fp32", part_index_ptr="*i64", r_bits_ptr="*i16", out_bits_ptr="*i16",
                         index_ptr="*i64", score_ptr="*fp32", num_splits="i32", d2="i32", gamma="fp32",
                         key_gamma_ptr="*fp32" if per_key else "constexpr", BLOCK_S="constexpr",
                         BLOCK_D2="constexpr", PER_KEY="constexpr")
        constexprs = dict(BLOCK_S=1024, BLOCK_D2=1024, PER_KEY=per_key)
        if not per_key:
            constexprs["key_gamma_ptr"] = None
        src = ASTSource(fn=tb._finalize_kernel, signature=signature, constexprs=constexprs)
        triton.compile(src, target=target, options={"num_warps": 4})
print("compiled")
"""


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the kernels compile and run for real above")
def test_kernels_compile_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9's default, stated to silence its warning
    result = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-4000:]
