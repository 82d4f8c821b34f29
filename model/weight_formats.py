"""The weight formats DeepSeek-V4 ships, decoded and encoded in plain PyTorch (the one home of them).

- e8m0 (UE8M0) scales: one unsigned byte u per scale, value 2^(u - 127); u = 255 is NaN. Stored as
  `torch.float8_e8m0fnu` (or its raw bytes as uint8/int8: the model holds uint8, which every export
  route carries). Base models ship float32 scales instead; every decoder here accepts both.
- FP8 linears: weight [N, K] float8_e4m3fn and `.scale` [ceil(N/128), ceil(K/128)], one scale per
  128 x 128 tile (the last tile of a dimension may be partial). value = code * scale of its tile.
- MXFP4 routed experts: weight [N, K/2] int8, two e2m1 codes per byte, element 2i in the low nibble
  and 2i+1 in the high nibble; `.scale` [N, K/32] e8m0, one scale per 1 x 32 run along K.

The quantizers are the inverse used to write checkpoints in these formats (scale = the block's amax
over the format's max, floored as DeepSeek does, rounded up to a power of two; codes round to
nearest even), so that every value they write decodes back to within the format's rounding.
"""
from __future__ import annotations

import torch

from .ops import AMAX_FLOOR as FP8_AMAX_FLOOR
from .ops import FP4_AMAX_FLOOR, FP4_MAX, FP8_LINEAR_BLOCK, FP8_MAX, fp4_codes, fp4_values

FP8_WEIGHT_BLOCK = FP8_LINEAR_BLOCK   # rows and columns of one FP8 weight tile (the activation block too)
MXFP4_BLOCK = 32         # elements along K sharing one e8m0 scale
E8M0_BIAS = 127
SCALE_DTYPES = (torch.float8_e8m0fnu, torch.uint8, torch.int8, torch.float32, torch.bfloat16)


# ---- scales ------------------------------------------------------------------------------------

def e8m0_to_float(scale: torch.Tensor) -> torch.Tensor:
    """e8m0 scales (float8_e8m0fnu, or their raw bytes as uint8/int8) -> float32 2^(u - 127), NaN for u = 255.

    Float scales (float32/bfloat16, as base models ship) come back as float32 unchanged in value.
    """
    if scale.dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        return scale.float()
    if scale.dtype not in (torch.float8_e8m0fnu, torch.uint8, torch.int8):
        raise TypeError(f"e8m0_to_float: scale dtype {scale.dtype} is not a scale format; accepted: "
                        f"{', '.join(str(d) for d in SCALE_DTYPES)}")
    # float32's bits: u in the exponent field; 0 -> the subnormal 2^-127. Multiplies, not shifts: the
    # ONNX export has no translation of int32 shifts (the view is dsv4_compile/onnx_bitcast.py's).
    u = scale.view(torch.uint8).to(torch.int32)
    bits = torch.where(u == 0, _FLOAT32_2_POW_M127_BITS, torch.where(u == 255, _FLOAT32_NAN_BITS, u * (1 << 23)))
    return bits.view(torch.float32)


