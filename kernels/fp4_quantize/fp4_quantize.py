"""Blockwise FP4 e2m1 quantize (packed two codes per byte, element 2i in the low nibble) / dequantize,
one pass over memory (`torch.ops.dsv4.fp4_quantize` / `fp4_dequantize` semantics, see model/ops.py).

Bit-exact against the plain op on the same device, NaN/Inf included, with the FP8 kernel's notes
(kernels/fp8_quantize/fp8_quantize.py): the scale's "/ 6" follows torch's per-device rule (true division on
the CPU, fp32-reciprocal multiply on CUDA), and the power-of-two scale is rounded up exactly where the
plain op's exp2(ceil(log2(s))) can round down for s a few ulps above a power of two. Dequantized
code 8 is -0.0 (its sign set on the bits: a compiled `-x` is `0 - x`, which loses it).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...model import ops as plain
from .._common import FLOAT_DTYPES, check, check_tensor, kernel_op, launch, resolve_config
from .._jit_utils import block_scale, divide_by_scale
from ..fp8_quantize.config import launch_grid
from .config import Fp4QuantConfig, default_config

# DeepSeek's FP4 amax floor; a constexpr, since @triton.jit code may read no other kind of global.
FP4_AMAX_FLOOR = tl.constexpr(plain.FP4_AMAX_FLOOR)


# ================================================================================================
# Kernels
# ================================================================================================

@triton.jit
def _e2m1_code(y):
    """fp32 y (already divided by its scale) -> e2m1 code 0..15 (int32): nearest of 0, .5, 1, 1.5,
    2, 3, 4, 6, ties to the even code; | 8 when y < 0. NaN -> 0 (every comparison is false)."""
    mag = tl.abs(y)
    code = ((mag > 0.25).to(tl.int32) + (mag >= 0.75).to(tl.int32) + (mag > 1.25).to(tl.int32)
            + (mag >= 1.75).to(tl.int32) + (mag > 2.5).to(tl.int32) + (mag >= 3.5).to(tl.int32)
            + (mag > 5.0).to(tl.int32))
    return code | tl.where(y < 0.0, 8, 0)


@triton.jit
def _e2m1_value(code):
    """e2m1 code 0..15 (int32) -> fp32 value (code 8 is -0.0)."""
    k = code & 7
    e = k >> 1
    m = (k & 1).to(tl.float32)
    mag = tl.where(e == 0, 0.5 * m, (1.0 + 0.5 * m) * tl.where(e == 3, 4.0, tl.where(e == 2, 2.0, 1.0)))
    # the sign on the bits: a compiled `-mag` is 0 - mag, which loses the sign of code 8 (-0.0)
    return (mag.to(tl.int32, bitcast=True) | ((code & 8) << 28)).to(tl.float32, bitcast=True)


@triton.jit
def _fp4_quantize_kernel(p_x, p_q, p_s, Q,
                         BS: tl.constexpr, POW2: tl.constexpr, RECIP: tl.constexpr, BLOCK_Q: tl.constexpr,
                         BLOCK_S: tl.constexpr):
    # The [..., D] tensors read as Q = numel / BS quantization blocks:
    # p_x [Q, BS] float; p_q [Q, BS/2] uint8; p_s [Q] float32; BLOCK_S = next_pow2(BS), BS even
    o_q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)                # [BQ]
    o_j = tl.arange(0, BLOCK_S)
    m_q = o_q < Q
    b_x = tl.load(p_x + o_q[:, None].to(tl.int64) * BS + o_j[None, :],
                  mask=m_q[:, None] & (o_j[None, :] < BS), other=0.0).to(tl.float32)   # [BQ, BS]
    b_s = block_scale(b_x, 6.0, FP4_AMAX_FLOOR, POW2, RECIP)                       # [BQ]
    b_c = _e2m1_code(divide_by_scale(b_x, b_s, POW2))                       # [BQ, BS]
    lo, hi = tl.split(tl.reshape(b_c, [BLOCK_Q, BLOCK_S // 2, 2]))         # elements 2i, 2i + 1
    o_i = tl.arange(0, BLOCK_S // 2)
    tl.store(p_q + o_q[:, None].to(tl.int64) * (BS // 2) + o_i[None, :], (lo | (hi << 4)).to(tl.uint8),
             mask=m_q[:, None] & (o_i[None, :] < BS // 2))
    tl.store(p_s + o_q, b_s, mask=m_q)


@triton.jit
def _fp4_dequantize_kernel(p_q, p_s, p_o, Q, BS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_S: tl.constexpr):
    # p_q [Q, BS/2] uint8; p_s [Q] float32; p_o [Q, BS] float32
    o_q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    o_i = tl.arange(0, BLOCK_S // 2)
    m_q = o_q < Q
    b_p = tl.load(p_q + o_q[:, None].to(tl.int64) * (BS // 2) + o_i[None, :],
                  mask=m_q[:, None] & (o_i[None, :] < BS // 2), other=0).to(tl.int32)   # [BQ, BS/2]
    b_v = tl.reshape(tl.join(_e2m1_value(b_p & 15), _e2m1_value(b_p >> 4)), [BLOCK_Q, BLOCK_S])
    b_s = tl.load(p_s + o_q, mask=m_q, other=0.0)
    o_j = tl.arange(0, BLOCK_S)
    tl.store(p_o + o_q[:, None].to(tl.int64) * BS + o_j[None, :], b_v * b_s[:, None],
             mask=m_q[:, None] & (o_j[None, :] < BS))


# ================================================================================================
# Launchers (tensors go whole: contiguous [..., D] read as [Q, block_size])
# ================================================================================================

def _launch_quantize(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, block_size: int, pow2: bool,
                     cfg: Fp4QuantConfig) -> None:
    Q = x.numel() // block_size
    if Q == 0:
        return
    grid, meta = launch_grid(Q, block_size, cfg)
    launch(_fp4_quantize_kernel, grid, x, packed, scale, Q, POW2=pow2, RECIP=x.device.type == "cuda", **meta)


def _launch_dequantize(packed: torch.Tensor, scale: torch.Tensor, out: torch.Tensor, block_size: int,
                       cfg: Fp4QuantConfig) -> None:
    Q = out.numel() // block_size
    if Q == 0:
        return
    grid, meta = launch_grid(Q, block_size, cfg)
    launch(_fp4_dequantize_kernel, grid, packed, scale, out, Q, **meta)


# ================================================================================================
# Public functions
# ================================================================================================

def fp4_quantize(x: torch.Tensor, block_size: int, pow2_scale: bool = False,
                 config: Fp4QuantConfig | dict | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise FP4 e2m1 quantization along the last dim, packed two codes per byte, in one pass.

    x [..., D] float32 / bfloat16 / float16, contiguous; block_size even, dividing D
    -> packed [..., D/2] uint8 (element 2i in the low nibble, 2i+1 in the high nibble),
       scale [..., D/block_size] float32 = max(amax, 6 * 2^-126) / 6 (rounded up to a power of two when
       `pow2_scale`). x/scale goes to the nearest of 0, .5, 1, 1.5, 2, 3, 4, 6 (signed), ties to the
       even code. NaN/Inf: a block holding a NaN gets scale NaN, one holding +-Inf scale +Inf; codes
       follow the formula (NaN -> +0) and dequantize to NaN.
    """
    check_tensor("fp4_quantize", "x", x, FLOAT_DTYPES, min_ndim=1)
    check(block_size >= 2 and block_size % 2 == 0,
          f"fp4_quantize: block_size {block_size} must be even (two codes per byte)")
    check(x.shape[-1] % block_size == 0,
          f"fp4_quantize: last dim {x.shape[-1]} is not divisible by block_size {block_size}")
    cfg = resolve_config(Fp4QuantConfig, config, default_config, x.device)
    D = x.shape[-1]
    packed = torch.empty((*x.shape[:-1], D // 2), dtype=torch.uint8, device=x.device)
    scale = torch.empty((*x.shape[:-1], D // block_size), dtype=torch.float32, device=x.device)
    _launch_quantize(x, packed, scale, block_size, bool(pow2_scale), cfg)
    return packed, scale


def fp4_dequantize(packed: torch.Tensor, scale: torch.Tensor, block_size: int,
                   config: Fp4QuantConfig | dict | str | None = None) -> torch.Tensor:
    """packed [..., D/2] uint8, scale [..., D/block_size] float32 (both contiguous)
    -> float32 [..., D] = e2m1 value * scale of its block (NaN/Inf scales give NaN/Inf as the product)."""
    check_tensor("fp4_dequantize", "packed", packed, (torch.uint8,), min_ndim=1)
    D = packed.shape[-1] * 2
    check(block_size >= 2 and block_size % 2 == 0 and D % block_size == 0,
          f"fp4_dequantize: unpacked last dim {D} is not divisible by even block_size {block_size}")
    check_tensor("fp4_dequantize", "scale", scale, (torch.float32,),
                 shape=(*packed.shape[:-1], D // block_size), device=packed.device)
    cfg = resolve_config(Fp4QuantConfig, config, default_config, packed.device)
    out = torch.empty((*packed.shape[:-1], D), dtype=torch.float32, device=packed.device)
    _launch_dequantize(packed, scale, out, block_size, cfg)
    return out


# ================================================================================================
# Torch ops (torch.ops.dsv4_triton.*): the dsv4 signature plus a config string
# ================================================================================================

@kernel_op("fp4_quantize")
def _fp4_quantize_op(x: torch.Tensor, block_size: int, pow2_scale: bool = False,
                     config: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    return fp4_quantize(x, block_size, pow2_scale, config)


@kernel_op("fp4_dequantize")
def _fp4_dequantize_op(packed: torch.Tensor, scale: torch.Tensor, block_size: int, config: str = "") -> torch.Tensor:
    return fp4_dequantize(packed, scale, block_size, config)
