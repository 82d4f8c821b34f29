"""Naive twins of the FP8 kernels: slow, float32, obviously right, and a different algorithm from
model/ops.py (nearest entry of the table of all e4m3 values, found by binary search, ties to the even
code; power-of-two scales from frexp). Same signatures as the kernels' public functions."""
from __future__ import annotations

import math

import torch

FP8_MAX = 448.0


def e4m3_value(code: int) -> float:
    """Decode one float8_e4m3fn byte: 1 sign bit, 4 exponent bits (bias 7), 3 mantissa bits,
    no infinities, S.1111.111 = NaN."""
    sign = -1.0 if code & 0x80 else 1.0
    e, m = (code >> 3) & 0xF, code & 0x7
    if e == 0xF and m == 0x7:
        return math.nan
    if e == 0:
        return sign * m / 8 * 2.0 ** -6  # subnormal
    return sign * (1 + m / 8) * 2.0 ** (e - 7)


def e4m3_table() -> torch.Tensor:
    """The 127 finite non-negative e4m3fn values, index = code (0x00..0x7E), ascending."""
    return torch.tensor([e4m3_value(code) for code in range(0x7F)], dtype=torch.float32)


def _pow2_ceil(s: torch.Tensor) -> torch.Tensor:
    mant, exp = torch.frexp(s)                       # s = mant * 2^exp, mant in [0.5, 1)
    up = torch.ldexp(torch.ones_like(s), exp - (mant == 0.5).to(exp.dtype))
    return torch.where(torch.isfinite(s), up, s)


def block_scales(x: torch.Tensor, block_size: int, qmax: float, pow2_scale: bool, floor: float = 1e-4):
    """x [..., D] (any device) -> (blocks [R, NB, bs] float32, scale [R, NB] float32), on the CPU,
    with the documented NaN rule; amax floored at `floor` (FP8 1e-4, FP4 6 * 2^-126). "/ qmax" follows torch's rule for x's device: true division for a
    CPU tensor, multiplication by the fp32 reciprocal for a CUDA tensor (what torch does on CUDA)."""
    D = x.shape[-1]
    if block_size < 1 or D % block_size:
        raise ValueError(f"last dim {D} is not divisible by block_size {block_size}")
    blocks = x.float().cpu().reshape(-1, D // block_size, block_size)
    amax = blocks.abs().max(dim=-1).values
    amax = torch.where(torch.isnan(blocks).any(-1), torch.full_like(amax, float("nan")), amax)
    amax = torch.where(amax < floor, torch.full_like(amax, floor), amax)
    if x.is_cuda:
        scale = amax * (torch.tensor(1.0) / torch.tensor(qmax))             # fp32 reciprocal, then one rounding
    else:
        scale = amax / qmax
    return blocks, (_pow2_ceil(scale) if pow2_scale else scale)


def fp8_quantize(x: torch.Tensor, block_size: int, pow2_scale: bool, config=None):
    """x [..., D] -> (x_fp8 [..., D] float8_e4m3fn, scale [..., D/block_size] float32) on the CPU;
    config ignored."""
    blocks, scale = block_scales(x, block_size, FP8_MAX, pow2_scale)
    y = (blocks / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX)
    table = e4m3_table()
    mag = y.abs().nan_to_num(0.0)
    hi = torch.searchsorted(table, mag).clamp(max=table.numel() - 1)       # first entry >= mag
    lo = (hi - 1).clamp(min=0)
    d_lo, d_hi = mag - table[lo], table[hi] - mag
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
    code = torch.where(pick_hi, hi, lo)
    code = torch.where(torch.isnan(y), torch.full_like(code, 0x7F), code)
    code = code | (torch.signbit(y).long() << 7)
    codes = code.to(torch.uint8).view(torch.float8_e4m3fn).reshape(x.shape)      # (CPU)
    return codes, scale.reshape(*x.shape[:-1], -1)


def fp8_dequantize(x_fp8: torch.Tensor, scale: torch.Tensor, block_size: int, config=None) -> torch.Tensor:
    """x_fp8 [..., D] float8_e4m3fn, scale [..., D/block_size] -> float32 [..., D]; config ignored."""
    bits = x_fp8.cpu().view(torch.uint8).long()
    scale = scale.cpu()
    table = torch.cat([e4m3_table(), torch.tensor([float("nan")])])
    value = table[bits & 0x7F] * torch.where(bits >= 0x80, -1.0, 1.0)
    return (value.unflatten(-1, (-1, block_size)) * scale.unsqueeze(-1)).flatten(-2)
