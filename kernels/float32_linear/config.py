"""Tunable launch parameters of the float32 linear kernel, with defaults per GPU and row count."""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Mapping

from .._common import KernelConfig, cdiv, gpu_key, pick_default, split_to_fill


@dataclasses.dataclass(frozen=True)
class Float32LinearConfig(KernelConfig):
    """y [M, N] = x [M, K] @ W [N, K]^T in float32 for a bf16 x and a float32 W: one program per
    [block_m, block_n] output tile, walking K in steps of block_k; each step splits its W tile into
    three bf16 tiles (hi + mid + lo == W exactly) and adds their three bf16 tensor-core products with x
    (each product exact in float32) into the float32 accumulator.

    split_k: programs sharing one output tile, each over a contiguous part of K, adding into the
    float32 result with atomics (the sums' order then varies between runs: last-bit differences). It
    counts the parts at one block of block_m rows; M rows run split_k // cdiv(M, block_m), at least 1
    (an engine's symbolic M evaluates it at run time).
    swap_ab: "yes" computes each tile transposed (W_tile @ x_tile^T): the W pieces, made in registers,
    are the MMA's register operand and fill its M side (64 on Hopper's wgmma) when x has few rows.
    """

    block_m: int = 64
    block_n: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8
    split_k: int = 1
    swap_ab: str = "no"

    POW2_FIELDS: ClassVar[tuple[str, ...]] = ("block_m", "block_n", "block_k", "num_warps")
    CHOICES: ClassVar[Mapping[str, tuple[str, ...]]] = {"swap_ab": ("no", "yes")}


# Many rows (prefill): three bf16 products a K step make the tile compute-heavier than a bf16 GEMM's;
# the weight rows on the MMA's M side (swap_ab) take the pieces from registers. Not yet timed on a GPU:
# the tuning space (tuning/spaces/float32_linear.py) and its table entries decide.
DEFAULT_CONFIGS: dict[str, Float32LinearConfig] = {
    "interpreter": Float32LinearConfig(block_m=16, block_n=32, block_k=32, num_stages=1),
    "H100": Float32LinearConfig(block_m=64, block_n=128, block_k=32, num_warps=8, num_stages=3, swap_ab="yes"),
    "H200": Float32LinearConfig(block_m=64, block_n=128, block_k=32, num_warps=8, num_stages=3, swap_ab="yes"),
    "generic": Float32LinearConfig(),
}
# Few rows (decode): reading W dominates; the weight rows on the MMA's M side, K split until about
# SPLIT_PROGRAMS programs stream W at one row block (at most MAX_SPLIT_K parts of at least one K step).
SMALL_M = 64
SMALL_M_CONFIGS: dict[str, Float32LinearConfig] = {
    "interpreter": Float32LinearConfig(block_m=16, block_n=32, block_k=32, num_stages=1),
    "H100": Float32LinearConfig(block_m=16, block_n=64, block_k=64, num_warps=4, num_stages=3, swap_ab="yes"),
    "H200": Float32LinearConfig(block_m=16, block_n=64, block_k=64, num_warps=4, num_stages=3, swap_ab="yes"),
    "generic": Float32LinearConfig(block_m=16, block_n=64, swap_ab="yes"),
}
SPLIT_PROGRAMS = 256
MAX_SPLIT_K = 32
# Past FEW_M rows (up to SMALL_M) on the H100 / H200: 32-row blocks, K split for twice the programs (16-row
# blocks re-read and re-split W once a block). An engine whose batch bound passes FEW_M runs this config
# at every batch: at V4's compressor shapes on the H100, 1.16-1.55x at 64 rows and 0.93-0.97x at one
# (bench/results/H100/session36_gpu_runs.md).
FEW_M = 16
FEW_M_BLOCK_M = 32
FEW_M_GPUS = ("H100", "H200")


def default_config(gpu_name: str | None = None, m: int | None = None, n: int | None = None,
                   k: int | None = None) -> Float32LinearConfig:
    """Default config for a GPU name (None = the current device) and, when known, the row count M and
    the weight's N, K (few rows: K split as above)."""
    if m is None or m > SMALL_M:
        return pick_default(DEFAULT_CONFIGS, gpu_name)
    cfg = pick_default(SMALL_M_CONFIGS, gpu_name)
    if n is None or k is None:
        return cfg
    programs = SPLIT_PROGRAMS
    if m > FEW_M and gpu_key(gpu_name) in FEW_M_GPUS:
        cfg, programs = cfg.replace(block_m=FEW_M_BLOCK_M), 2 * SPLIT_PROGRAMS
    return cfg.replace(split_k=split_to_fill(cdiv(n, cfg.block_n), cdiv(k, cfg.block_k), programs, MAX_SPLIT_K))


def decode_config(gpu_name: str | None = None) -> Float32LinearConfig:
    """The few-rows default (a decode step's batch), for the tuning space's decode phase."""
    return pick_default(SMALL_M_CONFIGS, gpu_name)

