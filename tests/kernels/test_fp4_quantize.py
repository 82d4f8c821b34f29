"""FP4 e2m1 quantize / dequantize kernels against their naive twin and the plain op (bit-exact).

CPU: the Triton interpreter on small odd shapes; GPU (marked): the kernel compiled, at real shapes.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel import (conftest does it too)

import pytest  # noqa: E402

import dsv4_compile.model.ops  # noqa: E402,F401  (registers torch.ops.dsv4.*)
from dsv4_compile.kernels.fp4_quantize import fp4_dequantize, fp4_quantize, naive  # noqa: E402
from helpers import assert_bits_equal, sqnr_db  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

SHAPES = [
    pytest.param((3, 128), 32, id="3x128-b32"),
    pytest.param((2, 5, 96), 32, id="2x5x96-b32"),
    pytest.param((7, 192), 64, id="7x192-b64"),
    pytest.param((4, 3, 36), 12, id="4x3x36-b12-non-pow2-block"),
    pytest.param((1, 10), 2, id="1x10-b2"),
]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16"),
          pytest.param(torch.float16, id="fp16")]
SCALES = [pytest.param(False, id="exact-scale"), pytest.param(True, id="pow2-scale")]


def make_input(shape, dtype, seed=0):
    """Gaussian rows at magnitudes 2^-20..2^8, plus exact e2m1 ties (x / scale = 0.25, 0.75, ..., 5)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x = x * torch.exp2(torch.randint(-20, 9, (*shape[:-1], 1), generator=g).float())
    flat = x.reshape(-1, shape[-1])
    if shape[-1] >= 10 and flat.shape[0] > 1:
        # row 0: amax 6 (scale exactly 1 in both modes) and every tie of the format, both signs
        flat[0] = 0.1
        flat[0, :10] = torch.tensor([6.0, 0.25, -0.75, 1.25, -1.75, 2.5, -3.5, 5.0, -5.0, 0.75])
    return flat.reshape(shape).to(dtype).to(DEVICE)


