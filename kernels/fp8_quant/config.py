"""Tunable launch parameters of the FP8 quantize / dequantize kernels, with defaults per GPU."""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Mapping

from .._common import KernelConfig, pick_default


@dataclasses.dataclass(frozen=True)
class Fp8QuantConfig(KernelConfig):
    """The tensor is read as a [R * D / block_size, block_size] matrix of quantization blocks; one
    program handles max(1, block_elems // next_pow2(block_size)) consecutive blocks.

    cast: how fp32 becomes e4m3. "bits" (default): round to nearest even on the raw bits, ~20 integer
    ops per element, bit-exact on the GPU and in the interpreter (checked on the H100). "native": the
    hardware conversion (cvt.rn.satfinite.e4m3x2.f32 on sm_89+), one instruction per two elements;
    expected bit-exact (round to nearest even; the input is already clamped to +-448, NaN stays NaN)
    but NOT yet checked on a GPU: run tests/kernels/test_fp8_quant.py::test_gpu_native_cast_bit_exact
    before making it a default. Ignored under the interpreter (its cast does not round to even).
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
    "H100": Fp8QuantConfig(block_elems=4096, num_warps=4),
    "H200": Fp8QuantConfig(block_elems=4096, num_warps=4),
    "generic": Fp8QuantConfig(),
}


def default_config(gpu_name: str | None = None) -> Fp8QuantConfig:
    """Default config for a GPU name (e.g. 'NVIDIA H100 80GB HBM3'); None = the current device."""
    return pick_default(DEFAULT_CONFIGS, gpu_name)
