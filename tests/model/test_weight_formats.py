"""The shipped weight formats against a float64 reference of DeepSeek's semantics, written from the bit
layouts (e4m3: sign, 4 exponent bits bias 7, 3 mantissa bits, 0x7f/0xff NaN; e2m1: sign, 2 exponent
bits bias 1, 1 mantissa bit; e8m0: 2^(u - 127), 255 NaN), element by element from Python floats.

Decoding is exact (a code times a power of two is exact in float32 in the ranges used), so the
decoders must equal the reference bit for bit; the quantizers must pick the scale DeepSeek picks
and the nearest code (ties to the even code).
"""
from __future__ import annotations

import math

import pytest
import torch

from dsv4_compile.model.weight_formats import (FP4_AMAX_FLOOR, dequantize_fp8_weight, dequantize_mxfp4, e8m0_to_float,
                                               float_to_e8m0, pack_fp4_codes, pow2_ceil, quantize_fp8_weight,
                                               quantize_mxfp4, scale_as, unpack_fp4_codes)


def e4m3_ref(byte: int) -> float:
    sign = -1.0 if byte & 0x80 else 1.0
    exponent, mantissa = (byte >> 3) & 0xF, byte & 0x7
    if exponent == 0xF and mantissa == 0x7:
        return math.nan
    if exponent == 0:
        return sign * mantissa / 8 * 2.0 ** -6
    return sign * (1 + mantissa / 8) * 2.0 ** (exponent - 7)


def e2m1_ref(code: int) -> float:
    sign = -1.0 if code & 0x8 else 1.0
    exponent, mantissa = (code >> 1) & 0x3, code & 0x1
    if exponent == 0:
        return sign * mantissa / 2
    return sign * (1 + mantissa / 2) * 2.0 ** (exponent - 1)


def e8m0_ref(byte: int) -> float:
    return math.nan if byte == 255 else 2.0 ** (byte - 127)


E4M3 = torch.tensor([e4m3_ref(b) for b in range(256)], dtype=torch.float64)
E2M1 = torch.tensor([e2m1_ref(c) for c in range(16)], dtype=torch.float64)


