"""float32 linear of a bf16 input and a float32 weight (`torch.ops.dsv4.float32_linear` for those
operands, see model/ops.py) on bf16 tensor cores, as exact as a float32 GEMM.

A float32 weight w splits exactly into three bf16 values, w = hi + mid + lo (hi = bf16(w), mid =
bf16(w - hi), lo = w - hi - mid: 8 significant bits each, 24 in all; every subtraction is exact; for
|w| < 2^-110 lo falls below bf16's subnormals, an error under 2^-133 absolute). A
bf16 x times each piece is exact in float32, so the three bf16 MMAs with a float32 accumulator sum the
products x * w exactly as a float32 GEMM does, in another order. The pieces are made in registers
from the float32 tile as it arrives, so W is read once, as stored, where cuBLAS's float32 GEMM runs on
CUDA cores (with few output tiles at decode sizes; at prefill at the CUDA cores' float32 rate, well below
three bf16 tensor-core MMAs').
An infinite w is its hi alone (inf - inf would make the others NaN); a NaN w gives NaN, as the plain op.
M, N and K are any size (masked tiles).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import INTERPRET, cdiv, check, check_tensor, kernel_op, largest_value, launch, resolve_config, split_for
from .._jit_utils import dot_acc, store_tile, tile_ids
from .config import Float32LinearConfig, default_config


@triton.jit
def _bf16_pieces(w):
    """w float32 -> bf16 tiles (hi, mid, lo) with hi + mid + lo == w exactly (finite |w| >= 2^-110)."""
    hi = w.to(tl.bfloat16)
    rest = w - hi.to(tl.float32)
    rest = tl.where(rest == rest, rest, 0.0)        # an infinite w (inf - inf): hi carries it alone
    mid = rest.to(tl.bfloat16)
    return hi, mid, (rest - mid.to(tl.float32)).to(tl.bfloat16)


@triton.jit
def _float32_linear_kernel(p_x, p_w, p_y, M, N, K, stride_xm, n_split,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, SWAP_AB: tl.constexpr, UPCAST: tl.constexpr):
    # p_x [M, K] bf16 (row stride stride_xm); p_w [N, K] float32 contiguous; p_y [M, N] float32
    # contiguous (added into when SPLIT_K > 1). Program axis 1: the part of K (of n_split <= SPLIT_K, a
    # run-time count) this program sums. SWAP_AB: the tile is computed transposed, [BLOCK_N, BLOCK_M] =
    # W_tile @ x_tile^T, the W pieces (registers) on the MMA's M side. UPCAST: the interpreter (dot_acc).
    pid_m, pid_n = tile_ids(tl.cdiv(M, BLOCK_M), N, BLOCK_N, GROUP_M)
    o_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_m = o_m < M
    m_n = o_n < N
    if SPLIT_K > 1 and tl.program_id(1) >= n_split:  # a spare part: this call's M splits K less
        return
    steps = tl.cdiv(K, BLOCK_K)
    per_part = tl.cdiv(steps, n_split)
    first = tl.program_id(1) * per_part
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(first, tl.minimum(steps, first + per_part)):
        o_k = step * BLOCK_K + tl.arange(0, BLOCK_K)
        m_k = o_k < K
        x = tl.load(p_x + o_m[:, None].to(tl.int64) * stride_xm + o_k[None, :], mask=m_m[:, None] & m_k[None, :],
                    other=0.0)                                                            # [BM, BK] bf16
        w = tl.load(p_w + o_n[:, None].to(tl.int64) * K + o_k[None, :], mask=m_n[:, None] & m_k[None, :],
                    other=0.0)                                                            # [BN, BK] fp32
        hi, mid, lo = _bf16_pieces(w)
        if SWAP_AB:
            x_t = tl.trans(x)
            acc = dot_acc(hi, x_t, acc, UPCAST, False)                                     # [BN, BM]
            acc = dot_acc(mid, x_t, acc, UPCAST, False)
            acc = dot_acc(lo, x_t, acc, UPCAST, False)
        else:
            acc = dot_acc(x, tl.trans(hi), acc, UPCAST, False)                             # [BM, BN]
            acc = dot_acc(x, tl.trans(mid), acc, UPCAST, False)
            acc = dot_acc(x, tl.trans(lo), acc, UPCAST, False)
    store_tile(p_y, acc, o_m, o_n, m_m, m_n, N, SWAP_AB, SPLIT_K > 1)


def float32_linear(x: torch.Tensor, weight: torch.Tensor,
                   config: Float32LinearConfig | dict | str | None = None) -> torch.Tensor:
    """x [..., K] bfloat16 and weight [N, K] float32, both contiguous -> y [..., N] float32
    (see the module docstring)."""
    check_tensor("float32_linear", "x", x, (torch.bfloat16,), min_ndim=1)
    check_tensor("float32_linear", "weight", weight, (torch.float32,), ndim=2, device=x.device)
    n, k = weight.shape
    check(x.shape[-1] == k, f"float32_linear: x [..., {x.shape[-1]}] against weight [{n}, {k}]: K must match")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    # the default for the most rows m may be (a symbolic m, as under export: its bound)
    rows = largest_value(m)
    cfg = resolve_config(Float32LinearConfig, config, lambda gpu: default_config(gpu, rows, n, k), x.device)
    if m == 0 or n == 0 or k == 0:
        return torch.zeros((*lead, n), dtype=torch.float32, device=x.device)
    split_k = min(cfg.split_k, cdiv(k, cfg.block_k))               # the grid's parts of K: one row block's
    n_split = split_for(split_k, cdiv(m, cfg.block_m))             # this call's (at run time for a symbolic m)
    y = (torch.empty if split_k == 1 else torch.zeros)((m, n), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), split_k)
    launch(_float32_linear_kernel, grid, x2, weight, y, m, n, k, x2.stride(0), n_split,
           BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, SPLIT_K=split_k,
           SWAP_AB=cfg.swap_ab == "yes", UPCAST=INTERPRET, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y.reshape(*lead, n)


@kernel_op("float32_linear")
def _float32_linear_op(x: torch.Tensor, weight: torch.Tensor, config: str = "") -> torch.Tensor:
    return float32_linear(x, weight, config)
