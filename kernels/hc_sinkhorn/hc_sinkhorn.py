"""mHC kernels: Sinkhorn-Knopp on small n x n matrices (`torch.ops.dsv4.hc_sinkhorn`) and the whole
hc_pre step fused into one kernel, one program per block of tokens (`torch.ops.dsv4.hc_pre`).

hc_pre per token block [BT tokens]: mixes = x_flat @ fn^T (a [BT, n*D] x [n*D, (2+n)n] product,
fp32) together with sum(x^2) in one sweep over x; then rsqrt-normalise, scale, bias, the pre / post
sigmoids, `iters` Sinkhorn rounds on the n x n comb matrices held in registers, and the weighted
stream sum y = sum_i pre_i x_i in a second sweep over the block's x (hot in L2). HBM traffic: x read
once (plus the L2-hit re-read), y written once, fn read once per program (from L2 after the first).
Decode (a few tokens: one program would stream all of fn alone) uses config num_splits > 1: a first
launch sweeps ranges of K = n*D in parallel and writes fp32 partials, the second adds them in range
order (so results do not depend on timing) and writes y by ranges of D, while one more program of it
runs the Sinkhorn rounds and stores post and comb. The first launch's token blocks of fewer than 16
tokens (config block_t < 16, and any block holding one token: a batch of one) sum the mixes with fp32
FMAs instead of tl.dot, whose 16 rows would be mostly padding.

Precision: fp32 throughout; divisions round to nearest except in the Sinkhorn rounds, which divide by
a fast reciprocal (within 2 ulp, no branches: the rounds are a serial chain a decode step waits on);
results agree with the plain op to fp32 rounding (summation order, exp, those divisions), relative
RMS <= 1e-5 for comb/post, and y to its own dtype.
NaN: a NaN in a token's streams makes that token's y, post and comb NaN; a NaN logit makes its
Sinkhorn matrix NaN (as the plain op: tl.max drops NaN, but exp(NaN) re-introduces it).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._common import FLOAT_DTYPES, check, check_tensor, kernel_op, launch, placeholder, resolve_config
from .._jit_utils import round_bf16
from .config import HcConfig, default_config, hc_pre_splits, padded_n


# ================================================================================================
# Kernels
# ================================================================================================

@triton.jit
def _sinkhorn_tile(logits, valid, iters, eps):
    """logits [BT, NP, NP] fp32, valid [.., NP, NP] (the real n x n corner) -> comb [BT, NP, NP]
    (0 outside the corner): softmax over rows + eps, column-normalise, then iters - 1 rounds of
    row- and column-normalisation, each dividing by (sum + eps) (fast division: the sums are >= eps,
    far from fdiv's inexact range)."""
    x = tl.where(valid, logits, float("-inf"))
    row_ok = tl.sum(valid.to(tl.int32), axis=2)[:, :, None] > 0             # padding rows: all False
    mx = tl.where(row_ok, tl.max(x, axis=2)[:, :, None], 0.0)               # NaN dropped here...
    e = tl.where(valid, tl.exp(x - mx), 0.0)                                # ...and back through exp(NaN)
    c = tl.div_rn(e, tl.broadcast_to(tl.where(row_ok, tl.sum(e, axis=2)[:, :, None], 1.0), e.shape)) + eps
    c = tl.where(valid, c, 0.0)
    c = tl.div_rn(c, tl.broadcast_to((tl.sum(c, axis=1) + eps)[:, None, :], c.shape))
    for _ in range(iters - 1):
        c = tl.fdiv(c, tl.broadcast_to((tl.sum(c, axis=2) + eps)[:, :, None], c.shape))
        c = tl.fdiv(c, tl.broadcast_to((tl.sum(c, axis=1) + eps)[:, None, :], c.shape))
    return c


@triton.jit
def _sigmoid(z):
    return tl.div_rn(tl.full(z.shape, 1.0, tl.float32), 1.0 + tl.exp(-z))   # torch: 1 / (1 + exp(-z))


@triton.jit
def _hc_sinkhorn_kernel(p_l, p_o, T, iters, eps, N: tl.constexpr, NP: tl.constexpr, BLOCK_T: tl.constexpr):
    # p_l [T, N, N] float; p_o [T, N, N] float32
    # float arguments are fp64 in AOTInductor's launch signature: keep the math in fp32
    eps = tl.cast(eps, tl.float32)
    o_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    o_i = tl.arange(0, NP)
    valid = (o_i[None, :, None] < N) & (o_i[None, None, :] < N)             # [1, NP, NP]
    offs = o_t[:, None, None].to(tl.int64) * (N * N) + o_i[None, :, None] * N + o_i[None, None, :]
    mask = (o_t[:, None, None] < T) & valid
    b_l = tl.load(p_l + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(p_o + offs, _sinkhorn_tile(b_l, valid, iters, eps), mask=mask)


@triton.jit
def _mix_columns(N: tl.constexpr, NP: tl.constexpr, NW: tl.constexpr):
    """The columns of a mixes tile [BT, NW]: c < NP*NP -> comb (i, j) = (c // NP, c % NP); then NP pre
    columns, NP post columns, then padding (NW = max(2 NP^2, 16)). -> (row of fn / base, valid,
    index into scale). _hc_pre_kernel's split path reads the partials at these columns."""
    NN: tl.constexpr = NP * NP
    o_c = tl.arange(0, NW)
    is_comb = o_c < NN
    ci = o_c // NP
    cj = o_c % NP
    g = (o_c - NN) // NP                                                    # 0 pre, 1 post (non-comb)
    kk = (o_c - NN) % NP
    valid_c = tl.where(is_comb, (ci < N) & (cj < N), (o_c >= NN) & (g < 2) & (kk < N))
    row = tl.where(valid_c, tl.where(is_comb, 2 * N + ci * N + cj, g * N + kk), 0)
    return row, valid_c, tl.where(valid_c, tl.where(is_comb, 2, g), 0)


@triton.jit
def _mixes_sweep(p_xt, p_fn, row, valid_c, m_t, k_lo, k_hi, K, BLOCK_T: tl.constexpr, NW: tl.constexpr,
                 BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """x_flat[:, k_lo:k_hi] @ fn[row, k_lo:k_hi]^T [BT, NW] and the sum of squares of x over the same
    range [BT], fp32 (p_xt: the block's token rows of x, K = N * D apart). BLOCK_T < 16 (a decode step's
    few tokens): fp32 FMAs on the CUDA cores, each token's products summed over the step (tl.dot needs
    16 rows; the padding rows' products, and tf32x3's operand splits, cost more than these)."""
    acc = tl.zeros([BLOCK_T, NW], dtype=tl.float32)
    ss = tl.zeros([BLOCK_T], dtype=tl.float32)
    o_k = tl.arange(0, BLOCK_K)
    for k in range(k_lo, k_hi, BLOCK_K):
        m_k = (k + o_k) < k_hi
        b_x = tl.load(p_xt + (k + o_k)[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0).to(tl.float32)
        b_w = tl.load(p_fn + row[None, :].to(tl.int64) * K + (k + o_k)[:, None],
                      mask=valid_c[None, :] & m_k[:, None], other=0.0)     # [BK, NW]
        if BLOCK_T < 16:
            acc += tl.sum(b_x[:, :, None] * b_w[None, :, :], axis=1)
        else:
            acc = tl.dot(b_x, b_w, acc, input_precision=PRECISION)
        ss += tl.sum(b_x * b_x, axis=1)
    return acc, ss


@triton.jit
def _partial_mixes(p_x, p_fn, p_part, p_ss, T, t0, split, row, valid_c, k_lo, k_hi, K, NW: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """Tokens [t0, t0 + BLOCK_T) of _hc_mixes_split_kernel's program: their partial mixes [BT, NW] into
    p_part[split] and sums of squares [BT] into p_ss[split] over K range [k_lo, k_hi)."""
    o_t = t0 + tl.arange(0, BLOCK_T)
    m_t = o_t < T
    acc, ss = _mixes_sweep(p_x + o_t[:, None].to(tl.int64) * K, p_fn, row, valid_c, m_t, k_lo, k_hi, K,
                           BLOCK_T, NW, BLOCK_K, PRECISION)
    at = (split * T + o_t).to(tl.int64)
    tl.store(p_part + at[:, None] * NW + tl.arange(0, NW)[None, :], acc, mask=m_t[:, None])
    tl.store(p_ss + at, ss, mask=m_t)


@triton.jit
def _hc_mixes_split_kernel(p_x, p_fn, p_part, p_ss, T, D, k_split, N: tl.constexpr, NP: tl.constexpr,
                           NW: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
                           PRECISION: tl.constexpr):
    # Split-K of hc_pre's first sweep (decode: a few tokens cannot fill the GPU with one program per
    # token block). Program (t, s) -> p_part[s, t-block, :] [BT, NW] and p_ss[s, t-block] [BT], the
    # partial mixes and sum of squares over K range [s k_split, (s + 1) k_split) of K = N * D.
    # A block of one token (a batch of one; a last block's lone token) takes the few-token FMA sweep
    # whatever BLOCK_T (its padding rows through tl.dot cost ~4x the instructions a step).
    K = N * D
    split = tl.program_id(1)
    t0 = tl.program_id(0) * BLOCK_T
    row, valid_c, _ = _mix_columns(N, NP, NW)
    k_lo = split * k_split
    k_hi = tl.minimum(k_lo + k_split, K)
    if BLOCK_T > 1 and T - t0 == 1:
        _partial_mixes(p_x, p_fn, p_part, p_ss, T, t0, split, row, valid_c, k_lo, k_hi, K, NW, 1, BLOCK_K, PRECISION)
    else:
        _partial_mixes(p_x, p_fn, p_part, p_ss, T, t0, split, row, valid_c, k_lo, k_hi, K, NW, BLOCK_T, BLOCK_K,
                       PRECISION)


@triton.jit
def _sum_splits(p, offs, mask, stride, SPLITS: tl.constexpr):
    """sum over s of p[s * stride + offs] in split order (the same sums on every run), fp32."""
    acc = tl.load(p + offs, mask=mask, other=0.0)
    for s in range(1, SPLITS):
        acc += tl.load(p + s * stride + offs, mask=mask, other=0.0)
    return acc


@triton.jit
def _norm_scale(ss, K, norm_eps):
    """1 / sqrt(mean of squares + eps) from the sum of squares over K values (torch's mean: sum / numel)."""
    mean_sq = tl.div_rn(ss, tl.zeros_like(ss) + K.to(tl.float32))
    return tl.div_rn(tl.full(ss.shape, 1.0, tl.float32), tl.sqrt_rn(mean_sq + norm_eps))


@triton.jit
def _store_post_comb(p_post, p_comb, post_l, comb_l, o_t, m_t, iters, hc_eps, N: tl.constexpr, NP: tl.constexpr):
    """post = 2 sigmoid(post logits) [BT, NP] and comb = Sinkhorn(comb logits) [BT, NP, NP], stored."""
    o_i = tl.arange(0, NP)
    valid = (o_i[None, :, None] < N) & (o_i[None, None, :] < N)
    tl.store(p_post + o_t[:, None].to(tl.int64) * N + o_i[None, :], 2.0 * _sigmoid(post_l),
             mask=m_t[:, None] & (o_i[None, :] < N))
    offs_c = o_t[:, None, None].to(tl.int64) * (N * N) + o_i[None, :, None] * N + o_i[None, None, :]
    tl.store(p_comb + offs_c, _sinkhorn_tile(comb_l, valid, iters, hc_eps), mask=m_t[:, None, None] & valid)


@triton.jit
def _hc_pre_kernel(p_x, p_fn, p_scale, p_base, p_y, p_post, p_comb, p_part, p_ss, T, D, d_split, iters,
                   norm_eps, hc_eps, N: tl.constexpr, NP: tl.constexpr, NW: tl.constexpr,
                   SPLITS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                   PRECISION: tl.constexpr):
    # p_x [T, N, D] float; p_fn [(2+N)N, N D] fp32; p_scale [3]; p_base [(2+N)N];
    # p_y [T, D] (x's dtype); p_post [T, N] fp32; p_comb [T, N, N] fp32.
    # SPLITS == 1: program (t, 0) sweeps all of K itself, then stores post, comb and y. SPLITS > 1:
    # p_part [SPLITS, T, NW] and p_ss [SPLITS, T] hold _hc_mixes_split_kernel's partials (columns as
    # _mix_columns lays them out); program (t, s < SPLITS) adds up the pre columns and makes y's columns
    # [s d_split, (s + 1) d_split), and program (t, SPLITS) alone adds up the post and comb columns and
    # stores post and comb, so that the serial Sinkhorn rounds run beside the stream sum. Each loads only
    # the columns it uses.
    # float arguments are fp64 in AOTInductor's launch signature: keep the math in fp32
    norm_eps = tl.cast(norm_eps, tl.float32)
    hc_eps = tl.cast(hc_eps, tl.float32)
    NN: tl.constexpr = NP * NP
    K = N * D
    split = tl.program_id(1)
    o_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)                # [BT]
    m_t = o_t < T
    o_i = tl.arange(0, NP)
    m_s = m_t[:, None] & (o_i[None, :] < N)                                 # [BT, NP]
    p_xt = p_x + o_t[:, None].to(tl.int64) * K

    if SPLITS == 1:
        # Sweep 1: mixes = x_flat @ fn^T and sum of squares, over K = N * D.
        row, valid_c, sc_idx = _mix_columns(N, NP, NW)
        acc, ss = _mixes_sweep(p_xt, p_fn, row, valid_c, m_t, 0, K, K, BLOCK_T, NW, BLOCK_K, PRECISION)
        b_sc = tl.load(p_scale + sc_idx, mask=valid_c, other=0.0)
        b_bs = tl.load(p_base + row, mask=valid_c, other=0.0)
        z = acc * _norm_scale(ss, K, norm_eps)[:, None] * b_sc[None, :] + b_bs[None, :]   # [BT, NW] logits
        # Split the columns: group 0 = comb [NP, NP], group 1 = rows (pre, post, padding) of NP.
        z3 = tl.reshape(z, [BLOCK_T, NW // NN, NN])
        h = tl.arange(0, NW // NN)[None, :, None]
        comb_l = tl.reshape(tl.sum(tl.where(h == 0, z3, 0.0), axis=1), [BLOCK_T, NP, NP])
        pp = tl.reshape(tl.sum(tl.where(h == 1, z3, 0.0), axis=1), [BLOCK_T, NP, NP])
        pre_l = tl.sum(tl.where(o_i[None, :, None] == 0, pp, 0.0), axis=1)   # [BT, NP]
        post_l = tl.sum(tl.where(o_i[None, :, None] == 1, pp, 0.0), axis=1)
        _store_post_comb(p_post, p_comb, post_l, comb_l, o_t, m_t, iters, hc_eps, N, NP)
    else:
        rs = _norm_scale(_sum_splits(p_ss, o_t, m_t, T, SPLITS), K, norm_eps)  # [BT]
        at = o_t[:, None].to(tl.int64) * NW                                  # [BT, 1]
        if split == SPLITS:
            post_l = (_sum_splits(p_part, at + NN + NP + o_i[None, :], m_s, T * NW, SPLITS) * rs[:, None]
                      * tl.load(p_scale + 1) + tl.load(p_base + N + o_i, mask=o_i < N, other=0.0)[None, :])
            # comb's columns as [BT, NP * NP], then reshaped: a thread holds a row, a warp whole matrices
            o_c = tl.arange(0, NN)
            valid = ((o_c // NP) < N) & ((o_c % NP) < N)                    # [NN]
            comb_l = (_sum_splits(p_part, at + o_c[None, :], m_t[:, None] & valid[None, :], T * NW, SPLITS)
                      * rs[:, None] * tl.load(p_scale + 2)
                      + tl.load(p_base + 2 * N + (o_c // NP) * N + o_c % NP, mask=valid, other=0.0)[None, :])
            comb_l = tl.reshape(comb_l, [BLOCK_T, NP, NP])
            _store_post_comb(p_post, p_comb, post_l, comb_l, o_t, m_t, iters, hc_eps, N, NP)
        # the post / comb program makes no y: its pre loads are masked off (no memory wait on its path)
        m_pre = m_s & ((o_i[None, :] * 0 + split) < SPLITS)
        pre_l = (_sum_splits(p_part, at + NN + o_i[None, :], m_pre, T * NW, SPLITS) * rs[:, None] * tl.load(p_scale)
                 + tl.load(p_base + o_i, mask=o_i < N, other=0.0)[None, :])

    # Sweep 2: y = sum_i pre_i x_i over this program's columns of D (this block's x again, from L2);
    # none for the post / comb program of a split launch.
    pre = tl.where(o_i[None, :] < N, _sigmoid(pre_l) + hc_eps, 0.0)        # [BT, NP]
    o_d = tl.arange(0, BLOCK_D)
    d_hi = tl.minimum(split * d_split + d_split, D)
    for d in range(split * d_split, d_hi, BLOCK_D):
        m_d = (d + o_d) < d_hi
        b_x = tl.load(p_xt[:, :, None] + o_i[None, :, None] * D + (d + o_d)[None, None, :],
                      mask=m_s[:, :, None] & m_d[None, None, :], other=0.0).to(tl.float32)   # [BT, NP, BD]
        b_y = tl.sum(pre[:, :, None] * b_x, axis=1)                         # [BT, BD]
        if p_y.dtype.element_ty == tl.bfloat16:
            b_y = round_bf16(b_y)
        tl.store(p_y + o_t[:, None].to(tl.int64) * D + (d + o_d)[None, :], b_y.to(p_y.dtype.element_ty),
                 mask=m_t[:, None] & m_d[None, :])


# ================================================================================================
# Launchers
# ================================================================================================

def _launch_sinkhorn(logits: torch.Tensor, out: torch.Tensor, T: int, n: int, iters: int, eps: float,
                     cfg: HcConfig) -> None:
    if T == 0:
        return
    launch(_hc_sinkhorn_kernel, (triton.cdiv(T, cfg.sinkhorn_block_t),), logits, out, T, int(iters), float(eps),
           N=n, NP=padded_n(n), BLOCK_T=cfg.sinkhorn_block_t, num_warps=cfg.sinkhorn_num_warps)


def _launch_hc_pre(x, fn, scale, base, y, post, comb, T: int, n: int, D: int, iters: int, norm_eps: float,
                   hc_eps: float, cfg: HcConfig) -> None:
    if T == 0:
        return
    NP = padded_n(n)
    NW = max(2 * NP * NP, 16)
    splits = hc_pre_splits(cfg, n * D)
    grid_t = triton.cdiv(T, cfg.block_t)
    # unused by the one-sweep kernel
    part, ss = placeholder(x.device, torch.float32), placeholder(x.device, torch.float32)
    if splits > 1:
        k_split = triton.cdiv(triton.cdiv(n * D, splits), cfg.block_k) * cfg.block_k
        part = torch.empty((splits, T, NW), dtype=torch.float32, device=x.device)
        ss = torch.empty((splits, T), dtype=torch.float32, device=x.device)
        launch(_hc_mixes_split_kernel, (grid_t, splits), x, fn, part, ss, T, D, k_split, N=n, NP=NP, NW=NW,
               BLOCK_T=cfg.block_t, BLOCK_K=cfg.block_k, PRECISION=cfg.dot_precision,
               num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    d_split = triton.cdiv(triton.cdiv(D, splits), cfg.block_d) * cfg.block_d
    programs = splits + 1 if splits > 1 else 1                              # + the post / comb program
    launch(_hc_pre_kernel, (grid_t, programs), x, fn, scale, base, y, post, comb, part, ss, T, D, d_split,
           int(iters), float(norm_eps), float(hc_eps), N=n, NP=NP, NW=NW, SPLITS=splits, BLOCK_T=cfg.block_t,
           BLOCK_K=cfg.block_k, BLOCK_D=cfg.block_d, PRECISION=cfg.dot_precision,
           num_warps=cfg.num_warps, num_stages=cfg.num_stages)


# ================================================================================================
# Public functions
# ================================================================================================

def hc_sinkhorn(logits: torch.Tensor, iters: int, eps: float,
                config: HcConfig | dict | str | None = None) -> torch.Tensor:
    """logits [..., n, n] (float32 / bfloat16 / float16, contiguous) -> comb [..., n, n] float32.

    c = softmax(logits, -1) + eps; c /= (column sums + eps); then iters - 1 rounds of
    c /= (row sums + eps); c /= (column sums + eps). NaN in a matrix makes that matrix NaN.
    """
    check_tensor("hc_sinkhorn", "logits", logits, FLOAT_DTYPES, min_ndim=2)
    n = logits.shape[-1]
    check(logits.shape[-2] == n, f"hc_sinkhorn: logits has shape {tuple(logits.shape)}; need [..., n, n]")
    cfg = resolve_config(HcConfig, config, default_config, logits.device)
    out = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    _launch_sinkhorn(logits, out, logits.numel() // max(1, n * n), n, iters, eps, cfg)
    return out


def hc_pre(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, iters: int,
           norm_eps: float, hc_eps: float,
           config: HcConfig | dict | str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mHC pre-mixing of n residual streams in one kernel.

    x [..., n, D] (float32 / bfloat16 / float16); fn [(2+n)*n, n*D] float32; scale [3] float32;
    base [(2+n)*n] float32; all contiguous, on one device.
    mixes = (flat(x) @ fn^T) * rsqrt(mean(flat(x)^2) + norm_eps), split into n pre, n post, n*n comb:
    pre = sigmoid(mixes*scale0 + base) + hc_eps, post = 2 sigmoid(mixes*scale1 + base),
    comb = hc_sinkhorn(mixes*scale2 + base, iters, hc_eps).
    Returns y = sum_i pre_i x_i [..., D] in x's dtype, post [..., n] and comb [..., n, n] float32.
    """
    check_tensor("hc_pre", "x", x, FLOAT_DTYPES, min_ndim=2)
    *lead, n, D = x.shape
    W = (2 + n) * n
    check_tensor("hc_pre", "fn", fn, (torch.float32,), shape=(W, n * D), device=x.device)
    check_tensor("hc_pre", "scale", scale, (torch.float32,), shape=(3,), device=x.device)
    check_tensor("hc_pre", "base", base, (torch.float32,), shape=(W,), device=x.device)
    cfg = resolve_config(HcConfig, config, default_config, x.device)
    y = torch.empty((*lead, D), dtype=x.dtype, device=x.device)
    post = torch.empty((*lead, n), dtype=torch.float32, device=x.device)
    comb = torch.empty((*lead, n, n), dtype=torch.float32, device=x.device)
    _launch_hc_pre(x, fn, scale, base, y, post, comb, math.prod(lead), n, D, iters, norm_eps, hc_eps, cfg)
    return y, post, comb


# ================================================================================================
# Torch ops (torch.ops.dsv4_triton.*): the dsv4 signatures plus a config string
# ================================================================================================

@kernel_op("hc_sinkhorn")
def _hc_sinkhorn_op(logits: torch.Tensor, iters: int, eps: float, config: str = "") -> torch.Tensor:
    return hc_sinkhorn(logits, iters, eps, config)


@kernel_op("hc_pre")
def _hc_pre_op(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, iters: int,
               norm_eps: float, hc_eps: float, config: str = "") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return hc_pre(x, fn, scale, base, iters, norm_eps, hc_eps, config)
