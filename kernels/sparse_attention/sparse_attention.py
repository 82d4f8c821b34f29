"""Sparse attention over gathered entries of one shared K=V head, with an attention sink
(`torch.ops.dsv4.sparse_attention` semantics, see model/ops.py), and the same over the FP8 cache
(`kernels/sparse_attention_cached` launches the kernel below with KV_FP8=True).

Structure (MQA: all H query heads share the single K=V head):
- one program = one query token (b, s) x `block_h` of its heads x one split of its K indices;
- the heads are the M dimension of both dots: b_s [BH, BK] = q [BH, D] @ kv^T, acc [BH, D] += p @ kv,
  so each gathered tile kv [BK, D] is read from memory once for all `block_h` heads and serves both
  dots (key and value are the same rows);
- online softmax (base 2) over the K indices in steps of `block_k` gathered rows; -1 indices are
  masked (their rows are not read: no wrap to row N-1, no NaN from row 0); the sink enters only the
  denominator, added once after the loop; a token with no valid index gives zeros;
- split-K (num_splits > 1, decode): each split writes (acc, m, l, count) in fp32 to a workspace and
  `_sparse_attn_combine_kernel` merges the splits, adds the sink and normalises;
- FP8 cache, dequant="tile" (KV_FP8): the FP8 dims and the rope dims as two gathered tiles (zeros past
  the FP8 dims in the first), the logits the sum of their two dots, the rope columns' own accumulator;
  each tile keeps the vectorised layout of its own load (merged, triton 3.6 shuffled every byte through
  shared memory: bench/results/H200/attention_compile_report.md). The logits' fp32 sum is cut between
  the FP8 and rope dims (last fp32 bits against one dot over the dequantised row);
- FP8 cache, dequant="chunks" (`_sparse_attn_fp8_chunks_kernel`, config field `dequant`): the same
  programs, with the head dim in 64-column chunks: logits summed over q and kv chunks in a loop,
  the accumulator kept as 64-column chunks, the value chunks gathered a second time (L1/L2); no
  [block_k, D] tile is live, so it does not spill at V4's decode shape (the tile kernel does at some
  configs). Same
  values in both dots; the logits' fp32 sum is cut at the chunk boundaries (last fp32 bits);
- head-dim split (split_d > 1): split_d programs per (token, head block, K split), adjacent in the
  grid, each owning BLOCK_D / split_d output columns: each computes the same full-width logits and
  softmax statistics, then the second dot over its columns only (a second gather of those columns of
  the same rows, expected to hit L1/L2), so acc is [BH, BD / split_d]. Each output column is the
  same reduction over the same rounded probabilities as with split_d = 1 (the column split leaves
  the dot's reduction dimension alone): the outputs are identical where the dot sums each column in
  the same order whatever the tile's width (the interpreter's does; tests/kernels check it bit for
  bit, on the CPU and, at the real shapes, on a GPU).
Numerics: logits accumulate in fp32 (fp32 inputs: IEEE fp32 dot, not tf32); the probabilities are
rounded to the K=V dtype for the second dot (as FlashAttention does: one extra bf16/fp16 rounding),
fp32 accumulation, one final rounding to q's dtype. NaN in q or in a selected entry gives NaN in that
row (tl.max drops NaN, but exp2(NaN - m) is NaN and reaches l and acc); a sink of -inf removes the sink.
FLOPs: 4 * H * D per (token, valid index); bytes: q and out once, each gathered row once per program.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._common import (FLOAT_DTYPES, INTERPRET, check, check_tensor, kernel_op, launch, placeholder,
                       resolve_config)
from .._jit_utils import round_bf16
from .config import SparseAttentionConfig, block_sizes, default_config, value_split

LOG2E = 1.4426950408889634


# ================================================================================================
# Kernels
# ================================================================================================

@triton.jit
def _load_kv_plain(p_kv, rows, valid, o_d, D):
    # p_kv [B*N, D]; rows [BK] int64 row numbers (0 for holes); -> [BK, BD] in kv's dtype, 0 for holes
    return tl.load(p_kv + rows[:, None] * D + o_d[None, :], mask=valid[:, None] & (o_d[None, :] < D), other=0.0)


@triton.jit
def _load_nope_fp8(p_cache, rows, valid, d0, NOPE: tl.constexpr, ROPE: tl.constexpr, ENTRY: tl.constexpr,
                   OUT_DTYPE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    # p_cache [B*N, ENTRY] uint8 main entries: [NOPE e4m3 codes | ROPE bf16 | NOPE/64 e8m0 scales | pad]
    # rows [BK] int64; columns d0 .. d0 + BD (d0 a multiple of 64) of the FP8 dims -> [BK, BD] dequantised
    # to OUT_DTYPE, 0 for holes and for the columns from NOPE on (the rope dims are _load_rope's).
    # Two gathers: the codes (contiguous bytes) and one scale byte per 64 dims ([BK, BD/64], broadcast by
    # a reshape, not re-loaded per element).
    o_d = d0 + tl.arange(0, BLOCK_D)                                        # [BD]
    base = rows[:, None] * ENTRY                                             # [BK, 1] byte offsets
    b_code = tl.load(p_cache + base + o_d[None, :], mask=valid[:, None] & (o_d[None, :] < NOPE), other=0)
    b_val = b_code.to(tl.float8e4nv, bitcast=True).to(tl.float32)           # [BK, BD]
    # e8m0 scale byte e -> 2^(e - 127) (the fp32 with exponent field e; byte 0 reads as 0)
    o_b = d0 // 64 + tl.arange(0, BLOCK_D // 64)                            # [NB] scale blocks
    b_e = tl.load(p_cache + base + (NOPE + 2 * ROPE) + o_b[None, :],
                  mask=valid[:, None] & (o_b[None, :] < NOPE // 64), other=0)  # [BK, NB]
    b_sc = (b_e.to(tl.int32) << 23).to(tl.float32, bitcast=True)
    b_val = tl.reshape(tl.reshape(b_val, [BLOCK_K, BLOCK_D // 64, 64]) * b_sc[:, :, None], [BLOCK_K, BLOCK_D])
    return b_val.to(OUT_DTYPE)


@triton.jit
def _load_rope(p_cache, rows, valid, r0, NOPE: tl.constexpr, ROPE: tl.constexpr, ENTRY: tl.constexpr,
               OUT_DTYPE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    # rope dims r0 .. r0 + BR of the rows (the bf16 values after the codes; r0 may be negative) -> [BK, BR]
    # in OUT_DTYPE, 0 for holes and outside [0, ROPE). Element NOPE / 2 + r of the row read as bf16
    # (ENTRY and NOPE are even); contiguous along the row, so the gather is vectorised.
    o_r = r0 + tl.arange(0, BLOCK_R)                                        # [BR]
    p16 = p_cache.to(tl.pointer_type(tl.bfloat16))
    b_rope = tl.load(p16 + rows[:, None] * (ENTRY // 2) + (NOPE // 2) + o_r[None, :],
                     mask=valid[:, None] & (o_r[None, :] >= 0) & (o_r[None, :] < ROPE), other=0.0)
    return b_rope.to(tl.float32).to(OUT_DTYPE)


@triton.jit
def _load_kv_fp8(p_cache, rows, valid, d0, NOPE: tl.constexpr, ROPE: tl.constexpr, ENTRY: tl.constexpr,
                 OUT_DTYPE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    # columns d0 .. d0 + BD of the whole head (FP8 dims, then rope dims) -> [BK, BD] in OUT_DTYPE (0 for
    # holes and padded dims): the dequant="chunks" kernel's 64-column chunks
    o_d = d0 + tl.arange(0, BLOCK_D)                                        # [BD]
    b_nope = _load_nope_fp8(p_cache, rows, valid, d0, NOPE, ROPE, ENTRY, OUT_DTYPE, BLOCK_K, BLOCK_D)
    b_rope = _load_rope(p_cache, rows, valid, d0 - NOPE, NOPE, ROPE, ENTRY, OUT_DTYPE, BLOCK_K, BLOCK_D)
    return tl.where(o_d[None, :] < NOPE, b_nope, b_rope)


@triton.jit
def _program_coords(N_HB, SPLIT_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    # axis 0 = token x head block x column part, column parts then head blocks fastest: the programs
    # sharing a token's gathered rows (and neighbouring tokens, whose windows overlap) run together
    # and hit L2; axis 1 = K split -> (token b * S + s (int64), head block, K split, first column d0
    # of the program's BLOCK_DV output columns)
    pid = tl.program_id(0)
    if SPLIT_D == 1:
        pid_hd = pid
        d0 = 0
    else:
        pid_hd = pid // SPLIT_D
        d0 = (pid % SPLIT_D) * BLOCK_DV
    return (pid_hd // N_HB).to(tl.int64), pid_hd % N_HB, tl.program_id(1), d0


@triton.jit
def _gather_rows(p_idx, pid_t, K, k0, k_hi, b, N, BLOCK_K: tl.constexpr):
    # The step's indices k0 .. k0 + BK of token pid_t (p_idx [B*S, K] int32, -1 = hole, k_hi the
    # split's end) -> (valid [BK], rows [BK] int64 row numbers of p_kv / the cache, 0 for holes: a
    # hole reads nothing)
    o_k = k0 + tl.arange(0, BLOCK_K)                                        # [BK]
    b_idx = tl.load(p_idx + pid_t * K + o_k, mask=o_k < k_hi, other=-1)
    valid = b_idx >= 0
    return valid, b * N + tl.where(valid, b_idx, 0).to(tl.int64)


@triton.jit
def _key_dot(b_s, b_q, b_k, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    # b_s [BH, BK] fp32 + b_q [BH, BD] @ b_k [BK, BD]^T: the logits, accumulated in fp32 (q is fp32
    # already under UPCAST)
    if UPCAST:
        return tl.dot(b_q, tl.trans(b_k.to(tl.float32)), b_s, input_precision="ieee")
    elif IEEE:
        return tl.dot(b_q, tl.trans(b_k), b_s, input_precision="ieee")
    else:
        return tl.dot(b_q, tl.trans(b_k), b_s)


@triton.jit
def _softmax_step(b_s, valid, m_i, l_i, qk_scale):
    # One step of the online softmax (base 2): b_s [BH, BK] fp32 logits, valid [BK], m_i / l_i [BH]
    # the running max and denominator -> (b_p [BH, BK] fp32 probabilities, alpha [BH] the factor of
    # the earlier steps, the new m_i, the new l_i). Masked entries get p = 0.
    b_s = tl.where(valid[None, :], b_s * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(b_s, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    b_p = tl.exp2(b_s - m_use[:, None])                                     # [BH, BK]
    l_i = l_i * alpha + tl.sum(b_p, axis=1)
    return b_p, alpha, m_new, l_i


@triton.jit
def _value_dot(acc, alpha, b_p, b_v, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    # acc [BH, BV] fp32 rescaled by alpha [BH] plus the probabilities b_p [BH, BK] (rounded to b_v's
    # dtype) @ b_v [BK, BV]
    if UPCAST:
        if b_v.dtype == tl.bfloat16:
            b_p = round_bf16(b_p)
        else:
            b_p = b_p.to(b_v.dtype).to(tl.float32)
        return acc * alpha[:, None] + tl.dot(b_p, b_v.to(tl.float32), input_precision="ieee")
    elif IEEE:
        return acc * alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision="ieee")
    else:
        return acc * alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v)


@triton.jit
def _out_scale(p_sink, o_h, m_h, m_i, l_i, count):
    # The factor [BH] that turns a finished accumulator into the output: the sink joins the
    # denominator (base 2); count = the valid entries seen (0: the factor does not matter)
    sink = tl.load(p_sink + o_h, mask=m_h, other=0.0) * 1.4426950408889634  # base 2
    m_f = tl.maximum(m_i, sink)
    m_f = tl.where(m_f == float("-inf"), 0.0, m_f)
    corr = tl.exp2(m_i - m_f)
    denom = l_i * corr + tl.exp2(sink - m_f)
    denom = tl.where(count > 0, denom, 1.0)                                 # 0 only for empty rows
    return corr / denom


@triton.jit
def _store_out(p_o, p_row, o_v, m_hv, acc, scale, count, UPCAST: tl.constexpr):
    # out[rows p_row [BH, 1], columns o_v [BV]] = acc [BH, BV] * scale [BH], zeros for a token with
    # no valid entry, rounded to the output's dtype
    b_o = acc * scale[:, None]
    b_o = tl.where(count > 0, b_o, 0.0)                                     # no entries: zeros
    if UPCAST:
        if p_o.dtype.element_ty == tl.bfloat16:
            b_o = round_bf16(b_o)
    tl.store(p_o + p_row + o_v[None, :], b_o.to(p_o.dtype.element_ty), mask=m_hv)


@triton.jit
def _store_stats(p_wml, p_w, m_ml, m_i, l_i, count, BLOCK_H: tl.constexpr):
    # split-K workspace p_wml [.., 3] at rows p_w [BH] where m_ml [BH]: (m, l, count)
    tl.store(p_wml + p_w * 3, m_i, mask=m_ml)
    tl.store(p_wml + p_w * 3 + 1, l_i, mask=m_ml)
    tl.store(p_wml + p_w * 3 + 2, tl.zeros([BLOCK_H], dtype=tl.float32) + count.to(tl.float32), mask=m_ml)


@triton.jit
def _sparse_attn_fwd_kernel(p_q, p_kv, p_sink, p_idx, p_o, p_wacc, p_wml,
                            S, H, N, K, D, K_PER_SPLIT, N_RUN, qk_scale, N_HB,
                            KV_FP8: tl.constexpr, NOPE: tl.constexpr, ROPE: tl.constexpr, ENTRY: tl.constexpr,
                            NUM_SPLITS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                            BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                            BLOCK_R: tl.constexpr, SPLIT_D: tl.constexpr):
    # p_q [B, S, H, D]; p_kv [B, N, D] (or [B, N, ENTRY] uint8 when KV_FP8); p_sink [H] fp32;
    # p_idx [B, S, K] int32; p_o [B, S, H, D]; workspace (NUM_SPLITS > 1): p_wacc [B*S, N_RUN, H, D]
    # fp32, p_wml [B*S, N_RUN, H, 3] fp32 (m, l, count). qk_scale = softmax_scale * log2(e).
    # NUM_SPLITS: the grid's split axis; N_RUN <= it: the splits this launch runs, each of K_PER_SPLIT
    # indices (in an engine with a dynamic batch, values it computes from the batch at run time:
    # sparse_attention_cached.config.split_count); the programs past them return at once.
    # UPCAST (the interpreter, whose bf16 tl.dot is wrong and whose bf16 casts truncate): exact fp32
    # copies of the operands, IEEE dots, and the roundings to bf16 done to nearest even on the bits.
    # SPLIT_D programs own BLOCK_DV = BLOCK_D / SPLIT_D output columns each (d0 = their first column,
    # grid order: _program_coords).
    # KV_FP8: the FP8 dims and the ROPE rope dims are two tiles, [BK, BD] (zeros from NOPE on) and [BK, BR],
    # each gathered in its own vectorised layout (one merged tile costs a shared-memory shuffle of every
    # byte on triton 3.6); the logits are the two dots' sum, and the rope columns of the output have their
    # own accumulator acc_r [BH, BR], stored by the part whose columns hold them.
    # The program coordinates, the gathered rows and the split-K statistics are written out here as
    # _program_coords, _gather_rows and _store_stats compute them: as calls they shift this kernel's
    # register allocation (triton 3.9, sm_90a: up to 54 B more spill in the compile report's configs).
    # float arguments are fp64 in AOTInductor's launch signature: keep the math in fp32
    BLOCK_DV: tl.constexpr = BLOCK_D // SPLIT_D
    qk_scale = tl.cast(qk_scale, tl.float32)
    pid = tl.program_id(0)
    if SPLIT_D == 1:
        pid_hd = pid
        d0 = 0
    else:
        pid_hd = pid // SPLIT_D
        d0 = (pid % SPLIT_D) * BLOCK_DV
    pid_h = pid_hd % N_HB
    pid_t = (pid_hd // N_HB).to(tl.int64)                                   # token b * S + s
    pid_k = tl.program_id(1)
    if pid_k >= N_RUN:
        return
    b = pid_t // S
    o_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)                           # [BH]
    o_d = tl.arange(0, BLOCK_D)                                             # [BD]
    o_v = d0 + tl.arange(0, BLOCK_DV)                                       # [BV] this program's columns
    m_h = o_h < H
    m_hd = m_h[:, None] & (o_d[None, :] < D)
    m_hv = m_h[:, None] & (o_v[None, :] < D)
    p_row = (pid_t * H + o_h[:, None]) * D                                  # [BH, 1]
    b_q = tl.load(p_q + p_row + o_d[None, :], mask=m_hd, other=0.0)         # [BH, BD]
    if UPCAST:
        b_q = b_q.to(tl.float32)
    HAS_ROPE: tl.constexpr = KV_FP8 and ROPE > 0
    if HAS_ROPE:
        o_r = NOPE + tl.arange(0, BLOCK_R)                                  # [BR] the rope columns
        m_hr = m_h[:, None] & (o_r[None, :] < NOPE + ROPE)
        b_qr = tl.load(p_q + p_row + o_r[None, :], mask=m_hr, other=0.0)    # [BH, BR]
        if UPCAST:
            b_qr = b_qr.to(tl.float32)
        acc_r = tl.zeros([BLOCK_H, BLOCK_R], dtype=tl.float32)
        m_hr_out = m_hr & (o_r[None, :] >= d0) & (o_r[None, :] < d0 + BLOCK_DV)  # the part holding them stores
    if KV_FP8:
        m_hv = m_hv & (o_v[None, :] < NOPE)                                 # acc: the FP8 columns

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], dtype=tl.float32)
    n_valid = tl.zeros([BLOCK_K], dtype=tl.int32)
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)                                    # [BK]
        b_idx = tl.load(p_idx + pid_t * K + o_k, mask=o_k < k_hi, other=-1)
        valid = b_idx >= 0
        rows = b * N + tl.where(valid, b_idx, 0).to(tl.int64)               # holes read nothing
        if KV_FP8:
            b_kv = _load_nope_fp8(p_kv, rows, valid, 0, NOPE, ROPE, ENTRY, p_q.dtype.element_ty, BLOCK_K, BLOCK_D)
        else:
            b_kv = _load_kv_plain(p_kv, rows, valid, o_d, D)                # [BK, BD]
        if SPLIT_D == 1:
            b_v = b_kv                                                      # [BK, BV] the values: the same rows
        elif KV_FP8:
            b_v = _load_nope_fp8(p_kv, rows, valid, d0, NOPE, ROPE, ENTRY, p_q.dtype.element_ty, BLOCK_K, BLOCK_DV)
        else:
            b_v = _load_kv_plain(p_kv, rows, valid, o_v, D)
        b_s = _key_dot(tl.zeros([BLOCK_H, BLOCK_K], dtype=tl.float32), b_q, b_kv, IEEE, UPCAST)  # [BH, BK]
        if HAS_ROPE:
            b_kr = _load_rope(p_kv, rows, valid, 0, NOPE, ROPE, ENTRY, p_q.dtype.element_ty, BLOCK_K, BLOCK_R)
            b_s = _key_dot(b_s, b_qr, b_kr, IEEE, UPCAST)
        b_p, alpha, m_i, l_i = _softmax_step(b_s, valid, m_i, l_i, qk_scale)
        acc = _value_dot(acc, alpha, b_p, b_v, IEEE, UPCAST)
        if HAS_ROPE:
            acc_r = _value_dot(acc_r, alpha, b_p, b_kr, IEEE, UPCAST)
        n_valid += valid.to(tl.int32)
    count = tl.sum(n_valid, axis=0)

    if NUM_SPLITS == 1:
        scale = _out_scale(p_sink, o_h, m_h, m_i, l_i, count)
        _store_out(p_o, p_row, o_v, m_hv, acc, scale, count, UPCAST)
        if HAS_ROPE:
            _store_out(p_o, p_row, o_r, m_hr_out, acc_r, scale, count, UPCAST)
    else:
        p_w = ((pid_t * N_RUN + pid_k) * H + o_h)                           # [BH]
        tl.store(p_wacc + p_w[:, None] * D + o_v[None, :], acc, mask=m_hv)
        if HAS_ROPE:
            tl.store(p_wacc + p_w[:, None] * D + o_r[None, :], acc_r, mask=m_hr_out)
        # (m, l, count) are the same in every column part: the first one writes them
        if SPLIT_D == 1:
            m_ml = m_h
        else:
            m_ml = m_h & (o_h * 0 + d0 == 0)                                # [BH]
        tl.store(p_wml + p_w * 3, m_i, mask=m_ml)
        tl.store(p_wml + p_w * 3 + 1, l_i, mask=m_ml)
        tl.store(p_wml + p_w * 3 + 2, tl.zeros([BLOCK_H], dtype=tl.float32) + count.to(tl.float32), mask=m_ml)


@triton.jit
def _sparse_attn_fp8_chunks_kernel(p_q, p_cache, p_sink, p_idx, p_o, p_wacc, p_wml,
                                   S, H, N, K, D, K_PER_SPLIT, N_RUN, qk_scale, N_HB,
                                   NOPE: tl.constexpr, ROPE: tl.constexpr, ENTRY: tl.constexpr,
                                   NUM_SPLITS: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                                   BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                                   SPLIT_D: tl.constexpr):
    # dequant="chunks" over the FP8 cache: _sparse_attn_fwd_kernel's arguments (as KV_FP8), grid and
    # results, the head dim taken in chunks of CH = 64 columns (one e8m0 scale block), so that no
    # [BK, BD] tile is ever live:
    # - logits: b_s [BH, BK] = the sum over the chunks, in column order, of q[:, chunk] @ kv[:, chunk]^T
    #   (one fp32 accumulator through the chunk dots), in a loop that is not unrolled, so one q chunk
    #   and one kv chunk buffer serve every chunk. (Unrolled, ptxas keeps a wgmma operand descriptor
    #   per 16-wide k step of q and of kv, 2 x BD / 16, live across the K loop, and they spill next to
    #   the accumulator: 204-428 B at V4's decode shape.)
    # - values: the accumulator as BV / CH chunks acc[c] [BH, CH] (a tuple), acc[c] += p @ kv[:, chunk c],
    #   each chunk gathered and dequantised again (its rows were just read: L1/L2 hits).
    # q is read again at every step, one chunk at a time (L1/L2). The kv chunks are _load_kv_fp8's
    # values, as in the tile kernel; a split_d part (d0) gathers only its own value chunks.
    CH: tl.constexpr = 64
    BLOCK_DV: tl.constexpr = BLOCK_D // SPLIT_D
    qk_scale = tl.cast(qk_scale, tl.float32)
    pid_t, pid_h, pid_k, d0 = _program_coords(N_HB, SPLIT_D, BLOCK_DV)
    if pid_k >= N_RUN:
        return
    b = pid_t // S
    o_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)                           # [BH]
    o_c = tl.arange(0, CH)                                                  # [CH]
    m_h = o_h < H
    p_row = (pid_t * H + o_h[:, None]) * D                                  # [BH, 1]
    dtype: tl.constexpr = p_q.dtype.element_ty

    accs = ()
    for c in tl.static_range(BLOCK_DV // CH):
        accs = accs + (tl.zeros([BLOCK_H, CH], dtype=tl.float32),)         # [BH, CH] each
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    n_valid = tl.zeros([BLOCK_K], dtype=tl.int32)
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        valid, rows = _gather_rows(p_idx, pid_t, K, k0, k_hi, b, N, BLOCK_K)
        b_s = tl.zeros([BLOCK_H, BLOCK_K], dtype=tl.float32)
        for c0 in range(0, BLOCK_D, CH):
            b_q = tl.load(p_q + p_row + c0 + o_c[None, :], mask=m_h[:, None] & (c0 + o_c[None, :] < D), other=0.0)
            if UPCAST:
                b_q = b_q.to(tl.float32)
            b_k = _load_kv_fp8(p_cache, rows, valid, c0, NOPE, ROPE, ENTRY, dtype, BLOCK_K, CH)   # [BK, CH]
            b_s = _key_dot(b_s, b_q, b_k, IEEE, UPCAST)
        b_p, alpha, m_i, l_i = _softmax_step(b_s, valid, m_i, l_i, qk_scale)
        new_accs = ()
        for c in tl.static_range(BLOCK_DV // CH):
            b_v = _load_kv_fp8(p_cache, rows, valid, d0 + c * CH, NOPE, ROPE, ENTRY, dtype, BLOCK_K, CH)
            new_accs = new_accs + (_value_dot(accs[c], alpha, b_p, b_v, IEEE, UPCAST),)
        accs = new_accs
        n_valid += valid.to(tl.int32)
    count = tl.sum(n_valid, axis=0)

    if NUM_SPLITS == 1:
        scale = _out_scale(p_sink, o_h, m_h, m_i, l_i, count)
        for c in tl.static_range(BLOCK_DV // CH):
            o_v = d0 + c * CH + o_c                                         # [CH] the chunk's columns
            _store_out(p_o, p_row, o_v, m_h[:, None] & (o_v[None, :] < D), accs[c], scale, count, UPCAST)
    else:
        p_w = ((pid_t * N_RUN + pid_k) * H + o_h)                           # [BH]
        for c in tl.static_range(BLOCK_DV // CH):
            o_v = d0 + c * CH + o_c
            tl.store(p_wacc + p_w[:, None] * D + o_v[None, :], accs[c], mask=m_h[:, None] & (o_v[None, :] < D))
        if SPLIT_D == 1:
            m_ml = m_h
        else:
            m_ml = m_h & (o_h * 0 + d0 == 0)                                # [BH] the first part writes them
        _store_stats(p_wml, p_w, m_ml, m_i, l_i, count, BLOCK_H)


@triton.jit
def _combine_part(p_wacc, p_wml, pid_t, sp, N_RUN, H, D, o_h, o_d, m_h, m_hd):
    """Split sp's (m, l, acc [BH, BD]) partial of token pid_t; a split at or past N_RUN reads as
    (-inf, 0, 0)."""
    ok = m_h & (o_h * 0 + sp < N_RUN)                                       # [BH]
    p_w = (pid_t * N_RUN + sp) * H + o_h
    m = tl.load(p_wml + p_w * 3, mask=ok, other=float("-inf"))
    l = tl.load(p_wml + p_w * 3 + 1, mask=ok, other=0.0)
    acc = tl.load(p_wacc + p_w[:, None] * D + o_d[None, :], mask=m_hd & ok[:, None], other=0.0)
    return m, l, acc


@triton.jit
def _sparse_attn_combine_kernel(p_wacc, p_wml, p_sink, p_o, H, D, N_RUN, UPCAST: tl.constexpr,
                                BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    # p_wacc [T, N_RUN, H, D] fp32; p_wml [T, N_RUN, H, 3]; p_sink [H]; p_o [T, H, D]. One program per
    # (token, BLOCK_H heads, BLOCK_D columns). The splits go four at a time, their loads issued together
    # (one memory round trip for four, not one each: at batch 1 the splits' serial loads bound this
    # kernel) and added in split order (the bits of one at a time; a split past N_RUN adds zeros).
    pid_t = tl.program_id(0).to(tl.int64)
    o_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    o_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    m_h = o_h < H
    m_hd = m_h[:, None] & (o_d[None, :] < D)
    sink = tl.load(p_sink + o_h, mask=m_h, other=0.0) * 1.4426950408889634
    m_f = sink
    count = tl.zeros([BLOCK_H], dtype=tl.float32)
    for sp in range(N_RUN):
        p_w = (pid_t * N_RUN + sp) * H + o_h
        m_f = tl.maximum(m_f, tl.load(p_wml + p_w * 3, mask=m_h, other=float("-inf")))
        count += tl.load(p_wml + p_w * 3 + 2, mask=m_h, other=0.0)
    m_f = tl.where(m_f == float("-inf"), 0.0, m_f)
    denom = tl.exp2(sink - m_f)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for s0 in range(0, N_RUN, 4):
        m0, l0, a0 = _combine_part(p_wacc, p_wml, pid_t, s0, N_RUN, H, D, o_h, o_d, m_h, m_hd)
        m1, l1, a1 = _combine_part(p_wacc, p_wml, pid_t, s0 + 1, N_RUN, H, D, o_h, o_d, m_h, m_hd)
        m2, l2, a2 = _combine_part(p_wacc, p_wml, pid_t, s0 + 2, N_RUN, H, D, o_h, o_d, m_h, m_hd)
        m3, l3, a3 = _combine_part(p_wacc, p_wml, pid_t, s0 + 3, N_RUN, H, D, o_h, o_d, m_h, m_hd)
        c0, c1, c2, c3 = tl.exp2(m0 - m_f), tl.exp2(m1 - m_f), tl.exp2(m2 - m_f), tl.exp2(m3 - m_f)
        denom += l0 * c0
        acc += a0 * c0[:, None]
        denom += l1 * c1
        acc += a1 * c1[:, None]
        denom += l2 * c2
        acc += a2 * c2[:, None]
        denom += l3 * c3
        acc += a3 * c3[:, None]
    denom = tl.where(count > 0, denom, 1.0)                                 # 0 only for empty rows
    b_o = tl.where(count[:, None] > 0, acc / denom[:, None], 0.0)
    if UPCAST:
        if p_o.dtype.element_ty == tl.bfloat16:
            b_o = round_bf16(b_o)
    tl.store(p_o + (pid_t * H + o_h[:, None]) * D + o_d[None, :], b_o.to(p_o.dtype.element_ty), mask=m_hd)


# ================================================================================================
# Launcher (shared with the cached / FP8 variant)
# ================================================================================================

# The combine's column block: one token's 64 heads x 512 in 16 programs at batch 1 (4 at full width).
COMBINE_BLOCK_D = 128


def launch_sparse_attention(q: torch.Tensor, kv: torch.Tensor, attn_sink: torch.Tensor, topk_idxs: torch.Tensor,
                            out: torch.Tensor, softmax_scale: float, cfg: SparseAttentionConfig, N: int,
                            kv_fp8: bool = False, nope: int = 0, entry_bytes: int = 0, run_splits=None) -> None:
    """Launch the main kernel (and the combine kernel for num_splits > 1) into `out` [B, S, H, D].

    kv: [B, N, D] in q's dtype, or with kv_fp8 the cache [B, N, entry_bytes] uint8 (`nope` FP8 dims).
    run_splits (None: cfg.num_splits): the splits to run, at most cfg.num_splits (the grid's split axis),
    an int or an expression of a symbolic size that an engine evaluates at run time."""
    B, S, H, D = q.shape
    K = topk_idxs.shape[-1]
    T = B * S  # a grid of 0 programs launches nothing (no branch on a possibly symbolic S)
    check(kv_fp8 or cfg.dequant == "tile",
          f"dequant={cfg.dequant!r} is for the FP8 cache (sparse_attention_cached); sparse_attention takes 'tile'")
    if H == 0 or D == 0:
        return
    block_h, block_d = block_sizes(H, D, cfg)
    split_d = value_split(D, cfg, kv_fp8)
    n_h = triton.cdiv(H, block_h)
    splits = max(1, min(cfg.num_splits, triton.cdiv(max(K, 1), cfg.block_k)))
    n_run = splits if run_splits is None else torch.sym_min(run_splits, splits)
    k_per_split = triton.cdiv(triton.cdiv(max(K, 1), n_run), cfg.block_k) * cfg.block_k
    ieee = q.dtype == torch.float32
    qk_scale = float(softmax_scale) * LOG2E
    if splits == 1:
        # unused (NUM_SPLITS == 1 never touches them)
        wacc, wml = placeholder(q.device, torch.float32), placeholder(q.device, torch.float32)
    else:
        wacc = torch.empty((T, n_run, H, D), dtype=torch.float32, device=q.device)
        wml = torch.empty((T, n_run, H, 3), dtype=torch.float32, device=q.device)
    rope = D - nope if kv_fp8 else 0
    if cfg.dequant == "chunks":
        kernel, variant = _sparse_attn_fp8_chunks_kernel, {}
    else:
        kernel, variant = _sparse_attn_fwd_kernel, {"KV_FP8": kv_fp8, "BLOCK_R": max(16, triton.next_power_of_2(rope))}
    launch(kernel, (T * n_h * split_d, splits), q, kv, attn_sink, topk_idxs, out, wacc, wml,
           S, H, N, K, D, k_per_split, n_run, qk_scale, n_h, **variant,
           NOPE=nope, ROPE=rope, ENTRY=entry_bytes, NUM_SPLITS=splits, IEEE=ieee, UPCAST=INTERPRET,
           BLOCK_H=block_h, BLOCK_K=cfg.block_k, BLOCK_D=block_d, SPLIT_D=split_d,
           num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if splits > 1:
        comb_h, comb_d = min(block_h, 16), min(block_d, COMBINE_BLOCK_D)
        launch(_sparse_attn_combine_kernel, (T, triton.cdiv(H, comb_h), triton.cdiv(D, comb_d)), wacc, wml, attn_sink,
               out, H, D, n_run, INTERPRET, BLOCK_H=comb_h, BLOCK_D=comb_d, num_warps=4, num_stages=1)


def check_common(op: str, q: torch.Tensor, attn_sink: torch.Tensor, topk_idxs: torch.Tensor) -> None:
    """The checks shared by both attention ops (q, sink, indices)."""
    check_tensor(op, "q", q, FLOAT_DTYPES, ndim=4)
    B, S, H, D = q.shape
    check_tensor(op, "attn_sink", attn_sink, (torch.float32,), shape=(H,), device=q.device)
    check_tensor(op, "topk_idxs", topk_idxs, (torch.int32,), ndim=3, device=q.device)
    check(tuple(topk_idxs.shape[:2]) == (B, S),
          f"{op}: topk_idxs has shape {tuple(topk_idxs.shape)}; need [B, S, K] = [{B}, {S}, K]")


# ================================================================================================
# Public function
# ================================================================================================

def sparse_attention(q: torch.Tensor, kv: torch.Tensor, attn_sink: torch.Tensor, topk_idxs: torch.Tensor,
                     softmax_scale: float, config: SparseAttentionConfig | dict | str | None = None) -> torch.Tensor:
    """Attention of every query over its own set of entries of one shared key=value head.

    q [B, S, H, D]; kv [B, N, D] (key and value), same dtype as q (bf16 / fp16 / fp32); attn_sink [H]
    fp32; topk_idxs [B, S, K] int32 in [-1, N) (-1 = no entry; a repeated index counts each time; an
    index >= N is undefined behaviour, as in any gather kernel). All contiguous, on one device.
    out [B, S, H, D] in q's dtype: out[b,s,h] = sum_j p_j kv[b, idx_j], p_j = exp(l_j) / (sum_i exp(l_i)
    + exp(sink_h)), l_j = softmax_scale * q[b,s,h] . kv[b, idx_j]. A row with no valid index gives
    zeros. config: SparseAttentionConfig / dict / 'field=value,...' (fields not named keep the default's
    values) / None: the device's default for this head dim (config.default_config).
    """
    op = "sparse_attention"
    check_common(op, q, attn_sink, topk_idxs)
    check_tensor(op, "kv", kv, (q.dtype,), ndim=3, device=q.device)
    B, S, H, D = q.shape
    check(kv.shape[0] == B and kv.shape[2] == D,
          f"{op}: kv has shape {tuple(kv.shape)}; need [B, N, D] = [{B}, N, {D}]")
    cfg = resolve_config(SparseAttentionConfig, config, lambda gpu: default_config(gpu, D), q.device)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    launch_sparse_attention(q, kv, attn_sink, topk_idxs, out, softmax_scale, cfg, N=kv.shape[1])
    return out


def flops(topk_idxs: torch.Tensor, H: int, D: int) -> int:
    """Matmul FLOPs the op needs: 4 H D per valid (token, index) pair (logits and output)."""
    return 4 * H * D * int((topk_idxs >= 0).sum())


# ================================================================================================
# Torch op (torch.ops.dsv4_triton.sparse_attention): the dsv4 signature plus a config string
# ================================================================================================

@kernel_op("sparse_attention")
def _sparse_attention_op(q: torch.Tensor, kv: torch.Tensor, attn_sink: torch.Tensor, topk_idxs: torch.Tensor,
                         softmax_scale: float, config: str = "") -> torch.Tensor:
    return sparse_attention(q, kv, attn_sink, topk_idxs, softmax_scale, config)
