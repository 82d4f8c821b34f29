"""The decode kernel's launch arithmetic: the cache entry layout and the automatic split-K. Its config
class and per-GPU defaults are sparse_attention's (SparseAttentionConfig, DECODE_DEFAULT_CONFIGS in
kernels/sparse_attention/config.py): the decode kernel reuses that launcher."""
from __future__ import annotations

from .._common import cdiv, largest_value
from ..sparse_attention.config import SparseAttentionConfig, block_sizes

FP8_BLOCK = 64


def entry_layout(head_dim: int, rope_dim: int) -> tuple[int, int]:
    """(nope dims, entry bytes) of a main cache entry (same formula as model/kv_layout.py)."""
    nope = head_dim - rope_dim
    return nope, (nope + 2 * rope_dim + nope // FP8_BLOCK + 7) // 8 * 8


def auto_splits(n_programs: int, K: int, block_k: int, n_sm: int) -> int:
    """Under half a wave of programs: the largest power of two of splits that keeps the grid within
    one wave of `n_sm` SMs (the kernel at 64 x 512 heads holds one program an SM: a second wave
    doubles the time of the programs it holds), each split >= 2 steps of block_k. Otherwise 1.
    (H100, B=64, 64 heads, block_k 32: 2 splits 64.8 us, 4 splits 78.5 us; bench/results/H100/
    session24_gpu_runs.md.)"""
    if 2 * n_programs > n_sm:
        return 1
    want = 1 << (n_sm // max(n_programs, 1)).bit_length() - 1               # power of two <= n_sm / n
    return max(1, min(want, K // (2 * block_k)))


def auto_config(B: int, S: int, H: int, K: int, cfg: SparseAttentionConfig, n_sm: int) -> SparseAttentionConfig:
    """Fill the GPU at decode by split-K (each split costs a write and a read of an fp32 [H, D]
    partial per token). Heads per program stay as configured: narrower head blocks lose wgmma (M < 64)
    and were slower on the H100 (see kernels/sparse_attention/config.py). The launcher's default and
    the tuning baseline. A symbolic B * S (export) counts its bound, unbounded as a full GPU: deciding
    on the size itself would specialise the program to the example's (export.narrowed_sizes)."""
    block_h = block_sizes(H, 16, cfg)[0]
    tokens = largest_value(B * S)
    n_programs = n_sm if tokens is None else tokens * cdiv(H, block_h)
    return cfg.replace(num_splits=auto_splits(n_programs, K, cfg.block_k, n_sm))
