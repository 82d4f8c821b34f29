"""Tunable launch parameters of the compress_kv kernels, with defaults per GPU (untuned so far)."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from .._common import KernelConfig, next_pow2, pick_default


@dataclasses.dataclass(frozen=True)
class CompressKVConfig(KernelConfig):
    """The pooling stage: one program per (entries, channel block, batch), each step a tile of
    block_r token rows x block_c channels of kv and score (see compress_kv.tiles). The per-entry
    epilogue (RMSNorm, RoPE, quantization) holds a whole row; its warps follow d, not the config.

    block_r: token rows per step of the online softmax: min(block_r, next_pow2(ratio)) rows of each
             of block_r // that entries (ratio 4: several entries a program; ratio 128: one entry,
             128 / block_r steps). The row steps also fix the summation order of the pooling.
    block_c: channels per program (clamped to next_pow2(d)); d / block_c programs per entry block.
    num_warps / num_stages: Triton launch parameters of the pooling kernel.
    """

    block_r: int = 32
    block_c: int = 32
    num_warps: int = 4
    num_stages: int = 2

    POW2_FIELDS: ClassVar[tuple[str, ...]] = ("block_r", "block_c", "num_warps")


# Expected on the H100 (UNMEASURED: a roofline estimate, to be checked with
# `python -m dsv4_compile bench --gpu H100 --ops layers --context 8k,32k`). V4-Flash, B = 1, the
# bench's fp32 kv and score: bytes = B*T*C*4*2 read (half that with bf16 inputs), + 3*N*d*4 for the
# pooled rows (written, re-read and overwritten in place by the epilogue), at ~3 TB/s:
#   CSA main (C = 2*512, ratio 4, N = 2048 at 8K): 67 MB + 12 MB -> ~26 us roofline, ~35-45 us expected
#       (was 0.39 ms; torch.compile 0.10 ms); grid (2048/8, 512/32) = 4096 programs of [8x4, 32] tiles.
#       32K: ~105 us roofline, ~130-160 us expected (was 0.23 ms; torch.compile 0.22 ms).
#   HCA (C = 512, ratio 128, N = 64 at 8K, 256 at 32K): 34 MB -> ~11 us roofline, ~20 us expected at 8K
#       (1024 programs of 4 steps of [32, 32]); 134 MB -> ~45 us roofline, ~55-65 us at 32K (4096
#       programs) (was 0.61 ms at both; torch.compile 0.07 / 0.10 ms).
#   Indexer (C = 2*128, ratio 4, Hadamard + FP4): 17 MB at 8K -> ~6 us roofline, ~10-15 us expected.
# The second launch (the epilogue) adds a few microseconds; at 8K it is most of the gap to the roofline.
# Caveat on the old numbers: they did not scale with the context (CSA 0.39 ms at 8K, 0.23 ms at 32K;
# HCA 0.61 ms at both), so they were mostly the eager wrap_triton HOP dispatch of the direct call
# (~0.3-1 ms of Python a launch, now skipped: compress_kv._direct_launches), not GPU time. Compiled
# for sm_90 (no GPU run): pooling loads are 128-bit vectors, 48 registers, no spills.
DEFAULT_CONFIGS: dict[str, CompressKVConfig] = {
    # The interpreter runs each program as numpy calls: few, large steps (every channel in one program).
    "interpreter": CompressKVConfig(block_r=16, block_c=1024, num_warps=4, num_stages=1),
    # Not yet measured: [32 rows, 32 channels] fp32 tiles of kv and score over 4 warps (8 values a
    # thread each; a row's 32 channels = one 128 B line): >= 4 x 132 programs at every V4-Flash shape.
    "H100": CompressKVConfig(block_r=32, block_c=32, num_warps=4, num_stages=2),
    "H200": CompressKVConfig(block_r=32, block_c=32, num_warps=4, num_stages=2),
    "generic": CompressKVConfig(block_r=32, block_c=32, num_warps=4, num_stages=2),
}


def tiles(cfg: CompressKVConfig, d: int, ratio: int, n_entries: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_R, BLOCK_C) of the pooling stage: block_r token rows a step, as
    min(block_r, next_pow2(ratio)) rows of each of block_r // that entries (at most next_pow2(N));
    block_c channels (at most next_pow2(d)). The launcher and the tuning space's rules use it."""
    block_r = min(cfg.block_r, next_pow2(ratio))
    block_n = min(max(cfg.block_r // block_r, 1), next_pow2(max(n_entries, 1)))
    return block_n, block_r, min(cfg.block_c, next_pow2(d))


def default_config(gpu_name: str | None = None) -> CompressKVConfig:
    """Default for a GPU name (e.g. 'NVIDIA H100 80GB HBM3'; None = the current device)."""
    return pick_default(DEFAULT_CONFIGS, gpu_name)
