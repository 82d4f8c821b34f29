"""Tunable launch parameters of the block-scaled FP8 linear kernel, with defaults per GPU and size."""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Mapping

from .._common import KernelConfig, pick_default

SCALE_BLOCK = 128  # K block of the activation scales and edge of the weight's scale tiles


@dataclasses.dataclass(frozen=True)
class Fp8LinearConfig(KernelConfig):
    """y [M, N] = x [M, K] @ W [N, K]^T, one program per [block_m, block_n] output tile, walking K in
    steps of 128 (one activation scale per row and one weight scale per 128 columns per step: each
    step's FP8 product is promoted to fp32 and scaled there, as DeepSeek's DeepGEMM does).

    quant: "fused" quantizes x's [block_m, 128] tiles inside the GEMM (one launch: what decode needs;
    every N tile re-quantizes its rows, fine while M is small); "separate" quantizes x once in its own
    pass and the GEMM reads FP8 codes + scales (large M: the re-quantization would cost CUDA-core time
    comparable to the tensor-core work).
    cast: fp32 -> e4m3 by the hardware conversion ("native", sm_89+, round to nearest even) or on the
    bits ("bits": exact everywhere; the interpreter's own cast does not round to even).
    split_k: programs sharing one output tile, each over a contiguous part of K, adding into an fp32
    result with atomics (then cast): more programs for few rows and few output tiles (decode); the
    fp32 sums' order then varies between runs (last-bit differences before the cast).
    swap_ab: "yes" computes each tile transposed (W_tile @ x_tile^T), so the weight rows fill the MMA's
    M side: for few rows of x, where a [block_m < 64, ...] tile wastes most of Hopper's wgmma.
    gemm: "triton" (this kernel) or "cublas": x quantized by our kernel, the FP8 product by cuBLAS's
    blockwise-scaled GEMM (torch._scaled_mm, 1x128 x 128x128 scales) where a probe shows this torch and
    GPU offer it with the op's numbers; elsewhere the Triton GEMM with the other fields.
    """

    block_m: int = 64
    block_n: int = 128
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8
    split_k: int = 1
    quant: str = "separate"
    cast: str = "bits"
    swap_ab: str = "no"
    gemm: str = "triton"

    POW2_FIELDS: ClassVar[tuple[str, ...]] = ("block_m", "block_n", "num_warps")
    CHOICES: ClassVar[Mapping[str, tuple[str, ...]]] = {"quant": ("fused", "separate"), "cast": ("bits", "native"),
                                                        "swap_ab": ("no", "yes"), "gemm": ("triton", "cublas")}


DEFAULT_CONFIGS: dict[str, Fp8LinearConfig] = {
    "interpreter": Fp8LinearConfig(block_m=16, block_n=32, num_stages=1, quant="fused"),
    # cuBLAS's blockwise GEMM where the probe admits it; else the Triton tile that won most 4096 / 16384-token
    # cases of the first H200 sweep (bench/results/H200/fp8_linear.md)
    "H100": Fp8LinearConfig(block_m=64, block_n=128, num_warps=4, num_stages=4, cast="native", gemm="cublas"),
    "H200": Fp8LinearConfig(block_m=64, block_n=128, num_warps=4, num_stages=4, cast="native", gemm="cublas"),
    "generic": Fp8LinearConfig(),
}
# Few rows (decode, small batches): reading W dominates; the tile transposed (weight rows on the MMA's M
# side), fused quantization (one launch).
SMALL_M = 64
SMALL_M_CONFIGS: dict[str, Fp8LinearConfig] = {
    "interpreter": Fp8LinearConfig(block_m=16, block_n=32, num_stages=1, quant="fused"),
    "H100": Fp8LinearConfig(block_m=16, block_n=64, num_warps=4, num_stages=4, quant="fused", cast="native",
                            swap_ab="yes"),
    "H200": Fp8LinearConfig(block_m=16, block_n=64, num_warps=4, num_stages=4, quant="fused", cast="native",
                            swap_ab="yes"),
    "generic": Fp8LinearConfig(block_m=16, block_n=64, quant="fused"),
}


def default_config(gpu_name: str | None = None, m: int | None = None) -> Fp8LinearConfig:
    """Default config for a GPU name (None = the current device) and, when known, the row count M."""
    table = SMALL_M_CONFIGS if m is not None and m <= SMALL_M else DEFAULT_CONFIGS
    return pick_default(table, gpu_name)


def decode_config(gpu_name: str | None = None) -> Fp8LinearConfig:
    """The few-rows default (a decode step's batch), for the tuning space's decode phase."""
    return pick_default(SMALL_M_CONFIGS, gpu_name)
