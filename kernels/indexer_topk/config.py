"""Tunable launch parameters of the indexer top-k kernel, with defaults per GPU."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from .._common import KernelConfig, next_pow2, pick_default

MAX_TOPK = 4096       # the fused kernel's [block_s, C] compaction sort and the radix select's k-sort live in registers


@dataclasses.dataclass(frozen=True)
class IndexerTopkConfig(KernelConfig):
    """A persistent program takes blocks of `block_s` consecutive query tokens of one batch row (one on
    the exact path), one after the other: for each it loops over the visible keys in tiles of
    `block_n`, scores a tile with one tl.dot of M = block_s x heads rows (queries x heads flattened) by
    K = head dim by N = block_n keys, and appends each query's keys that beat its running threshold to
    its candidate row (C = buffer_factor x KB int64 slots, KB = max(next_pow2(topk), block_n)), which
    is sorted and cut back to topk when the next tile might not fit (see the kernel's module doc).

    block_s:   queries a program on the 16-bit MMA paths (q bf16, or q and keys fp16); the exact path
               (fp32 q, mixed fp16) takes one (its fp32 q tile would not fit in registers). The tile is
               a [block_s * 64, block_n, 128] MMA at the V4 indexer's 64 heads x 128 dims, and each key
               tile is read once for block_s queries (the key reads from L2 shrink by block_s); a
               compaction sorts all block_s rows when any of them could overflow.
    block_n:   keys per tile (>= 16, the smallest tl.dot N); the tile's scores are [block_s * heads,
               block_n] fp32 in registers. Each tile costs a threshold compare, a prefix sum and a masked
               store of block_n keys per query.
    buffer_factor: C / KB (a power of two >= 2, so C >= topk + block_n). A compaction (one sort of
               [block_s, C] int64) frees about C - topk slots, so a larger factor means fewer, larger
               sorts; with scores in random key order the entries above the topk-th best among n keys
               grow like topk ln n, so a query over n keys compacts about 1 + ln(n / C) topk /
               (C - topk - block_n) times (~6 at topk 512, C 1024, n 32K; ~2 at C 2048); scores
               ascending along the keys (every key enters) compact every (C - topk) / block_n tiles.
               It also sets the pipelined stretch of key tiles between checks, (C - count) / block_n
               tiles (the kernel's segments): ~3 at C 1024, top-512, block_n 128; ~11 at C 2048.
    score_rows: which side of the score MMA the keys are. "keys": scores^T [block_n, M] = keys @ q^T,
               so the weighted sum over heads runs along each thread's own columns (a few shuffles); "heads":
               scores [M, block_n] = q @ keys^T, whose head sum crosses the warps that hold the M rows
               (a shared-memory reduction a tile). Both give the same products; only the summation order
               of the fp32 head sum can differ.
    score_mma: the score MMA's operand type on the bf16-q paths (q bf16, keys any float dtype; ignored
               otherwise). "bf16": bf16 operands (fp32 keys rounded, residual dots where that is not
               exact). "fp8": FP8 e4m3 operands, each q and key row times a power-of-two row scale, on
               Hopper's FP8 tensor cores (2x the bf16 MMA rate), the same scores as "bf16" wherever
               the rows are FP4-like (the model's FP4-simulated queries and keys; DESIGN.md, FP8 path);
               keys from the first tile holding a row that is not, and query blocks holding one, take
               the bf16 dots.
    selection: how each query's top-k is chosen from its scores. "threshold": in the fused kernel
               above (running threshold, candidate rows, compactions). "radix": a score kernel with the
               same tiles and score code writes the scores of a chunk of queries to an fp32 workspace
               [queries, keys] (within WORKSPACE_BYTES, kernels/indexer_topk/indexer_topk.py), then the
               radix select (radix_topk.py, its device default RadixTopkConfig) picks each row's top-k
               (buffer_factor unused). The same scores and order rule: the same picks, bit for bit.
    num_warps / num_stages: Triton launch parameters.
    The head count and head dim are not fields: each is one (power-of-two padded) tile. The number of
    persistent programs is not a field either (kernels/indexer_topk: PROGRAMS_PER_SM a SM).
    Defaults (H100/H200; a short gated sweep on the H100, 5 configs at 32K and 3 at 128K, found none
    faster, bench/results/H100/TUNING.md): block_s 2 x 64 heads = a
    128 x 128 x 128 bf16 MMA a key tile (two warpgroups of 64 rows), a 64-register fp32 accumulator a
    thread at 8 warps, 2 stages of [128, 128] bf16 key tiles (64 KB) plus the resident q tile (32 KB),
    buffer_factor 4 (top-512: C 2048, long pipelined segments; V4-Pro's top-1024 gets C 4096, for the
    tuner to weigh against 2).
    """

    block_s: int = 1
    block_n: int = 64
    buffer_factor: int = 2
    score_rows: str = "keys"
    score_mma: str = "bf16"
    selection: str = "threshold"
    num_warps: int = 8
    num_stages: int = 2

    POW2_FIELDS: ClassVar[tuple[str, ...]] = ("block_s", "block_n", "buffer_factor", "num_warps")
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"score_rows": ("keys", "heads"), "score_mma": ("bf16", "fp8"),
                                                     "selection": ("threshold", "radix")}

    def __post_init__(self):
        super().__post_init__()
        if self.block_n < 16:
            raise ValueError(f"IndexerTopkConfig.block_n = {self.block_n}: tl.dot needs >= 16")
        if self.buffer_factor < 2:
            raise ValueError(f"IndexerTopkConfig.buffer_factor = {self.buffer_factor}: need >= 2 "
                             f"(a compacted row of topk plus one tile of block_n keys)")


# selection stays "threshold" everywhere until a GPU run measures the radix selection against it.
DEFAULT_CONFIGS: dict[str, IndexerTopkConfig] = {
    # The interpreter runs each program as numpy calls: small tiles keep the sorts short; block_s 2
    # keeps the multi-query tiling under test, buffer_factor 2 the most compactions.
    "interpreter": IndexerTopkConfig(block_s=2, block_n=16, buffer_factor=2, num_warps=4, num_stages=1),
    # buffer_factor 4: at top-512 C = 2048, segments of ~11 pipelined key tiles between compactions
    # (~3 at C = 1024); compiled offline for sm_90, 200 registers either way (bf16 keys).
    "H100": IndexerTopkConfig(block_s=2, block_n=128, buffer_factor=4, num_warps=8, num_stages=2),
    "H200": IndexerTopkConfig(block_s=2, block_n=128, buffer_factor=4, num_warps=8, num_stages=2),
    "generic": IndexerTopkConfig(block_s=1, block_n=64, buffer_factor=2, num_warps=4, num_stages=2),
}


# score_rows="keys" selected wrong keys on an H100 (triton 3.6.0) at block_s 8 x 64 heads (an MMA of
# N = 512 columns) with 16 warps, while "heads" was exact at the same config and "keys" was exact at
# every config with <= 256 columns and <= 8 warps that ran (GPU tests, bench/results/H100/
# LAYERS_notes.md). Which of the two triggers it is not isolated, so both are refused.
KEY_ROWS_MAX_COLUMNS = 256
KEY_ROWS_MAX_WARPS = 8


def key_rows_refusal(cfg: IndexerTopkConfig, block_h: int) -> str | None:
    """Why `cfg` cannot take score_rows="keys" with `block_h` (padded) heads a query, or None."""
    columns = cfg.block_s * block_h
    if cfg.score_rows != "keys" or (columns <= KEY_ROWS_MAX_COLUMNS and cfg.num_warps <= KEY_ROWS_MAX_WARPS):
        return None
    return (f"score_rows=keys with block_s {cfg.block_s} x {block_h} heads = {columns} columns and {cfg.num_warps} "
            f"warps: needs <= {KEY_ROWS_MAX_COLUMNS} columns and <= {KEY_ROWS_MAX_WARPS} warps (wrong results "
            f"measured beyond); use score_rows=heads or smaller tiles")


def launch_plan(q_dtype, k_dtype, score_mma: str = "bf16") -> str:
    """Which path the launcher takes (DESIGN.md), from the dtypes (torch dtypes or their names) and the
    config's score_mma: 'fp8' (q bf16, keys any float dtype, score_mma "fp8": FP8 operands with
    power-of-two row scales, bf16 dots for rows that are not FP4-like), 'bf16' (q bf16, keys bf16:
    16-bit MMA), 'bf16_fix' (q bf16, keys fp32/fp16: their bf16 rounding as the MMA operand, residual
    dots if any key is not bf16-exact), 'fp16' (q and keys fp16: 16-bit MMA) or 'exact' (fp32 q, or
    fp16 q with other keys: fp32 IEEE dots, one query a program)."""
    q, k = (str(t).removeprefix("torch.") for t in (q_dtype, k_dtype))
    if q == "bfloat16":
        if score_mma == "fp8":
            return "fp8"
        return "bf16" if k == "bfloat16" else "bf16_fix"
    if q == "float16" and k == "float16":
        return "fp16"
    return "exact"


FP8_K_STEP = 32   # the FP8 MMA's K step (Hopper's wgmma k32) = the model's FP4 block (DESIGN.md, FP8 path)


def padded_heads_dims(H: int, D: int, plan: str = "bf16") -> tuple[int, int]:
    """(BLOCK_H, BLOCK_D): all heads and the whole head dim, each one power-of-two tile (>= 16; the
    head dim >= FP8_K_STEP on the fp8 path)."""
    return max(16, next_pow2(H)), max(FP8_K_STEP if plan == "fp8" else 16, next_pow2(D))


def workspace_width(topk: int, cfg: IndexerTopkConfig) -> int:
    """C, the candidate slots a query: buffer_factor x KB, KB = max(next_pow2(topk), block_n), so
    C >= topk + block_n (a compacted row of topk plus one whole tile always fits)."""
    return cfg.buffer_factor * max(next_pow2(topk), cfg.block_n)


def default_config(gpu_name: str | None = None) -> IndexerTopkConfig:
    """The default for a GPU name (e.g. 'NVIDIA H100 80GB HBM3'); None = the current device."""
    return pick_default(DEFAULT_CONFIGS, gpu_name)


# ---- the radix select (radix_topk.py) ---------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RadixTopkConfig(KernelConfig):
    """One program a row of scores: digit passes over the row in tiles of `block_n` keys, each a
    tl.histogram of the next `digit_bits` bits of the keys still in the running (see DESIGN.md, Radix
    select).

    block_n:    keys a tile (block_n / (32 x num_warps) a thread); each tile's histogram ends with its
                bins read back from shared memory, so larger tiles amortise that.
    digit_bits: 8 (4 histogram passes of 256 bins) or 11 (3 passes, 11 + 11 + 10 bits, of 2048 bins).
                tl.histogram (Triton 3.9, sm_90) is one shared-memory atomic add a key, plus zeroing the bins
                and reading them back into registers each tile (bins / (32 x num_warps) a thread): 11 bits
                saves a pass over the row (an L2 read) for 8x the per-tile bin traffic. 8 by default,
                unmeasured: the tuner's to weigh.
    num_warps:  Triton launch parameter.
    """

    block_n: int = 1024
    digit_bits: int = 8
    num_warps: int = 4

    POW2_FIELDS: ClassVar[tuple[str, ...]] = ("block_n", "num_warps")
    DIGIT_BITS: ClassVar[tuple[int, ...]] = (8, 11)

    def __post_init__(self):
        super().__post_init__()
        if self.digit_bits not in self.DIGIT_BITS:
            raise ValueError(f"RadixTopkConfig.digit_bits = {self.digit_bits}: choose one of {self.DIGIT_BITS}")


RADIX_DEFAULT_CONFIGS: dict[str, RadixTopkConfig] = {
    # the interpreter's cost is per tile: rows of ~1000 keys span two tiles (tests pick smaller ones)
    "interpreter": RadixTopkConfig(block_n=512, digit_bits=8, num_warps=4),
    # untuned: 8 keys a thread a tile at 8 warps (no GPU measurement yet)
    "H100": RadixTopkConfig(block_n=2048, digit_bits=8, num_warps=8),
    "H200": RadixTopkConfig(block_n=2048, digit_bits=8, num_warps=8),
    "generic": RadixTopkConfig(block_n=1024, digit_bits=8, num_warps=4),
}


def radix_default_config(gpu_name: str | None = None) -> RadixTopkConfig:
    """The radix select's default for a GPU name; None = the current device."""
    return pick_default(RADIX_DEFAULT_CONFIGS, gpu_name)
