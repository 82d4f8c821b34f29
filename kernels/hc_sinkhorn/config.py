"""Tunable launch parameters of the mHC kernels (fused hc_pre, Sinkhorn alone), defaults per GPU."""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Mapping

from .._common import KernelConfig, cdiv, next_pow2, pick_default


@dataclasses.dataclass(frozen=True)
class HcConfig(KernelConfig):
    """hc_pre: one program per `block_t` tokens; the mixes GEMV walks n*D in `block_k` steps with
    `dot_precision` for its fp32 product ('ieee' = fp32 FMA, 'tf32x3' ~ fp32 on tensor cores, 'tf32'
    ~1e-3 relative) where block_t >= 16 (a tl.dot dimension), and in fp32 FMAs on the CUDA cores where
    block_t < 16 (a decode step's few tokens: dot_precision unused); the stream sum walks D in
    `block_d` steps.
    `num_splits` > 1 (decode: a few tokens, one program per token block would leave all but a few
    SMs idle) cuts both sweeps in that many ranges, each a program: a first launch writes fp32 partial
    mixes per range, the second adds them in range order and makes y's columns of its range.
    hc_sinkhorn: one program per `sinkhorn_block_t` matrices."""

    block_t: int = 16
    block_k: int = 256
    block_d: int = 256
    num_warps: int = 4
    num_stages: int = 2
    dot_precision: str = "ieee"
    num_splits: int = 1
    sinkhorn_block_t: int = 64
    sinkhorn_num_warps: int = 4

    POW2_FIELDS: ClassVar[tuple[str, ...]] = ("block_t", "block_k", "block_d", "num_warps",
                                              "sinkhorn_block_t", "sinkhorn_num_warps")
    CHOICES: ClassVar[Mapping[str, tuple[str, ...]]] = {"dot_precision": ("ieee", "tf32x3", "tf32")}

    def __post_init__(self):
        super().__post_init__()
        if self.block_k < 16:
            raise ValueError(f"HcConfig.block_k = {self.block_k}: tl.dot needs >= 16")
        if self.num_splits < 1:
            raise ValueError(f"HcConfig.num_splits = {self.num_splits}: need >= 1")


DEFAULT_CONFIGS: dict[str, HcConfig] = {
    "interpreter": HcConfig(block_t=16, block_k=1024, block_d=1024, sinkhorn_block_t=256),
    # tf32x3 (three tf32 tensor-core products, ~fp32 accuracy): 3.5x faster than 'ieee' FMA on the
    # H100 (bench/results/H100, run 1), within the fp32 test tolerance of the plain op. block_k 128:
    # at 256 the mixes sweep spills (255 registers); 4 stages: 1.04x at 4096 tokens (session 27).
    "H100": HcConfig(dot_precision="tf32x3", block_k=128, num_stages=4),
    "H200": HcConfig(dot_precision="tf32x3", block_k=128, num_stages=4),
    "generic": HcConfig(),
}


# A decode step's hc_pre (tokens = batch <= a few block_t): split so that the first sweep, n D fp32
# weights of fn (1.5 MB at V4's n 4, D 4096) plus x, spreads over most SMs (132 on the H100/H200:
# 32 ranges x 1-4 token blocks), each range still >= 2 steps of block_k at D 4096 (H100: 32 ranges of
# 4 steps of 128 beat 16 or 64 ranges and 256-wide steps at B 1 and 64, session 27). CPU interpreter:
# 2 ranges, so the tests run the split path.
DECODE_CONFIGS: dict[str, HcConfig] = {
    "interpreter": DEFAULT_CONFIGS["interpreter"].replace(num_splits=2),
    "H100": HcConfig(dot_precision="tf32x3", block_k=128, num_splits=32),
    "H200": HcConfig(dot_precision="tf32x3", block_k=128, num_splits=32),
    "generic": HcConfig(num_splits=16),
}


def padded_n(n: int) -> int:
    """The n x n matrices' padded side in the kernels' tiles (a power of two >= 2)."""
    return max(2, next_pow2(n))


def default_config(gpu_name: str | None = None) -> HcConfig:
    """Default config for a GPU name (e.g. 'NVIDIA H100 80GB HBM3'); None = the current device."""
    return pick_default(DEFAULT_CONFIGS, gpu_name)


def decode_config(gpu_name: str | None = None) -> HcConfig:
    """The default for a decode step's hc_pre (one token per sequence): split (DECODE_CONFIGS)."""
    return pick_default(DECODE_CONFIGS, gpu_name)


def hc_pre_splits(cfg: HcConfig, K: int) -> int:
    """Ranges the launch cuts K = n D into: cfg.num_splits, at most one per block_k step."""
    return max(1, min(cfg.num_splits, cdiv(K, cfg.block_k)))
