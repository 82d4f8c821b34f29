"""FP8 quantize / dequantize kernels against their naive twin and the plain op (bit-exact).

CPU: the Triton interpreter on small odd shapes; GPU (marked): the kernel compiled, at real shapes.
"""
import importlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel import (conftest does it too)

import pytest  # noqa: E402

import dsv4_compile.model.ops  # noqa: E402,F401  (registers torch.ops.dsv4.*)
from dsv4_compile.kernels.fp8_quantize import fp8_dequantize, fp8_quantize, fp8_round, naive  # noqa: E402
from helpers import assert_bits_equal, sqnr_db  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

SHAPES = [
    pytest.param((3, 256), 128, id="3x256-b128"),
    pytest.param((2, 5, 192), 64, id="2x5x192-b64"),
    pytest.param((7, 96), 32, id="7x96-b32"),
    pytest.param((33, 128), 128, id="33x128-b128"),
    pytest.param((4, 3, 48), 48, id="4x3x48-b48-non-pow2-block"),
    pytest.param((1, 24), 6, id="1x24-b6"),
]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16"),
          pytest.param(torch.float16, id="fp16")]
SCALES = [pytest.param(False, id="exact-scale"), pytest.param(True, id="pow2-scale")]


def make_input(shape, dtype, seed=0):
    """Gaussian rows with magnitudes spread over 2^-20..2^8 (so some blocks sit under the 1e-4 amax
    floor) and a few exact FP8 rounding ties."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x = x * torch.exp2(torch.randint(-20, 9, (*shape[:-1], 1), generator=g).float())
    return x.to(dtype).to(DEVICE)


def assert_codes_equal(name, ref, out):
    """Bit-exact float8 codes; NaN codes only need to be NaN in both (a NaN's sign is unspecified)."""
    assert ref.shape == out.shape and ref.dtype == out.dtype == torch.float8_e4m3fn, name
    ref_nan, out_nan = torch.isnan(ref.float()), torch.isnan(out.float())
    assert torch.equal(ref_nan, out_nan), f"{name}: NaN codes differ ({int(ref_nan.sum())} vs {int(out_nan.sum())})"
    differ = (ref.view(torch.uint8) != out.view(torch.uint8)) & ~ref_nan
    assert not differ.any(), f"{name}: {int(differ.sum())} of {ref.numel()} codes differ"


@pytest.mark.parametrize("pow2", SCALES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,block_size", SHAPES)
def test_quantize_matches_plain_and_naive(shape, block_size, dtype, pow2):
    x = make_input(shape, dtype)
    codes, scale = fp8_quantize(x, block_size, pow2)
    ref_codes, ref_scale = torch.ops.dsv4.fp8_quantize(x, block_size, pow2)
    nv_codes, nv_scale = naive.fp8_quantize(x, block_size, pow2)
    assert_bits_equal("scale vs plain", ref_scale, scale)
    assert_codes_equal("codes vs plain", ref_codes, codes)
    assert_bits_equal("scale vs naive", nv_scale, scale.cpu())
    assert_codes_equal("codes vs naive", nv_codes, codes.cpu())
    # Sanity of the format itself: e4m3 keeps 3 mantissa bits (about 30 dB on Gaussian data).
    assert sqnr_db(x.float(), fp8_dequantize(codes, scale, block_size)) > 25


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,block_size", SHAPES)
def test_dequantize_matches_plain_and_naive(shape, block_size, dtype):
    ref_codes, ref_scale = torch.ops.dsv4.fp8_quantize(make_input(shape, dtype, seed=1), block_size, False)
    out = fp8_dequantize(ref_codes, ref_scale, block_size)
    assert_bits_equal("dequant vs plain", torch.ops.dsv4.fp8_dequantize(ref_codes, ref_scale, block_size), out)
    assert_bits_equal("dequant vs naive", naive.fp8_dequantize(ref_codes.cpu(), ref_scale.cpu(), block_size), out.cpu())


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter's numpy: inf * 0
@pytest.mark.parametrize("pow2", SCALES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_inf_blocks(dtype, pow2):
    """Docstring: a NaN block -> scale NaN, all codes NaN; an Inf block -> scale +Inf, infinite
    elements NaN codes, finite elements 0; other blocks untouched."""
    x = make_input((2, 4 * 32), dtype, seed=2).float()
    x[0, 3] = float("nan")
    x[0, 32 + 5] = float("inf")
    x[1, 64 + 7] = -float("inf")
    x[1, 100] = float("nan")
    x[1, 101] = float("inf")                                                # NaN and Inf in one block
    x = x.to(dtype)
    codes, scale = fp8_quantize(x, 32, pow2)
    inf = float("inf")
    s = scale.cpu()
    assert torch.isnan(s[0, 0]) and s[0, 1] == inf and s[1, 2] == inf and torch.isnan(s[1, 3])
    assert torch.isfinite(s[0, 2:]).all() and torch.isfinite(s[1, :2]).all()
    c = codes.float().cpu()
    assert torch.isnan(c[0, :32]).all() and torch.isnan(c[1, 96:]).all()
    assert torch.isnan(c[0, 37]) and torch.isnan(c[1, 71])
    finite_in_inf_block = torch.ones(32, dtype=torch.bool)
    finite_in_inf_block[5] = False
    assert (c[0, 32:64][finite_in_inf_block] == 0).all()
    ref_codes, ref_scale = torch.ops.dsv4.fp8_quantize(x, 32, pow2)
    assert_bits_equal("scale vs plain", ref_scale, scale)
    assert_codes_equal("codes vs plain", ref_codes, codes)
    nv_codes, nv_scale = naive.fp8_quantize(x, 32, pow2)
    assert_codes_equal("codes vs naive", nv_codes, codes.cpu())
    assert_bits_equal("scale vs naive", nv_scale, scale.cpu())


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter's numpy: inf * 0
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=["to-fp32", "to-bf16"])
@pytest.mark.parametrize("pow2", SCALES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,block_size", SHAPES[:4])
def test_round_is_dequantize_of_quantize(shape, block_size, dtype, pow2, out_dtype):
    """fp8_round in one pass = the plain dequantize of the plain quantize bit for bit, stored in fp32 or
    (power-of-two scales) bf16: the rounded values hold 4 significant bits and exponents within bf16's,
    exact there too; NaN and Inf blocks included; the values really are rounded (they differ from x)."""
    if out_dtype == torch.bfloat16 and not pow2:
        pytest.skip("bf16 holds the rounded values with power-of-two scales only (refused otherwise)")
    x = make_input(shape, dtype, seed=3).float()
    x.view(-1, block_size)[0, 1] = float("nan")
    x.view(-1, block_size)[1, 0] = float("inf")
    x = x.to(dtype)
    ref = torch.ops.dsv4.fp8_dequantize(*torch.ops.dsv4.fp8_quantize(x, block_size, pow2), block_size)
    out = fp8_round(x, block_size, pow2, out_dtype)
    assert_bits_equal("fp8_round vs dequantize(quantize)", ref.to(out_dtype), out)
    finite = torch.isfinite(ref)
    assert (out.float()[finite] != x.float()[finite]).any(), "nothing was rounded"
    if out_dtype == torch.bfloat16:  # no second rounding: the bf16 values are the fp32 ones
        assert_bits_equal("fp8_round to bf16 vs to fp32", fp8_round(x, block_size, pow2, torch.float32), out.float())
    if dtype == torch.float32 or (dtype == torch.bfloat16 and pow2):
        assert fp8_round(x, block_size, pow2).dtype == dtype                  # x's dtype by default


def test_round_refuses_what_it_cannot_hold():
    x = make_input((2, 64), torch.float32)
    with pytest.raises(ValueError, match="fp8_round: out_dtype torch.float16; accepted: torch.float32, torch.bfloat16"):
        fp8_round(x, 32, True, torch.float16)
    with pytest.raises(ValueError, match="fp8_round: out_dtype torch.bfloat16 with pow2_scale False; bf16 holds"):
        fp8_round(x, 32, False, torch.bfloat16)
    with pytest.raises(ValueError, match="fp8_round: last dim 64 is not divisible by block_size 48"):
        fp8_round(x, 48, True)


def test_pow2_scale_just_above_a_power_of_two():
    """The documented exception: for scale = 2^k (1 + 4 ulp) the kernel (and the naive twin, via
    frexp) round up to 2^(k+1); the plain op's exp2(ceil(log2(s))) may give 2^k, then saturates."""
    k = -8
    amax = 7 * 2.0 ** (k + 6) * (1 + 4 * 2.0 ** -23)                       # amax / 448 = 2^k (1 + 4 ulp), exact
    x = torch.full((1, 32), 0.5 * amax)
    x[0, 0] = amax
    x = x.to(DEVICE)
    codes, scale = fp8_quantize(x, 32, True)
    assert scale.item() == 2.0 ** (k + 1)
    nv_codes, nv_scale = naive.fp8_quantize(x, 32, True)
    assert nv_scale.item() == 2.0 ** (k + 1)
    assert_codes_equal("codes vs naive", nv_codes, codes.cpu())
    _, ref_scale = torch.ops.dsv4.fp8_quantize(x, 32, True)
    assert ref_scale.item() in (2.0 ** k, 2.0 ** (k + 1))


def test_exact_powers_of_two_agree():
    """amax = 448 * 2^k exactly: every implementation gives scale 2^k (no tie)."""
    x = torch.randn(8, 64)
    x[:, 0] = 448 * torch.exp2(torch.arange(-10, -2).float())
    x[:, 1:] = x[:, 1:].clamp(-1e-4, 1e-4)
    x = x.to(DEVICE)
    codes, scale = fp8_quantize(x, 64, True)
    ref_codes, ref_scale = torch.ops.dsv4.fp8_quantize(x, 64, True)
    assert_bits_equal("scale", ref_scale, scale)
    assert_codes_equal("codes", ref_codes, codes)


def test_cuda_scale_rule_path():
    """On CUDA torch computes amax / 448 as amax * fp32(1/448) (a Python-scalar divisor becomes a
    reciprocal multiply); the kernel's RECIP path reproduces that, and is exercised here on the CPU
    by launching the kernel directly with RECIP=True against that rule."""
    k = importlib.import_module("dsv4_compile.kernels.fp8_quantize.fp8_quantize")  # the module, not the function
    x = make_input((4, 3, 128), torch.float32, seed=5)
    codes = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=DEVICE)
    scale = torch.empty((4, 3, 4), device=DEVICE)
    grid, meta = k.launch_grid(x.numel() // 32, 32, k.default_config(None))
    k.launch(k._fp8_quantize_kernel, grid, x, codes, scale, x.numel() // 32, POW2=False, RECIP=True,
             NATIVE_CAST=False, ROUNDED=False, **meta)
    blocks = x.float().cpu().reshape(4, 3, 4, 32)
    amax = blocks.abs().amax(-1).clamp_min(1e-4)
    ref_scale = amax * (torch.tensor(1.0) / torch.tensor(448.0))
    assert_bits_equal("scale (reciprocal rule)", ref_scale, scale.cpu())
    ref_codes = (blocks / ref_scale.unsqueeze(-1)).clamp(-448, 448).to(torch.float8_e4m3fn).reshape(x.shape)
    assert_codes_equal("codes (reciprocal rule)", ref_codes, codes.cpu())
    assert (ref_scale != amax / 448).any()  # the two rules do differ on this data


def test_config_variants_agree():
    x = make_input((5, 3, 128), torch.bfloat16, seed=3)
    ref = fp8_quantize(x, 32, True)
    for cfg in ({"block_elems": 32}, {"block_elems": 256, "num_warps": 8}, "block_elems=64"):
        out = fp8_quantize(x, 32, True, config=cfg)
        assert_codes_equal(f"codes {cfg}", ref[0], out[0])
        assert_bits_equal(f"scale {cfg}", ref[1], out[1])


def test_input_errors():
    x = make_input((4, 64), torch.float32)
    with pytest.raises(ValueError, match="not divisible"):
        fp8_quantize(x, 48, False)
    with pytest.raises(ValueError, match="accepted"):
        fp8_quantize(x.double(), 32, False)
    with pytest.raises(ValueError, match="not contiguous"):
        fp8_quantize(x.t(), 2, False)
    codes, scale = fp8_quantize(x, 32, False)
    with pytest.raises(ValueError, match="shape"):
        fp8_dequantize(codes, scale[:, :1], 32)
    with pytest.raises(ValueError, match="block_elems"):
        fp8_quantize(x, 32, False, config={"block_elems": 3})


def test_empty_input():
    codes, scale = fp8_quantize(torch.empty(0, 128, device=DEVICE), 128, True)
    assert codes.shape == (0, 128) and scale.shape == (0, 1)


CASTS = [pytest.param("native", id="native-cast"), pytest.param("bits", id="bits-cast")]


@pytest.mark.gpu
@pytest.mark.parametrize("cast", CASTS)
@pytest.mark.parametrize("pow2", SCALES)
def test_gpu_real_shape_bit_exact(pow2, cast):
    """Both e4m3 conversions ("native", the H100/H200 default: the hardware cvt with satfinite) at
    the benchmark's shape and the KV cache's block 64, against the plain op."""
    x = torch.randn(16384, 7168, device="cuda", dtype=torch.bfloat16)
    x[0, :7] = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 448.0, -448.0, 3.0])     # signed zeros, underflow
    codes, scale = fp8_quantize(x, 128, pow2, config={"cast": cast})
    ref_codes, ref_scale = torch.ops.dsv4.fp8_quantize(x, 128, pow2)
    assert_bits_equal("scale", ref_scale, scale)
    assert_codes_equal("codes", ref_codes, codes)
    assert_bits_equal("dequant", torch.ops.dsv4.fp8_dequantize(codes, scale, 128), fp8_dequantize(codes, scale, 128))
    # the KV-cache layout's block 64 with power-of-two scales; fp32 rows spread over 2^-20..2^8
    # (subnormal codes, blocks under the 1e-4 amax floor, ties)
    y = torch.randn(4096, 448, device="cuda") * torch.exp2(torch.randint(-20, 9, (4096, 1), device="cuda").float())
    c, s = fp8_quantize(y, 64, pow2, config={"cast": cast})
    rc, rs = torch.ops.dsv4.fp8_quantize(y, 64, pow2)
    assert_bits_equal("scale b64", rs, s)
    assert_codes_equal("codes b64", rc, c)


@pytest.mark.gpu
@pytest.mark.parametrize("cast", CASTS)
def test_gpu_round_is_dequantize_of_quantize(cast):
    """fp8_round compiled (either e4m3 conversion) at a decode-sized MoE activation, into bf16 and fp32."""
    x = torch.randn(96, 2048, device="cuda") * torch.exp2(torch.randint(-20, 9, (96, 1), device="cuda").float())
    ref = fp8_dequantize(*fp8_quantize(x, 128, True, config={"cast": cast}), 128)
    for out_dtype in (torch.float32, torch.bfloat16):
        assert_bits_equal(f"fp8_round to {out_dtype}", ref.to(out_dtype),
                          fp8_round(x, 128, True, out_dtype, config={"cast": cast}))


@pytest.mark.gpu
def test_gpu_default_is_native_cast():
    from dsv4_compile.kernels.fp8_quantize.config import default_config
    name = torch.cuda.get_device_name()
    if "H100" in name or "H200" in name:
        assert default_config(name).cast == "native"
