"""Block-scaled FP8 linear, W8A8 (`torch.ops.dsv4.fp8_linear` semantics, see model/ops.py): the input
quantized to FP8 e4m3 per row and 128-block of K with power-of-two scales, times an FP8 weight with one
scale per 128 x 128 tile, on FP8 tensor cores (Hopper), accumulated in fp32.

Per 128-step of K the FP8 product of the tile is formed by tl.dot (fp32 accumulator) and added to
the running sum times (activation scale of the row x weight scale of the column's tile); the scales
are powers of two, so the scaling is exact. The plain op dequantizes first and sums in another order:
the two agree to fp32 rounding of the sums. K must be a multiple of 128 (refused otherwise, as the
plain op and DeepSeek do); M and N are any size (masked tiles).

gemm="cublas" (config) quantizes x with the same kernel and hands the FP8 product to cuBLAS's
blockwise-scaled GEMM (torch._scaled_mm with 1x128 activation and 128x128 weight scales, cuBLASLt
12.9+ on sm_90): the same per-128-step fp32 promotion with the same power-of-two scales. It is used
only where a one-time probe on the device shows that this torch offers it and that it matches the
plain op; anywhere else (CPU, the interpreter, K/128 or N not as cuBLAS needs) the Triton GEMM runs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import (FLOAT_DTYPES, INTERPRET, check, check_tensor, kernel_op, largest_value, launch,
                       placeholder, resolve_config)
from .._jit_utils import e4m3_dequantized, e4m3_float, quantize_rows_e4m3, store_tile, tile_ids
from .config import SCALE_BLOCK, Fp8LinearConfig, default_config, run_splits

FP8_MAX = 448.0


@triton.jit
def _quantize_kernel(p_x, p_q, p_s, M, K, stride_xm, stride_sm, stride_sk,
                     RECIP: tl.constexpr, NATIVE_CAST: tl.constexpr, BLOCK_M: tl.constexpr):
    # p_x [M, K] float (row stride stride_xm); p_q [M, K] float8 contiguous; p_s [M, K/128] float32 at
    # strides (stride_sm, stride_sk): row-major for the Triton GEMM, M-major for cuBLAS's 1x128 scales
    o_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    kb = tl.program_id(1)
    o_k = kb * 128 + tl.arange(0, 128)
    m_m = o_m < M
    b_x = tl.load(p_x + o_m[:, None].to(tl.int64) * stride_xm + o_k[None, :], mask=m_m[:, None], other=0.0)
    codes, s = quantize_rows_e4m3(b_x.to(tl.float32), RECIP, NATIVE_CAST)
    tl.store(p_q + o_m[:, None].to(tl.int64) * K + o_k[None, :], codes, mask=m_m[:, None])
    tl.store(p_s + o_m.to(tl.int64) * stride_sm + kb * stride_sk, s, mask=m_m)


@triton.jit
def _fp8_linear_kernel(p_a, p_as, p_w, p_ws, p_y, M, N, K, stride_am, n_split,
                       FUSED: tl.constexpr, RECIP: tl.constexpr, NATIVE_CAST: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr,
                       SWAP_AB: tl.constexpr):
    # FUSED: p_a [M, K] float x (row stride stride_am), p_as unused; else p_a [M, K] float8 codes
    # (row stride stride_am) and p_as [M, K/128] float32 scales. p_w [N, K] float8; p_ws
    # [cdiv(N, 128), K/128] float32; p_y [M, N] (x's dtype; float32 added into when SPLIT_K > 1),
    # contiguous. Program axis 1: the part of K (of n_split <= SPLIT_K, a run-time count) this program sums.
    # SWAP_AB: the tile is computed transposed, [BLOCK_N, BLOCK_M] = W_tile @ x_tile^T, so that the
    # weight rows fill the MMA's M side (64 / 128 on Hopper's wgmma) when x has few rows.
    pid_m, pid_n = tile_ids(tl.cdiv(M, BLOCK_M), N, BLOCK_N, GROUP_M)
    o_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_k = tl.arange(0, 128)
    m_m = o_m < M
    m_n = o_n < N
    KB = K // 128
    p_a_rows = p_a + o_m[:, None].to(tl.int64) * stride_am + o_k[None, :]
    p_w_rows = p_w + o_n[:, None].to(tl.int64) * K + o_k[None, :]
    # a tile of at most 128 columns inside one 128-row weight tile has one weight scale per K step
    ONE_W_SCALE: tl.constexpr = BLOCK_N <= 128
    if ONE_W_SCALE:
        p_ws_cols = p_ws + ((pid_n * BLOCK_N) // 128).to(tl.int64) * KB
    else:
        p_ws_cols = p_ws + (o_n // 128).to(tl.int64) * KB
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if SPLIT_K > 1 and tl.program_id(1) >= n_split:  # a spare part: this call's M splits K less
        return
    kb_per = tl.cdiv(KB, n_split)
    kb_start = tl.program_id(1) * kb_per
    for kb in range(kb_start, tl.minimum(KB, kb_start + kb_per)):
        if FUSED:
            b_x = tl.load(p_a_rows + kb * 128, mask=m_m[:, None], other=0.0).to(tl.float32)
            a, s_a = quantize_rows_e4m3(b_x, RECIP, NATIVE_CAST)
        else:
            a = tl.load(p_a_rows + kb * 128, mask=m_m[:, None], other=0.0)
            s_a = tl.load(p_as + o_m.to(tl.int64) * KB + kb, mask=m_m, other=0.0)
        w = tl.load(p_w_rows + kb * 128, mask=m_n[:, None], other=0.0)
        if ONE_W_SCALE:
            s_w = tl.load(p_ws_cols + kb)
            if SWAP_AB:
                acc += tl.dot(w, tl.trans(a)) * (s_a * s_w)[None, :]                 # [BN, BM] fp32
            else:
                acc += tl.dot(a, tl.trans(w)) * (s_a * s_w)[:, None]                 # [BM, BN] fp32
        else:
            s_w = tl.load(p_ws_cols + kb, mask=m_n, other=0.0)
            if SWAP_AB:
                acc += tl.dot(w, tl.trans(a)) * s_w[:, None] * s_a[None, :]
            else:
                acc += tl.dot(a, tl.trans(w)) * s_a[:, None] * s_w[None, :]
    store_tile(p_y, acc, o_m, o_n, m_m, m_n, N, SWAP_AB, SPLIT_K > 1)


@triton.jit
def _fp8_gemv_kernel(p_x, p_w, p_ws, p_y, M, N, K, stride_xm, RECIP: tl.constexpr, NATIVE_CAST: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # gemm="gemv": p_x [M, K] float (row stride stride_xm), p_w [N, K] float8, p_ws [cdiv(N, 128), K/128]
    # float32, p_y [M, N] in x's dtype, contiguous. One program per (BLOCK_N rows of W, one row of x), the
    # rows of x of one W tile adjacent in the grid (its re-reads from L2), the whole of K, on the CUDA
    # cores: the products summed elementwise along K ([BN, BK] fp32, the weight tile's own layout: no
    # shuffles in the loop) and reduced once at the end, so no split-K partials, atomics or zeroed fp32
    # output. BLOCK_N divides 128: a program's rows share one row of weight-scale tiles, whose scale for
    # each 128-block is folded with the activation's into its values (code * s_a * s_w: powers of two,
    # exact), so each product is exact as on the tensor cores, summed in fp32 in another order.
    G: tl.constexpr = BLOCK_K // 128
    tile, row = tl.program_id(0) // M, tl.program_id(0) % M
    o_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    o_k = tl.arange(0, BLOCK_K)
    o_g = tl.arange(0, G)
    m_n = o_n < N
    KB = K // 128
    p_x_row = p_x + row.to(tl.int64) * stride_xm + o_k
    p_ws_row = p_ws + ((tile * BLOCK_N) // 128).to(tl.int64) * KB
    p_w_rows = p_w + o_n[:, None].to(tl.int64) * K + o_k[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        m_k = k0 + o_k < K
        b_x = tl.load(p_x_row + k0, mask=m_k, other=0.0).to(tl.float32)                          # [BK]
        codes, s_a = quantize_rows_e4m3(tl.reshape(b_x, [G, 128]), RECIP, NATIVE_CAST)           # per 128-block
        s_w = tl.load(p_ws_row + k0 // 128 + o_g, mask=k0 // 128 + o_g < KB, other=0.0)          # [G]
        a = tl.reshape(e4m3_dequantized(codes, s_a * s_w, NATIVE_CAST), [BLOCK_K])
        w = e4m3_float(tl.load(p_w_rows + k0, mask=m_n[:, None] & m_k[None, :], other=0.0), NATIVE_CAST)  # [BN, BK]
        acc += w * a[None, :]
    y = tl.sum(acc, axis=1)                                                                      # [BN]
    tl.store(p_y + row.to(tl.int64) * N + o_n, y.to(p_y.dtype.element_ty), mask=m_n)


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
    # the default for the most rows m may be (a symbolic m, as under export: its bound; deciding on m itself
    # would specialise the program to the example's rows: export.narrowed_sizes)
    rows = largest_value(m)
    cfg = resolve_config(Fp8LinearConfig, config, lambda gpu: default_config(gpu, rows, n, k), x.device)
    if m == 0 or n == 0:
        return x.new_empty((*lead, n))
    recip = x.device.type == "cuda"
    native = cfg.cast == "native" and not INTERPRET
    if cfg.gemm == "cublas" and cublas_blockwise_ready(x, n, k):
        return _cublas_fp8_linear(x2, weight, scale, native).reshape(*lead, n)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if cfg.gemm == "gemv":
        check(cfg.block_n <= SCALE_BLOCK and cfg.block_k >= SCALE_BLOCK,
              f"fp8_linear: gemm=gemv takes block_n <= {SCALE_BLOCK} (a program's rows in one row of weight-scale "
              f"tiles) and block_k >= {SCALE_BLOCK}; got block_n={cfg.block_n}, block_k={cfg.block_k}")
        launch(_fp8_gemv_kernel, (triton.cdiv(n, cfg.block_n) * m,), x2, weight, scale, y, m, n, k, x2.stride(0),
               RECIP=recip, NATIVE_CAST=native, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps,
               num_stages=cfg.num_stages)
        return y.reshape(*lead, n)
    fused = cfg.quant == "fused"
    a, a_scale, stride = x2, placeholder(x.device, torch.float32), x2.stride(0)  # p_as unused when fused
    if not fused:
        a, a_scale = _quantize(x2, native, m, row_major_scales=True)
        stride = k
    split_k = min(cfg.split_k, k // SCALE_BLOCK)                  # the grid's parts of K: one row block's
    n_split = run_splits(split_k, m, cfg.block_m)                 # this call's (at run time for a symbolic m)
    out = y if split_k == 1 else torch.zeros((m, n), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), split_k)
    launch(_fp8_linear_kernel, grid, a, a_scale, weight, scale, out, m, n, k, stride, n_split,
           FUSED=fused, RECIP=recip, NATIVE_CAST=native, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
           GROUP_M=cfg.group_m, SPLIT_K=split_k, SWAP_AB=cfg.swap_ab == "yes",
           num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return (y if split_k == 1 else out.to(x.dtype)).reshape(*lead, n)


def _quantize(x2: torch.Tensor, native: bool, rows: int, row_major_scales: bool):
    """x2 [M, K] -> (codes [rows, K] float8_e4m3fn, scales [rows, K/128] float32) for rows >= M (rows past
    M: unwritten padding). Scales row-major (the Triton GEMM) or M-major, i.e. the transpose of a
    contiguous [K/128, rows] (cuBLAS's 1x128 layout)."""
    m, k = x2.shape
    kb = k // SCALE_BLOCK
    codes = torch.empty((rows, k), dtype=torch.float8_e4m3fn, device=x2.device)
    if row_major_scales:
        scales = torch.empty((rows, kb), dtype=torch.float32, device=x2.device)
    else:
        scales = torch.empty((kb, rows), dtype=torch.float32, device=x2.device).t()
    launch(_quantize_kernel, (triton.cdiv(m, 32), kb), x2, codes, scales, m, k, x2.stride(0),
           scales.stride(0), scales.stride(1), RECIP=x2.device.type == "cuda", NATIVE_CAST=native,
           BLOCK_M=32, num_warps=4)
    return codes, scales


def _cublas_fp8_linear(x2, weight, scale, native):
    """x2 [M, K] -> [M, N] in x2's dtype: our quantization, then cuBLAS's blockwise-scaled FP8 GEMM.
    M is padded to a multiple of 16 (cuBLAS's alignment for A and its M-major scales), spelt so that for
    an engine's symbolic M, y[:m] needs (m + 15) % 16 <= 15, which torch proves: m <= 16 * cdiv(m, 16)
    became a guard that export's solver turned into a congruence on the batch ("Cannot create Dim with
    inconsistent min=1, max=-4", torch 2.11 and 2.13)."""
    m = x2.shape[0]
    codes, scales = _quantize(x2, native, m + 15 - (m + 15) % 16, row_major_scales=False)
    # weight [N, K] row-major is B^T: B = weight.t() column-major [K, N]; its 128x128 scales as [K/128, N/128]
    y = torch._scaled_mm(codes, weight.t(), scale_a=scales, scale_b=scale.t(), out_dtype=x2.dtype)
    return y[:m]


def cublas_blockwise_ready(x: torch.Tensor, n: int, k: int) -> bool:
    """Whether gemm="cublas" can serve x [..., K] against weight [N, K]: a CUDA device (not the
    interpreter) whose torch/cuBLAS passed the probe for x's dtype, K/128 a multiple of 4 (cuBLAS's
    scale-row alignment, which also makes torch's two scale-layout rules agree), N a multiple of 16.
    The probe runs once per (device, dtype) on real tensors, also when x is a fake or traced tensor
    (the decision is then baked into the trace); never while a CUDA graph is being captured (it
    synchronizes): there the Triton GEMM serves until a probe has run outside capture."""
    if INTERPRET or x.device.type != "cuda" or (k // SCALE_BLOCK) % 4 or n % 16:
        return False
    key = (x.device.index if x.device.index is not None else torch.cuda.current_device(), x.dtype)
    if key not in _PROBE_RESULTS:
        if torch.cuda.is_current_stream_capturing():
            return False
        from torch._subclasses.fake_tensor import unset_fake_temporarily
        from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

        with unset_fake_temporarily(), disable_proxy_modes_tracing(), torch.no_grad():
            _PROBE_RESULTS[key] = _probe(*key)
    return _PROBE_RESULTS[key]


_PROBE_RESULTS: dict[tuple[int, torch.dtype], bool] = {}


def _probe(device_index: int, dtype: torch.dtype) -> bool:
    """Run cuBLAS's blockwise path once on a small case with distinct scales per row, K block and
    weight tile (N = 144: a partial last tile), against the plain op: False where this torch lacks
    it (an error) or reads the scales otherwise (wrong numbers)."""
    from ...model import ops  # noqa: F401  (registers torch.ops.dsv4.fp8_linear, the reference)
    from ...model.weight_formats import e8m0_to_float, quantize_fp8_weight

    device = torch.device("cuda", device_index)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(24, 512, generator=g) * torch.logspace(-2, 1, 512)).to(dtype).to(device)
    codes, tile_scale = quantize_fp8_weight(torch.randn(144, 512, generator=g) * torch.logspace(-2, 0, 144)[:, None])
    w, s = codes.to(device), e8m0_to_float(tile_scale).to(device)
    try:
        got = _cublas_fp8_linear(x, w, s, native=True).float()
    except (RuntimeError, ValueError, TypeError):
        return False
    ref = torch.ops.dsv4.fp8_linear(x, w, s).float()
    return bool(((got - ref).norm() <= 1e-2 * ref.norm()).item())


@kernel_op("fp8_linear")
def _fp8_linear_op(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, config: str = "") -> torch.Tensor:
    return fp8_linear(x, weight, scale, config)
