"""Tunable launch parameters of the FP4 quantize / dequantize kernels, with defaults per GPU."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from .._common import KernelConfig, pick_default


@dataclasses.dataclass(frozen=True)
class Fp4QuantConfig(KernelConfig):
    """The tensor is read as a [R * D / block_size, block_size] matrix of quantization blocks; one
    program handles max(1, block_elems // next_pow2(block_size)) consecutive blocks."""

    block_elems: int = 2048
    num_warps: int = 4
    num_stages: int = 1

    POW2_FIELDS: ClassVar[tuple[str, ...]] = ("block_elems", "num_warps")


DEFAULT_CONFIGS: dict[str, Fp4QuantConfig] = {
    "interpreter": Fp4QuantConfig(block_elems=8192),
    "H100": Fp4QuantConfig(block_elems=2048, num_warps=4),
    "H200": Fp4QuantConfig(block_elems=2048, num_warps=4),
    "generic": Fp4QuantConfig(),
}


def default_config(gpu_name: str | None = None) -> Fp4QuantConfig:
    """Default config for a GPU name (e.g. 'NVIDIA H100 80GB HBM3'); None = the current device."""
    return pick_default(DEFAULT_CONFIGS, gpu_name)
