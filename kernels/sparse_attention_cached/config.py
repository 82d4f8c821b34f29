"""The decode kernel's launch arithmetic: the cache entry layout and the automatic split-K. Its config
class and per-GPU defaults are sparse_attention's (SparseAttentionConfig, DECODE_DEFAULT_CONFIGS in
kernels/sparse_attention/config.py): the decode kernel reuses that launcher."""
from __future__ import annotations

import torch

from .._common import cdiv
from ..sparse_attention.config import SparseAttentionConfig, block_sizes

FP8_BLOCK = 64


def entry_layout(head_dim: int, rope_dim: int) -> tuple[int, int]:
    """(nope dims, entry bytes) of a main cache entry (same formula as model/kv_layout.py)."""
    nope = head_dim - rope_dim
    return nope, (nope + 2 * rope_dim + nope // FP8_BLOCK + 7) // 8 * 8


def auto_splits(n_programs, K: int, block_k: int, n_sm: int):
    """Split-K that fills one wave of `n_sm` SMs and no more (the kernel at 64 x 512 heads holds one
    program an SM: a second wave doubles the time of the programs it holds): n_sm // n_programs splits,
    each >= 2 steps of block_k, at least 1. n_programs may be a symbolic size (an engine's batch): the
    count is then an expression of it, evaluated at run time (no guard on the size). (H100, B=64, 64
    heads, block_k 32: 2 splits 64.8 us, 4 splits, two waves, 78.5 us; bench/results/H100/
    session24_gpu_runs.md.)"""
    return torch.sym_max(1, torch.sym_min(n_sm // torch.sym_max(n_programs, 1), K // (2 * block_k)))


def split_count(B, S, H: int, K: int, cfg: SparseAttentionConfig, n_sm: int):
    """auto_splits for B * S tokens of H heads in cfg's head blocks: an int, or for a symbolic B * S the
    expression a launch evaluates at run time (the launcher's run_splits)."""
    return auto_splits(B * S * cdiv(H, block_sizes(H, 16, cfg)[0]), K, cfg.block_k, n_sm)


def auto_config(B, S, H: int, K: int, cfg: SparseAttentionConfig, n_sm: int) -> SparseAttentionConfig:
    """Fill the GPU at decode by split-K (each split costs a write and a read of an fp32 [H, D]
    partial per token): num_splits = split_count. Heads per program stay as configured: narrower head
    blocks lose wgmma (M < 64) and were slower on the H100 (see kernels/sparse_attention/config.py). The
    launcher's default and the tuning baseline. A symbolic B * S (an engine's dynamic batch, export)
    takes the most splits any batch gets, one token's, as the grid's split axis: the launch runs
    split_count's expression of them at run time, so a batch of 1 splits as widely as when it is
    traced alone and a batch of 64 as narrowly (deciding on the size itself would specialise the
    program to the example's: export.narrowed_sizes)."""
    count = split_count(B, S, H, K, cfg, n_sm)
    return cfg.replace(num_splits=count if isinstance(count, int) else split_count(1, 1, H, K, cfg, n_sm))
