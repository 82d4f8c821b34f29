"""Tunable launch parameters of the indexer top-k kernel, with defaults per GPU."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from .._common import KernelConfig, pick_default


@dataclasses.dataclass(frozen=True)
class IndexerTopkConfig(KernelConfig):
    """One program handles `block_s` consecutive query tokens of one batch row (one on the exact path):
    it loops over their visible keys in tiles of `block_n`, scores a tile with one tl.dot of M =
    block_s x heads rows (queries x heads flattened) by K = head dim by N = block_n keys, and merges it
    into each query's running top-k buffer.

    block_s:   queries a program on the 16-bit MMA paths (q bf16, or q and keys fp16); the exact path
               (fp32 q, mixed fp16) takes one (its fp32 q tile would not fit in registers). The tile is
               a [block_s * 64, block_n, 128] MMA at the V4 indexer's 64 heads x 128 dims, and each key
               tile is read once for block_s queries (the key reads from L2 shrink by block_s); the
               merge work per query does not shrink, and a tile merges when any of the block's
               queries needs it.
    block_n:   keys per tile (>= 16, the smallest tl.dot N). Each tile that can enter the top-k costs
               a sort of its block_n keys and a bitonic merge of KB = max(next_pow2(topk), block_n)
               int64 keys per query, so larger tiles amortise the merge; the tile's scores are
               [block_s * heads, block_n] fp32 in registers.
    num_warps / num_stages: Triton launch parameters.
    The head count and head dim are not fields: each is one (power-of-two padded) tile.
    Defaults are untuned guesses (no GPU measurement yet): on H100/H200 block_s 2 x 64 heads = a
    128 x 128 x 128 bf16 MMA a key tile (two warpgroups of 64 rows), a 64-register fp32 accumulator a
    thread at 8 warps, 2 stages of [128, 128] bf16 key tiles (64 KB) plus the resident q tile (32 KB).
    """

    block_s: int = 1
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 2

    POW2_FIELDS: ClassVar[tuple[str, ...]] = ("block_s", "block_n", "num_warps")

    def __post_init__(self):
        super().__post_init__()
        if self.block_n < 16:
            raise ValueError(f"IndexerTopkConfig.block_n = {self.block_n}: tl.dot needs >= 16")


DEFAULT_CONFIGS: dict[str, IndexerTopkConfig] = {
    # The interpreter runs each program as numpy calls: small tiles keep the sorts short; block_s 2
    # keeps the multi-query tiling under test.
    "interpreter": IndexerTopkConfig(block_s=2, block_n=16, num_warps=4, num_stages=1),
    "H100": IndexerTopkConfig(block_s=2, block_n=128, num_warps=8, num_stages=2),
    "H200": IndexerTopkConfig(block_s=2, block_n=128, num_warps=8, num_stages=2),
    "generic": IndexerTopkConfig(block_s=1, block_n=64, num_warps=4, num_stages=2),
}


def default_config(gpu_name: str | None = None) -> IndexerTopkConfig:
    """The default for a GPU name (e.g. 'NVIDIA H100 80GB HBM3'); None = the current device."""
    return pick_default(DEFAULT_CONFIGS, gpu_name)
