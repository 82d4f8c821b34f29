"""Tunable launch parameters of the sparse attention kernels (prefill and cached decode), with
defaults per GPU."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import ClassVar

from .._common import KernelConfig, next_pow2, pick_default


@dataclasses.dataclass(frozen=True)
class SparseAttentionConfig(KernelConfig):
    """One program handles one query token and `block_h` of its heads (the M dimension of both dots;
    every head shares the gathered K=V rows, so each gathered tile is loaded once for `block_h` heads).

    block_h:    heads per program (>= 16, the smallest tl.dot M); padded heads are masked.
    block_k:    gathered entries per step of the online softmax (>= 16).
    num_splits: split-K (flash-decoding): the K indices of a token are cut into `num_splits` ranges,
                each a program writing a partial (m, l, acc) to an fp32 workspace, then one combine
                kernel adds the sink and normalises. 1 = one kernel, no workspace (prefill).
    split_d:    head-dim split of the output: each program owns BLOCK_D / split_d output columns (acc
                [block_h, BLOCK_D / split_d]) and computes the full-width logits (q and the gathered rows
                at full width for the first dot) but the second dot and the output only for its
                columns; the softmax statistics are recomputed by each of the split_d programs (the
                same values). It cuts the accumulator's registers by split_d at the cost of split_d x
                the logits FLOPs and gathers (the value columns are read a second time, from L1/L2).
                1 = the whole head dim in one program. Clamped by the launcher so each part keeps >= 16
                columns (>= 64 over the FP8 cache: one scale block), see value_split.
    dequant:    FP8 cache only. "tile": each step gathers and dequantises the whole [block_k, BLOCK_D]
                tile of FP8 dims and a [block_k, rope] tile of rope dims, which serve both dots.
                "chunks": 64-column chunks (one e8m0 scale block) in a loop, the logits summed over them
                in column order, the accumulator kept as 64-column chunks, the
                value chunks gathered a second time (L1/L2): no [block_k, BLOCK_D] tile and fewer live
                registers (no spills at V4's 64 x 512 decode up to block_k 64, sm_90a, bench/results/
                H200/attention_compile_report.md). Same dequantised values; the logits' fp32 sum is cut
                at the chunk boundaries, so the logits can differ from "tile"'s in the last fp32 bits
                (the interpreter's do; on a GPU unmeasured).
    num_warps / num_stages: Triton launch parameters of the main kernel (the combine kernel uses 4/1).
    The head dim is not a block field: with dequant "tile" the whole (power-of-two padded) head dim is
    one tile for the logits, so each gathered row serves both dots (logits and output) when split_d = 1.
    Defaults per GPU: DEFAULT_CONFIGS (prefill, head dim > 128), SMALL_HEAD_DEFAULT_CONFIGS (prefill,
    head dim <= 128), DECODE_DEFAULT_CONFIGS (the FP8-cache op). A config string names only the fields
    it changes: "block_k=128,num_stages=1" keeps the default's other values.
    """

    block_h: int = 64
    block_k: int = 32
    num_splits: int = 1
    num_warps: int = 8
    num_stages: int = 2
    split_d: int = 1
    dequant: str = "tile"

    POW2_FIELDS: ClassVar[tuple[str, ...]] = ("block_h", "block_k", "num_warps", "split_d")
    CHOICES: ClassVar[Mapping[str, tuple[str, ...]]] = {"dequant": ("tile", "chunks")}

    def __post_init__(self):
        super().__post_init__()
        for name in ("block_h", "block_k"):
            if getattr(self, name) < 16:
                raise ValueError(f"SparseAttentionConfig.{name} = {getattr(self, name)}: tl.dot needs >= 16")


DEFAULT_CONFIGS: dict[str, SparseAttentionConfig] = {
    # The interpreter runs each program as numpy calls: few heads of padding, large K steps.
    "interpreter": SparseAttentionConfig(block_h=16, block_k=32, num_warps=4, num_stages=1),
    # Hopper, 512-dim heads: acc [64, 512] fp32 over 8 warps = 128 registers a thread (255 used, a
    # little spilled), q 64 KB + two stages of the gathered [64, 512] bf16 tile = 192 KB of shared
    # memory, one program per SM. block_k=64 was the fastest of 5 configs on the H100 (2026-11-23,
    # bench/results/H100): window 1.06 ms vs 1.15-1.62, csa 3.41 ms vs 3.95-6.0 at S=8K.
    "H100": SparseAttentionConfig(block_h=64, block_k=64, num_warps=8, num_stages=2),
    "H200": SparseAttentionConfig(block_h=64, block_k=64, num_warps=8, num_stages=2),
    "generic": SparseAttentionConfig(block_h=32, block_k=32, num_warps=4, num_stages=2),
}

# Decode (the FP8 cache): few tokens; with config None / "" split-K fills the GPU (see
# sparse_attention_cached.auto_config). Narrower head blocks (16/32, mma.sync instead of wgmma) were
# slower on the H100 (2026-11-23): 0.45 / 0.28 ms against 0.15 ms for 64 heads with 2 splits.
# block_k=32 (2 stages, 2 splits at B=64) was the fastest of 11 decode configs on the H100 at 8K-128K
# (2026-12-06: 64.8 us; block_k 16: 100-107 us; bench/results/H100/session24_gpu_runs.md).
DECODE_DEFAULT_CONFIGS: dict[str, SparseAttentionConfig] = {
    "interpreter": SparseAttentionConfig(block_h=16, block_k=32, num_warps=4, num_stages=1),
    "H100": SparseAttentionConfig(block_h=64, block_k=32, num_warps=8, num_stages=2),
    "H200": SparseAttentionConfig(block_h=64, block_k=32, num_warps=8, num_stages=2),
    "generic": SparseAttentionConfig(block_h=32, block_k=32, num_warps=4, num_stages=2),
}


# Heads of <= 128 dims (acc [32, 128] fp32 is small): one warpgroup, long K steps. Measured on the
# H100 at 32 heads x 128 (csa index set, S=8K): 0.389 ms vs 0.558 ms with block_k=64.
SMALL_HEAD_DEFAULT_CONFIGS: dict[str, SparseAttentionConfig] = {
    "interpreter": DEFAULT_CONFIGS["interpreter"],
    "H100": SparseAttentionConfig(block_h=32, block_k=128, num_warps=4, num_stages=2),
    "H200": SparseAttentionConfig(block_h=32, block_k=128, num_warps=4, num_stages=2),
    "generic": SparseAttentionConfig(block_h=32, block_k=64, num_warps=4, num_stages=2),
}
SMALL_HEAD_DIM = 128


def block_sizes(H: int, D: int, cfg: SparseAttentionConfig) -> tuple[int, int]:
    """(BLOCK_H, BLOCK_D): heads per program (no more than H needs, >= 16) and the padded head dim."""
    block_h = max(16, min(cfg.block_h, next_pow2(H)))
    return block_h, max(16, next_pow2(D))


def value_split(D: int, cfg: SparseAttentionConfig, kv_fp8: bool = False) -> int:
    """The split_d the launcher uses: cfg.split_d, reduced so each part of the padded head dim keeps
    >= 16 columns (the smallest tl.dot N), >= 64 over the FP8 cache (its loader reads one e8m0 scale
    per 64 columns)."""
    block_d = block_sizes(cfg.block_h, D, cfg)[1]
    return max(1, min(cfg.split_d, block_d // (64 if kv_fp8 else 16)))


def default_config(gpu_name: str | None = None, head_dim: int | None = None) -> SparseAttentionConfig:
    """Prefill default for a GPU name (e.g. 'NVIDIA H100 80GB HBM3'; None = the current device) and
    head dim (None or > 128: the 512-dim table)."""
    if head_dim is not None and head_dim <= SMALL_HEAD_DIM:
        return pick_default(SMALL_HEAD_DEFAULT_CONFIGS, gpu_name)
    return pick_default(DEFAULT_CONFIGS, gpu_name)


def decode_default_config(gpu_name: str | None = None) -> SparseAttentionConfig:
    """Decode (cached) default for a GPU name; None = the current device."""
    return pick_default(DECODE_DEFAULT_CONFIGS, gpu_name)
