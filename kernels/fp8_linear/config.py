"""Tunable launch parameters of the block-scaled FP8 linear kernel, with defaults per GPU and size."""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Mapping

from ...model.ops import FP8_LINEAR_BLOCK
from .._common import KernelConfig, cdiv, gpu_key, next_pow2, pick_default, split_for, split_to_fill

SCALE_BLOCK = FP8_LINEAR_BLOCK  # K block of the activation scales and edge of the weight's scale tiles


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
    fp32 sums' order then varies between runs (last-bit differences before the cast). It counts the
    parts at one block of block_m rows; M rows take split_k // cdiv(M, block_m) parts, at least 1
    (`run_splits`: the programs stay about as many as one row block's; an engine's symbolic M evaluates
    it at run time).
    swap_ab: "yes" computes each tile transposed (W_tile @ x_tile^T), so the weight rows fill the MMA's
    M side: for few rows of x, where a [block_m < 64, ...] tile wastes most of Hopper's wgmma.
    gemm: "triton" (this kernel) or "cublas": x quantized by our kernel, the FP8 product by cuBLAS's
    blockwise-scaled GEMM (torch._scaled_mm, 1x128 x 128x128 scales) where a probe shows this torch and
    GPU offer it with the op's numbers; elsewhere the Triton GEMM with the other fields. "gemv": for a
    few rows, the CUDA cores instead of the tensor cores (which pad the rows to 16 or 64), one program
    per block_n weight rows (at most 128) and row of x over the whole of K, block_k of it an iteration,
    x quantized in the kernel: one launch writing y in x's dtype (each further row reads W again, from
    L2 at best: block_m, split_k, quant, swap_ab and group_m unused).
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
    block_k: int = 128

    POW2_FIELDS: ClassVar[tuple[str, ...]] = ("block_m", "block_n", "num_warps", "block_k")
    CHOICES: ClassVar[Mapping[str, tuple[str, ...]]] = {"quant": ("fused", "separate"), "cast": ("bits", "native"),
                                                        "swap_ab": ("no", "yes"), "gemm": ("triton", "cublas", "gemv")}


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
    "H100": Fp8LinearConfig(block_m=16, block_n=128, num_warps=4, num_stages=3, quant="fused", cast="native",
                            swap_ab="yes"),
    "H200": Fp8LinearConfig(block_m=16, block_n=128, num_warps=4, num_stages=3, quant="fused", cast="native",
                            swap_ab="yes"),
    "generic": Fp8LinearConfig(block_m=16, block_n=64, quant="fused"),
}


# Shape rules for few rows on the H100 / H200 (bench/results/H200/fp8_linear.md, the sweep of 2026-12-03):
# 17..64 rows with N >= CUBLAS_MIN_N go to cuBLAS's blockwise GEMM (its wide tiles read W once); else
# the swapped Triton tile, K split until about SPLIT_PROGRAMS programs stream W at one row block (at most
# MAX_SPLIT_K parts, each of at least one K step; more rows split less: run_splits). H100, session 28: K
# in 32 one-step parts took wq_a (N 1024) 9.5 -> 8.3 us at 1 row and wkv (N 512) 9.3 -> 7.3 against 8
# parts, and the same parts over 64 rows (8 each) 14.4 and 12.3 us, under cuBLAS's 16.4 and 15.8.
SHAPE_RULE_GPUS = ("H100", "H200")
FEW_M = 16
CUBLAS_MIN_N = 2048
SPLIT_PROGRAMS = 256
MAX_SPLIT_K = 32
# One or two rows: the CUDA-core GEMV (gemm="gemv"; 1024 of K an iteration: the bytes in flight an SM
# needs to stream W) while the row-weight products M * N * K stay within GEMV_MAX_WORK; past it the
# GEMV's per-row dequantization outgrows the swapped tile's (bench/results/H100/session35_gpu_runs.md: up
# to 2.1x over the tile at V4-Flash's linears at one row, wq_b's 32768 x 1024 at 0.97x). A W of at most
# GEMV_NARROW_N rows is too few programs at 8 rows a program: 4, with 2048 of K over 8 warps.
GEMV_ROWS = 2
GEMV_MAX_WORK = 1 << 25
GEMV_NARROW_N = 1024
GEMV_TILE = {"block_n": 8, "block_k": 1024}
GEMV_NARROW_TILE = {"block_n": 4, "block_k": 2048, "num_warps": 8}
# An engine's symbolic row count crosses these bounds between its configs (a cond on M a bound where the
# configs on its two sides differ; one row alone: the GEMV where two rows exceed GEMV_MAX_WORK).
ROW_TIERS = (1, GEMV_ROWS, FEW_M)


def default_config(gpu_name: str | None = None, m: int | None = None, n: int | None = None,
                   k: int | None = None) -> Fp8LinearConfig:
    """Default config for a GPU name (None = the current device) and, when known, the row count M and
    the weight's N, K (the few-rows shape rules above)."""
    if m is None or m > SMALL_M:
        return pick_default(DEFAULT_CONFIGS, gpu_name)
    cfg = pick_default(SMALL_M_CONFIGS, gpu_name)
    if n is None or k is None or gpu_key(gpu_name) not in SHAPE_RULE_GPUS:
        return cfg
    if m > FEW_M and n >= CUBLAS_MIN_N:
        return cfg.replace(gemm="cublas")
    if m <= GEMV_ROWS and m * n * k <= GEMV_MAX_WORK:
        tile = GEMV_NARROW_TILE if n <= GEMV_NARROW_N else GEMV_TILE
        return cfg.replace(gemm="gemv", **{**tile, "block_k": min(tile["block_k"], next_pow2(k))})
    return cfg.replace(split_k=split_to_fill(cdiv(n, cfg.block_n), k // SCALE_BLOCK, SPLIT_PROGRAMS, MAX_SPLIT_K))


def run_splits(split_k: int, m, block_m: int):
    """The parts of K a launch over m rows runs for a config's split_k (its count at one row block): split_k
    // cdiv(m, block_m), at least 1 (for a symbolic m, an expression the launch evaluates at run time)."""
    return split_for(split_k, cdiv(m, block_m))


def decode_config(gpu_name: str | None = None) -> Fp8LinearConfig:
    """The few-rows default (a decode step's batch), for the tuning space's decode phase."""
    return pick_default(SMALL_M_CONFIGS, gpu_name)