def scale_as(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Scales in any accepted format (e8m0 bytes, or float values) held as `dtype`: float32 values, or
    e8m0 as uint8 bytes / float8_e8m0fnu. Floats become e8m0 only if they are powers of two in
    [2^-127, 2^127] (ValueError naming the first that is not)."""
    if dtype == torch.float32:
        return e8m0_to_float(scale)
    if dtype not in (torch.uint8, torch.float8_e8m0fnu):
        raise ValueError(f"scale_as: dtype {dtype}; accepted: torch.float32, torch.uint8, torch.float8_e8m0fnu")
    e8m0 = scale if scale.dtype in (torch.float8_e8m0fnu, torch.uint8, torch.int8) else float_to_e8m0(scale)
    return e8m0.view(dtype)


_FLOAT32_NAN_BITS = 0x7FC00000
_FLOAT32_2_POW_M127_BITS = 0x00400000


def _pow2_bits(exponent: torch.Tensor) -> torch.Tensor:
    """int32 exponents e in [-149, 127] -> the int32 bit patterns of float32 2^e, built exactly (no pow)."""
    normal = (exponent + 127).clamp_min(1) << 23
    subnormal = torch.ones_like(exponent) << (exponent + 149).clamp(0, 22)
    return torch.where(exponent >= -126, normal, subnormal)


def float_to_e8m0(scale: torch.Tensor) -> torch.Tensor:
    """Power-of-two float scales in [2^-127, 2^127] -> float8_e8m0fnu; anything else is a ValueError."""
    s = scale.float()
    mantissa, exponent = torch.frexp(s)  # s = mantissa * 2^exponent, mantissa 0.5 for a power of two
    ok = (mantissa == 0.5) & (exponent - 1 >= -E8M0_BIAS) & (exponent - 1 <= E8M0_BIAS)
    if not bool(ok.all()):
        bad = s[~ok].flatten()[0].item()
        raise ValueError(f"float_to_e8m0: scale {bad!r} is not a power of two in [2^-127, 2^127]; e8m0 holds only those")
    return (exponent - 1 + E8M0_BIAS).to(torch.uint8).view(torch.float8_e8m0fnu)


def pow2_ceil(x: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= x (float32, x > 0), computed exactly from the binary exponent; NaN stays NaN."""
    x = x.float()
    mantissa, exponent = torch.frexp(x)  # x = mantissa * 2^exponent, mantissa in [0.5, 1)
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)
    return torch.where(torch.isnan(x), x, _pow2_bits(exponent.to(torch.int32)).view(torch.float32))


def _expand_tiles(scale: torch.Tensor, rows: int, cols: int, block_rows: int, block_cols: int) -> torch.Tensor:
    """[..., ceil(rows/br), ceil(cols/bc)] -> [..., rows, cols], each scale repeated over its tile."""
    return scale.repeat_interleave(block_rows, dim=-2)[..., :rows, :].repeat_interleave(block_cols, dim=-1)[..., :cols]


# ---- FP8 e4m3, 128 x 128 tiles --------------------------------------------------------------------

