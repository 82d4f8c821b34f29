"""Compressor (`torch.ops.dsv4.compress_kv` semantics, see model/ops.py) in one kernel: gated softmax
pooling of blocks of `ratio` tokens, then RMSNorm, RoPE and the FP8 or Hadamard+FP4 simulation fused
into the epilogue. One program per (entry, batch) holds the whole d-channel row of its entry; the
block's rows stream through in [block_r, d] tiles with an online (running max) softmax per channel.

Precision: the pooling sums in another order than the plain op (tiles, online rescaling), and
compiled on a GPU `tl.exp` / fused multiply-adds differ in the last bits; the epilogue follows the plain
op's operations (true division and sqrt, the same RoPE products, the same butterfly Hadamard, the
exact FP8/FP4 roundings of kernels/_jit_utils.py), so the quantized values equal the plain op's except
for a rare code flip (a value on a rounding boundary, or a block amax crossing a power of two) caused
by those last-bit differences before quantization.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import FLOAT_DTYPES, check, check_tensor, kernel_op, launch, resolve_config
from .._jit_utils import block_scale, divide_by_scale, e4m3_bits, round_bf16
from ..fp4_quant.fp4_quant import _e2m1_code, _e2m1_value
from .config import CompressKVConfig, default_config

QUANTS = ("fp8", "hadamard_fp4")
MAX_DIM = 1024  # the whole row lives in registers
FP8_BLOCK = 64
FP4_BLOCK = 32


# ================================================================================================
# Kernel
# ================================================================================================

@triton.jit
def _e4m3_value(code):
    """float8_e4m3fn bit pattern (int32 0..255) -> its fp32 value (0x7F / 0xFF -> NaN)."""
    e = (code >> 3) & 15
    m = code & 7
    normal = ((e + 120) << 23) | (m << 20)
    sub = (m.to(tl.float32) * 0.001953125).to(tl.int32, bitcast=True)     # m * 2^-9, exact
    mag = tl.where(e == 0, sub, normal)
    mag = tl.where((code & 0x7F) == 0x7F, 0x7FC00000, mag)
    return (mag | ((code & 0x80) << 24)).to(tl.float32, bitcast=True)


@triton.jit
def _compress_kv_kernel(p_kv, p_score, p_ape, p_w, p_cos, p_sin, p_out,
                        T, N, cos_stride_b, norm_eps, had_scale,
                        C: tl.constexpr, D: tl.constexpr, R: tl.constexpr, RATIO: tl.constexpr,
                        NPHASE: tl.constexpr, QUANT_FP8: tl.constexpr, RECIP: tl.constexpr,
                        LOG_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # p_kv, p_score [B, T, C]; p_ape [RATIO, C] fp32; p_w [D] fp32; p_cos, p_sin [(B,) N, R/2] fp32;
    # p_out [B, N, D] fp32. NPHASE = 2 with overlap (previous block on channels [0, D), then the
    # current block on [D, 2D)), else 1 (current block on [0, D)).
    # float arguments are fp64 in AOTInductor's launch signature: keep the math in fp32
    norm_eps = tl.cast(norm_eps, tl.float32)
    had_scale = tl.cast(had_scale, tl.float32)
    i = tl.program_id(0)
    b = tl.program_id(1)
    o_c = tl.arange(0, BLOCK_D)
    m_c = o_c < D
    o_r = tl.arange(0, BLOCK_R)
    m_i = tl.full([BLOCK_D], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    base = b.to(tl.int64) * T * C
    for phase in tl.static_range(NPHASE):
        blk = i - (NPHASE - 1) + phase
        ch = phase * D
        for r0 in range(0, RATIO, BLOCK_R):
            rows = r0 + o_r
            tok = blk * RATIO + rows
            m_r = (rows < RATIO) & (tok < T) & (tok >= 0)
            mask = m_r[:, None] & m_c[None, :]
            offs = base + tok[:, None].to(tl.int64) * C + ch + o_c[None, :]
            b_s = tl.load(p_score + offs, mask=mask, other=float("-inf")).to(tl.float32)
            b_s = b_s + tl.load(p_ape + rows[:, None] * C + ch + o_c[None, :], mask=mask, other=0.0)
            b_x = tl.load(p_kv + offs, mask=mask, other=0.0).to(tl.float32)
            m_new = tl.maximum(m_i, tl.max(b_s, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)                # an all-absent tile
            alpha = tl.exp(m_i - m_safe)
            b_p = tl.exp(b_s - m_safe[None, :])
            l_i = l_i * alpha + tl.sum(b_p, axis=0)
            acc = acc * alpha + tl.sum(b_x * b_p, axis=0)
            m_i = m_new
    # an empty block (no token present) pools to 0; NaN totals stay NaN
    pooled = tl.where(l_i != 0, tl.div_rn(acc, tl.where(l_i != 0, l_i, 1.0)), 0.0)
    pooled = tl.where(m_c, pooled, 0.0)

    # RMSNorm * weight (the plain op's order: x * rsqrt(mean(x^2) + eps) * w)
    ms = tl.div_rn(tl.sum(pooled * pooled, axis=0), D * 1.0)
    inv = tl.div_rn(1.0, tl.sqrt_rn(ms + norm_eps))
    w = tl.load(p_w + o_c, mask=m_c, other=0.0).to(tl.float32)
    y = pooled * inv * w

    # RoPE on the last R dims: interleaved pairs (2k, 2k+1)
    HALF: tl.constexpr = BLOCK_D // 2
    re, im = tl.split(tl.reshape(y, [HALF, 2]))
    o_p = tl.arange(0, HALF)
    k = o_p - (D - R) // 2
    m_p = (k >= 0) & (o_p < D // 2)
    cs_off = b.to(tl.int64) * cos_stride_b + i * (R // 2) + k
    cs = tl.load(p_cos + cs_off, mask=m_p, other=1.0).to(tl.float32)
    sn = tl.load(p_sin + cs_off, mask=m_p, other=0.0).to(tl.float32)
    re2 = tl.where(m_p, re * cs - im * sn, re)
    im2 = tl.where(m_p, re * sn + im * cs, im)
    y = tl.reshape(tl.join(re2, im2), [BLOCK_D])

    if QUANT_FP8:
        # FP8 simulation of the first D - R dims (blocks of 64, pow2 scales), BF16 rounding of the rest
        NB: tl.constexpr = BLOCK_D // 64
        nope = o_c < D - R
        yb = tl.reshape(tl.where(nope, y, 0.0), [NB, 64])
        s8 = block_scale(yb, 448.0, True, RECIP)                               # [NB]
        q = divide_by_scale(yb, s8, True)
        q = tl.where(q > 448.0, 448.0, tl.where(q < -448.0, -448.0, q))
        v = tl.reshape(_e4m3_value(e4m3_bits(q)) * s8[:, None], [BLOCK_D])
        out = tl.where(nope, v, round_bf16(y))
    else:
        # Walsh-Hadamard butterflies (as the plain op: pair i with i + h inside each block of 2h),
        # then FP4 simulation (blocks of 32, pow2 scales). BLOCK_D == D here.
        h = y
        for s in tl.static_range(LOG_D):
            # the half-width 1 << s is spelled inline: a constexpr name cannot be rebound per step
            t = tl.permute(tl.reshape(h, [BLOCK_D // (2 << s), 2, 1 << s]), [0, 2, 1])
            a, c = tl.split(t)
            t = tl.permute(tl.join(a + c, a - c), [0, 2, 1])
            h = tl.reshape(t, [BLOCK_D])
        h = h * had_scale
        NB4: tl.constexpr = BLOCK_D // 32
        hb = tl.reshape(h, [NB4, 32])
        s4 = block_scale(hb, 6.0, True, RECIP)
        v = _e2m1_value(_e2m1_code(divide_by_scale(hb, s4, True))) * s4[:, None]
        out = tl.reshape(v, [BLOCK_D])
    tl.store(p_out + (b.to(tl.int64) * N + i) * D + o_c, out, mask=m_c)


# ================================================================================================
# Launcher and public function
# ================================================================================================

def _launch(kv, score, ape, norm_weight, cos, sin, out, ratio: int, overlap: bool, norm_eps: float,
            quant: str, cfg: CompressKVConfig) -> None:
    B, T, C = kv.shape
    N, d = out.shape[1], out.shape[2]
    if B == 0 or N == 0:
        return
    R = 2 * cos.shape[-1]
    block_d = max(triton.next_power_of_2(d), FP8_BLOCK) if quant == "fp8" else d
    cos_stride_b = N * (R // 2) if cos.dim() == 3 else 0
    launch(_compress_kv_kernel, (N, B), kv, score, ape, norm_weight, cos, sin, out,
           T, N, cos_stride_b, float(norm_eps), float(d ** -0.5),
           C=C, D=d, R=R, RATIO=ratio, NPHASE=2 if overlap else 1, QUANT_FP8=quant == "fp8",
           RECIP=kv.device.type == "cuda", LOG_D=max(d.bit_length() - 1, 0),
           BLOCK_R=min(cfg.block_r, triton.next_power_of_2(ratio)), BLOCK_D=block_d,
           num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def compress_kv(kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, norm_weight: torch.Tensor,
                cos: torch.Tensor, sin: torch.Tensor, ratio: int, overlap: bool, norm_eps: float, quant: str,
                config: CompressKVConfig | dict | str | None = None) -> torch.Tensor:
    """Pool blocks of `ratio` tokens into N = cos.shape[-2] entries, then RMSNorm, RoPE, quant sim.

    kv, score [B, T, C] float32 / bfloat16 / float16 (C = 2d with `overlap`, else d); ape [ratio, C]
    float32; norm_weight [d] float32; cos, sin [N, R/2] or [B, N, R/2] float32 (R even, 2 <= R <= d); all
    contiguous, on one device. quant "fp8" needs (d - R) % 64 == 0; "hadamard_fp4" needs d a power of
    two, multiple of 32. d <= 1024. Returns [B, N, d] float32 (see `torch.ops.dsv4.compress_kv`).
    """
    op = "compress_kv"
    check(quant in QUANTS, f"{op}: quant {quant!r}; accepted: {', '.join(QUANTS)}")
    check(isinstance(ratio, int) and ratio >= 1, f"{op}: ratio {ratio!r} must be a positive int")
    check_tensor(op, "kv", kv, FLOAT_DTYPES, ndim=3)
    dev = kv.device
    check_tensor(op, "score", score, FLOAT_DTYPES, shape=kv.shape, device=dev)
    B, T, C = kv.shape
    check(not overlap or C % 2 == 0, f"{op}: overlap needs an even channel count, got {C}")
    d = C // 2 if overlap else C
    check(1 <= d <= MAX_DIM, f"{op}: d = {d} must be in [1, {MAX_DIM}]")
    check_tensor(op, "ape", ape, (torch.float32,), shape=(ratio, C), device=dev)
    check_tensor(op, "norm_weight", norm_weight, (torch.float32,), shape=(d,), device=dev)
    check_tensor(op, "cos", cos, (torch.float32,), device=dev)
    check(cos.dim() in (2, 3) and (cos.dim() == 2 or cos.shape[0] == B),
          f"{op}: cos has shape {tuple(cos.shape)}; need [N, R/2] or [{B}, N, R/2]")
    check_tensor(op, "sin", sin, (torch.float32,), shape=cos.shape, device=dev)
    N, R = cos.shape[-2], 2 * cos.shape[-1]
    check(2 <= R <= d, f"{op}: rope dims R = {R} must be in [2, d = {d}]")
    if quant == "fp8":
        check((d - R) % FP8_BLOCK == 0, f"{op}: fp8 needs d - R = {d - R} to be a multiple of {FP8_BLOCK}")
    else:
        check(d % FP4_BLOCK == 0 and d & (d - 1) == 0,
              f"{op}: hadamard_fp4 needs d = {d} to be a power of two and a multiple of {FP4_BLOCK}")
    cfg = resolve_config(CompressKVConfig, config, default_config, dev)
    out = torch.empty((B, N, d), dtype=torch.float32, device=dev)
    _launch(kv, score, ape, norm_weight, cos, sin, out, ratio, bool(overlap), norm_eps, quant, cfg)
    return out


@kernel_op("compress_kv")
def _compress_kv_op(kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, norm_weight: torch.Tensor,
                    cos: torch.Tensor, sin: torch.Tensor, ratio: int, overlap: bool, norm_eps: float,
                    quant: str, config: str = "") -> torch.Tensor:
    return compress_kv(kv, score, ape, norm_weight, cos, sin, ratio, overlap, norm_eps, quant, config)
