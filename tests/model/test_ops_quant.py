"""FP8 e4m3 and FP4 e2m1 blockwise quantization ops (torch.ops.dsv4.fp8_* / fp4_*) against the naive
twins in naive_ops.py, the grid, the tie rules and the documented NaN/Inf behaviour.

Tolerances: codes and scales are compared bit for bit (the contract fixes every rounding: scale =
float32 max(amax, floor) / qmax (floor 1e-4 for FP8, 6 * 2^-126 for FP4, as DeepSeek), exact power-of-two ceiling, float32 quotient, nearest code with ties to
even). Dequantized values are code * scale rounded once to float32, so they are compared exactly too.
Quantization error itself is judged by SQNR on Gaussian data: e4m3 keeps 3 mantissa bits (about 31 dB
with block scales), e2m1 one (about 18-19 dB); the bars are 28 and 15 dB.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import dsv4_compile.model.ops as ops  # noqa: F401  (registers torch.ops.dsv4.*)
import naive_ops as naive
from helpers import sqnr_db

dsv4 = torch.ops.dsv4

# (shape, block_size): odd leading dims, several blocks per row, block sizes that are not 32/64/128.
SHAPES = [
    pytest.param((5, 96), 32, id="5x96-bs32"),
    pytest.param((3, 7, 128), 64, id="3x7x128-bs64"),
    pytest.param((2, 1, 3, 56), 8, id="2x1x3x56-bs8"),
    pytest.param((11, 72), 24, id="11x72-bs24"),
    pytest.param((1, 128), 128, id="1x128-bs128"),
]
# Every dtype the quantizers accept ("any float dtype"): the values are converted to float32 first.
DTYPES = [pytest.param(t, id=str(t).split(".")[-1]) for t in (torch.float32, torch.bfloat16, torch.float16, torch.float64)]
POW2 = [pytest.param(False, id="scale"), pytest.param(True, id="pow2")]


def spread_input(shape, block_size, dtype, seed=0) -> torch.Tensor:
    """Gaussian values whose blocks span 1e-6 .. 1e3 in magnitude (so that the 1e-4 amax floor, tiny
    and large scales all occur), with one all-zero block."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    n_blocks = shape[-1] // block_size
    mags = 10.0 ** torch.empty(*shape[:-1], n_blocks).uniform_(-6, 3, generator=g)
    x = x * mags.repeat_interleave(block_size, -1)
    x.view(-1, shape[-1])[0, :block_size] = 0.0
    if dtype == torch.float16:
        x = x.clamp(-6e4, 6e4)
    return x.to(dtype)


