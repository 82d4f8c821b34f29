"""compress_kv kernel against its naive twin and the plain op.

CPU: the Triton interpreter on small odd shapes; GPU (marked): the kernel compiled, at real shapes.
Tolerance (`assert_few_flips`): the kernel pools in another summation order (online softmax over
row tiles, split over programs by entries and channels) than the plain op and the float64 naive
twin, so a value lying on a quantization boundary may round to the neighbouring code: at most max(4, 1%) of the values may differ, each by at most half
of the larger magnitude (one FP8 / FP4 / BF16 code step) or between 0 and a nonzero code, NaN positions
equal. On the CPU the kernel has so far matched both the plain op and the naive twin bit for bit at every test shape (0 flips;
asserted with the tolerance all the same, as compiled GPU code may differ).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel import (conftest does it too)

import pytest  # noqa: E402
from torch.fx.experimental.proxy_tensor import make_fx  # noqa: E402

import dsv4_compile.model.ops  # noqa: E402,F401  (registers torch.ops.dsv4.*)
from dsv4_compile.kernels.compress_kv import CompressKVConfig, compress_kv, naive  # noqa: E402
from helpers import assert_few_flips  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-6


def make_inputs(B, T, d, R, ratio, N, overlap, cos_batched=False, dtype=torch.float32, seed=0, n_inf=3):
    g = torch.Generator().manual_seed(seed)
    C = 2 * d if overlap else d
    kv = torch.randn(B, T, C, generator=g) * 2
    score = torch.randn(B, T, C, generator=g)
    for j in range(n_inf):  # absent tokens on some channels
        b, t = j % B, int(torch.randint(0, max(T, 1), (1,), generator=g))
        if T:
            score[b, t, j * 3: j * 3 + 7] = float("-inf")
    ape = torch.randn(ratio, C, generator=g) * 0.5
    w = torch.rand(d, generator=g) + 0.5
    shape = (B, N, R // 2) if cos_batched else (N, R // 2)
    ang = torch.rand(shape, generator=g) * 6.3
    return (kv.to(dtype).to(DEVICE), score.to(dtype).to(DEVICE), ape.to(DEVICE), w.to(DEVICE),
            ang.cos().to(DEVICE), ang.sin().to(DEVICE))


CASES = [  # (d, R, quant, overlap, ratio, T, N, cos_batched)
    pytest.param(80, 16, "fp8", True, 4, 10, 4, False, id="fp8-overlap-r4-T10-N4"),
    pytest.param(80, 16, "fp8", False, 3, 7, 4, True, id="fp8-r3-T7-N4-cosB"),
    pytest.param(128, 64, "fp8", False, 5, 9, 2, False, id="fp8-d128-R64-r5"),
    pytest.param(32, 8, "hadamard_fp4", True, 3, 8, 4, True, id="fp4-overlap-r3-T8-N4-cosB"),
    pytest.param(32, 8, "hadamard_fp4", False, 4, 6, 3, False, id="fp4-r4-T6-N3"),
    pytest.param(64, 16, "hadamard_fp4", True, 1, 3, 3, False, id="fp4-overlap-r1"),
]


@pytest.mark.parametrize("d,R,quant,overlap,ratio,T,N,cos_batched", CASES)
def test_matches_plain_and_naive(d, R, quant, overlap, ratio, T, N, cos_batched):
    args = make_inputs(2, T, d, R, ratio, N, overlap, cos_batched, seed=d + ratio)
    out = compress_kv(*args, ratio, overlap, EPS, quant)
    assert out.shape == (2, N, d)
    plain = torch.ops.dsv4.compress_kv(*args, ratio, overlap, EPS, quant)
    assert_few_flips("vs plain", plain, out)
    assert_few_flips("vs naive", naive.compress_kv(*args, ratio, overlap, EPS, quant), out)
    # blocks with no token present (and, with overlap, no previous token either) give exactly 0
    for i in range(N):
        if i * ratio >= T and (not overlap or (i - 1) * ratio >= T):
            assert not out[:, i].any(), f"entry {i} should be empty"


def test_bf16_inputs_and_all_absent_block():
    kv, score, ape, w, cos, sin = make_inputs(2, 9, 80, 16, 3, 3, True, dtype=torch.bfloat16, seed=3)
    score[1, 3:6] = float("-inf")  # block 1 of batch 1: every token absent (channels [d,2d) too)
    out = compress_kv(kv, score, ape, w, cos, sin, 3, True, EPS, "fp8")
    assert_few_flips("bf16 vs plain", torch.ops.dsv4.compress_kv(kv, score, ape, w, cos, sin, 3, True, EPS, "fp8"), out)
    # no overlap: block 1 of batch 1 pools nothing -> exactly 0
    kv2, score2 = kv[..., :80].contiguous(), score[..., :80].contiguous()
    out2 = compress_kv(kv2, score2, ape[:, :80].contiguous(), w, cos, sin, 3, False, EPS, "fp8")
    assert not out2[1, 1].any()
    assert_few_flips("bf16 no overlap", torch.ops.dsv4.compress_kv(kv2, score2, ape[:, :80].contiguous(), w, cos, sin,
                                                                    3, False, EPS, "fp8"), out2)


def test_config_api_and_input_checks():
    cfg = CompressKVConfig.from_str("block_r=4,block_c=64,num_warps=2")
    assert (cfg.block_r, cfg.block_c, cfg.num_warps) == (4, 64, 2) and CompressKVConfig.from_str(cfg.to_str()) == cfg
    with pytest.raises(ValueError, match="power of two"):
        CompressKVConfig(block_r=3)
    with pytest.raises(ValueError, match="power of two"):
        CompressKVConfig(block_c=48)
    args = make_inputs(1, 7, 80, 16, 3, 3, False, seed=5)
    ref = torch.ops.dsv4.compress_kv(*args, 3, False, EPS, "fp8")
    for config in ("block_r=1", {"block_r": 2}, "block_r=64", "block_r=8,block_c=16", "block_c=2048"):
        assert_few_flips(f"config {config}", ref, compress_kv(*args, 3, False, EPS, "fp8", config))

    kv, score, ape, w, cos, sin = args
    with pytest.raises(ValueError, match="quant 'fp6'"):
        compress_kv(*args, 3, False, EPS, "fp6")
    with pytest.raises(ValueError, match="multiple of 64"):
        compress_kv(kv, score, ape, w, cos[:, :4].contiguous(), sin[:, :4].contiguous(), 3, False, EPS, "fp8")
    with pytest.raises(ValueError, match="power of two"):
        compress_kv(*args, 3, False, EPS, "hadamard_fp4")
    with pytest.raises(ValueError, match="ape has shape"):
        compress_kv(kv, score, ape[:2].contiguous(), w, cos, sin, 3, False, EPS, "fp8")
    with pytest.raises(ValueError, match="score is torch.int32"):
        compress_kv(kv, score.int(), ape, w, cos, sin, 3, False, EPS, "fp8")
    with pytest.raises(ValueError, match="overlap needs an even"):
        compress_kv(kv[..., :79].contiguous(), score[..., :79].contiguous(), ape[:, :79].contiguous(), w, cos, sin,
                    3, True, EPS, "fp8")


def test_tiles_follow_the_config():
    from dsv4_compile.kernels.compress_kv.config import tiles
    cfg = CompressKVConfig(block_r=32, block_c=32)
    assert tiles(cfg, 512, 4, 2048) == (8, 4, 32)       # CSA: 8 entries of 4 rows a program
    assert tiles(cfg, 512, 128, 64) == (1, 32, 32)      # HCA: one entry, 4 steps of 32 rows
    assert tiles(cfg, 128, 4, 3) == (4, 4, 32)          # entries clamped to next_pow2(N)
    assert tiles(CompressKVConfig(block_r=2, block_c=1024), 80, 3, 9) == (1, 2, 128)


@pytest.mark.parametrize("d,R,quant,overlap,ratio,T,N", [
    pytest.param(80, 16, "fp8", True, 3, 20, 7, id="fp8-overlap-r3"),
    pytest.param(80, 16, "fp8", False, 16, 45, 4, id="fp8-r16"),
    pytest.param(64, 16, "hadamard_fp4", True, 4, 21, 6, id="fp4-overlap-r4"),
])
def test_channel_and_entry_split(d, R, quant, overlap, ratio, T, N):
    """Programs that own several entries (a partial last group) and part of the channels (a partial
    last block): the pooling is per (entry, channel), so on the CPU the output equals that of one
    program per entry holding every channel bit for bit, for the same block_r (the row steps)."""
    args = make_inputs(2, T, d, R, ratio, N, overlap, seed=T, n_inf=6)
    plain = torch.ops.dsv4.compress_kv(*args, ratio, overlap, EPS, quant)
    for block_r in (4, 16):
        whole = compress_kv(*args, ratio, overlap, EPS, quant, f"block_r={block_r},block_c=1024")
        for block_c in (16, 32):
            out = compress_kv(*args, ratio, overlap, EPS, quant, f"block_r={block_r},block_c={block_c}")
            assert_few_flips(f"block_r={block_r},block_c={block_c}", plain, out)
            if DEVICE == "cpu":
                assert torch.equal(out, whole), f"block_r={block_r},block_c={block_c}"


def test_torch_op_and_substitution():
    """The dsv4_triton op, and the pass: 1 node substituted, numbers vs eager."""
    from dsv4_compile.passes.kernel_substitutions.compress_kv import SUBSTITUTION, interpreter_substitution
    from dsv4_compile.passes import PassManager

    args = make_inputs(1, 8, 32, 8, 4, 2, True, seed=9)
    ref = torch.ops.dsv4.compress_kv(*args, 4, True, EPS, "hadamard_fp4")
    assert_few_flips("op", ref, torch.ops.dsv4_triton.compress_kv(*args, 4, True, EPS, "hadamard_fp4", ""))

    def fn(kv, score, ape, w, cos, sin):
        return torch.ops.dsv4.compress_kv(kv * 2, score, ape, w, cos, sin, 4, True, EPS, "hadamard_fp4")

    sub = SUBSTITUTION if DEVICE == "cuda" else interpreter_substitution()
    gm = make_fx(fn, tracing_mode="fake")(*args)
    manager = PassManager([sub], gpu="H100" if DEVICE == "cuda" else "cpu")
    manager(gm.graph)
    gm.recompile()
    before, after = manager.graph_ops[0]["before"], manager.graph_ops[0]["after"]
    assert before["dsv4.compress_kv.default"] == 1 and "dsv4.compress_kv.default" not in after
    assert manager.report.replaced("dsv4.compress_kv") == 1
    assert_few_flips("substituted graph", fn(*args), gm(*args))
    if DEVICE == "cpu":  # the registered substitution declines CPU tensors, with its reason
        gm = make_fx(fn, tracing_mode="fake")(*args)
        manager = PassManager([SUBSTITUTION], gpu="cpu")
        manager(gm.graph)
        assert "needs CUDA tensors" in manager.report.left_alone()[0].reason


def test_op_schema_and_opcheck():
    ours = torch.ops.dsv4_triton.compress_kv.default._schema
    plain = torch.ops.dsv4.compress_kv.default._schema
    assert [a.name for a in ours.arguments] == [a.name for a in plain.arguments] + ["config"]
    assert [str(a.type) for a in ours.arguments[:-1]] == [str(a.type) for a in plain.arguments]
    args = make_inputs(1, 5, 80, 16, 2, 3, False, seed=11)
    torch.library.opcheck(torch.ops.dsv4_triton.compress_kv.default, (*args, 2, False, EPS, "fp8", ""),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


# ================================================================================================
# GPU: real shapes (d=512 / R=64 FP8 main cache at ratio 4 with overlap and ratio 128; d=128
# Hadamard+FP4 indexer cache)
# ================================================================================================

@pytest.mark.gpu
@pytest.mark.parametrize("d,R,quant,overlap,ratio", [
    pytest.param(512, 64, "fp8", True, 4, id="main-r4-overlap"),
    pytest.param(512, 64, "fp8", False, 128, id="main-r128"),
    pytest.param(128, 64, "hadamard_fp4", True, 4, id="indexer-r4-overlap"),
])
def test_gpu_real_shapes(d, R, quant, overlap, ratio):
    B, T = 2, 4096 + ratio // 2 + 1
    N = T // ratio + 2  # a partial block and an empty one
    args = make_inputs(B, T, d, R, ratio, N, overlap, cos_batched=False, seed=ratio, n_inf=50)
    ref = torch.ops.dsv4.compress_kv(*args, ratio, overlap, EPS, quant)
    for config in (None, "block_r=4", "block_r=16,num_warps=8", "block_r=128,block_c=16,num_warps=8",
                   "block_r=8,block_c=512,num_stages=1"):
        out = compress_kv(*args, ratio, overlap, EPS, quant, config)
        assert not torch.isnan(out).any(), f"{config}: NaN outputs"
        assert_few_flips(f"{d} {quant} r{ratio} {config}", ref, out)
    assert_few_flips("vs naive (2 entries)", naive.compress_kv(args[0][:1, :2 * ratio], args[1][:1, :2 * ratio], *args[2:4],
                                                               args[4][:2], args[5][:2], ratio, overlap, EPS, quant),
                     out[:1, :2])
