"""Tunable launch parameters of the FP8 quantize / dequantize kernels, with defaults per GPU."""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Mapping

from .._common import KernelConfig, pick_default


@dataclasses.dataclass(frozen=True)
class Fp8QuantConfig(KernelConfig):
    """The tensor is read as a [R * D / block_size, block_size] matrix of quantization blocks; one
    program handles max(1, block_elems // next_pow2(block_size)) consecutive blocks.

    cast: how fp32 becomes e4m3. "native" (the H100/H200 default): the hardware conversion
    (cvt.rn.satfinite.e4m3x2.f32, sm_89+), one instruction per two elements, round to nearest even
    with saturation to +-448 built in (NaN stays NaN): the same codes as the plain op's clamp + cast.
    "bits": round to nearest even on the raw bits, ~20 integer ops per element (bit-exact everywhere;
    the generic default, since before sm_89 Triton emulates the fp8 cast). The interpreter always uses
    "bits": its own cast does not round to even. On the H100 the "bits" kernel was ALU-bound at 0.69x of
    torch.compile (bench/results/H100/KERNELS.md); "native" cuts its PTX from ~29 to ~8 instructions
    per element (plus the exact-scale division), which should make it memory-bound.
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
    "H100": Fp8QuantConfig(block_elems=4096, num_warps=4, cast="native"),
    "H200": Fp8QuantConfig(block_elems=4096, num_warps=4, cast="native"),
    "generic": Fp8QuantConfig(),
}


def default_config(gpu_name: str | None = None) -> Fp8QuantConfig:
    """Default config for a GPU name (e.g. 'NVIDIA H100 80GB HBM3'); None = the current device."""
    return pick_default(DEFAULT_CONFIGS, gpu_name)