# ------------------------------------------------------------------------------------------------
# Against the naive twins: bit-exact codes and scales
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pow2", POW2)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,bs", SHAPES)
def test_fp8_matches_naive(shape, bs, dtype, pow2):
    x = spread_input(shape, bs, dtype)
    codes, scale = dsv4.fp8_quantize(x, bs, pow2)
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == (*shape[:-1], shape[-1] // bs)
    ref_codes, ref_scale = naive.fp8_quantize(x, bs, pow2)
    assert torch.equal(scale, ref_scale), "fp8 scales differ from the naive ones"
    mismatch = (codes.view(torch.uint8) != ref_codes).sum().item()
    assert mismatch == 0, f"{mismatch} of {codes.numel()} fp8 codes differ from the naive ones"
    out = dsv4.fp8_dequantize(codes, scale, bs)
    assert out.dtype == torch.float32
    assert torch.equal(out, naive.fp8_dequantize(ref_codes, ref_scale, bs).float())


@pytest.mark.parametrize("pow2", POW2)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,bs", SHAPES)
def test_fp4_matches_naive(shape, bs, dtype, pow2):
    x = spread_input(shape, bs, dtype, seed=1)
    packed, scale = dsv4.fp4_quantize(x, bs, pow2)
    assert packed.dtype == torch.uint8 and packed.shape == (*shape[:-1], shape[-1] // 2)
    ref_packed, ref_scale = naive.fp4_quantize(x, bs, pow2)
    assert torch.equal(scale, ref_scale), "fp4 scales differ from the naive ones"
    mismatch = (packed != ref_packed).sum().item()
    assert mismatch == 0, f"{mismatch} of {packed.numel()} fp4 bytes differ from the naive ones"
    out = dsv4.fp4_dequantize(packed, scale, bs)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert torch.equal(out, naive.fp4_dequantize(ref_packed, ref_scale, bs).float())


def test_fp4_default_pow2_is_false():
    x = spread_input((4, 64), 32, torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(dsv4.fp4_quantize(x, 32), dsv4.fp4_quantize(x, 32, False)))


# ------------------------------------------------------------------------------------------------
# SQNR on Gaussian data
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pow2", POW2)
@pytest.mark.parametrize("bs", [32, 64, 128])
def test_sqnr_gaussian(bs, pow2):
    x = torch.randn(128, 1024, generator=torch.Generator().manual_seed(2))
    codes, scale = dsv4.fp8_quantize(x, bs, pow2)
    fp8 = sqnr_db(x, dsv4.fp8_dequantize(codes, scale, bs))
    packed, scale4 = dsv4.fp4_quantize(x, bs, pow2)
    fp4 = sqnr_db(x, dsv4.fp4_dequantize(packed, scale4, bs))
    assert fp8 >= 28.0, f"FP8 SQNR {fp8:.1f} dB < 28 dB"
    assert fp4 >= 15.0, f"FP4 SQNR {fp4:.1f} dB < 15 dB"


# ------------------------------------------------------------------------------------------------
# Values already on the grid: exact codes, exact values
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pow2", POW2)
@pytest.mark.parametrize("exponent", [-20, -7, 0, 5])
def test_fp8_on_grid_is_exact(exponent, pow2):
    """Each block holds +-448 * 2^e (so the scale is exactly 2^e) and random grid codes."""
    g = torch.Generator().manual_seed(3)
    bs, n_blocks = 32, 6
    code = torch.randint(0, 256, (n_blocks, bs), generator=g, dtype=torch.uint8)
    code[(code & 0x7F) == 0x7F] = 0x7E  # no NaN codes
    code[:, 0] = torch.where(torch.rand(n_blocks, generator=g) < 0.5, 0x7E, 0xFE).to(torch.uint8)  # +-448
    grid = torch.tensor([naive.e4m3_value(int(c)) for c in code.flatten()]).view(n_blocks, bs)
    x = (grid * 2.0 ** exponent).float().flatten()
    codes, scale = dsv4.fp8_quantize(x, bs, pow2)
    assert torch.equal(scale, torch.full((n_blocks,), 2.0 ** exponent))
    same = (codes.view(torch.uint8).view(n_blocks, bs) == code) | ((code & 0x7F) == 0)  # +-0 both fine
    assert same.all(), f"{int((~same).sum())} on-grid codes changed"
    assert torch.equal(dsv4.fp8_dequantize(codes, scale, bs), x)


@pytest.mark.parametrize("pow2", POW2)
@pytest.mark.parametrize("exponent", [-14, -3, 0, 4])  # 6 * 2^-14 is above the 1e-4 amax floor
def test_fp4_on_grid_is_exact(exponent, pow2):
    g = torch.Generator().manual_seed(4)
    bs, n_blocks = 16, 5
    code = torch.randint(0, 16, (n_blocks, bs), generator=g, dtype=torch.uint8)
    code[code == 8] = 0  # -0 quantizes to +0 by the documented sign rule (y < 0)
    code[:, 3] = 7       # +6: the block's amax, so the scale is exactly 2^e
    x = (torch.tensor([naive.fp4_value(int(c)) for c in code.flatten()]) * 2.0 ** exponent).float()
    packed, scale = dsv4.fp4_quantize(x, bs, pow2)
    assert torch.equal(scale, torch.full((n_blocks,), 2.0 ** exponent))
    codes = torch.stack([packed & 0xF, packed >> 4], -1).flatten()
    assert torch.equal(codes, code.flatten())
    assert torch.equal(dsv4.fp4_dequantize(packed, scale, bs), x)


def test_pow2_scales_below_amax_round_trip_exactly():
    """A pow2 block whose amax is well below 448 * scale still round-trips (the scale only shrinks)."""
    x = torch.tensor([naive.e4m3_value(c) for c in range(0, 0x60)], dtype=torch.float32) * 2.0 ** -9
    codes, scale = dsv4.fp8_quantize(x, x.numel(), True)
    assert torch.equal(dsv4.fp8_dequantize(codes, scale, x.numel()), x)


# ------------------------------------------------------------------------------------------------
# Tie rules and the power-of-two ceiling
# ------------------------------------------------------------------------------------------------

FP4_TIES = [  # (x / scale, expected code): ties go to the even code
    (0.25, 0), (0.75, 2), (1.25, 2), (1.75, 4), (2.5, 4), (3.5, 6), (5.0, 6),
    (-0.25, 8), (-0.75, 10), (-1.25, 10), (-1.75, 12), (-2.5, 12), (-3.5, 14), (-5.0, 14),
    (0.2500001, 1), (2.4999998, 4), (2.5000002, 5), (7.0, 7), (-100.0, 15), (-0.0, 0), (0.0, 0),
]


@pytest.mark.parametrize("pow2", POW2)
def test_fp4_ties_to_even(pow2):
    vals = [6.0] + [v for v, _ in FP4_TIES]  # amax 6 -> scale exactly 1 in both modes
    vals += [0.0] * (-len(vals) % 2)
    x = torch.tensor(vals, dtype=torch.float32)
    x[x.abs() > 6] = x[x.abs() > 6].clamp(-6, 6)  # keep amax 6 (7 and -100 are checked via fp4_codes)
    packed, scale = dsv4.fp4_quantize(x, x.numel(), pow2)
    assert scale.item() == 1.0
    codes = torch.stack([packed & 0xF, packed >> 4], -1).flatten()[1:len(FP4_TIES) + 1].tolist()
    expect = [c if abs(v) <= 6 else (7 if v > 0 else 15) for v, c in FP4_TIES]
    assert codes == expect
    # the documented examples, as values
    out = dsv4.fp4_dequantize(packed, scale, x.numel())[1:].tolist()
    for v, want in [(0.25, 0.0), (0.75, 1.0), (2.5, 2.0), (5.0, 4.0), (-0.25, -0.0), (-0.75, -1.0), (-2.5, -2.0), (-5.0, -4.0)]:
        assert out[[t for t, _ in FP4_TIES].index(v)] == want
    # the code function by itself, beyond the grid, and the naive rule, on the same values
    y = torch.tensor([v for v, _ in FP4_TIES], dtype=torch.float32)
    assert ops.fp4_codes(y).tolist() == [c for _, c in FP4_TIES] == [naive.fp4_code(v) for v in y.tolist()]


FP8_TIES = [  # (x / scale, expected e4m3 value)
    (1.0625, 1.0), (1.1875, 1.25), (1.3125, 1.25), (-1.0625, -1.0), (2.0 ** -10, 0.0),
    (3 * 2.0 ** -10, 2.0 ** -8), (5 * 2.0 ** -10, 2.0 ** -8), (240.0 + 8, 256.0), (432.0, 448.0), (416.0, 416.0),
]


def test_fp8_ties_to_even():
    x = torch.tensor([448.0] + [v for v, _ in FP8_TIES], dtype=torch.float32)
    codes, scale = dsv4.fp8_quantize(x, x.numel(), False)
    assert scale.item() == 1.0
    assert codes.float()[1:].tolist() == [w for _, w in FP8_TIES]


def test_amax_floor_is_deepseeks_per_format():
    """DeepSeek floors the amax at 6 * 2^-126 for FP4 (fp4_act_quant) and at 1e-4 for FP8 (act_quant):
    blocks with amax below 1e-4 keep their own scale in FP4 (so they survive), not in FP8."""
    x = torch.zeros(4, 32)
    x[1, 0], x[2, :] = 3e-30, 1e-6
    x[3, 5] = 2e-5
    _, s4 = dsv4.fp4_quantize(x, 32, True)
    _, s8 = dsv4.fp8_quantize(x, 32, True)
    def deepseek(amax: float, qmax: float, floor: float) -> float:
        return 2.0 ** math.ceil(math.log2(max(amax, floor) / qmax))
    amaxes = [0.0, 3e-30, 1e-6, 2e-5]
    assert s4.squeeze(-1).tolist() == [deepseek(torch.tensor(a).item(), 6.0, 6 * 2.0 ** -126) for a in amaxes]
    assert s8.squeeze(-1).tolist() == [deepseek(torch.tensor(a).item(), 448.0, 1e-4) for a in amaxes]
    assert s4[0].item() == 2.0 ** -126 and s8[0].item() == 2.0 ** -22
    # the tiny FP4 blocks dequantize to nonzero values; under the FP8 floor (2^-22 scale) 3e-30 rounds to 0
    sim4 = dsv4.fp4_dequantize(*dsv4.fp4_quantize(x, 32, True), 32)
    assert sim4[1, 0] > 0 and (sim4[2] > 0).all()
    assert (dsv4.fp8_dequantize(*dsv4.fp8_quantize(x, 32, True), 32)[1] == 0).all()


@pytest.mark.parametrize("qmax,quant", [(448.0, "fp8"), (6.0, "fp4")])
def test_pow2_scale_is_a_true_ceiling(qmax, quant):
    """For amax just above qmax * 2^k the scale must be 2^(k+1) (float32 log2 rounds such scales to the
    integer k; ops.py corrects for it), just below or at it 2^k."""
    amaxes, want = [], []
    for k in range(-20, 8):
        p = torch.tensor(2.0 ** k * qmax, dtype=torch.float32)
        for v in (p, torch.nextafter(p, torch.tensor(math.inf)), torch.nextafter(p, torch.tensor(0.0))):
            amaxes.append(v.item())
            want.append(naive.block_scale([v.item()], qmax, True))
    x = torch.zeros(len(amaxes), 4)
    x[:, 1] = torch.tensor(amaxes)
    q = dsv4.fp8_quantize if quant == "fp8" else dsv4.fp4_quantize
    _, scale = q(x, 4, True)
    assert scale.squeeze(-1).tolist() == want


# ------------------------------------------------------------------------------------------------
# NaN / Inf, exactly as the docstrings define them
# ------------------------------------------------------------------------------------------------

def special_input():
    """Four blocks of 8: a NaN block, a +Inf block, a -Inf block, a finite block."""
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(5))
    x[0, 3] = math.nan
    x[1, 5] = math.inf
    x[2, 0] = -math.inf
    return x.flatten()


@pytest.mark.parametrize("pow2", POW2)
def test_fp8_nan_inf(pow2):
    x = special_input()
    codes, scale = dsv4.fp8_quantize(x, 8, pow2)
    f = codes.float().view(4, 8)
    assert math.isnan(scale[0]) and f[0].isnan().all(), "a NaN block: scale NaN, all codes NaN"
    for blk, pos in ((1, 5), (2, 0)):
        assert scale[blk] == math.inf, "an Inf block: scale +Inf"
        assert f[blk, pos].isnan(), "its infinite elements: NaN codes"
        rest = torch.cat([f[blk, :pos], f[blk, pos + 1:]])
        assert (rest == 0).all(), "its finite elements: 0"
    assert torch.isfinite(scale[3]) and torch.isfinite(f[3]).all(), "other blocks unaffected"
    ref_codes, ref_scale = naive.fp8_quantize(x, 8, pow2)
    assert torch.equal(scale.isnan(), ref_scale.isnan()) and torch.equal(scale[1:], ref_scale[1:])
    nan = codes.float().isnan()
    assert torch.equal(codes.view(torch.uint8)[~nan], ref_codes[~nan])
    assert torch.equal(nan, (ref_codes & 0x7F) == 0x7F)


@pytest.mark.parametrize("pow2", POW2)
def test_fp4_nan_inf(pow2):
    x = special_input()
    packed, scale = dsv4.fp4_quantize(x, 8, pow2)
    assert math.isnan(scale[0]) and scale[1] == math.inf and scale[2] == math.inf and torch.isfinite(scale[3])
    # NaN -> +0 code, x / inf -> +-0 -> code 0 (sign only for y < 0): all codes of blocks 0..2 are 0
    assert (packed.view(4, 4)[:3] == 0).all()
    out = dsv4.fp4_dequantize(packed, scale, 8).view(4, 8)
    assert out[:3].isnan().all(), "a block with a non-finite scale dequantizes to NaN"
    assert torch.isfinite(out[3]).all()
    ref_packed, ref_scale = naive.fp4_quantize(x, 8, pow2)
    assert torch.equal(packed, ref_packed)
    assert torch.equal(scale.isnan(), ref_scale.isnan()) and torch.equal(scale[1:], ref_scale[1:])


# ------------------------------------------------------------------------------------------------
# Errors, fake implementations, the QAT simulators
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fake", [False, True], ids=["real", "fake"])
def test_bad_block_size_raises(fake):
    x = torch.randn(3, 100)
    mode = FakeTensorMode() if fake else None
    if fake:
        x = mode.from_tensor(x)
        mode.__enter__()
    try:
        with pytest.raises(ValueError, match="fp8_quantize: last dim 100 is not divisible by block_size 64"):
            dsv4.fp8_quantize(x, 64, False)
        with pytest.raises(ValueError, match="fp4_quantize: last dim 100 is not divisible"):
            dsv4.fp4_quantize(x, 32, True)
        with pytest.raises(ValueError, match=r"fp4_quantize: .*(even.*block_size 5|block_size 5.*even)"):
            dsv4.fp4_quantize(x[..., :10], 5, True)
    finally:
        if fake:
            mode.__exit__(None, None, None)


@pytest.mark.parametrize("kind", ["fp8", "fp8_round", "fp4"])
def test_simulate_forward_and_straight_through_grad(kind):
    """fp8_round (plain code, for the window rows) gives fp8_simulate's (the ops') numbers bit for bit."""
    x = spread_input((3, 128), 64, torch.float32).requires_grad_()
    sim = {"fp8": ops.fp8_simulate, "fp8_round": ops.fp8_round}[kind](x, 64) if kind != "fp4" else ops.fp4_simulate(x, 32)
    ref = naive.fp8_simulate(x.detach(), 64) if kind != "fp4" else naive.fp4_simulate(x.detach(), 32)
    assert sim.dtype == x.dtype and torch.equal(sim.detach(), ref.float())
    g = torch.randn_like(x)
    sim.backward(g)
    assert torch.equal(x.grad, g), "the simulation's backward is the identity"


def _bf16_cases() -> torch.Tensor:
    """Random bits over every exponent (subnormals included), the exact ties of each rounding direction,
    the largest finite float (rounds to inf in bf16), infinities and zeros of both signs."""
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-2**31, 2**31, (1 << 16,), generator=g, dtype=torch.int64).to(torch.int32)
    ties = torch.tensor([0x3F808000, 0x3F818000, 0x00008000, 0x00018000, 0x7F7F8000], dtype=torch.int32)
    x = torch.cat([bits.view(torch.float32), ties.view(torch.float32), -ties.view(torch.float32),
                   torch.tensor([3.4028235e38, -3.4028235e38, float("inf"), float("-inf"), 0.0, -0.0])])
    return x[~torch.isnan(x)]


