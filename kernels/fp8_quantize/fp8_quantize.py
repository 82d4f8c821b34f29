"""Blockwise FP8 e4m3 quantize / dequantize in one pass over memory (`torch.ops.dsv4.fp8_quantize` /
`fp8_dequantize` semantics, see model/ops.py).

Bit-exact against the plain op on the same device (codes, scales and dequantized values), NaN/Inf
included. The plain op's scale is itself device-dependent: torch computes `amax / 448` by true
division on the CPU but as `amax * fp32(1/448)` on CUDA (a Python-scalar divisor becomes a reciprocal
multiply), which differs in the last bit for ~half the blocks; the kernel follows the device of its
input (RECIP), as does the naive twin. One documented exception: with `pow2_scale` the kernel rounds the scale up to a power of two exactly (on
the bits), while the plain op's exp2(ceil(log2(s))) can round DOWN when s lies a few ulps above a
power of two (log2 rounds to the integer): there the plain scale is half the kernel's, its codes
saturate at 448, and the kernel's are the correct "rounded up" ones. The sign of a NaN code is not
specified (x86 and CUDA make NaNs of different signs); NaN codes are compared as NaN.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import FLOAT_DTYPES, INTERPRET, check, check_tensor, kernel_op, launch, placeholder, resolve_config
from .._jit_utils import ceil_pow2, divide_by_scale, e4m3_bits, e4m3_dequantized
from .config import Fp8QuantConfig, default_config, launch_grid

FP8_MAX = 448.0


# ================================================================================================
# Kernels
# ================================================================================================

@triton.jit
def _block_scale_bits(b_x, POW2: tl.constexpr, RECIP: tl.constexpr):
    """b_x [BQ, BS] fp32, one block per row (padding = 0) -> scale [BQ], as `_jit_utils.block_scale`
    (NaN block -> NaN, Inf block -> +Inf) with ONE integer max: the bits of |x| order as the values,
    and every NaN's bits exceed +Inf's, so the max of the bits is NaN wherever a NaN is (tl.max on
    floats drops NaN, which costs block_scale a second reduction)."""
    b_abs = b_x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    amax = tl.max(b_abs, axis=1).to(tl.float32, bitcast=True)              # [BQ]
    amax = tl.where(amax < 1e-4, 1e-4, amax)                                 # NaN stays NaN
    if RECIP:
        inv = tl.div_rn(tl.full(amax.shape, 1.0, tl.float32), tl.full(amax.shape, 448.0, tl.float32))
        s = amax * inv
    else:
        s = tl.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32))
    if POW2:
        s = ceil_pow2(s)
    return s


@triton.jit
def _fp8_quantize_kernel(p_x, p_q, p_s, Q,
                         BS: tl.constexpr, POW2: tl.constexpr, RECIP: tl.constexpr, NATIVE_CAST: tl.constexpr,
                         ROUNDED: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_S: tl.constexpr):
    # The [..., D] tensors read as Q = numel / BS quantization blocks of BS elements:
    # p_x [Q, BS] float; p_q [Q, BS] float8_e4m3fn; p_s [Q] float32; BLOCK_S = next_pow2(BS).
    # ROUNDED: p_q [Q, BS] float, each code times its scale (the dequantized values), p_s unused
    o_q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)                # [BQ]
    o_j = tl.arange(0, BLOCK_S)                                             # [BS]
    offs = o_q[:, None].to(tl.int64) * BS + o_j[None, :]
    mask = (o_q[:, None] < Q) & (o_j[None, :] < BS)
    b_x = tl.load(p_x + offs, mask=mask, other=0.0).to(tl.float32)         # [BQ, BS]
    b_s = _block_scale_bits(b_x, POW2, RECIP)                               # [BQ]
    b_y = divide_by_scale(b_x, b_s, POW2)
    if NATIVE_CAST:
        # cvt.rn.satfinite.e4m3x2.f32: round to nearest even, finite values beyond +-448 (and +-Inf,
        # which a finite scale never leaves) saturate to +-448, NaN stays NaN: the clamp is built in.
        b_q = b_y.to(tl.float8e4nv)
    else:
        b_y = tl.where(b_y > 448.0, 448.0, tl.where(b_y < -448.0, -448.0, b_y))  # clamp, NaN kept
        b_q = e4m3_bits(b_y).to(tl.uint8).to(tl.float8e4nv, bitcast=True)
    if ROUNDED:
        tl.store(p_q + offs, e4m3_dequantized(b_q, b_s, NATIVE_CAST).to(p_q.dtype.element_ty), mask=mask)
    else:
        tl.store(p_q + offs, b_q, mask=mask)
        tl.store(p_s + o_q, b_s, mask=o_q < Q)


@triton.jit
def _fp8_dequantize_kernel(p_q, p_s, p_o, Q, BS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_S: tl.constexpr):
    # p_q [Q, BS] float8_e4m3fn; p_s [Q] float32; p_o [Q, BS] float32
    o_q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    o_j = tl.arange(0, BLOCK_S)
    offs = o_q[:, None].to(tl.int64) * BS + o_j[None, :]
    mask = (o_q[:, None] < Q) & (o_j[None, :] < BS)
    b_q = tl.load(p_q + offs, mask=mask, other=0.0).to(tl.float32)          # exact: every e4m3 value is an fp32
    b_s = tl.load(p_s + o_q, mask=o_q < Q, other=0.0)
    tl.store(p_o + offs, b_q * b_s[:, None], mask=mask)


# ================================================================================================
# Launchers (tensors go whole: contiguous [..., D] read as [Q, block_size]; no views of outputs,
# which keeps the triton_op body simple to functionalize)
# ================================================================================================

def _launch_quantize(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, block_size: int, pow2: bool,
                     cfg: Fp8QuantConfig) -> None:
    """codes [..., D] e4m3 and scale [..., D / block_size] of x; codes of another dtype: the rounded
    values themselves (fp8_round; scale unused)."""
    Q = x.numel() // block_size
    if Q == 0:
        return
    grid, meta = launch_grid(Q, block_size, cfg)
    launch(_fp8_quantize_kernel, grid, x, codes, scale, Q, POW2=pow2, RECIP=x.device.type == "cuda",
           NATIVE_CAST=cfg.cast == "native" and not INTERPRET, ROUNDED=codes.dtype != torch.float8_e4m3fn, **meta)


def _launch_dequantize(codes: torch.Tensor, scale: torch.Tensor, out: torch.Tensor, block_size: int,
                       cfg: Fp8QuantConfig) -> None:
    Q = codes.numel() // block_size
    if Q == 0:
        return
    grid, meta = launch_grid(Q, block_size, cfg)
    launch(_fp8_dequantize_kernel, grid, codes, scale, out, Q, **meta)


# ================================================================================================
# Public functions
# ================================================================================================

def fp8_quantize(x: torch.Tensor, block_size: int, pow2_scale: bool,
                 config: Fp8QuantConfig | dict | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise FP8 e4m3 quantization along the last dim, in one pass.

    x [..., D] float32 / bfloat16 / float16, contiguous, D divisible by block_size (any block_size >= 1)
    -> x_fp8 [..., D] float8_e4m3fn, scale [..., D / block_size] float32.
    scale = max(amax, 1e-4) / 448 per block (rounded up to a power of two when `pow2_scale`);
    x_fp8 = clamp(x / scale, +-448) rounded to nearest even.
    NaN/Inf: a block holding a NaN gets scale NaN and all its codes NaN; a block holding +-Inf gets
    scale +Inf, its infinite elements become NaN codes and its finite elements 0 (as the plain op).
    """
    check_tensor("fp8_quantize", "x", x, FLOAT_DTYPES, min_ndim=1)
    check(block_size >= 1 and x.shape[-1] % block_size == 0,
          f"fp8_quantize: last dim {x.shape[-1]} is not divisible by block_size {block_size}")
    cfg = resolve_config(Fp8QuantConfig, config, default_config, x.device)
    D = x.shape[-1]
    codes = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((*x.shape[:-1], D // block_size), dtype=torch.float32, device=x.device)
    _launch_quantize(x, codes, scale, block_size, bool(pow2_scale), cfg)
    return codes, scale


def fp8_round(x: torch.Tensor, block_size: int, pow2_scale: bool, out_dtype: torch.dtype | None = None,
              config: Fp8QuantConfig | dict | str | None = None) -> torch.Tensor:
    """x [..., D] as fp8_quantize takes it -> [..., D] in out_dtype (default x's): each value rounded to
    FP8 as fp8_quantize rounds it, times its block's scale: fp8_dequantize(*fp8_quantize(x, ...)) in
    one pass (the values W4A8 multiplies on bf16 tensor cores). Exact in float32, and in bfloat16 with
    power-of-two scales (4 significant bits, exponents within bf16's); fp16's range does not hold them
    all."""
    check_tensor("fp8_round", "x", x, FLOAT_DTYPES, min_ndim=1)
    check(block_size >= 1 and x.shape[-1] % block_size == 0,
          f"fp8_round: last dim {x.shape[-1]} is not divisible by block_size {block_size}")
    out_dtype = x.dtype if out_dtype is None else out_dtype
    check(out_dtype in (torch.float32, torch.bfloat16),
          f"fp8_round: out_dtype {out_dtype}; accepted: torch.float32, torch.bfloat16 (which hold every rounded value)")
    check(out_dtype == torch.float32 or pow2_scale,
          f"fp8_round: out_dtype {out_dtype} with pow2_scale False; bf16 holds the rounded values with power-of-two "
          f"scales only: accepted pow2_scale True or out_dtype torch.float32")
    cfg = resolve_config(Fp8QuantConfig, config, default_config, x.device)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    _launch_quantize(x, out, placeholder(x.device, torch.float32), block_size, bool(pow2_scale), cfg)
    return out


def fp8_dequantize(x_fp8: torch.Tensor, scale: torch.Tensor, block_size: int,
                   config: Fp8QuantConfig | dict | str | None = None) -> torch.Tensor:
    """x_fp8 [..., D] float8_e4m3fn, scale [..., D / block_size] float32 (both contiguous)
    -> float32 [..., D] = code * scale of its block (exact; NaN codes or scales give NaN)."""
    check_tensor("fp8_dequantize", "x_fp8", x_fp8, (torch.float8_e4m3fn,), min_ndim=1)
    D = x_fp8.shape[-1]
    check(block_size >= 1 and D % block_size == 0,
          f"fp8_dequantize: last dim {D} is not divisible by block_size {block_size}")
    check_tensor("fp8_dequantize", "scale", scale, (torch.float32,),
                 shape=(*x_fp8.shape[:-1], D // block_size), device=x_fp8.device)
    cfg = resolve_config(Fp8QuantConfig, config, default_config, x_fp8.device)
    out = torch.empty(x_fp8.shape, dtype=torch.float32, device=x_fp8.device)
    _launch_dequantize(x_fp8, scale, out, block_size, cfg)
    return out


# ================================================================================================
# Torch ops (torch.ops.dsv4_triton.*): the dsv4 signature plus a config string
# ================================================================================================

@kernel_op("fp8_quantize")
def _fp8_quantize_op(x: torch.Tensor, block_size: int, pow2_scale: bool,
                     config: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    return fp8_quantize(x, block_size, pow2_scale, config)


@kernel_op("fp8_dequantize")
def _fp8_dequantize_op(x_fp8: torch.Tensor, scale: torch.Tensor, block_size: int, config: str = "") -> torch.Tensor:
    return fp8_dequantize(x_fp8, scale, block_size, config)
