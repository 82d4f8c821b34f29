"""Tunable launch parameters of the compress_kv kernel, with defaults per GPU (untuned so far)."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from .._common import KernelConfig, pick_default


@dataclasses.dataclass(frozen=True)
class CompressKVConfig(KernelConfig):
    """One program pools one entry (all of its d channels: the RMSNorm and the Hadamard need the whole
    row) and runs the fused norm / RoPE / quant epilogue.

    block_r: block rows per step of the online softmax (a [block_r, d] tile of kv and score).
    num_warps / num_stages: Triton launch parameters.
    """

    block_r: int = 8
    num_warps: int = 4
    num_stages: int = 2

    POW2_FIELDS: ClassVar[tuple[str, ...]] = ("block_r", "num_warps")


DEFAULT_CONFIGS: dict[str, CompressKVConfig] = {
    # The interpreter runs each program as numpy calls: few, large steps.
    "interpreter": CompressKVConfig(block_r=16, num_warps=4, num_stages=1),
    # Not yet measured: [8, 512] fp32 tiles of kv and score over 4 warps (32 values a thread each).
    "H100": CompressKVConfig(block_r=8, num_warps=4, num_stages=2),
    "H200": CompressKVConfig(block_r=8, num_warps=4, num_stages=2),
    "generic": CompressKVConfig(block_r=8, num_warps=4, num_stages=2),
}


def default_config(gpu_name: str | None = None) -> CompressKVConfig:
    """Default for a GPU name (e.g. 'NVIDIA H100 80GB HBM3'; None = the current device)."""
    return pick_default(DEFAULT_CONFIGS, gpu_name)