def test_bf16_round_is_the_cast():
    """ops.bf16_round (float arithmetic no compiler drops) equals the cast round trip bit for bit:
    nearest, ties to even, subnormals, overflow to inf, infinities, signed zeros; NaN stays NaN."""
    x = _bf16_cases()
    assert torch.equal(ops.bf16_round(x).view(torch.int32), x.bfloat16().float().view(torch.int32))
    assert torch.isnan(ops.bf16_round(torch.tensor([float("nan")]))).all()


def test_bf16_round_survives_inductor():
    """Compiled, the rounding stays (Inductor before torch 2.13 dropped x.bfloat16().float())."""
    x = _bf16_cases()
    compiled = torch.compile(lambda t: ops.bf16_round(t * 1.0))
    assert torch.equal(compiled(x).view(torch.int32), x.bfloat16().float().view(torch.int32))


def test_bf16_round_backward_is_the_casts():
    """The compressor's backward (ops._plain_autograd) and training through the window rows differentiate
    it: the same values and gradients as the cast round trip."""
    x = torch.randn(64, requires_grad=True)
    g = torch.randn(64)
    ops.bf16_round(x).backward(g)
    y = x.detach().clone().requires_grad_()
    y.bfloat16().float().backward(g)
    assert torch.equal(ops.bf16_round(x).detach(), y.detach().bfloat16().float())
    assert torch.equal(x.grad, y.grad) and not torch.equal(x.grad, g)  # rounded to bf16, as the cast's
