"""Tunable launch parameters of the Newton-Schulz kernels, with defaults per GPU."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from .._common import KernelConfig, fit_block, pick_default  # noqa: F401  (fit_block: the launchers' tiles)


@dataclasses.dataclass(frozen=True)
class NewtonSchulzConfig(KernelConfig):
    """Block shapes of the three kernels of one step.

    gemm  (X <- a X + B X, B [m, m], X [m, n]): block_m x block_n output tiles, block_k deep, grouped
          by group_m rows of tiles for L2 reuse.
    sym   (A = X X^T and B = b A + c A A, both symmetric [m, m]): sym_block square tiles of the upper
          triangle only (mirrored on store), sym_block_k deep.
    norm  (Frobenius norm and scaling): norm_block elements per load, norm_tile square output tiles.
    """

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3
    sym_block: int = 128
    sym_block_k: int = 64
    sym_num_warps: int = 8
    sym_num_stages: int = 3
    norm_block: int = 2048
    norm_tile: int = 64

    POW2_FIELDS: ClassVar[tuple[str, ...]] = (
        "block_m", "block_n", "block_k", "num_warps", "sym_block", "sym_block_k", "sym_num_warps",
        "norm_block", "norm_tile")

    def __post_init__(self):
        super().__post_init__()
        for name in ("block_m", "block_n", "block_k", "sym_block", "sym_block_k"):
            if getattr(self, name) < 16:
                raise ValueError(f"NewtonSchulzConfig.{name} = {getattr(self, name)}: tl.dot needs >= 16")


DEFAULT_CONFIGS: dict[str, NewtonSchulzConfig] = {
    "interpreter": NewtonSchulzConfig(block_m=128, block_n=128, block_k=128, sym_block=128, sym_block_k=128,
                                      norm_block=4096, norm_tile=128),
    "H100": NewtonSchulzConfig(),
    "H200": NewtonSchulzConfig(),
    "generic": NewtonSchulzConfig(block_m=64, block_n=64, block_k=32, num_warps=4, num_stages=2,
                                  sym_block=64, sym_block_k=32, sym_num_warps=4, sym_num_stages=2),
}


def default_config(gpu_name: str | None = None) -> NewtonSchulzConfig:
    """Default config for a GPU name (e.g. 'NVIDIA H100 80GB HBM3'); None = the current device."""
    return pick_default(DEFAULT_CONFIGS, gpu_name)
