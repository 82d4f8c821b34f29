"""Radix-select top-k over rows of scores: per row, the indices of the k largest scores, best first,
ties to the lowest index, NaN first (lowest index first among NaNs), -0.0 == +0.0, -1 padding: the
order of the indexer's int64 sort keys (sort_keys.py). The selection half of the indexer's
two-kernel path (config selection="radix": a score kernel writes a chunk of scores [rows, N], this
selects, writing each row's picks to its query's output row). Design and cost:
kernels/indexer_topk/DESIGN.md, Radix select.

One program a row. Each key's score is mapped to the int32 `order_bits` (signed order = selection
order); the k-th best key's bits are found digit by digit, most significant first: each pass streams
the row in tiles and histograms the next digit of the keys whose higher digits match the prefix
found so far (tl.histogram), then picks the digit's bin holding the k-th best. A final pass stores
the indices of every key above the threshold class and the first (lowest-index) keys of the class, k
in all, into the output row; those are re-read, packed into int64 sort keys, sorted (k of them, not N)
and written back best first.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import check, check_tensor, launch, placeholder, resolve_config
from .config import MAX_TOPK, RadixTopkConfig, radix_default_config
from .sort_keys import order_bits, pack_keys, unpack_index


@triton.jit
def _radix_topk_kernel(p_scores, stride_r, p_len, p_rows, p_out, N, k, HAS_LEN: tl.constexpr,
                       HAS_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BITS: tl.constexpr, KB: tl.constexpr):
    # p_scores [R, N] fp32 rows (row stride stride_r, unit column stride); p_len [R] int32 keys a row
    # (clamped to [0, N]; used when HAS_LEN); p_out [R, k] int32, or with HAS_ROWS [*, k] int32 whose
    # row p_rows[r] (int32; < 0: none, the row is skipped) takes row r's picks. KB = next_pow2(k).
    r = tl.program_id(0).to(tl.int64)
    p_row = p_scores + r * stride_r
    out_row = r
    if HAS_ROWS:
        out_row = tl.load(p_rows + r).to(tl.int64)
        if out_row < 0:
            return
    p_out_row = p_out + out_row * k
    n = N
    if HAS_LEN:
        n = tl.minimum(tl.maximum(tl.load(p_len + r), 0), N)
    NB: tl.constexpr = 1 << BITS
    LEVELS: tl.constexpr = (32 + BITS - 1) // BITS
    o_b = tl.arange(0, NB)
    # The threshold class [lo, hi] of order bits: every key above hi is selected, and the first `need`
    # keys (in index order) within it. Unsigned offset of lo from INT32_MIN: lo_u (int64, exact).
    lo_u = (r * 0).to(tl.int64)
    lo = -2147483648
    hi = 2147483647
    need = k
    done = n <= k                        # every key selected: the class is everything, need = k >= n
    for level in tl.static_range(LEVELS):
        # this digit: bits [SHIFT, TOP) of the order bits (11-bit digits: 11 + 11 + 10)
        TOP = 32 - level * BITS
        SHIFT = TOP - BITS if TOP > BITS else 0
        if not done:
            hist = tl.zeros([NB], tl.int32)
            for n0 in range(0, n, BLOCK_N):
                o_n = n0 + tl.arange(0, BLOCK_N)
                m = o_n < n
                bits = order_bits(tl.load(p_row + o_n, mask=m, other=0.0))
                digit = (bits >> SHIFT) & ((1 << (TOP - SHIFT)) - 1)
                if level == 0:
                    digit = digit ^ (1 << (TOP - SHIFT - 1))       # the sign bit: signed -> unsigned order
                else:
                    m = m & (bits >= lo) & (bits <= hi)
                hist += tl.histogram(digit, NB, mask=m)
            # the bin holding the need-th best: the highest bin b with keys_at_or_above[b] >= need
            at_or_above = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist        # [NB]
            b = tl.max(tl.where(at_or_above >= need, o_b, -1), axis=0)
            in_b = tl.sum(tl.where(o_b == b, hist, 0), axis=0)
            need -= tl.sum(tl.where(o_b == b, at_or_above, 0), axis=0) - in_b
            lo_u += b.to(tl.int64) << SHIFT
            lo = (lo_u - 2147483648).to(tl.int32)
            hi = (lo_u + ((1 << SHIFT) - 1) - 2147483648).to(tl.int32)
            done = need == in_b          # the whole bin is selected: no need to resolve it further
    # Store the selected indices (unordered) into the output row: slots [0, min(n, k)).
    taken = 0
    seen = 0                             # keys of the class seen so far
    for n0 in range(0, n, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m = o_n < n
        bits = order_bits(tl.load(p_row + o_n, mask=m, other=0.0))
        in_class = m & (bits >= lo) & (bits <= hi)
        rank = seen + tl.cumsum(in_class.to(tl.int32), axis=0) - 1                # within the class
        take = (m & (bits > hi)) | (in_class & (rank < need))
        slot = taken + tl.cumsum(take.to(tl.int32), axis=0) - 1
        tl.store(p_out_row + slot, o_n, mask=take)
        taken += tl.sum(take.to(tl.int32), axis=0)
        seen += tl.sum(in_class.to(tl.int32), axis=0)
    # Order them: re-read, pack into sort keys (score bits, index), sort the k descending; -1 past taken.
    o_k = tl.arange(0, KB)
    m_k = o_k < taken
    tl.debug_barrier()                   # every thread's stores are visible
    idx = tl.load(p_out_row + o_k, mask=m_k, other=0)
    key = tl.sort(pack_keys(tl.load(p_row + idx, mask=m_k, other=0.0), idx, m_k), descending=True)
    tl.debug_barrier()                   # every thread has read before the stores
    tl.store(p_out_row + o_k, unpack_index(key), mask=o_k < k)


def radix_topk(scores: torch.Tensor, lengths: torch.Tensor | None, k: int, config=None) -> torch.Tensor:
    """scores [R, N] fp32 (unit column stride; rows may be strided), lengths [R] int32 or None (row r
    considers keys [0, lengths[r]) only, clamped to [0, N]; None = all N), k -> [R, k] int32: each row's
    indices of its k largest scores, best first, ties to the lowest index, NaN largest, -0.0 == +0.0, -1
    where the row has fewer than k keys.
    config: None / "" (the device's default), a 'field=value,...' string, a dict or a RadixTopkConfig."""
    op = "radix_topk"
    check_tensor(op, "scores", scores, (torch.float32,), ndim=2, rows=True)
    R, N = scores.shape
    if lengths is not None:
        check_tensor(op, "lengths", lengths, (torch.int32,), shape=(R,), device=scores.device)
    check(isinstance(k, int) and 0 <= k <= MAX_TOPK, f"{op}: k = {k!r}; need an int in [0, {MAX_TOPK}]")
    check(N < 2 ** 31, f"{op}: {N} keys a row; need < 2^31")
    cfg = resolve_config(RadixTopkConfig, config, radix_default_config, scores.device)
    out = torch.empty((R, k), dtype=torch.int32, device=scores.device)
    if R == 0 or k == 0:
        return out
    if N == 0:
        return out.fill_(-1)
    launch_radix_topk(scores, lengths, None, out, k, cfg)
    return out


def launch_radix_topk(scores, lengths, out_rows, out, k: int, cfg: RadixTopkConfig) -> None:
    """One program a row of scores [R, N] fp32 (N >= 1, k >= 1): its picks into out [R, k] int32, or with
    out_rows [R] int32 into out row out_rows[r] (rows < 0 skipped) of out [*, k]; lengths [R] int32 or
    None as in radix_topk."""
    R, N = scores.shape
    launch(_radix_topk_kernel, (R,), scores, scores.stride(0), placeholder(scores.device) if lengths is None else lengths,
           placeholder(scores.device) if out_rows is None else out_rows, out, N, k, HAS_LEN=lengths is not None,
           HAS_ROWS=out_rows is not None, BLOCK_N=cfg.block_n, BITS=cfg.digit_bits, KB=triton.next_power_of_2(k),
           num_warps=cfg.num_warps)

