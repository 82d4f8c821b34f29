"""Lightning-indexer top-k (`torch.ops.dsv4.indexer_topk` semantics, see model/ops.py): per query,
the visible compressed keys with the highest weighted-ReLU scores, best first, ties to the lowest
index, NaN first, -1 padding.

Persistent programs score tiles of keys with one tensor-core MMA for `block_s` queries x all heads
(no [S, N] score matrix is ever written), keep each query's running top-k as threshold-filtered
candidates packed into sortable int64 keys in a small global workspace, and compact them with a sort
only when a row could overflow. Paths by dtype and config (`config.launch_plan`): 16-bit MMA (bf16 /
fp16), bf16 MMA with exact fp32 residuals (bf16 q, fp32 keys: the model's case), FP8 MMA on
power-of-two row-scaled operands (config score_mma="fp8": the model's FP4-simulated q and keys are
exact in e4m3; other rows fall back to the bf16 dots), exact fp32 (fp32 models).
The selection is exactly the plain op's where every partial sum is exact; otherwise near-tied keys
can trade places.
config selection="radix" (default "threshold", the above) splits the work in two: a score kernel
(the same query blocks, key tiles and score code) writes the scores of a chunk of queries to an fp32
workspace [rows, keys] (within WORKSPACE_BYTES), then the radix select (radix_topk.py) picks each
row's top-k into its output row: the same scores and order rule, so the same picks.
Packed keys (indexer_topk_cached, kernels/indexer_topk_cached): with KEY_FORMAT set both kernels read
the uint8 index cache and decode each key tile in registers (FP4 e2m1 x e8m0, FP8 e4m3 x a float32
scale) into the same dots; DESIGN.md, Packed keys.
Design, ordering rules and cost model: kernels/indexer_topk/DESIGN.md; measurements:
bench/results/H100/indexer_notes.md.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from .._common import (FLOAT_DTYPES, INTERPRET, check, check_tensor, device_name, kernel_op, largest_value, launch,
                       placeholder, resolve_config, sm_count, split_chunks)
from .config import (FP8_K_STEP, MAX_TOPK, IndexerTopkConfig, default_config, key_rows_refusal, launch_plan,
                     padded_heads_dims, radix_default_config, workspace_width)
from .radix_topk import launch_radix_topk
from .sort_keys import EMPTY, pack_keys, unpack_index

PROGRAMS_PER_SM = 4   # persistent programs a CUDA SM (untuned; ~1-2 resident at the V4 tiles, the rest queue)
INTERPRET_PROGRAMS = 4
MAX_HEADS = 128
MAX_HEAD_DIM = 256
FP8_ROWS_BLOCK = 32   # rows a program of the fp8 operand conversion
# selection="radix": the fp32 score workspace of one chunk of queries stays within this many bytes.
# Unchunked, a 128K-token prefill over 32K keys would take 16 GiB. 512 MiB is 4096 rows of 32K keys: 32
# chunks at 128K (64 launches, well under a millisecond of launch gaps against the indexer's tens),
# 4096 radix programs a chunk (many waves of 132 SMs, so the last wave's idle SMs cost little), and
# small beside the H200's 141 GB. The workspace round trip through HBM (each visible score written
# once and read once by the radix select's first pass) is the same at any chunk size; chunks that fit
# the 50 MB L2 (~400 rows at 32K keys) could keep it on chip at 10x the launches: for the GPU to weigh.
WORKSPACE_BYTES = 512 << 20


# ================================================================================================
# Kernel
# ================================================================================================

@triton.jit
def _fp8_rows_kernel(p_x, p_x8, p_scale, p_first_bad, R, N_GROUP, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                     STEP: tl.constexpr, FIRST_BAD: tl.constexpr):
    # p_x [R, D] rows (any float dtype) -> p_x8 [R, D] = x * 2^-r (float8e4nv) and p_scale [R] fp32 = 2^r,
    # or 0 where the row is not "FP4-like" (then p_x8 is unused). FP4-like: in each K step of STEP
    # dims (the FP8 MMA's, = the model's FP4 block) every value is an integer multiple, at most 15,
    # of the unit 2^(E - 3) (E = the exponent of the step's amax: 4 significant bits on one grid a
    # step; e2m1 values times one power-of-two block scale are), with E in fp32's normal range and at
    # most 13 below the row's largest, or the step is all zeros. r = (the row's largest E) - 7 puts
    # the row's values below 2^8 <= 448 and every unit at >= 2^-9 (e4m3's subnormal step): exact in
    # e4m3. Rows of zeros get scale 1. FIRST_BAD: p_first_bad [R / N_GROUP] int32 (set to N_GROUP
    # before) takes the lowest index within its group of N_GROUP rows of a row that is not FP4-like.
    NS: tl.constexpr = BLOCK_D // STEP
    o_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    m_r = o_r < R
    o_d = tl.arange(0, BLOCK_D)
    p_rd = o_r[:, None].to(tl.int64) * D + o_d[None, :]
    m_rd = m_r[:, None] & (o_d < D)[None, :]
    b_x = tl.reshape(tl.load(p_x + p_rd, mask=m_rd, other=0.0).to(tl.float32), [BLOCK_R, NS, STEP])
    a_step = tl.max(tl.abs(b_x), axis=2)                                    # [BR, NS]; drops NaN (off the grid below)
    e_step = a_step.to(tl.int32, bitcast=True) >> 23                        # biased exponent; 255 = Inf
    e_max = tl.max(e_step, axis=1)                                          # [BR]
    normal = (e_step >= 8) & (e_step <= 254)                                # unit 2^(E - 130) and 2^r normal
    inv_unit = tl.where(normal, (257 - e_step) << 23, 127 << 23).to(tl.float32, bitcast=True)  # 2^(130 - E)
    units = b_x * inv_unit[:, :, None]                                      # exact (a power of two)
    on_grid = tl.min((units == tl.floor(units)).to(tl.int32), axis=2) == 1  # NaN: off the grid
    step_ok = (a_step == 0) | (normal & on_grid & (e_step >= e_max[:, None] - 13))
    row_ok = tl.min(step_ok.to(tl.int32), axis=1) == 1                      # [BR]
    scaled = e_max >= 8                                                     # else zeros (or bad): scale 1
    scale = tl.where(scaled, (e_max - 7) << 23, 127 << 23).to(tl.float32, bitcast=True)
    inv_scale = tl.where(scaled & (e_max <= 254), (261 - e_max) << 23, 127 << 23).to(tl.float32, bitcast=True)
    b_x8 = tl.reshape(b_x, [BLOCK_R, BLOCK_D]) * inv_scale[:, None]
    tl.store(p_x8 + p_rd, b_x8.to(p_x8.dtype.element_ty), mask=m_rd)
    tl.store(p_scale + o_r, tl.where(row_ok, scale, 0.0), mask=m_r)
    if FIRST_BAD:
        tl.atomic_min(p_first_bad + o_r // N_GROUP, o_r % N_GROUP, mask=m_r & ~row_ok)


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    # a @ b (+ acc): IEEE fp32 dots on fp32 copies (UPCAST) or fp32 operands (IEEE), else the MMA.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _key_dots(b_q, b_k, UPCAST: tl.constexpr, IEEE: tl.constexpr, KEY_ROWS: tl.constexpr):
    # b_q [M, BD] queries x heads, b_k [BN, BD] the key tile (dot operand) -> the per-head dots, fp32:
    # [BN, M] when KEY_ROWS (keys as the MMA's rows), else [M, BN].
    if KEY_ROWS:
        return _dot(b_k, tl.trans(b_q), None, UPCAST, IEEE)
    else:
        return _dot(b_q, tl.trans(b_k), None, UPCAST, IEEE)


@triton.jit
def _residual_dots(b_s, b_q, b_k, b_kf, UPCAST: tl.constexpr, IEEE: tl.constexpr, KEY_ROWS: tl.constexpr):
    # b_s (the dots of b_q with b_k = the bf16 rounding of the fp32 keys b_kf [BN, BD]) plus the dots of
    # the keys' two bf16 residual terms (b_kf = hi + mid + lo exactly, hi = b_k; Inf/NaN-free
    # residuals; see the module doc).
    b_hi = b_k.to(tl.float32)
    r1 = tl.where(b_hi == b_kf, 0.0, b_kf - b_hi)
    b_mid = r1.to(tl.bfloat16)
    b_lo = (r1 - b_mid.to(tl.float32)).to(tl.bfloat16)
    if KEY_ROWS:
        return _dot(b_lo, tl.trans(b_q), _dot(b_mid, tl.trans(b_q), b_s, UPCAST, IEEE), UPCAST, IEEE)
    else:
        return _dot(b_q, tl.trans(b_lo), _dot(b_q, tl.trans(b_mid), b_s, UPCAST, IEEE), UPCAST, IEEE)


@triton.jit
def _tile_dots(b_q, b_k, p_kf, m_kd, fix, UPCAST: tl.constexpr, IEEE: tl.constexpr, FIX: tl.constexpr,
                 KEY_ROWS: tl.constexpr):
    # _key_dots; FIX: when the flag `fix` is set, plus the residual dots of the keys as given at p_kf
    # [BN, BD] (masked by m_kd).
    b_s = _key_dots(b_q, b_k, UPCAST, IEEE, KEY_ROWS)
    if FIX:
        if fix:
            b_s = _residual_dots(b_s, b_q, b_k, tl.load(p_kf, mask=m_kd, other=0.0).to(tl.float32), UPCAST, IEEE,
                                 KEY_ROWS)
    return b_s


@triton.jit
def _sorted_rows(p_rows, cnt, C: tl.constexpr):
    # p_rows [BS, C] workspace slots, cnt [BS] int32 filled slots each -> [BS, C] int64 keys, each row
    # sorted descending (EMPTY past cnt). Ends with a barrier: every thread has read before any store.
    o_c = tl.arange(0, C)
    tl.debug_barrier()                                                      # every thread's appends are visible
    buf = tl.sort(tl.load(p_rows, mask=o_c[None, :] < cnt[:, None], other=EMPTY), descending=True)
    tl.debug_barrier()
    return buf


@triton.jit
def _compact(p_row, cnt, topk, C: tl.constexpr):
    # p_row [BS] pointers to the program's workspace rows, cnt [BS] int32 filled slots each.
    # Keeps each row's topk best keys (sorted descending) in its first slots; returns (cnt, thr) with
    # thr [BS] = the row's topk-th best key (EMPTY while it holds fewer).
    o_c = tl.arange(0, C)
    p_rows = p_row[:, None] + o_c[None, :]                                  # [BS, C]
    buf = _sorted_rows(p_rows, cnt, C)
    cnt = tl.minimum(cnt, topk)
    tl.store(p_rows, buf, mask=o_c[None, :] < cnt[:, None])                 # slots < cnt; appends go to >= cnt
    thr = tl.max(tl.where(o_c[None, :] == topk - 1, buf, EMPTY), axis=1)    # [BS]
    return cnt, thr


@triton.jit
def _fp8_tile_dots(b_q8, b_k8, UPCAST: tl.constexpr, KEY_ROWS: tl.constexpr, STEP: tl.constexpr):
    # b_q8 [M, BD], b_k8 [BN, BD] row-scaled e4m3 operands -> their dots, fp32 ([BN, M] when KEY_ROWS,
    # else [M, BN]). Hopper's FP8 MMA sums in a ~14-bit fixed-point window: max_num_imprecise_acc=STEP
    # adds each K step's sum (exact for FP4-like rows: DESIGN.md) into the fp32 accumulator.
    # UPCAST (the interpreter): fp32 copies and IEEE dots.
    if KEY_ROWS:
        a, b = b_k8, b_q8
    else:
        a, b = b_q8, b_k8
    if UPCAST:
        b_s = tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), input_precision="ieee")
    else:
        b_s = tl.dot(a, tl.trans(b), max_num_imprecise_acc=STEP)
    return b_s


@triton.jit
def _head_sum(b_s, b_w, ks, KSCALE: tl.constexpr, KEY_ROWS: tl.constexpr, BLOCK_S: tl.constexpr,
              BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr):
    # b_s the per-head dots ([BN, M] when KEY_ROWS, else [M, BN]), b_w [M] head weights, KSCALE: times
    # ks [BN] after the head sum (the fp8 path's key row scales) -> [BS, BN] fp32 scores.
    b_s = tl.where(b_s < 0, 0.0, b_s)                                        # relu, NaN kept
    if KEY_ROWS:                                                             # b_s [BN, M]
        b_s = b_s * b_w[None, :]
        score = tl.trans(tl.sum(tl.reshape(b_s, [BLOCK_N, BLOCK_S, BLOCK_H]), axis=2))  # [BS, BN]
    else:                                                                    # b_s [M, BN]
        b_s = b_s * b_w[:, None]
        score = tl.sum(tl.reshape(b_s, [BLOCK_S, BLOCK_H, BLOCK_N]), axis=1)  # [BS, BN]: sum over heads
    if KSCALE:
        score = score * ks[None, :]
    return score


@triton.jit
def _visible_keys(t, ratio, N):
    # t [BS] the queries' positions (-1: no query) -> [BS] int32 each one's visible keys (0 for none).
    # Each kernel loads the positions itself and passes them here: a store address (the output row,
    # the candidate slots) derives from these, and torch's mutation analysis counts every argument of
    # a helper call whose result reaches a store address as written (it does not look inside), which
    # would make export copy the positions every CSA layer shares (bench/mutation_report.py).
    n_vis = tl.where(t + 1 > 0, (t + 1) // ratio, 0)
    return tl.minimum(n_vis, N).to(tl.int32)


@triton.jit
def _query_block(p_q, p_w, p_q8, p_qs, p_kbad, b, s0, s_end, S, H, N, D, UPCAST: tl.constexpr,
                 FP8: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    # The block of queries s0 .. s0 + BLOCK_S - 1 (those < s_end <= S) of batch row b (pointers as in
    # _indexer_topk_kernel) -> (o_qt, m_qt) [M, BD] offsets and mask of its q rows (M = BLOCK_S x
    # BLOCK_H: query s0 + m // BH x head m % BH), b_q [M, BD] the dot operand (fp32 when UPCAST; the
    # row-scaled e4m3 form when FP8), b_w [M] fp32 head weights, b_w8 [M] the weights times the q row
    # scales (FP8; else b_w), n_fp8 the keys [0, n_fp8) that take the FP8 dots (FP8; else 0).
    M: tl.constexpr = BLOCK_S * BLOCK_H
    o_m = tl.arange(0, M)
    o_hm = o_m % BLOCK_H
    o_d = tl.arange(0, BLOCK_D)
    o_sm = s0 + o_m // BLOCK_H
    m_m = (o_hm < H) & (o_sm < s_end)
    t_m = b * S + o_sm                                                       # [M] token b * S + s
    o_qt = (t_m[:, None] * H + o_hm[:, None]) * D + o_d[None, :]              # [M, BD]
    m_qt = m_m[:, None] & (o_d < D)[None, :]
    b_w = tl.load(p_w + t_m * H + o_hm, mask=m_m, other=0.0).to(tl.float32)  # [M]
    if FP8:
        b_q = tl.load(p_q8 + o_qt, mask=m_qt, other=0.0)
        qs = tl.load(p_qs + t_m * H + o_hm, mask=m_m, other=1.0)             # [M]
        b_w8 = b_w * qs                                                      # exact: qs a power of two
        # keys [0, n_fp8) take the FP8 dots: none if a query row is not FP4-like, else those before
        # the tile of the batch row's first key that is not
        n_fp8 = tl.where(tl.min(qs, axis=0) == 0, 0, tl.load(p_kbad + b) // BLOCK_N * BLOCK_N)
    else:
        b_q = tl.load(p_q + o_qt, mask=m_qt, other=0.0)
        if UPCAST:
            b_q = b_q.to(tl.float32)
        b_w8 = b_w
        n_fp8 = 0
    return o_qt, m_qt, b_q, b_w, b_w8, n_fp8


@triton.jit
def _fp8_tile_scores(p_k, p_ks, b_q8, b_w8, b, n, n_max, N, D, UPCAST: tl.constexpr, KEY_ROWS: tl.constexpr,
                     STEP: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    # The FP8 dots of keys n .. n + BN - 1 (those < n_max) of batch row b with the block's q8 [M, BD],
    # head-summed with the scaled weights b_w8 [M] and times the key row scales -> [BS, BN] fp32 scores.
    o_n = n + tl.arange(0, BLOCK_N)                                          # [BN] int32
    m_n = o_n < n_max
    o_d = tl.arange(0, BLOCK_D)
    b_k8 = tl.load(p_k + (b * N + o_n[:, None]) * D + o_d[None, :], mask=m_n[:, None] & (o_d < D)[None, :],
                   other=0.0)                                                # [BN, BD]
    ks = tl.load(p_ks + b * N + o_n, mask=m_n, other=1.0)                    # [BN]
    b_s = _fp8_tile_dots(b_q8, b_k8, UPCAST, KEY_ROWS, STEP)
    return _head_sum(b_s, b_w8, ks, True, KEY_ROWS, BLOCK_S, BLOCK_H, BLOCK_N)


@triton.jit
def _mma_tile_scores(p_q, p_k, p_kf, o_qt, m_qt, b_q, b_w, fix, b, n, n_max, N, D, UPCAST: tl.constexpr,
                     IEEE: tl.constexpr, FIX: tl.constexpr, FP8: tl.constexpr, KEY_ROWS: tl.constexpr,
                     BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    # The 16-bit / exact dots of keys n .. n + BN - 1 (those < n_max) of batch row b with the block's
    # b_q [M, BD] (with FP8, the fallback: q reloaded as given from o_qt / m_qt, keys as given rounded
    # to bf16), head-summed with b_w [M] -> [BS, BN] fp32 scores.
    o_n = n + tl.arange(0, BLOCK_N)                                          # [BN] int32
    o_d = tl.arange(0, BLOCK_D)
    m_kd = (o_n < n_max)[:, None] & (o_d < D)[None, :]
    p_kt = (b * N + o_n[:, None]) * D + o_d[None, :]
    if FP8:                                                                  # the fallback: bf16 dots
        b_q = tl.load(p_q + o_qt, mask=m_qt, other=0.0)
        if UPCAST:
            b_q = b_q.to(tl.float32)
        b_k = tl.load(p_kf + p_kt, mask=m_kd, other=0.0).to(tl.bfloat16)
    else:
        b_k = tl.load(p_k + p_kt, mask=m_kd, other=0.0)                      # [BN, BD]
    b_s = _tile_dots(b_q, b_k, p_kf + p_kt, m_kd, fix, UPCAST, IEEE, FIX, KEY_ROWS)
    return _head_sum(b_s, b_w, b_w, False, KEY_ROWS, BLOCK_S, BLOCK_H, BLOCK_N)


# KEY_FORMAT of the kernels: the keys as float rows [B, N, D], or the packed indexer cache [B, N, ENTRY]
# uint8 (model/kv_layout.py): "fp4" = D/2 bytes of e2m1 codes (element 2i in the low nibble) and one
# e8m0 scale byte per 32 values; "fp8" = D e4m3 codes and one little-endian float32 scale.
KEY_FLOAT = tl.constexpr(0)
KEY_FP4 = tl.constexpr(1)
KEY_FP8 = tl.constexpr(2)
PACKED_KEY_FORMATS = {"fp4": KEY_FP4.value, "fp8": KEY_FP8.value}   # the cache formats (kv_layout) -> KEY_FORMAT


@triton.jit
def _packed_key_offsets(b, n, n_max, N, D, KEY_FORMAT: tl.constexpr, ENTRY: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    # The byte offsets into the packed cache [B, N, ENTRY] of keys n .. n + BN - 1 (those < n_max) of
    # batch row b -> (o_code [BN, BD] and its mask: the code byte of each value (fp4: the byte holding
    # its nibble), o_scale and its mask: fp4 [BN, BD] the scale byte of each value, fp8 [BN, 4] the
    # scale's bytes). Pointer-free: the kernels load the cache in their own body (_visible_keys' comment
    # says why).
    o_n = n + tl.arange(0, BLOCK_N)                                          # [BN] int32
    o_d = tl.arange(0, BLOCK_D)
    m_n = o_n < n_max
    row = (b * N + o_n).to(tl.int64) * ENTRY                                 # [BN] first byte of each key
    m_kd = m_n[:, None] & (o_d < D)[None, :]
    if KEY_FORMAT == KEY_FP4:
        o_code = row[:, None] + (o_d // 2)[None, :]
        o_scale = row[:, None] + (D // 2 + o_d // 32)[None, :]
        m_scale = m_kd
    else:
        o_b = tl.arange(0, 4)
        o_code = row[:, None] + o_d[None, :]
        o_scale = row[:, None] + (D + o_b)[None, :]
        m_scale = m_n[:, None] & (o_b < 4)[None, :]
    return o_code, m_kd, o_scale, m_scale


@triton.jit
def _packed_key_values(b_code, b_scale, KEY_FORMAT: tl.constexpr, BLOCK_D: tl.constexpr):
    # The bytes at _packed_key_offsets' offsets -> the keys [BN, BD] fp32, bit for bit
    # model/kv_layout.unpack_indexer_keys' values (0 where masked).
    if KEY_FORMAT == KEY_FP4:
        odd = (tl.arange(0, BLOCK_D) % 2)[None, :] == 1
        code = b_code.to(tl.int32)
        code = tl.where(odd, code >> 4, code & 15)                           # [BN, BD] e2m1 codes 0..15
        e = (code & 7) >> 1
        m = code & 1
        # exponent 0: 0.5 m (0, 0.5); else 2^(e-1) (1 + m/2), the fp32 of exponent field e + 126
        mag = tl.where(e == 0, 0.5 * m.to(tl.float32), (((e + 126) << 23) | (m << 22)).to(tl.float32, bitcast=True))
        value = tl.where(code >= 8, -mag, mag)                               # code 8: -0.0
        sb = b_scale.to(tl.int32)
        # e8m0 byte s -> 2^(s - 127): the fp32 of exponent field s (255: inf), 2^-127 (subnormal) for 0
        scale = tl.where(sb == 0, 1 << 22, sb << 23).to(tl.float32, bitcast=True)
        return value * scale                                                 # exact: a power of two
    else:
        value = b_code.to(tl.float8e4nv, bitcast=True).to(tl.float32)        # [BN, BD]
        # e4m3fn's NaN codes (S.1111.111) explicitly: the interpreter's conversion does not give NaN
        value = tl.where((b_code & 0x7F) == 0x7F, float("nan"), value)
        bits = tl.sum(b_scale.to(tl.int32) << (8 * tl.arange(0, 4))[None, :], axis=1)  # [BN] little-endian
        scale = bits.to(tl.float32, bitcast=True)[:, None]
        # The product rounded once, as torch's code * scale: the scale split into 20 + 4 significant
        # bits makes both partial products exact (codes have 4), so their sum rounds to the same
        # float32 whether or not the compiler contracts it into an FMA (a contracted code * scale
        # would feed the residual split below the unrounded product).
        hi = (bits & -16).to(tl.float32, bitcast=True)[:, None]
        split = value * hi + value * (scale - hi)
        return tl.where(((bits & 0x7F800000) == 0x7F800000)[:, None], value * scale, split)  # Inf / NaN scales


@triton.jit
def _packed_tile_scores(b_code, b_scale, b_q, b_w, UPCAST: tl.constexpr, IEEE: tl.constexpr, KEY_FORMAT: tl.constexpr,
                        KEY_BF16: tl.constexpr, KEY_ROWS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    # One packed key tile's bytes (b_code, b_scale: _packed_key_offsets) with the block's b_q [M, BD]
    # -> [BS, BN] fp32 scores, head-summed with b_w [M]. KEY_BF16 (q bf16): bf16 keys as the MMA
    # operand, exact for FP4 keys (e2m1 x a power of two); FP8 keys (code x a float32 scale) add the
    # residual dots (the bf16_fix path's split). Else the fp32 keys (the exact path).
    b_kf = _packed_key_values(b_code, b_scale, KEY_FORMAT, BLOCK_D)         # [BN, BD] fp32
    if KEY_BF16:
        b_k = b_kf.to(tl.bfloat16)
    else:
        b_k = b_kf
    b_s = _key_dots(b_q, b_k, UPCAST, IEEE, KEY_ROWS)
    if KEY_BF16 and KEY_FORMAT == KEY_FP8:
        b_s = _residual_dots(b_s, b_q, b_k, b_kf, UPCAST, IEEE, KEY_ROWS)
    return _head_sum(b_s, b_w, b_w, False, KEY_ROWS, BLOCK_S, BLOCK_H, BLOCK_N)


@triton.jit
def _enter_tile(score, n, n_vis, thr, cnt, p_row, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr):
    # One key tile's scores [BS, BN] (keys n .. n + BN - 1) into the running selection: n_vis [BS],
    # thr [BS] and cnt [BS] the block's visibility, thresholds and filled slots. Appends each query's
    # keys above its threshold to its workspace row; returns the new cnt.
    o_n = n + tl.arange(0, BLOCK_N)                                          # [BN] int32
    valid = o_n[None, :] < n_vis[:, None]
    key = pack_keys(score, tl.broadcast_to(o_n[None, :], [BLOCK_S, BLOCK_N]), valid)  # [BS, BN]
    sel = key > thr[:, None]                                                 # [BS, BN]; EMPTY never
    n_sel = tl.sum(sel.to(tl.int32), axis=1)                                 # [BS]
    if tl.max(n_sel, axis=0) > 0:
        slot = cnt[:, None] + tl.cumsum(sel.to(tl.int32), axis=1) - 1        # [BS, BN]
        tl.store(p_row[:, None] + slot, key, mask=sel)
        cnt += n_sel
    return cnt


@triton.jit
def _indexer_topk_kernel(p_q, p_w, p_k, p_kf, p_fix, p_pos, p_ws, p_out, p_q8, p_qs, p_ks, p_kbad, S, H, N, D, ratio,
                         topk, N_SB, n_blocks, UPCAST: tl.constexpr, IEEE: tl.constexpr, FIX: tl.constexpr,
                         FP8: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_N: tl.constexpr, C: tl.constexpr, KEY_ROWS: tl.constexpr, STEP: tl.constexpr,
                         KEY_FORMAT: tl.constexpr, KEY_BF16: tl.constexpr, ENTRY: tl.constexpr):
    # p_q [B, S, H, D]; p_w [B, S, H]; p_k [B, N, D] (the dot operand: the keys, their bf16 rounding
    # when FIX, their row-scaled e4m3 form when FP8); p_kf [B, N, D] the keys as given (used when FIX
    # or FP8) and p_fix an int32 flag (used only when FIX and not FP8; otherwise a placeholder);
    # p_pos [B, S] int64; p_ws [programs * BLOCK_S, C] int64 candidate workspace (program pid owns rows
    # pid * BLOCK_S ..); p_out [B, S, topk] int32.
    # FP8 (else unused placeholders): p_q8 [B, S, H, D] q's row-scaled e4m3 form, p_qs [B, S, H]
    # and p_ks [B, N] fp32 row scales (0: the row is not FP4-like), p_kbad [B] int32 the first key
    # of each batch row that is not (N if none): keys from its tile on, and query blocks holding a
    # row that is not, take the bf16 dots (with FIX the residual dots too), see DESIGN.md.
    # UPCAST: fp32 copies of q and keys and IEEE dots (fp32 inputs, mixed dtypes, the interpreter,
    # whose bf16 tl.dot is wrong). IEEE: fp32 q (the exact path). FIX: q bf16 with keys given in
    # another dtype; p_fix != 0 when some key is not exact in bf16: then each tile adds the dots of the
    # two bf16 residual terms (keys = hi + mid + lo exactly), see the module doc.
    # KEY_FORMAT (KEY_FP4 / KEY_FP8; else KEY_FLOAT): p_k is the packed indexer cache [B, N, ENTRY]
    # uint8, read and decoded a key tile at a time (_packed_tile_scores; KEY_BF16: q bf16, the 16-bit
    # MMA), and p_kf, p_fix and the FP8 operands are unused.
    # Persistent: program pid takes blocks pid, pid + programs, ... of the n_blocks = B * N_SB (batch
    # row, block of BLOCK_S consecutive queries), the last (longest) blocks first.
    pid = tl.program_id(0).to(tl.int64)
    n_prog = tl.num_programs(0)
    o_c = tl.arange(0, C)
    p_row = p_ws + (pid * BLOCK_S + tl.arange(0, BLOCK_S)) * C              # [BS] workspace rows
    if FP8:
        fix = True                                                          # the fallback dots: residuals whenever FIX
    else:
        fix = tl.load(p_fix) != 0                                           # used only when FIX
    for blk in range(pid, n_blocks, n_prog):
        b = blk // N_SB
        s0 = (N_SB - 1 - blk % N_SB) * BLOCK_S
        o_qt, m_qt, b_q, b_w, b_w8, n_fp8 = _query_block(
            p_q, p_w, p_q8, p_qs, p_kbad, b, s0, S, S, H, N, D, UPCAST, FP8, BLOCK_S, BLOCK_H, BLOCK_D, BLOCK_N)
        o_s = s0 + tl.arange(0, BLOCK_S)                                     # [BS] the block's queries
        m_s = o_s < S
        n_vis = _visible_keys(tl.load(p_pos + b * S + o_s, mask=m_s, other=-1), ratio, N)  # [BS]
        n_max = tl.max(n_vis, axis=0)
        # per query: cnt candidates in its workspace row (unordered), thr <= its current topk-th best
        cnt = tl.zeros([BLOCK_S], tl.int32)
        thr = tl.full([BLOCK_S], EMPTY, tl.int64)
        n0 = n_max * 0
        while n0 < n_max:
            if tl.max(cnt, axis=0) > C - BLOCK_N:
                # the next tile might overflow some row: keep each row's topk best (C - topk >= BLOCK_N)
                cnt, thr = _compact(p_row, cnt, topk, C)
            # a segment of tiles that fit whatever enters (<= BLOCK_N keys a row each): no check and no
            # barrier inside, so the key loads of these loops can be software-pipelined
            n1 = tl.minimum(n_max, n0 + (C - tl.max(cnt, axis=0)) // BLOCK_N * BLOCK_N)
            n_mid = n0
            if FP8:
                n_mid = tl.maximum(n0, tl.minimum(n1, n_fp8))
                for n in range(n0, n_mid, BLOCK_N):                          # the FP8 tiles
                    score = _fp8_tile_scores(p_k, p_ks, b_q, b_w8, b, n, n_max, N, D, UPCAST, KEY_ROWS, STEP, BLOCK_S,
                                             BLOCK_H, BLOCK_D, BLOCK_N)
                    cnt = _enter_tile(score, n, n_vis, thr, cnt, p_row, BLOCK_S, BLOCK_N)
            for n in range(n_mid, n1, BLOCK_N):                              # 16-bit / exact tiles
                if KEY_FORMAT == KEY_FLOAT:
                    score = _mma_tile_scores(p_q, p_k, p_kf, o_qt, m_qt, b_q, b_w, fix, b, n, n_max, N, D, UPCAST,
                                             IEEE, FIX, FP8, KEY_ROWS, BLOCK_S, BLOCK_H, BLOCK_D, BLOCK_N)
                else:
                    # the cache is loaded here, in the body: a helper that took its pointer would have
                    # torch's mutation analysis count it as written (the candidate slots derive from
                    # the scores), and export would copy the whole cache every step
                    o_code, m_code, o_scale, m_scale = _packed_key_offsets(b, n, n_max, N, D, KEY_FORMAT, ENTRY,
                                                                           BLOCK_N, BLOCK_D)
                    score = _packed_tile_scores(tl.load(p_k + o_code, mask=m_code, other=0),
                                                tl.load(p_k + o_scale, mask=m_scale, other=0), b_q, b_w, UPCAST, IEEE,
                                                KEY_FORMAT, KEY_BF16, KEY_ROWS, BLOCK_S, BLOCK_H, BLOCK_D, BLOCK_N)
                cnt = _enter_tile(score, n, n_vis, thr, cnt, p_row, BLOCK_S, BLOCK_N)
            n0 = n1
        buf = _sorted_rows(p_row[:, None] + o_c[None, :], cnt, C)           # [BS, C]
        idx = unpack_index(buf)
        tl.store(p_out + (b * S + o_s[:, None]) * topk + o_c[None, :], idx, mask=m_s[:, None] & (o_c[None, :] < topk))


@triton.jit
def _indexer_scores_kernel(p_q, p_w, p_k, p_kf, p_fix, p_pos, p_ws, p_len, p_rows, p_q8, p_qs, p_ks, p_kbad, S, H,
                           N, D, ratio, N_SB, blk0, n_blocks, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                           FIX: tl.constexpr, FP8: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr,
                           BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, KEY_ROWS: tl.constexpr, STEP: tl.constexpr,
                           KEY_FORMAT: tl.constexpr, KEY_BF16: tl.constexpr, ENTRY: tl.constexpr):
    # The first half of selection="radix": the scores of one chunk of query blocks into a workspace.
    # Inputs (KEY_FORMAT included) as in _indexer_topk_kernel; p_ws [chunk * BLOCK_S, N] fp32, p_len
    # [chunk * BLOCK_S] int32, p_rows [chunk * BLOCK_S] int32. Program (j, split) takes query block
    # blk = blk0 + j of the n_blocks = B * N_SB (batch row blk // N_SB, queries (blk % N_SB) * BLOCK_S
    # ..), workspace rows j * BLOCK_S .. (one a query), and its visible key tiles split, split +
    # splits, ... (splits = the grid's second dimension: a few query blocks still fill the GPU, as at
    # decode). Row of query s: the
    # scores of its visible keys [0, n_vis) in columns [0, n_vis) (the rest is not written), p_len =
    # n_vis, p_rows = b * S + s, its output row (-1 for the rows of queries >= S and of blocks past
    # n_blocks: no output; their lengths 0). Scores by the fused kernel's own code (_query_block and
    # the tile helpers): the same values, so the same picks.
    j = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    blk = blk0 + j.to(tl.int64)
    b = blk // N_SB
    s0 = blk % N_SB * BLOCK_S
    s_end = tl.where(blk < n_blocks, S, 0)                                   # blocks past the end: no queries
    o_qt, m_qt, b_q, b_w, b_w8, n_fp8 = _query_block(
        p_q, p_w, p_q8, p_qs, p_kbad, b, s0, s_end, S, H, N, D, UPCAST, FP8, BLOCK_S, BLOCK_H, BLOCK_D, BLOCK_N)
    o_s = s0 + tl.arange(0, BLOCK_S)                                         # [BS] the block's queries
    m_s = o_s < s_end
    n_vis = _visible_keys(tl.load(p_pos + b * S + o_s, mask=m_s, other=-1), ratio, N)  # [BS]
    o_r = j.to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)                   # [BS] workspace rows
    if split == 0:
        tl.store(p_len + o_r, n_vis)
        tl.store(p_rows + o_r, tl.where(m_s, b * S + o_s, -1).to(tl.int32))
    n_max = tl.max(n_vis, axis=0)
    o_t = tl.arange(0, BLOCK_N)
    p_row = p_ws + o_r[:, None] * N                                          # [BS, 1]
    first = split * BLOCK_N
    if FP8:
        fix = True
        n_mid = tl.minimum(n_max, n_fp8)
        for n in range(first, n_mid, splits * BLOCK_N):                      # the FP8 tiles
            score = _fp8_tile_scores(p_k, p_ks, b_q, b_w8, b, n, n_max, N, D, UPCAST, KEY_ROWS, STEP, BLOCK_S,
                                     BLOCK_H, BLOCK_D, BLOCK_N)
            tl.store(p_row + n + o_t[None, :], score, mask=(n + o_t)[None, :] < n_vis[:, None])
        first = n_fp8 + split * BLOCK_N                                      # the tiles from n_fp8 on, split again
    else:
        fix = tl.load(p_fix) != 0
    for n in range(first, n_max, splits * BLOCK_N):                          # 16-bit / exact tiles
        if KEY_FORMAT == KEY_FLOAT:
            score = _mma_tile_scores(p_q, p_k, p_kf, o_qt, m_qt, b_q, b_w, fix, b, n, n_max, N, D, UPCAST, IEEE, FIX,
                                     FP8, KEY_ROWS, BLOCK_S, BLOCK_H, BLOCK_D, BLOCK_N)
        else:                                                                # the packed cache, as in the fused kernel
            o_code, m_code, o_scale, m_scale = _packed_key_offsets(b, n, n_max, N, D, KEY_FORMAT, ENTRY, BLOCK_N,
                                                                   BLOCK_D)
            score = _packed_tile_scores(tl.load(p_k + o_code, mask=m_code, other=0),
                                        tl.load(p_k + o_scale, mask=m_scale, other=0), b_q, b_w, UPCAST, IEEE,
                                        KEY_FORMAT, KEY_BF16, KEY_ROWS, BLOCK_S, BLOCK_H, BLOCK_D, BLOCK_N)
        tl.store(p_row + n + o_t[None, :], score, mask=(n + o_t)[None, :] < n_vis[:, None])


# ================================================================================================
# Launcher and public function
# ================================================================================================

def persistent_programs(device: torch.device) -> int:
    """The persistent grid's size (capped at the number of query blocks): PROGRAMS_PER_SM a CUDA SM,
    INTERPRET_PROGRAMS under the interpreter."""
    if INTERPRET or device.type != "cuda":
        return INTERPRET_PROGRAMS
    return PROGRAMS_PER_SM * sm_count(device)


def fp8_rows(x: torch.Tensor, group: int = 0):
    """x [R, D] float rows -> (x8 [R, D] float8_e4m3fn, scale [R] fp32, first_bad [R / group] int32 or
    None): x = x8 * scale exactly where scale != 0 (the row is FP4-like: _fp8_rows_kernel), and with
    group > 0 the lowest index (within each group of `group` rows) of a row that is not (group if
    none). One elementwise pass; everything stays on the device."""
    R, D = x.shape
    x8 = torch.empty((R, D), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((R,), dtype=torch.float32, device=x.device)
    first_bad = torch.full((R // group,), group, dtype=torch.int32, device=x.device) if group else None
    BLOCK_D = max(FP8_K_STEP, triton.next_power_of_2(D))
    launch(_fp8_rows_kernel, (triton.cdiv(R, FP8_ROWS_BLOCK),), x, x8, scale, placeholder(x.device) if first_bad is None else first_bad,
           R, max(group, 1), D, BLOCK_R=FP8_ROWS_BLOCK, BLOCK_D=BLOCK_D, STEP=FP8_K_STEP, FIRST_BAD=bool(group),
           num_warps=4)
    return x8, scale, first_bad


def launch_indexer_topk(q, weights, keys, positions, out, ratio: int, topk: int, cfg: IndexerTopkConfig,
                        key_format: str | None = None) -> None:
    """Fill out [B, S, topk] int32 with the selection. keys [B, N, d] float rows, or with key_format
    ("fp4" / "fp8") the packed indexer cache [B, N, entry_bytes] uint8 (indexer_topk_cached), which the
    kernels decode a key tile at a time: FP4 keys are exact in bf16 (the 'bf16' plan for bf16 q), FP8
    keys (a float32 scale) take the residual dots ('bf16_fix'); the FP8 score MMA is not offered."""
    B, S, H, D = q.shape
    N = keys.shape[1]
    if B * S == 0:
        return
    if N == 0 or topk == 0:
        out.fill_(-1)  # no key visible anywhere (a no-op on an empty [B, S, 0] output)
        return
    packed = key_format is not None
    check(not packed or cfg.score_mma == "bf16",
          f"indexer_topk_cached: score_mma={cfg.score_mma!r}; the packed cache takes score_mma=bf16")
    # the dtype the packed keys decode to exactly: bf16 for FP4 (e2m1 x a power of two), fp32 for FP8
    key_dtype = {None: keys.dtype, "fp4": torch.bfloat16, "fp8": torch.float32}[key_format]
    plan = launch_plan(q.dtype, key_dtype, cfg.score_mma)
    fast = plan != "exact"
    fp8 = plan == "fp8"
    fix = not packed and (plan == "bf16_fix" or (fp8 and keys.dtype != torch.bfloat16))
    dev = q.device
    k_op, flag = keys, placeholder(dev)                                     # p_fix unused unless FIX
    k_full = keys if fp8 or fix else placeholder(dev, keys.dtype)           # p_kf: the fallback / residual dots
    q8, q_scale = placeholder(dev, torch.float8_e4m3fn), placeholder(dev, torch.float32)  # unused unless FP8
    k_scale, k_bad = placeholder(dev, torch.float32), placeholder(dev)
    if fp8:
        # The MMA operands: q and keys times power-of-two row scales, in e4m3; rows that are not
        # FP4-like get scale 0, and the kernel gives them (and the keys after them) the bf16 dots.
        q8, q_scale, _ = fp8_rows(q.view(B * S * H, D))
        k_op, k_scale, k_bad = fp8_rows(keys.view(B * N, D), group=N)
    elif fix:
        # The MMA operand: the keys rounded to bf16 (equal to them for the model's FP4/FP8-simulated
        # keys). flag = some key is not bf16-exact: a device value, no host sync (CUDA graphs, export).
        k_op = keys.to(torch.bfloat16)
        flag = (k_op != keys).any().to(torch.int32)
    block_s = cfg.block_s if fast else 1
    BLOCK_H, BLOCK_D = padded_heads_dims(H, D, plan)
    refusal = key_rows_refusal(dataclasses.replace(cfg, block_s=block_s), BLOCK_H)
    check(refusal is None, f"indexer_topk: {refusal}")
    n_sb = triton.cdiv(S, block_s)
    n_blocks = B * n_sb
    programs = persistent_programs(q.device)
    operands = (q, weights, k_op, k_full, flag, positions)
    fp8_operands = (q8, q_scale, k_scale, k_bad)
    consts = dict(UPCAST=INTERPRET or (not fast and q.dtype != (torch.float32 if packed else keys.dtype)),
                  IEEE=q.dtype == torch.float32, FIX=fix, FP8=fp8, BLOCK_S=block_s, BLOCK_H=BLOCK_H, BLOCK_D=BLOCK_D,
                  BLOCK_N=cfg.block_n, KEY_ROWS=cfg.score_rows == "keys", STEP=FP8_K_STEP,
                  KEY_FORMAT=PACKED_KEY_FORMATS.get(key_format, 0), KEY_BF16=plan in ("bf16", "bf16_fix"),
                  ENTRY=keys.shape[2] if packed else 0, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.selection == "radix":
        _launch_radix_selection(operands, fp8_operands, out, S, H, N, D, ratio, topk, n_sb, n_blocks, programs, consts)
        return
    C = workspace_width(topk, cfg)
    # [programs * block_s, C] int64 candidate rows (each program reuses its rows for all its blocks);
    # sized by the fixed program count, so no shape depends on the inputs beyond block_s and C.
    ws = torch.empty((programs * block_s, C), dtype=torch.int64, device=q.device)
    launch(_indexer_topk_kernel, (torch.sym_min(n_blocks, programs),), *operands, ws, out,
           *fp8_operands, S, H, N, D, ratio, topk, n_sb, n_blocks, C=C, **consts)


def score_chunk_blocks(N, block_s: int) -> int | None:
    """Query blocks (of block_s queries) a chunk of selection="radix": the most whose fp32 score rows
    [block_s, N] fit WORKSPACE_BYTES (at least one); a symbolic N takes its upper bound, an unbounded
    one gives None (no bound: one chunk)."""
    n = largest_value(N)
    return None if n is None else max(1, WORKSPACE_BYTES // (block_s * max(n, 1) * 4))


def _launch_radix_selection(operands, fp8_operands, out, S, H, N, D, ratio, topk, n_sb, n_blocks, programs, consts):
    """selection="radix": per chunk of query blocks, _indexer_scores_kernel writes their scores [chunk
    x block_s, N] fp32 (and each row's visible keys and output row) to a workspace, then the radix
    select writes each row's top-k into its row of out [B, S, topk]. The chunk's workspace is reused."""
    q = operands[0]
    block_s = consts["BLOCK_S"]
    chunk, n_chunks = split_chunks(n_blocks, score_chunk_blocks(N, block_s))
    rows = chunk * block_s
    ws = torch.empty((rows, N), dtype=torch.float32, device=q.device)            # [rows, N] scores
    lengths = torch.empty((rows,), dtype=torch.int32, device=q.device)           # visible keys a row
    out_rows = torch.empty((rows,), dtype=torch.int32, device=q.device)          # its row of out (-1: none)
    # key splits: enough programs to fill the GPU when the chunk has few query blocks (decode), no more
    # than the key tiles
    chunk_bound = largest_value(chunk) or programs
    tiles = triton.cdiv(largest_value(N) or consts["BLOCK_N"], consts["BLOCK_N"])
    splits = max(1, min(tiles, triton.cdiv(programs, chunk_bound)))
    select_cfg = radix_default_config(device_name(q.device))
    for c in range(n_chunks):
        launch(_indexer_scores_kernel, (chunk, splits), *operands, ws, lengths, out_rows, *fp8_operands, S, H, N, D,
               ratio, n_sb, c * chunk, n_blocks, **consts)
        launch_radix_topk(ws, lengths, out_rows, out.view(-1, topk), topk, select_cfg)


def check_common(op: str, q, weights, positions, ratio, topk) -> None:
    """The checks of q [B, S, H, d], weights [B, S, H], positions [B, S] int64, ratio and topk that
    indexer_topk and indexer_topk_cached share (one-line ValueErrors)."""
    check_tensor(op, "q", q, FLOAT_DTYPES, ndim=4)
    B, S, H, D = q.shape
    check_tensor(op, "weights", weights, FLOAT_DTYPES, shape=(B, S, H), device=q.device)
    check_tensor(op, "positions", positions, (torch.int64,), shape=(B, S), device=q.device)
    check(isinstance(ratio, int) and ratio >= 1, f"{op}: ratio = {ratio!r}; need an int >= 1")
    check(isinstance(topk, int) and 0 <= topk <= MAX_TOPK, f"{op}: topk = {topk!r}; need an int in [0, {MAX_TOPK}]")
    check(H <= MAX_HEADS and D <= MAX_HEAD_DIM,
          f"{op}: {H} heads x {D} dims; the kernel takes <= {MAX_HEADS} heads x <= {MAX_HEAD_DIM} dims")


def indexer_topk(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor,
                 ratio: int, topk: int, config=None) -> torch.Tensor:
    """q [B, S, H, d] indexer queries, weights [B, S, H], keys [B, N, d], positions [B, S] int64
    -> [B, S, topk] int32: the visible keys (n < (t + 1) // ratio) with the highest scores
    sum_h w[h] relu(q[h] . key[n]), best first, ties to the lowest index, NaN first, -1 padding.
    q and keys: float32 / bfloat16 / float16 (may differ); weights any of those. All contiguous.
    config: None / "" (the device's default), a 'field=value,...' string, a dict or an IndexerTopkConfig;
    its selection ("threshold": the fused kernel; "radix": score chunks + the radix select) changes the
    speed, not the picks."""
    op = "indexer_topk"
    check_common(op, q, weights, positions, ratio, topk)
    B, S, H, D = q.shape
    check_tensor(op, "keys", keys, FLOAT_DTYPES, ndim=3, device=q.device)
    check(keys.shape[0] == B and keys.shape[2] == D,
          f"{op}: keys has shape {tuple(keys.shape)}; need [B, N, d] = [{B}, N, {D}]")
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
