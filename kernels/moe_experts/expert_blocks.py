"""The routing layout of the grouped-expert launches (model.moe_ops.expert_blocks, its reference) in one
Triton program, for decode-sized calls.

The plain layout is some thirty small torch launches (a sort, a scatter-add, cumsums, gathers); at
decode sizes each costs more than its work, and together they are a fixed cost beside the expert
GEMMs of a one-token call (bench_moe's "layout / ours"). Here one program of the N = T * k assignments
(N <= config.DECODE_MAX_ASSIGNMENTS, one chunk) does it all:
  1. keys expert * NP + index, sorted (tl.sort): the assignments by expert, each expert's in their
     original order (an id outside [0, E) sorts last as expert E);
  2. the count of each expert (tl.histogram), its first sorted position and its first padded row
     (cumsums of the counts and of the counts padded to `block` rows), kept in a small scratch so that
     each sorted position can read its expert's;
  3. slot: every row N (padding), then each assignment stored at its expert's first padded row plus
     its rank among the expert's assignments; block_expert: E everywhere (past the last block in use),
     then each assignment's expert stored at its row's block (every block in use holds one: an
     expert's padding is shorter than a block), O(N) stores where comparing each block with every
     expert's padded end was O(blocks x E).
The same integers as expert_blocks, bit for bit (tests/kernels/test_moe_experts.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...model.moe_ops import max_expert_blocks
from .._common import largest_value, launch
from .config import DECODE_MAX_ASSIGNMENTS

@triton.jit
def _expert_blocks_kernel(p_ids, p_slot, p_block_expert, p_scratch, N, E, n_blocks,
                          BLOCK: tl.constexpr, NP: tl.constexpr, EP: tl.constexpr):
    # p_ids [N] int32/int64 (topk_ids flattened); p_slot [n_blocks * BLOCK] int64; p_block_expert
    # [n_blocks] int64; p_scratch [2 * EP] int32. NP >= N and EP > E powers of two.
    i = tl.arange(0, NP)
    ids = tl.load(p_ids + i, mask=i < N, other=-1)
    ids = tl.where((ids >= 0) & (ids < E), ids, E).to(tl.int32)                       # [NP], E = none
    key = tl.sort(ids * NP + i)                                                        # by (expert, index)
    order = key % NP                                                                   # [NP] assignment
    expert = key // NP                                                                 # [NP] its expert
    e = tl.arange(0, EP)
    count = tl.where(e < E, tl.histogram(ids, EP), 0)                                  # [EP]
    padded = (count + BLOCK - 1) // BLOCK * BLOCK
    padded_end = tl.cumsum(padded, 0)
    tl.store(p_scratch + e, tl.cumsum(count, 0) - count)                               # first sorted position
    tl.store(p_scratch + EP + e, padded_end - padded)                                  # first padded row
    rows = n_blocks * BLOCK
    for r0 in range(0, rows, NP):                                                      # every row padding
        r = r0 + i
        tl.store(p_slot + r, tl.full([NP], N, tl.int64), mask=r < rows)
    for b0 in range(0, n_blocks, NP):                                                  # every block unused
        b = b0 + i
        tl.store(p_block_expert + b, tl.full([NP], E, tl.int64), mask=b < n_blocks)
    tl.debug_barrier()  # the scratch and the padding stores before the reads and stores below
    valid = expert < E
    mine = tl.minimum(expert, E - 1)
    rank = i - tl.load(p_scratch + mine, mask=valid, other=0)
    row = tl.load(p_scratch + EP + mine, mask=valid, other=0) + rank
    tl.store(p_slot + row, order.to(tl.int64), mask=valid)
    tl.store(p_block_expert + row // BLOCK, mine.to(tl.int64), mask=valid)


def fits(n_assignments, n_experts: int) -> bool:
    """Whether one program lays out n_assignments (an int or a symbolic size: its upper bound) over
    n_experts: at most the decode regime's DECODE_MAX_ASSIGNMENTS (the sort's keys in registers: 4096
    over 8 warps, 16 a thread), and the sort keys within int32."""
    most = largest_value(n_assignments)
    return (most is not None and most <= DECODE_MAX_ASSIGNMENTS
            and (n_experts + 1) * triton.next_power_of_2(most) < 2 ** 31)


def expert_blocks(topk_ids: torch.Tensor, n_experts: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """model.moe_ops.expert_blocks(topk_ids, n_experts, block) as [1, n_blocks, block] / [1, n_blocks]
    (chunked_expert_blocks' shapes for one chunk), in one launch; `fits` must hold."""
    T, k = topk_ids.shape
    N, E = T * k, n_experts
    n_blocks = max_expert_blocks(N, E, block)
    slot = torch.empty((1, n_blocks, block), dtype=torch.int64, device=topk_ids.device)
    block_expert = torch.empty((1, n_blocks), dtype=torch.int64, device=topk_ids.device)
    np2 = triton.next_power_of_2(max(largest_value(N), 2))
    ep2 = triton.next_power_of_2(E + 1)
    scratch = torch.empty(2 * ep2, dtype=torch.int32, device=topk_ids.device)
    launch(_expert_blocks_kernel, (1,), topk_ids.reshape(-1), slot, block_expert, scratch, N, E, n_blocks,
           BLOCK=block, NP=np2, EP=ep2, num_warps=8 if np2 >= 1024 else 4)
    return slot, block_expert
