"""Block-scaled FP8 linear, W8A8 (`torch.ops.dsv4.fp8_linear` semantics, see model/ops.py): the input
quantized to FP8 e4m3 per row and 128-block of K with power-of-two scales, times an FP8 weight with one
scale per 128 x 128 tile, on FP8 tensor cores (Hopper), accumulated in fp32.

Per 128-step of K the FP8 product of the tile is formed by tl.dot (fp32 accumulator) and added to
the running sum times (activation scale of the row x weight scale of the column's tile); the scales
are powers of two, so the scaling is exact. The plain op dequantizes first and sums in another order:
the two agree to fp32 rounding of the sums. K must be a multiple of 128 (refused otherwise, as the
plain op and DeepSeek do); M and N are any size (masked tiles).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import FLOAT_DTYPES, INTERPRET, check, check_tensor, kernel_op, launch, resolve_config
from .._jit_utils import block_scale, divide_by_scale, e4m3_bits
from .config import SCALE_BLOCK, Fp8LinearConfig, default_config

FP8_MAX = 448.0


@triton.jit
def _quantize_rows(b_x, RECIP: tl.constexpr, NATIVE_CAST: tl.constexpr):
    """b_x [BM, 128] fp32 -> (codes [BM, 128] float8e4nv, scale [BM]): fp8_quantize(x, 128, pow2=True)."""
    s = block_scale(b_x, 448.0, 1e-4, True, RECIP)                               # [BM]
    q = divide_by_scale(b_x, s, True)
    q = tl.where(q > 448.0, 448.0, tl.where(q < -448.0, -448.0, q))
    if NATIVE_CAST:
        codes = q.to(tl.float8e4nv)
    else:
        codes = e4m3_bits(q).to(tl.uint8).to(tl.float8e4nv, bitcast=True)
    return codes, s


@triton.jit
def _quantize_kernel(p_x, p_q, p_s, M, K, stride_xm,
                     RECIP: tl.constexpr, NATIVE_CAST: tl.constexpr, BLOCK_M: tl.constexpr):
    # p_x [M, K] float (row stride stride_xm); p_q [M, K] float8 contiguous; p_s [M, K/128] float32
    o_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    kb = tl.program_id(1)
    o_k = kb * 128 + tl.arange(0, 128)
    m_m = o_m < M
    b_x = tl.load(p_x + o_m[:, None].to(tl.int64) * stride_xm + o_k[None, :], mask=m_m[:, None], other=0.0)
    codes, s = _quantize_rows(b_x.to(tl.float32), RECIP, NATIVE_CAST)
    tl.store(p_q + o_m[:, None].to(tl.int64) * K + o_k[None, :], codes, mask=m_m[:, None])
    tl.store(p_s + o_m.to(tl.int64) * (K // 128) + kb, s, mask=m_m)


@triton.jit
def _fp8_linear_kernel(p_a, p_as, p_w, p_ws, p_y, M, N, K, stride_am,
                       FUSED: tl.constexpr, RECIP: tl.constexpr, NATIVE_CAST: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr):
    # FUSED: p_a [M, K] float x (row stride stride_am), p_as unused; else p_a [M, K] float8 codes
    # (row stride stride_am) and p_as [M, K/128] float32 scales. p_w [N, K] float8; p_ws
    # [cdiv(N, 128), K/128] float32; p_y [M, N] (x's dtype; float32 added into when SPLIT_K > 1),
    # contiguous. Program axis 1: the part of K (of SPLIT_K) this program sums.
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * n_n)                  # grouped order: neighbouring programs share W tiles in L2
    first_m = group * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * n_n)) % size_m
    pid_n = (pid % (GROUP_M * n_n)) // size_m
    o_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_k = tl.arange(0, 128)
    m_m = o_m < M
    m_n = o_n < N
    KB = K // 128
    p_a_rows = p_a + o_m[:, None].to(tl.int64) * stride_am + o_k[None, :]
    p_w_rows = p_w + o_n[:, None].to(tl.int64) * K + o_k[None, :]
    p_ws_cols = p_ws + (o_n // 128).to(tl.int64) * KB
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    kb_per = tl.cdiv(KB, SPLIT_K)
    kb_start = tl.program_id(1) * kb_per
    for kb in range(kb_start, tl.minimum(KB, kb_start + kb_per)):
        if FUSED:
            b_x = tl.load(p_a_rows + kb * 128, mask=m_m[:, None], other=0.0).to(tl.float32)
            a, s_a = _quantize_rows(b_x, RECIP, NATIVE_CAST)
        else:
            a = tl.load(p_a_rows + kb * 128, mask=m_m[:, None], other=0.0)
            s_a = tl.load(p_as + o_m.to(tl.int64) * KB + kb, mask=m_m, other=0.0)
        w = tl.load(p_w_rows + kb * 128, mask=m_n[:, None], other=0.0)
        s_w = tl.load(p_ws_cols + kb, mask=m_n, other=0.0)
        part = tl.dot(a, tl.trans(w))                                             # [BM, BN] fp32
        acc += part * s_a[:, None] * s_w[None, :]
    p_out = p_y + o_m[:, None].to(tl.int64) * N + o_n[None, :]
    if SPLIT_K == 1:
        tl.store(p_out, acc.to(p_y.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])
    else:
        tl.atomic_add(p_out, acc, mask=m_m[:, None] & m_n[None, :])


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
               config: Fp8LinearConfig | dict | str | None = None) -> torch.Tensor:
    """x [..., K] float32 / bfloat16 / float16, weight [N, K] float8_e4m3fn and scale [cdiv(N, 128), K/128]
    float32, all contiguous -> y [..., N] in x's dtype (see the module docstring)."""
    check_tensor("fp8_linear", "x", x, FLOAT_DTYPES, min_ndim=1)
    check_tensor("fp8_linear", "weight", weight, (torch.float8_e4m3fn,), ndim=2, device=x.device)
    n, k = weight.shape
    check(x.shape[-1] == k and k % SCALE_BLOCK == 0,
          f"fp8_linear: x [..., {x.shape[-1]}] against weight [{n}, {k}]: K must match and be a multiple of "
          f"{SCALE_BLOCK} (the activation block)")
    check_tensor("fp8_linear", "scale", scale, (torch.float32,), shape=(triton.cdiv(n, SCALE_BLOCK), k // SCALE_BLOCK),
                 device=x.device)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    cfg = resolve_config(Fp8LinearConfig, config, lambda gpu: default_config(gpu, m), x.device)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y.reshape(*lead, n)
    recip = x.device.type == "cuda"
    native = cfg.cast == "native" and not INTERPRET
    fused = cfg.quant == "fused"
    a, a_scale, stride = x2, y, x2.stride(0)
    if not fused:
        a = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
        a_scale = torch.empty((m, k // SCALE_BLOCK), dtype=torch.float32, device=x.device)
        launch(_quantize_kernel, (triton.cdiv(m, 32), k // SCALE_BLOCK), x2, a, a_scale, m, k, x2.stride(0),
               RECIP=recip, NATIVE_CAST=native, BLOCK_M=32, num_warps=4)
        stride = k
    split_k = min(cfg.split_k, k // SCALE_BLOCK)
    out = y if split_k == 1 else torch.zeros((m, n), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), split_k)
    launch(_fp8_linear_kernel, grid, a, a_scale, weight, scale, out, m, n, k, stride,
           FUSED=fused, RECIP=recip, NATIVE_CAST=native, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
           GROUP_M=cfg.group_m, SPLIT_K=split_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return (y if split_k == 1 else out.to(x.dtype)).reshape(*lead, n)


@kernel_op("fp8_linear")
def _fp8_linear_op(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, config: str = "") -> torch.Tensor:
    return fp8_linear(x, weight, scale, config)
