"""Lightning-indexer top-k (`torch.ops.dsv4.indexer_topk` semantics, see model/ops.py): per query,
the visible compressed keys with the highest weighted-ReLU scores, best first, ties to the lowest
index, NaN first, -1 padding.

Structure:
- one program = one query token (b, s); it reads its position t and scores only the visible keys
  n < min(N, (t + 1) // ratio), in tiles of `block_n` keys: b_s [BH, BN] = q [BH, BD] @ keys^T
  (all heads in one tl.dot), relu, times the head weights, summed over heads -> [BN] fp32 scores.
  No [S, N] score matrix is written anywhere: the only output is [B, S, topk] int32.
- running top-k in registers: a buffer of KB = max(next_pow2(topk), block_n) int64 keys, sorted
  descending. Each (score, index) pair is packed into one int64 whose signed order is the selection
  order: high 32 bits = the fp32 score bits mapped to a monotone int32 (x ^ ((x >> 31) & 0x7fffffff);
  -0.0 made +0.0 first, every NaN made INT32_MAX so NaN sorts first), low 32 bits = 2^31 - 1 - index
  (so among equal scores the lower index is larger: ties go to the lowest index). Empty slots hold
  INT64_MIN, below every real key.
- merge (a bitonic merge step): a tile whose best key beats the buffer's worst is sorted ascending
  (block_n keys) and placed at the end of a KB vector of empty slots; the elementwise max of that
  ascending vector and the descending buffer holds exactly the KB best keys of both, as a bitonic
  sequence, which one `tl.bitonic_merge` (log2 KB compare-and-swap rounds) sorts descending. Tiles
  that cannot enter the top-k skip the merge.
- output: the first topk keys unpacked to indices; INT64_MIN slots become -1.
Numerics: fp32 scores (fp32 inputs: IEEE fp32 dot, not tf32; bf16/fp16: products exact, fp32
accumulation); the head sum is a tree reduction, so scores can differ from the plain op's in the last
bits and near-ties may resolve differently (exact scores select exactly the same keys).
Cost: 2 H d FLOPs per (query, visible key); each query re-reads its visible keys (L2-resident for
neighbouring queries); per merged tile one sort of block_n keys and one bitonic merge of KB.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import FLOAT_DTYPES, INTERPRET, check, check_tensor, kernel_op, launch, resolve_config
from .config import IndexerTopkConfig, default_config

MAX_TOPK = 4096       # the buffer and its merge sort live in registers
MAX_HEADS = 128
MAX_HEAD_DIM = 256


# ================================================================================================
# Kernel
# ================================================================================================

@triton.jit
def _pack_keys(b_score, o_n, valid):
    # b_score [BN] fp32, o_n [BN] int32 key indices, valid [BN] -> [BN] int64 sort keys (see module doc)
    bits = b_score.to(tl.int32, bitcast=True)
    bits = tl.where(bits == -2147483648, 0, bits)                            # -0.0 -> +0.0
    mono = bits ^ ((bits >> 31) & 0x7FFFFFFF)                                # signed order = float order
    mono = tl.where(b_score != b_score, 2147483647, mono)                    # every NaN first
    key = (mono.to(tl.int64) << 32) | (2147483647 - o_n).to(tl.int64)
    return tl.where(valid, key, -9223372036854775808)


@triton.jit
def _indexer_topk_kernel(p_q, p_w, p_k, p_pos, p_out, S, H, N, D, ratio, topk,
                         UPCAST: tl.constexpr, IEEE: tl.constexpr, BLOCK_H: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, KB: tl.constexpr):
    # p_q [B, S, H, D]; p_w [B, S, H]; p_k [B, N, D]; p_pos [B, S] int64; p_out [B, S, topk] int32.
    # UPCAST: fp32 copies of q and keys and IEEE dots (fp32 inputs, mixed dtypes, the interpreter).
    pid_t = tl.program_id(0).to(tl.int64)                                   # token b * S + s
    b = pid_t // S
    o_h = tl.arange(0, BLOCK_H)
    o_d = tl.arange(0, BLOCK_D)
    m_h = o_h < H
    m_d = o_d < D
    b_q = tl.load(p_q + (pid_t * H + o_h[:, None]) * D + o_d[None, :], mask=m_h[:, None] & m_d[None, :], other=0.0)
    if UPCAST:
        b_q = b_q.to(tl.float32)
    b_w = tl.load(p_w + pid_t * H + o_h, mask=m_h, other=0.0).to(tl.float32)   # [BH]
    t = tl.load(p_pos + pid_t)
    n_vis = tl.where(t + 1 > 0, (t + 1) // ratio, 0)
    n_vis = tl.minimum(n_vis, N).to(tl.int32)

    EMPTY: tl.constexpr = -9223372036854775808
    R: tl.constexpr = KB // BLOCK_N
    buf = tl.full([KB], EMPTY, tl.int64)
    o_r = tl.arange(0, R)
    for n0 in range(0, n_vis, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)                                    # [BN] int32
        valid = o_n < n_vis
        b_k = tl.load(p_k + (b * N + o_n[:, None]) * D + o_d[None, :], mask=valid[:, None] & m_d[None, :], other=0.0)
        if UPCAST:
            b_s = tl.dot(b_q, tl.trans(b_k.to(tl.float32)), input_precision="ieee")
        elif IEEE:
            b_s = tl.dot(b_q, tl.trans(b_k), input_precision="ieee")
        else:
            b_s = tl.dot(b_q, tl.trans(b_k))                                 # [BH, BN] fp32
        b_s = tl.where(b_s < 0, 0.0, b_s)                                    # relu, NaN kept
        score = tl.sum(b_s * b_w[:, None], axis=0)                          # [BN]
        key = _pack_keys(score, o_n, valid)
        if tl.max(key, axis=0) > tl.min(buf, axis=0):
            # the tile ascending, at the end of a KB vector of EMPTY: max with the descending buffer
            # keeps the KB best of both as a bitonic sequence, which one bitonic merge sorts
            srt = tl.sort(key, descending=False)                             # [BN]
            pad = tl.reshape(tl.where(o_r[:, None] == R - 1, srt[None, :], EMPTY), [KB])  # [KB] ascending
            buf = tl.bitonic_merge(tl.maximum(buf, pad), descending=True)
    o_k = tl.arange(0, KB)
    idx = tl.where(buf == EMPTY, -1, 2147483647 - (buf & 0xFFFFFFFF)).to(tl.int32)
    tl.store(p_out + pid_t * topk + o_k, idx, mask=o_k < topk)


# ================================================================================================
# Launcher and public function
# ================================================================================================

def launch_indexer_topk(q, weights, keys, positions, out, ratio: int, topk: int, cfg: IndexerTopkConfig) -> None:
    B, S, H, D = q.shape
    N = keys.shape[1]
    if B * S == 0:
        return
    if N == 0 or topk == 0:
        out.fill_(-1) if topk else None
        return
    upcast = INTERPRET or q.dtype != keys.dtype
    ieee = q.dtype == torch.float32
    KB = max(triton.next_power_of_2(topk), cfg.block_n)
    launch(_indexer_topk_kernel, (B * S,), q, weights, keys, positions, out, S, H, N, D, ratio, topk,
           UPCAST=upcast, IEEE=ieee, BLOCK_H=max(16, triton.next_power_of_2(H)),
           BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_N=cfg.block_n, KB=KB,
           num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def indexer_topk(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor,
                 ratio: int, topk: int, config=None) -> torch.Tensor:
    """q [B, S, H, d] indexer queries, weights [B, S, H], keys [B, N, d], positions [B, S] int64
    -> [B, S, topk] int32: the visible keys (n < (t + 1) // ratio) with the highest scores
    sum_h w[h] relu(q[h] . key[n]), best first, ties to the lowest index, NaN first, -1 padding.
    q and keys: float32 / bfloat16 / float16 (may differ); weights any of those. All contiguous.
    config: None / "" (the device's default), a 'field=value,...' string, a dict or an IndexerTopkConfig."""
    op = "indexer_topk"
    check_tensor(op, "q", q, FLOAT_DTYPES, ndim=4)
    B, S, H, D = q.shape
    check_tensor(op, "weights", weights, FLOAT_DTYPES, shape=(B, S, H), device=q.device)
    check_tensor(op, "keys", keys, FLOAT_DTYPES, ndim=3, device=q.device)
    check(keys.shape[0] == B and keys.shape[2] == D,
          f"{op}: keys has shape {tuple(keys.shape)}; need [B, N, d] = [{B}, N, {D}]")
    check_tensor(op, "positions", positions, (torch.int64,), shape=(B, S), device=q.device)
    check(isinstance(ratio, int) and ratio >= 1, f"{op}: ratio = {ratio!r}; need an int >= 1")
    check(isinstance(topk, int) and 0 <= topk <= MAX_TOPK, f"{op}: topk = {topk!r}; need an int in [0, {MAX_TOPK}]")
    check(H <= MAX_HEADS and D <= MAX_HEAD_DIM,
          f"{op}: {H} heads x {D} dims; the kernel takes <= {MAX_HEADS} heads x <= {MAX_HEAD_DIM} dims")
    check(keys.shape[1] < 2 ** 31, f"{op}: {keys.shape[1]} keys; need < 2^31")
    cfg = resolve_config(IndexerTopkConfig, config, default_config, q.device)
    out = torch.empty((B, S, topk), dtype=torch.int32, device=q.device)
    launch_indexer_topk(q, weights, keys, positions, out, ratio, topk, cfg)
    return out


# ================================================================================================
# Torch op (torch.ops.dsv4_triton.indexer_topk): the dsv4 signature plus a config string
# ================================================================================================

@kernel_op("indexer_topk")
def _indexer_topk_op(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor,
                     ratio: int, topk: int, config: str = "") -> torch.Tensor:
    return indexer_topk(q, weights, keys, positions, ratio, topk, config)