def nearest_code(values: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """float64 values -> the code whose table value is nearest, ties to the even code (NaN codes never)."""
    finite = torch.nonzero(~torch.isnan(table)).flatten()
    dist = (values.unsqueeze(-1) - table[finite]).abs()
    best = dist.min(-1, keepdim=True).values
    tied = dist == best
    # among the tied codes prefer an even one (the lower mantissa bit 0), and +0 over -0
    rank = torch.where(tied, (finite % 2) * 2 + (finite >= 0x80 if len(table) == 256 else finite >= 8).long(), 99)
    return finite[rank.argmin(-1)]


def test_e8m0_every_byte_matches_reference_and_torch():
    raw = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    ref = torch.tensor([e8m0_ref(b) for b in range(256)], dtype=torch.float64)
    for as_dtype in (raw, raw.view(torch.int8), raw.view(torch.float8_e8m0fnu)):
        out = e8m0_to_float(as_dtype)
        assert out.dtype == torch.float32
        assert torch.equal(torch.isnan(out), torch.isnan(ref))
        assert torch.equal(out.double()[:255], ref[:255])
    assert torch.equal(e8m0_to_float(raw.view(torch.float8_e8m0fnu))[:255], raw.view(torch.float8_e8m0fnu).float()[:255])
    assert torch.equal(float_to_e8m0(ref[:255].float()).view(torch.uint8), raw[:255])


def test_float_scales_pass_through_and_bad_scales_refused():
    s = torch.tensor([0.5, 3.0, 1e-3])
    assert torch.equal(e8m0_to_float(s), s)
    with pytest.raises(ValueError, match=r"3\.0 is not a power of two"):
        float_to_e8m0(torch.tensor([0.5, 3.0]))
    with pytest.raises(TypeError, match="not a scale format"):
        e8m0_to_float(torch.zeros(2, dtype=torch.int32))


def test_scales_held_in_each_storage_dtype():
    """scale_as: e8m0 bytes and power-of-two floats held as float32 values, uint8 bytes or float8_e8m0fnu,
    every way round the same values; a float that is no power of two has no e8m0 byte."""
    raw = torch.arange(255, dtype=torch.int32).to(torch.uint8)                   # every finite e8m0 byte
    values = e8m0_to_float(raw)
    for source in (raw, raw.view(torch.int8), raw.view(torch.float8_e8m0fnu), values):
        assert torch.equal(scale_as(source, torch.float32), values)
        for held in (torch.uint8, torch.float8_e8m0fnu):
            out = scale_as(source, held)
            assert out.dtype == held and torch.equal(out.view(torch.uint8), raw)
    with pytest.raises(ValueError, match=r"1\.5 is not a power of two"):
        scale_as(torch.tensor([1.5]), torch.uint8)
    with pytest.raises(ValueError, match="scale_as: dtype torch.int32; accepted"):
        scale_as(raw, torch.int32)


def test_pow2_ceil_exact_at_and_around_powers_of_two():
    k = torch.arange(-126, 127, dtype=torch.float64)
    exact = torch.exp2(k)
    for x, want in ((exact, exact), (exact * (1 + 2.0 ** -23), exact * 2), (exact * (1 - 2.0 ** -24), exact)):
        assert torch.equal(pow2_ceil(x.float()).double(), want)
    assert torch.isnan(pow2_ceil(torch.tensor([math.nan]))).all()


@pytest.mark.parametrize("rows,cols", [(128, 128), (300, 200), (1, 129), (257, 64)])
def test_dequantize_fp8_weight_matches_reference(rows, cols):
    g = torch.Generator().manual_seed(rows * 1000 + cols)
    codes = torch.randint(0, 256, (rows, cols), generator=g, dtype=torch.int32)
    codes = torch.where((codes & 0x7F) == 0x7F, 0, codes)  # leave NaN codes to the dedicated check
    tiles = (-(-rows // 128), -(-cols // 128))
    scale_bytes = torch.randint(100, 140, tiles, generator=g, dtype=torch.int32)
    weight = codes.to(torch.uint8).view(torch.float8_e4m3fn)
    scale = scale_bytes.to(torch.uint8).view(torch.float8_e8m0fnu)
    ref = torch.empty(rows, cols, dtype=torch.float64)
    for i in range(rows):
        for tj in range(tiles[1]):
            s = e8m0_ref(int(scale_bytes[i // 128, tj]))
            ref[i, tj * 128:(tj + 1) * 128] = E4M3[codes[i, tj * 128:(tj + 1) * 128].long()] * s
    out = dequantize_fp8_weight(weight, scale)
    assert out.dtype == torch.float32 and torch.equal(out.double(), ref)
    # base models ship float32 scales: the same numbers
    assert torch.equal(dequantize_fp8_weight(weight, e8m0_to_float(scale)), out)
    assert torch.equal(dequantize_fp8_weight(weight, scale, dtype=torch.bfloat16), out.bfloat16())


def test_dequantize_fp8_weight_nan_code_and_bad_scale_shape():
    weight = torch.tensor([[0x7F, 0x01]], dtype=torch.uint8).view(torch.float8_e4m3fn)
    out = dequantize_fp8_weight(weight, torch.ones(1, 1))
    assert math.isnan(out[0, 0]) and out[0, 1] == 2.0 ** -9
    with pytest.raises(ValueError, match=r"expected \[\.\.\., 1, 1\]"):
        dequantize_fp8_weight(weight, torch.ones(1, 2))


@pytest.mark.parametrize("shape", [(3, 64), (2, 5, 96), (1, 32)])
def test_dequantize_mxfp4_matches_reference(shape):
    g = torch.Generator().manual_seed(sum(shape))
    *lead, k = shape
    raw = torch.randint(0, 256, (*lead, k // 2), generator=g, dtype=torch.int32)
    scale_bytes = torch.randint(110, 140, (*lead, k // 32), generator=g, dtype=torch.int32)
    packed = raw.to(torch.uint8).view(torch.int8)
    scale = scale_bytes.to(torch.uint8).view(torch.float8_e8m0fnu)
    ref = torch.empty(*lead, k, dtype=torch.float64).flatten(0, -2)
    flat_raw, flat_scale = raw.flatten(0, -2), scale_bytes.flatten(0, -2)
    for r in range(flat_raw.shape[0]):
        for i in range(k // 2):
            byte = int(flat_raw[r, i])
            s = e8m0_ref(int(flat_scale[r, (2 * i) // 32]))
            ref[r, 2 * i] = e2m1_ref(byte & 0xF) * s       # low nibble: element 2i
            ref[r, 2 * i + 1] = e2m1_ref(byte >> 4) * s    # high nibble: element 2i + 1
    out = dequantize_mxfp4(packed, scale)
    assert out.dtype == torch.float32 and torch.equal(out.double(), ref.reshape(*lead, k))
    assert torch.equal(unpack_fp4_codes(pack_fp4_codes(unpack_fp4_codes(packed))), unpack_fp4_codes(packed))
    with pytest.raises(ValueError, match="one scale per 1x32"):
        dequantize_mxfp4(packed, torch.ones(*lead, k // 32 + 1))


@pytest.mark.parametrize("rows,cols", [(130, 200), (64, 128)])
def test_quantize_fp8_weight_picks_deepseek_scale_and_nearest_code(rows, cols):
    g = torch.Generator().manual_seed(rows + cols)
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64) * torch.logspace(-3, 1, cols, dtype=torch.float64)
    w[:7, :128] = 3e-5  # a tile whose amax is below the 1e-4 floor (its rows, first column tile)
    w[128:, 128:] = 0.0  # a partial tile of zeros
    codes, scale = quantize_fp8_weight(w.float())
    assert codes.dtype == torch.float8_e4m3fn and scale.dtype == torch.float8_e8m0fnu
    assert tuple(scale.shape) == (-(-rows // 128), -(-cols // 128))
    w32 = w.float().double()
    for ti in range(scale.shape[0]):
        for tj in range(scale.shape[1]):
            tile = w32[ti * 128:(ti + 1) * 128, tj * 128:(tj + 1) * 128]
            want = 2.0 ** math.ceil(math.log2(max(float(tile.abs().max()), 1e-4) / 448))
            assert float(e8m0_to_float(scale)[ti, tj]) == want
            ref = nearest_code((tile / want).flatten(), E4M3)
            got = codes.view(torch.uint8)[ti * 128:(ti + 1) * 128, tj * 128:(tj + 1) * 128].flatten().long()
            assert torch.equal(E4M3[got], E4M3[ref])  # same value (+0 and -0 both allowed for 0)
    again = quantize_fp8_weight(dequantize_fp8_weight(codes, scale))
    assert torch.equal(dequantize_fp8_weight(*again), dequantize_fp8_weight(codes, scale))


def test_quantize_mxfp4_floor_scale_and_nearest_code():
    g = torch.Generator().manual_seed(7)
    w = torch.randn(3, 96, generator=g, dtype=torch.float64)
    w[0, :32] = 1e-30     # amax far below 1e-4: DeepSeek's FP4 floor 6 * 2^-126 keeps it representable
    w[1, 32:64] = 0.0     # all zeros: scale at the floor
    w[2, 64:] = torch.tensor([0.25, 0.75, 2.5, 5.0] * 8, dtype=torch.float64) * 4  # exact ties at scale 4/... below
    packed, scale = quantize_mxfp4(w.float())
    assert packed.dtype == torch.int8 and packed.shape == (3, 48) and scale.shape == (3, 3)
    wf = w.float().double()
    blocks = wf.unflatten(-1, (3, 32))
    want_scale = torch.tensor([[2.0 ** math.ceil(math.log2(max(float(b.abs().max()), 6 * 2.0 ** -126) / 6)) for b in row]
                               for row in blocks], dtype=torch.float64)
    assert torch.equal(e8m0_to_float(scale).double(), want_scale)
    assert float(e8m0_to_float(scale)[1, 1]) == FP4_AMAX_FLOOR / 6 == 2.0 ** -126
    assert float(e8m0_to_float(scale)[0, 0]) < 1e-4 / 6  # not the FP8 floor
    ref_codes = nearest_code((blocks / want_scale.unsqueeze(-1)).flatten(), E2M1).reshape(3, 96)
    got_codes = unpack_fp4_codes(packed)
    assert torch.equal(E2M1[got_codes], E2M1[ref_codes])
    deq = dequantize_mxfp4(packed, scale)
    assert float(deq[0, :32].abs().max()) > 0  # the tiny block survives
    assert torch.equal(dequantize_mxfp4(*quantize_mxfp4(deq)), deq)


@pytest.mark.parametrize("quantize", ["quantize_fp8_weight", "quantize_mxfp4"])
def test_experts_quantized_a_few_at_a_time_equal_all_at_once(quantize):
    from dsv4_compile.model import weight_formats

    fn = getattr(weight_formats, quantize)
    w = torch.randn(5, 130, 256, generator=torch.Generator().manual_seed(0))
    codes, scales = weight_formats.quantize_experts(fn, w, experts_at_once=2)
    want_codes, want_scales = fn(w)
    assert codes.dtype == want_codes.dtype and scales.dtype == want_scales.dtype
    assert torch.equal(codes.view(torch.uint8), want_codes.view(torch.uint8))
    assert torch.equal(scales.view(torch.uint8), want_scales.view(torch.uint8))