def fp8_weight_scale_shape(rows: int, cols: int, block: int = FP8_WEIGHT_BLOCK) -> tuple[int, int]:
    return (-(-rows // block), -(-cols // block))


def dequantize_fp8_weight(weight: torch.Tensor, scale: torch.Tensor, block: int = FP8_WEIGHT_BLOCK,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """weight [..., N, K] float8_e4m3fn, scale [..., ceil(N/block), ceil(K/block)] (e8m0 or float) -> dtype [..., N, K].

    Computed in float32 (code * power-of-two scale is exact there), then cast to `dtype`.
    """
    if weight.dtype != torch.float8_e4m3fn:
        raise TypeError(f"dequantize_fp8_weight: weight dtype {weight.dtype}; expected torch.float8_e4m3fn")
    rows, cols = weight.shape[-2:]
    if tuple(scale.shape[-2:]) != fp8_weight_scale_shape(rows, cols, block):
        raise ValueError(f"dequantize_fp8_weight: scale shape {list(scale.shape)} does not match weight {list(weight.shape)}; "
                         f"expected [..., {', '.join(map(str, fp8_weight_scale_shape(rows, cols, block)))}] "
                         f"(one scale per {block}x{block} tile)")
    values = weight.float() * _expand_tiles(e8m0_to_float(scale), rows, cols, block, block)
    return values.to(dtype)


def quantize_fp8_weight(weight: torch.Tensor, block: int = FP8_WEIGHT_BLOCK, scale_dtype: torch.dtype = torch.float8_e8m0fnu
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [..., N, K] float -> (codes [..., N, K] float8_e4m3fn, scale [..., ceil(N/block), ceil(K/block)]).

    Per tile: scale = pow2_ceil(max(amax, 1e-4) / 448); codes = weight / scale, rounded to nearest even.
    scale_dtype: float8_e8m0fnu (the instruct releases' UE8M0), its bytes as uint8, or float32 (same values).
    """
    rows, cols = weight.shape[-2:]
    tile_rows, tile_cols = fp8_weight_scale_shape(rows, cols, block)
    w = weight.float()
    padded = torch.nn.functional.pad(w, (0, tile_cols * block - cols, 0, tile_rows * block - rows))
    tiles = padded.unflatten(-1, (tile_cols, block)).unflatten(-3, (tile_rows, block))  # [..., tr, b, tc, b]
    amax = tiles.abs().amax(dim=(-3, -1))  # [..., tr, tc]
    scale = pow2_ceil(amax.clamp_min(FP8_AMAX_FLOOR) / FP8_MAX)
    codes = (w / _expand_tiles(scale, rows, cols, block, block)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return codes, scale_as(scale, scale_dtype)


# ---- MXFP4: e2m1 pairs in int8, e8m0 per 1 x 32 -----------------------------------------------------

def unpack_fp4_codes(packed: torch.Tensor) -> torch.Tensor:
    """packed [..., K/2] int8/uint8 -> e2m1 codes [..., K] int32 (0..15), low nibble first."""
    if packed.dtype not in (torch.int8, torch.uint8):
        raise TypeError(f"unpack_fp4_codes: packed dtype {packed.dtype}; expected torch.int8 or torch.uint8")
    byte = packed.view(torch.uint8).to(torch.int32)
    return torch.stack([byte & 0xF, byte >> 4], dim=-1).flatten(-2)


def pack_fp4_codes(codes: torch.Tensor) -> torch.Tensor:
    """e2m1 codes [..., K] (0..15, K even) -> packed [..., K/2] int8, element 2i in the low nibble."""
    codes = codes.to(torch.int32)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8).view(torch.int8)


def dequantize_mxfp4(packed: torch.Tensor, scale: torch.Tensor, block: int = MXFP4_BLOCK,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """packed [..., N, K/2] int8, scale [..., N, K/block] (e8m0 or float) -> dtype [..., N, K]."""
    values = fp4_values(unpack_fp4_codes(packed))
    k = values.shape[-1]
    if k % block or tuple(scale.shape) != (*values.shape[:-1], k // block):
        raise ValueError(f"dequantize_mxfp4: scale shape {list(scale.shape)} does not match packed {list(packed.shape)}; "
                         f"expected {[*values.shape[:-1], k // block]} (one scale per 1x{block} along K = {k})")
    blocks = values.unflatten(-1, (k // block, block)) * e8m0_to_float(scale).unsqueeze(-1)
    return blocks.flatten(-2).to(dtype)


def quantize_mxfp4(weight: torch.Tensor, block: int = MXFP4_BLOCK, scale_dtype: torch.dtype = torch.float8_e8m0fnu
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [..., N, K] float (K a multiple of block) -> (packed [..., N, K/2] int8, scale [..., N, K/block]).

    Per 1 x block run: scale = pow2_ceil(max(amax, 6 * 2^-126) / 6); codes: nearest e2m1 value of
    weight / scale, ties to the even code.
    """
    k = weight.shape[-1]
    if k % block:
        raise ValueError(f"quantize_mxfp4: last dim {k} is not a multiple of the block {block}")
    blocks = weight.float().unflatten(-1, (k // block, block))
    scale = pow2_ceil(blocks.abs().amax(-1).clamp_min(FP4_AMAX_FLOOR) / FP4_MAX)
    codes = fp4_codes(blocks / scale.unsqueeze(-1)).flatten(-2)
    return pack_fp4_codes(codes), scale_as(scale, scale_dtype)


def quantize_experts(quantize, weights: torch.Tensor, experts_at_once: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize(weights)` (quantize_fp8_weight or quantize_mxfp4) of stacked experts [E, N, K], computed
    `experts_at_once` experts at a time: whole-tensor quantization's float temporaries take tens of GiB
    at V4-Flash's 256 experts."""
    parts = [quantize(weights[e:e + experts_at_once]) for e in range(0, weights.shape[0], experts_at_once)]
    return tuple(torch.cat([p[i].view(torch.uint8) for p in parts]).view(parts[0][i].dtype) for i in (0, 1))
