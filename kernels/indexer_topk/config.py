"""Tunable launch parameters of the indexer top-k kernel, with defaults per GPU."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from .._common import KernelConfig, pick_default


@dataclasses.dataclass(frozen=True)
class IndexerTopkConfig(KernelConfig):
    """One program handles one query token: it loops over the visible keys in tiles of `block_n`,
    scores a tile with one tl.dot (all heads x the tile) and merges it into a running top-k buffer.

    block_n:   keys per tile (>= 16, the smallest tl.dot N). Each tile that can enter the top-k costs
               a sort of its block_n keys and a bitonic merge of KB = max(next_pow2(topk), block_n)
               int64 keys, so larger tiles amortise the merge; the tile's scores are [heads,
               block_n] fp32 in registers.
    num_warps / num_stages: Triton launch parameters.
    The head count and head dim are not fields: each is one (power-of-two padded) tile.
    Defaults are untuned guesses (no GPU measurement yet).
    """

    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 2

    POW2_FIELDS: ClassVar[tuple[str, ...]] = ("block_n", "num_warps")

    def __post_init__(self):
        super().__post_init__()
        if self.block_n < 16:
            raise ValueError(f"IndexerTopkConfig.block_n = {self.block_n}: tl.dot needs >= 16")


DEFAULT_CONFIGS: dict[str, IndexerTopkConfig] = {
    # The interpreter runs each program as numpy calls: small tiles keep the sorts short.
    "interpreter": IndexerTopkConfig(block_n=16, num_warps=4, num_stages=1),
    "H100": IndexerTopkConfig(block_n=128, num_warps=8, num_stages=2),
    "H200": IndexerTopkConfig(block_n=128, num_warps=8, num_stages=2),
    "generic": IndexerTopkConfig(block_n=64, num_warps=4, num_stages=2),
}


def default_config(gpu_name: str | None = None) -> IndexerTopkConfig:
    """The default for a GPU name (e.g. 'NVIDIA H100 80GB HBM3'); None = the current device."""
    return pick_default(DEFAULT_CONFIGS, gpu_name)
