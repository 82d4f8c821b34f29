"""Compressor (`torch.ops.dsv4.compress_kv` semantics, see model/ops.py) in two kernels:

1. `_pool_kernel`, the gated softmax pooling of blocks of `ratio` tokens. The softmax runs over the
   block's rows independently per channel, so a program owns (BLOCK_N entries, BLOCK_C channels):
   grid (N / BLOCK_N, d / BLOCK_C, B), enough programs for the GPU both with few long blocks (HCA:
   N = T/128 entries of 128 rows; the channels give the parallelism) and with many short ones (CSA:
   N = T/4 entries of 4 (+4 overlapping) rows; several entries a program, so that each step reads
   [BLOCK_N * BLOCK_R consecutive rows, BLOCK_C contiguous channels] of kv and score). The rows stream
   through in steps of BLOCK_R with an online (running max) softmax per channel; the pooled rows go
   to the output tensor, in fp32.
2. `_epilogue_kernel`, in place on the output: one program per entry reads its whole pooled row
   (RMSNorm and the FP8 blocks / Hadamard need all d channels) and applies RMSNorm, RoPE and the FP8
   or Hadamard+FP4 simulation. It moves B*N*d*4 bytes twice more, small beside the B*T*C inputs.

Precision: the pooling sums in another order than the plain op (tiles, online rescaling), and
compiled on a GPU `tl.exp` / fused multiply-adds differ in the last bits; the epilogue follows the plain
op's operations (true division and sqrt, the same RoPE products, the same butterfly Hadamard, the
exact FP8/FP4 roundings of kernels/_jit_utils.py), so the quantized values equal the plain op's except
for a rare code flip (a value on a rounding boundary, or a block amax crossing a power of two) caused
by those last-bit differences before quantization. Per (entry, channel) the pooling does the same
operations in the same order as the former one-program-per-entry kernel for the same block_r (the
channel split and the entries a program holds do not enter the arithmetic).
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from .._common import FLOAT_DTYPES, check, check_tensor, kernel_op, launch, resolve_config
from .._jit_utils import block_scale, divide_by_scale, e4m3_bits, e4m3_value, round_bf16
from ..fp4_quantize.fp4_quantize import FP4_AMAX_FLOOR, _e2m1_code, _e2m1_value
from .config import CompressKVConfig, default_config, tiles

QUANTS = ("fp8", "hadamard_fp4")
MAX_DIM = 1024  # the whole row lives in registers
FP8_BLOCK = 64
FP4_BLOCK = 32


# ================================================================================================
# Kernel
# ================================================================================================

@triton.jit
def _pool_kernel(p_kv, p_score, p_ape, p_out, T, N,
                 C: tl.constexpr, D: tl.constexpr, RATIO: tl.constexpr, NPHASE: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # Stage 1, the gated softmax pooling: one program per (BLOCK_N entries, BLOCK_C channels, batch).
    # p_kv, p_score [B, T, C]; p_ape [RATIO, C] fp32; p_out [B, N, D] fp32 (the pooled rows, before
    # the epilogue). NPHASE = 2 with overlap (previous block on channels [0, D), then the current
    # block on [D, 2D)), else 1 (current block on [0, D)). Each step reads a [BLOCK_N, BLOCK_R,
    # BLOCK_C] tile: BLOCK_R rows of each of BLOCK_N consecutive entries (consecutive tokens when
    # BLOCK_R covers the block), BLOCK_C contiguous channels of each row. The softmax is per channel,
    # so splitting the channels over programs changes nothing in the arithmetic: per (entry, channel)
    # it is the same online softmax over the same BLOCK_R-row steps as one program per entry does.
    pid_n = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2)
    o_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    o_r = tl.arange(0, BLOCK_R)
    m_n = o_n < N
    m_c = o_c < D
    m_i = tl.full([BLOCK_N, BLOCK_C], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    base = b.to(tl.int64) * T * C
    for phase in tl.static_range(NPHASE):
        blk = o_n - (NPHASE - 1) + phase                                      # [BLOCK_N]
        ch = phase * D
        for r0 in range(0, RATIO, BLOCK_R):
            rows = r0 + o_r                                                   # [BLOCK_R]
            m_rows = rows < RATIO
            tok = blk[:, None] * RATIO + rows[None, :]                        # [BLOCK_N, BLOCK_R]
            m_r = m_n[:, None] & m_rows[None, :] & (tok < T) & (tok >= 0)
            mask = m_r[:, :, None] & m_c[None, None, :]
            offs = base + tok[:, :, None].to(tl.int64) * C + ch + o_c[None, None, :]
            b_s = tl.load(p_score + offs, mask=mask, other=float("-inf")).to(tl.float32)
            b_a = tl.load(p_ape + rows[:, None] * C + ch + o_c[None, :], mask=m_rows[:, None] & m_c[None, :],
                          other=0.0)                                          # [BLOCK_R, BLOCK_C]
            # an absent row stays exactly -inf (as if its ape were 0 too)
            b_s = tl.where(mask, b_s + b_a[None, :, :], float("-inf"))
            b_x = tl.load(p_kv + offs, mask=mask, other=0.0).to(tl.float32)
            m_new = tl.maximum(m_i, tl.max(b_s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)                # an all-absent tile
            alpha = tl.exp(m_i - m_safe)
            b_p = tl.exp(b_s - m_safe[:, None, :])
            l_i = l_i * alpha + tl.sum(b_p, axis=1)
            acc = acc * alpha + tl.sum(b_x * b_p, axis=1)
            m_i = m_new
    # an empty block (no token present) pools to 0; NaN totals stay NaN
    pooled = tl.where(l_i != 0, tl.div_rn(acc, tl.where(l_i != 0, l_i, 1.0)), 0.0)
    out_off = (b.to(tl.int64) * N + o_n[:, None]) * D + o_c[None, :]
    tl.store(p_out + out_off, pooled, mask=m_n[:, None] & m_c[None, :])


@triton.jit
def _epilogue_kernel(p_out, p_w, p_cos, p_sin, N, cos_stride_b, norm_eps, had_scale,
                     D: tl.constexpr, R: tl.constexpr, QUANT_FP8: tl.constexpr, RECIP: tl.constexpr,
                     LOG_D: tl.constexpr, BLOCK_D: tl.constexpr):
    # Stage 2, in place on p_out [B, N, D] fp32: one program per (entry, batch) reads its pooled row,
    # then RMSNorm, RoPE and the quantization simulation (they need the whole row). Every value
    # stored depends on the row's norm (a reduction over all the values loaded), so no store can
    # overtake a load of the same row.
    # float arguments are fp64 in AOTInductor's launch signature: keep the math in fp32
    norm_eps = tl.cast(norm_eps, tl.float32)
    had_scale = tl.cast(had_scale, tl.float32)
    i = tl.program_id(0)
    b = tl.program_id(1)
    o_c = tl.arange(0, BLOCK_D)
    m_c = o_c < D
    row = (b.to(tl.int64) * N + i) * D
    pooled = tl.load(p_out + row + o_c, mask=m_c, other=0.0)

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
        s8 = block_scale(yb, 448.0, 1e-4, True, RECIP)                         # [NB]
        q = divide_by_scale(yb, s8, True)
        q = tl.where(q > 448.0, 448.0, tl.where(q < -448.0, -448.0, q))
        v = tl.reshape(e4m3_value(e4m3_bits(q)) * s8[:, None], [BLOCK_D])
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
        s4 = block_scale(hb, 6.0, FP4_AMAX_FLOOR, True, RECIP)
        v = _e2m1_value(_e2m1_code(divide_by_scale(hb, s4, True))) * s4[:, None]
        out = tl.reshape(v, [BLOCK_D])
    tl.store(p_out + row + o_c, out, mask=m_c)


# ================================================================================================
# Launcher and public function
# ================================================================================================

def epilogue_warps(d: int) -> int:
    """Warps of the per-entry epilogue: 4 fp32 values a thread (1 warp for d <= 128, 8 for d = 1024)."""
    return max(1, min(8, triton.next_power_of_2(d) // 128))


def _launch(kv, score, ape, norm_weight, cos, sin, out, ratio: int, overlap: bool, norm_eps: float,
            quant: str, cfg: CompressKVConfig) -> None:
    B, T, C = kv.shape
    N, d = out.shape[1], out.shape[2]
    if B == 0 or N == 0:
        return
    R = 2 * cos.shape[-1]
    block_n, block_r, block_c = tiles(cfg, d, ratio, N)
    launch(_pool_kernel, (triton.cdiv(N, block_n), triton.cdiv(d, block_c), B), kv, score, ape, out, T, N,
           C=C, D=d, RATIO=ratio, NPHASE=2 if overlap else 1, BLOCK_N=block_n, BLOCK_R=block_r, BLOCK_C=block_c,
           num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    block_d = max(triton.next_power_of_2(d), FP8_BLOCK) if quant == "fp8" else d
    cos_stride_b = N * (R // 2) if cos.dim() == 3 else 0
    launch(_epilogue_kernel, (N, B), out, norm_weight, cos, sin, N, cos_stride_b, float(norm_eps), float(d ** -0.5),
           D=d, R=R, QUANT_FP8=quant == "fp8", RECIP=kv.device.type == "cuda", LOG_D=max(d.bit_length() - 1, 0),
           BLOCK_D=block_d, num_warps=epilogue_warps(d), num_stages=1)


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
