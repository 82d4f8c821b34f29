"""Tunable launch parameters of the FP4 quantize / dequantize kernels, with defaults per GPU."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from .._common import KernelConfig, pick_default


@dataclasses.dataclass(frozen=True)
class Fp4QuantConfig(KernelConfig):
    """One program handles `block_rows` rows x `block_cols` unpacked columns (whole quantization
    blocks: max(1, block_cols // next_pow2(block_size)) blocks of a row)."""

    block_rows: int = 4
    block_cols: int = 1024
    num_warps: int = 4
    num_stages: int = 1

    POW2_FIELDS: ClassVar[tuple[str, ...]] = ("block_rows", "block_cols", "num_warps")


DEFAULT_CONFIGS: dict[str, Fp4QuantConfig] = {
    "interpreter": Fp4QuantConfig(block_rows=16, block_cols=512),
    "H100": Fp4QuantConfig(block_rows=4, block_cols=1024, num_warps=4),
    "H200": Fp4QuantConfig(block_rows=4, block_cols=1024, num_warps=4),
    "generic": Fp4QuantConfig(),
}


def default_config(gpu_name: str | None = None) -> Fp4QuantConfig:
    """Default config for a GPU name (e.g. 'NVIDIA H100 80GB HBM3'); None = the current device."""
    return pick_default(DEFAULT_CONFIGS, gpu_name)