@pytest.mark.parametrize("pow2", SCALES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,block_size", SHAPES)
def test_quantize_matches_plain_and_naive(shape, block_size, dtype, pow2):
    x = make_input(shape, dtype)
    packed, scale = fp4_quantize(x, block_size, pow2)
    ref_packed, ref_scale = torch.ops.dsv4.fp4_quantize(x, block_size, pow2)
    nv_packed, nv_scale = naive.fp4_quantize(x, block_size, pow2)
    assert_bits_equal("scale vs plain", ref_scale, scale)
    assert_bits_equal("packed vs plain", ref_packed, packed)
    assert_bits_equal("scale vs naive", nv_scale, scale.cpu())
    assert_bits_equal("packed vs naive", nv_packed, packed.cpu())
    # e2m1 keeps 1 mantissa bit: about 17 dB on Gaussian data (pow2 scales waste up to 1 bit)
    assert sqnr_db(x.float(), fp4_dequantize(packed, scale, block_size)) > 12


def test_ties_go_to_even_codes():
    x = make_input((2, 32), torch.float32)
    packed, scale = fp4_quantize(x, 32, False)
    assert scale[0].item() == 1.0
    codes = torch.stack([packed & 15, packed >> 4], -1).flatten(-2)[0, :10].cpu().tolist()
    # 6 -> 7; 0.25 -> 0; -0.75 -> -1.0 (8|2); 1.25 -> 1.0 (2); -1.75 -> -2 (8|4); 2.5 -> 2 (4);
    # -3.5 -> -4 (8|6); 5 -> 4 (6); -5 -> -4 (8|6); 0.75 -> 1.0 (2)
    assert codes == [7, 0, 10, 2, 12, 4, 14, 6, 14, 2]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,block_size", SHAPES)
def test_dequantize_matches_plain_and_naive(shape, block_size, dtype):
    packed, scale = torch.ops.dsv4.fp4_quantize(make_input(shape, dtype, seed=1), block_size, True)
    out = fp4_dequantize(packed, scale, block_size)
    assert_bits_equal("dequant vs plain", torch.ops.dsv4.fp4_dequantize(packed, scale, block_size), out)
    assert_bits_equal("dequant vs naive", naive.fp4_dequantize(packed.cpu(), scale.cpu(), block_size), out.cpu())


def test_every_code_dequantizes():
    packed = torch.arange(256, dtype=torch.uint8, device=DEVICE).reshape(4, 64)
    scale = torch.tensor([[1.0, 0.5], [2.0, 0.25], [8.0, 1.0], [1.0, 4.0]], device=DEVICE)
    out = fp4_dequantize(packed, scale, 64)
    assert_bits_equal("all codes", torch.ops.dsv4.fp4_dequantize(packed, scale, 64), out)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter's numpy: inf * 0
@pytest.mark.parametrize("pow2", SCALES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_inf_blocks(dtype, pow2):
    """Docstring: a NaN block -> scale NaN, an Inf block -> scale +Inf; codes follow the formula
    (NaN -> +0, finite / Inf -> 0) and dequantize to NaN."""
    x = make_input((2, 3 * 16), dtype, seed=2).float()
    x[0, 3] = float("nan")
    x[0, 16 + 5] = float("inf")
    x[1, 32 + 7] = -float("inf")
    x = x.to(dtype)
    packed, scale = fp4_quantize(x, 16, pow2)
    s = scale.cpu()
    assert torch.isnan(s[0, 0]) and s[0, 1] == float("inf") and s[1, 2] == float("inf")
    assert torch.isfinite(s[0, 2]) and torch.isfinite(s[1, :2]).all()
    codes = torch.stack([packed & 15, packed >> 4], -1).flatten(-2).cpu()
    assert (codes[0, 16:32] == 0).all() and (codes[1, 32:48] == 0).all() and codes[0, 3] == 0
    deq = fp4_dequantize(packed, scale, 16).cpu()
    assert torch.isnan(deq[0, :16]).all() and torch.isnan(deq[0, 16:32]).all() and torch.isnan(deq[1, 32:]).all()
    ref_packed, ref_scale = torch.ops.dsv4.fp4_quantize(x, 16, pow2)
    assert_bits_equal("scale vs plain", ref_scale, scale)
    assert_bits_equal("packed vs plain", ref_packed, packed)
    nv_packed, nv_scale = naive.fp4_quantize(x, 16, pow2)
    assert_bits_equal("packed vs naive", nv_packed, packed.cpu())
    assert_bits_equal("scale vs naive", nv_scale, scale.cpu())


def test_config_variants_agree():
    x = make_input((5, 3, 96), torch.bfloat16, seed=3)
    ref = fp4_quantize(x, 32, True)
    for cfg in ({"block_elems": 32}, {"block_elems": 256, "num_warps": 8}, "block_elems=64"):
        out = fp4_quantize(x, 32, True, config=cfg)
        assert_bits_equal(f"packed {cfg}", ref[0], out[0])
        assert_bits_equal(f"scale {cfg}", ref[1], out[1])
        assert_bits_equal(f"dequant {cfg}", fp4_dequantize(*ref, 32), fp4_dequantize(*out, 32, config=cfg))


def test_input_errors():
    x = make_input((4, 64), torch.float32)
    with pytest.raises(ValueError, match="even"):
        fp4_quantize(x, 3)
    with pytest.raises(ValueError, match="not divisible"):
        fp4_quantize(x, 48)
    with pytest.raises(ValueError, match="accepted"):
        fp4_quantize(x.to(torch.int32), 32)
    with pytest.raises(ValueError, match="not contiguous"):
        fp4_quantize(x.t(), 2)
    packed, scale = fp4_quantize(x, 32)
    with pytest.raises(ValueError, match="accepted"):
        fp4_dequantize(packed.to(torch.int32), scale, 32)


@pytest.mark.gpu
@pytest.mark.parametrize("pow2", SCALES)
def test_gpu_real_shape_bit_exact(pow2):
    x = torch.randn(16384, 7168, device="cuda", dtype=torch.bfloat16)
    packed, scale = fp4_quantize(x, 32, pow2)
    ref_packed, ref_scale = torch.ops.dsv4.fp4_quantize(x, 32, pow2)
    assert_bits_equal("scale", ref_scale, scale)
    assert_bits_equal("packed", ref_packed, packed)
    assert_bits_equal("dequant", torch.ops.dsv4.fp4_dequantize(packed, scale, 32), fp4_dequantize(packed, scale, 32))
