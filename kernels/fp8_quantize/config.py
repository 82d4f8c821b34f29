"""Tunable launch parameters of the FP8 quantize / dequantize kernels, with defaults per GPU."""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Mapping

from .._common import KernelConfig, cdiv, next_pow2, pick_default


@dataclasses.dataclass(frozen=True)
class Fp8QuantConfig(KernelConfig):
    """The tensor is read as a [R * D / block_size, block_size] matrix of quantization blocks; one
    program handles max(1, block_elems // next_pow2(block_size)) consecutive blocks.

    cast: how fp32 becomes e4m3. "native": the hardware conversion (cvt.rn.satfinite.e4m3x2.f32,
    sm_89+), one instruction per two elements, round to nearest even with saturation to +-448 built in
    (NaN stays NaN): the same codes as the plain op's clamp + cast. "bits": round to nearest even on
    the raw bits, ~20 integer ops per element (bit-exact everywhere; the generic default, since before
    sm_89 Triton emulates the fp8 cast). The interpreter always uses "bits": its own cast does not
    round to even.
    Measured on the H100 (bench/results/H100/run3_kernels.md, 16384 x 7168 bf16, one run): neither
    cast reaches torch.compile of the plain op (0.126 / 0.131 ms). Exact scales: bits 1024 x 4 warps
    0.189 ms, native 16384 x 8 warps 0.205 ms; pow2 scales: native 4096 x 8 warps 0.328 ms, bits
    4096 x 8 warps 0.406 ms. Cutting the PTX from ~29 to ~8 instructions per element did not make the
    kernel memory-bound, so the instruction count was not the whole story: profile before the next try.
    """

    block_elems: int = 4096
    num_warps: int = 4
    num_stages: int = 1
    cast: str = "bits"

    POW2_FIELDS: ClassVar[tuple[str, ...]] = ("block_elems", "num_warps")
    CHOICES: ClassVar[Mapping[str, tuple[str, ...]]] = {"cast": ("bits", "native")}


DEFAULT_CONFIGS: dict[str, Fp8QuantConfig] = {
    # The interpreter runs each program as numpy calls: few, large programs are fastest.
    "interpreter": Fp8QuantConfig(block_elems=8192),
    # the best pow2-scale config of the H100 run (the mode of the KV cache's e8m0 scales)
    "H100": Fp8QuantConfig(block_elems=4096, num_warps=8, cast="native"),
    "H200": Fp8QuantConfig(block_elems=4096, num_warps=8, cast="native"),
    "generic": Fp8QuantConfig(),
}


def quant_tile(block_elems: int, block_size: int) -> tuple[int, int]:
    """(quantization blocks a program, padded block width): the FP8 and FP4 launchers read the tensor
    as [Q, block_size] blocks and give each program max(1, block_elems // next_pow2(block_size))."""
    block_s = next_pow2(block_size)
    return max(1, block_elems // block_s), block_s


def launch_grid(Q: int, block_size: int, cfg) -> tuple[tuple[int], dict]:
    """(grid, meta-parameters) of the FP8 and FP4 kernels over Q blocks of block_size (either config class)."""
    block_q, block_s = quant_tile(cfg.block_elems, block_size)
    return (cdiv(Q, block_q),), dict(BS=block_size, BLOCK_Q=block_q, BLOCK_S=block_s,
                                     num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def default_config(gpu_name: str | None = None) -> Fp8QuantConfig:
    """Default config for a GPU name (e.g. 'NVIDIA H100 80GB HBM3'); None = the current device."""
    return pick_default(DEFAULT_CONFIGS, gpu_name)
