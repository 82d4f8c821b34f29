"""Tunable launch parameters of the grouped-expert MoE kernels, with defaults per GPU and per regime
(decode-sized token counts, where reading the experts' weights bounds the time, and prefill, where
the tensor cores do)."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import ClassVar

from ...model.ops import FP8_LINEAR_BLOCK
from .._common import KernelConfig, fit_block, pick_default, split_for  # noqa: F401  (fit_block: the launcher's tiles)

# T * top_k at or below this is the decode regime: few rows per expert (<= 16 on average over 256
# experts), so the smallest row block (16, tl.dot's minimum) wastes the least padding and the weight
# reads bound the time. (H200, bench/results/H200/moe.md: 16-row blocks beat 128-row ones at T = 512
# with k = 6, 128-row ones win from T = 4096.)
DECODE_MAX_ASSIGNMENTS = 4096
# W8A8 and W4A8 (the moe_experts_fp8_w8a8 and moe_experts_mxfp4_w4a8 ops): one activation scale per row
# and ACT_BLOCK elements along the reduction dim (the FP8 weight tile's edge), as DeepSeek's act_quant
# and kernels/fp8_linear.
ACT_BLOCK = FP8_LINEAR_BLOCK


@dataclasses.dataclass(frozen=True)
class MoeExpertsConfig(KernelConfig):
    """block_m: rows (assignments of one expert) per block, the padding unit of the routing layout,
    shared by both launches. gate_up launch (x @ w1^T, x @ w3^T, SwiGLU): block_n output columns of
    the intermediate dim, block_k deep along D, group_m blocks of rows per column sweep (L2 reuse of
    the weight tiles), num_warps / num_stages. down launch (act @ w2^T, routing weight, scatter-add):
    down_block_n output columns of D, down_block_k deep along I, down_num_warps / down_num_stages.
    Dequantizing launches read FP8 / MXFP4 tiles; block_k and down_block_k must divide 128 for FP8
    (one scale per 128 x 128 tile) and be multiples of 32 for MXFP4 (one scale per 32 along K).
    Tiles only: whether the activations are quantized (W8A8) is the op's semantics, not a config's
    choice (the launcher's `act`, set by which op runs). W8A8 and W4A8 rounding in the gate/up epilogue
    (act_round, below) need block_n a multiple of 128: `w8a8_config`, `w4a8_config`, and the launcher
    refuses less. w4a8_mma (W4A8 only): the tensor cores that multiply its FP8-rounded
    activations with the MXFP4 weights, the same exact products either way: "bf16" (the activations
    held as their bf16 values, the weights decoded to bf16 as W4A16 does) or "fp8" (e4m3 codes on the
    FP8 tensor cores, the weights decoded to e4m3) or "fp8_swap" (the same e4m3 products with the
    operands swapped: the weight rows the MMA's first operand, decoded into registers as the MMA reads
    them, one MMA per 32-run; block_n a multiple of 64 makes it a wgmma). bf16 is the
    default: on the H200 the e4m3 decode's integer work bound the FP8 route below W4A16's speed at every T
    (bench/results/H200/moe.md). "fp8_swap" compiles to fewer instructions a weight than bf16 at decode
    but ran about half as fast on the H100 at T 1, 8 and 64 (bench/results/H100/session33_gpu_runs.md).
    act_round (W8A8 and W4A8): where the SwiGLU output is rounded to FP8, the same values either way:
    "gate_up" in the gate/up epilogue, once per value (block_n a multiple of 128: the epilogue needs
    whole activation scale blocks), or "pass" in a pass of its own between the launches (the epilogue
    stores it in fp32; kernels/fp8_quantize: codes and scales for FP8 tensor cores, the rounded values
    for bf16 ones; any block_n). "pass" costs a launch and the fp32 round trip, and frees the gate/up
    column tile: at decode sizes 128-wide tiles leave SMs idle when few experts are in use (96 programs
    for one token's 6 experts at I 2048), so it is W4A8's decode default.
    mxfp4_scaling (MXFP4 weights on bf16 tensor cores): how a decoded code meets its scale, the same
    values either way: "two" multiplies (2^126, then the scale) or "one" (by their product, which bf16
    holds for scales up to 2; a program that meets a larger scale runs its K loop again on "two"). "one"
    is the decode default: 11-12% fewer instructions a K step where the dequantization bounds the time
    (1.03x at T 1 and 64 on the H100); at prefill its 128 x 128 tiles' registers spilled and it ran 0.97x
    (bench/results/H100/session30_gpu_runs.md).
    split_k / down_split_k (decode): the gate/up launch's reduction over D / the down launch's over I cut
    into that many ranges of whole K tiles at one token, each range a program (`run_splits`: split_k // T
    ranges at T tokens, at least 1, so the grid stays about one token's size; an engine's symbolic T
    evaluates it at run time). One token's gate/up launch is otherwise 192 programs each walking
    D = 4096 in 32 serial K steps (6 experts x 32 column tiles at I 2048): latency-bound, a few warps an
    SM. gate/up ranges store fp32 partial sums; a pass of its own adds them in range order and applies
    the clamped SwiGLU (W8A8 / W4A8: the routing weight and the rounding too, in place of act_round's
    pass); down ranges store partial slots that the slot sum adds in range order. Deterministic; 1 = no
    split. Only where the tokens fit one workspace chunk (decode sizes always do).
    """

    block_m: int = 64
    block_n: int = 64
    block_k: int = 64
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    down_block_n: int = 64
    down_block_k: int = 64
    down_num_warps: int = 4
    down_num_stages: int = 3
    w4a8_mma: str = "bf16"
    act_round: str = "gate_up"
    mxfp4_scaling: str = "two"
    split_k: int = 1
    down_split_k: int = 1

    POW2_FIELDS: ClassVar[tuple[str, ...]] = ("block_m", "block_n", "block_k", "num_warps", "down_block_n",
                                              "down_block_k", "down_num_warps")
    CHOICES: ClassVar[Mapping[str, tuple[str, ...]]] = {"w4a8_mma": ("bf16", "fp8", "fp8_swap"),
                                                        "act_round": ("gate_up", "pass"),
                                                        "mxfp4_scaling": ("two", "one")}

    def __post_init__(self):
        super().__post_init__()
        for name in ("block_m", "block_n", "block_k", "down_block_n", "down_block_k"):
            if getattr(self, name) < 16:
                raise ValueError(f"MoeExpertsConfig.{name} = {getattr(self, name)}: tl.dot needs >= 16")
        for name in ("block_k", "down_block_k"):
            if not 32 <= getattr(self, name) <= 128:
                raise ValueError(f"MoeExpertsConfig.{name} = {getattr(self, name)}: must be 32, 64 or 128 "
                                 f"(a divisor of the FP8 tile 128 and a multiple of the MXFP4 block 32)")
        for name in ("split_k", "down_split_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"MoeExpertsConfig.{name} = {getattr(self, name)}: need >= 1 (1: no split)")


def run_splits(split_k: int, T):
    """The K ranges a launch runs at T tokens for a config's split count at one token: split_k // T, at
    least 1 (an expression of a symbolic T, which the launch evaluates at run time: no guard on T)."""
    return split_for(split_k, T)


def w8a8_config(cfg: MoeExpertsConfig) -> MoeExpertsConfig:
    """cfg's tiles made the W8A8 op's: the gate/up column tile widened to an activation scale block where
    narrower (decode defaults), K tiles of 128 (one activation and one weight scale per FP8 MMA step of
    128: the fewest fp32 promotions). The W8A8 op's defaults (default_config(..., "fp8", "fp8"))."""
    return cfg.replace(block_n=max(cfg.block_n, ACT_BLOCK), block_k=ACT_BLOCK, down_block_k=ACT_BLOCK)


def w4a8_config(cfg: MoeExpertsConfig, n_assignments: int) -> MoeExpertsConfig:
    """cfg's tiles made the W4A8 op's on bf16 tensor cores (w4a8_mma's default), K tiles as W4A16's (its
    K loop is W4A16's: the activations are FP8-rounded values in bf16, no per-128 promotions to save;
    128-deep tiles spilled in the sm_90a compile where W4A16's 64-deep ones do not). At decode sizes the
    SwiGLU output rounded in a pass of its own (act_round "pass") under W4A16's column tiles; at prefill
    rounded in the gate/up epilogue, its column tile widened to an activation scale block where narrower.
    The W4A8 op's defaults (default_config(..., "mxfp4", "fp8"))."""
    if regime(n_assignments) == "decode":
        return cfg.replace(act_round="pass")
    return cfg.replace(block_n=max(cfg.block_n, ACT_BLOCK))


def regime(n_assignments: int) -> str:
    """'decode' for T * top_k <= DECODE_MAX_ASSIGNMENTS, else 'prefill'."""
    return "decode" if n_assignments <= DECODE_MAX_ASSIGNMENTS else "prefill"


DEFAULT_CONFIGS: dict[str, dict[str, MoeExpertsConfig]] = {
    # Large tiles: fewer interpreted programs (each program costs Python time, not FLOPs).
    "interpreter": {"decode": MoeExpertsConfig(block_m=16, block_n=64, block_k=64, down_block_n=64, down_block_k=64),
                    "prefill": MoeExpertsConfig(block_m=32, block_n=64, block_k=64, down_block_n=64, down_block_k=64)},
    # Decode: 16-row blocks, narrow column tiles so that the few experts in use still spread their
    # weight reads over every SM. Prefill: 128 x 128 tensor-core tiles.
    "H200": {"decode": MoeExpertsConfig(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=3,
                                        down_block_n=64, down_block_k=128, down_num_warps=4, down_num_stages=4),
             "prefill": MoeExpertsConfig(block_m=128, block_n=128, block_k=64, group_m=8, num_warps=8, num_stages=3,
                                         down_block_n=128, down_block_k=64, down_num_warps=8, down_num_stages=3)},
    "H100": {"decode": MoeExpertsConfig(block_m=16, block_n=32, block_k=128, num_warps=4, num_stages=4,
                                        down_block_n=32, down_block_k=128, down_num_warps=4, down_num_stages=4),
             "prefill": MoeExpertsConfig(block_m=128, block_n=128, block_k=64, group_m=8, num_warps=8, num_stages=3,
                                         down_block_n=128, down_block_k=64, down_num_warps=8, down_num_stages=3)},
    "generic": {"decode": MoeExpertsConfig(block_m=16, block_n=32, block_k=64, num_stages=2, down_block_n=32,
                                           down_block_k=64, down_num_stages=2),
                "prefill": MoeExpertsConfig(num_stages=2, down_num_stages=2)},
}


# MXFP4 decode config fields where they differ from the GPU's decode default. MXFP4's decode kernels are
# bound by the dequantization's instructions, not by bytes (ncu, H100, T 64: 55% of issue slots, DRAM
# 45%), and wider tiles spread that work better beyond one token: on the H100 gate/up 64 wide and down
# 128 took 1.24x / 1.19x less time than 32 / 32 at T 64 / 8 (W4A16 and W4A8 alike) and 1.09x more at
# T 1, while FP8 and bf16 experts (bandwidth-bound) ran the same within 1-3%
# (bench/results/H100/session26_gpu_runs.md). One token's launches split K in two ranges on the H100
# (split_k // T: one range from T 2 on): 1.31x at T 1 (104.4 -> 79.9 us, W4A8), and the split path's
# SwiGLU pass 1.03x at T 64 (bench/results/H100/session28_gpu_runs.md). The H200 has the H100's SMs and
# more bandwidth, so its MXFP4 decodes are as instruction-bound: the same fields (without them its experts
# ran slower than the H100's with them at B 1 and 64: bench/results/H200/session33_gpu_runs.md).
_HOPPER_MXFP4_DECODE_FIELDS = {"block_n": 64, "down_block_n": 128, "split_k": 2, "down_split_k": 2}
MXFP4_DECODE_FIELDS: dict[str, dict[str, int]] = {
    "H100": _HOPPER_MXFP4_DECODE_FIELDS, "H200": _HOPPER_MXFP4_DECODE_FIELDS, "generic": {}}


def default_config(gpu_name: str | None = None, n_assignments: int = 1, weight_format: str = "float",
                   act: str = "x") -> MoeExpertsConfig:
    """Default config for a GPU name (e.g. 'NVIDIA H200') and T * top_k; None = the current device. With
    act "fp8" (the launcher's weight_format and act): the W8A8 op's (FP8 weights: w8a8_config of the
    regime's default) or the W4A8 op's (MXFP4: w4a8_config)."""
    cfg = pick_default({gpu: by_regime[regime(n_assignments)] for gpu, by_regime in DEFAULT_CONFIGS.items()}, gpu_name)
    if weight_format == "mxfp4" and regime(n_assignments) == "decode":
        cfg = cfg.replace(mxfp4_scaling="one", **pick_default(MXFP4_DECODE_FIELDS, gpu_name))
    if act != "fp8":
        return cfg
    return w4a8_config(cfg, n_assignments) if weight_format == "mxfp4" else w8a8_config(cfg)


def decode_config(gpu_name: str | None = None, weight_format: str = "float", act: str = "x") -> MoeExpertsConfig:
    """The decode regime's default for a GPU (the tuning space's 'decode' phase)."""
    return default_config(gpu_name, 1, weight_format, act)


def prefill_config(gpu_name: str | None = None, weight_format: str = "float", act: str = "x") -> MoeExpertsConfig:
    """The prefill regime's default for a GPU (the tuning space's 'prefill' phase)."""
    return default_config(gpu_name, DECODE_MAX_ASSIGNMENTS + 1, weight_format, act)


def w8a8_decode_config(gpu_name: str | None = None) -> MoeExpertsConfig:
    """decode_config of the W8A8 op (the moe_experts_fp8_w8a8 space's 'decode' phase)."""
    return decode_config(gpu_name, "fp8", "fp8")


def w8a8_prefill_config(gpu_name: str | None = None) -> MoeExpertsConfig:
    """prefill_config of the W8A8 op (the moe_experts_fp8_w8a8 space's 'prefill' phase)."""
    return prefill_config(gpu_name, "fp8", "fp8")


def w4a8_decode_config(gpu_name: str | None = None) -> MoeExpertsConfig:
    """decode_config of the W4A8 op (the moe_experts_mxfp4_w4a8 space's 'decode' phase)."""
    return decode_config(gpu_name, "mxfp4", "fp8")


def w4a8_prefill_config(gpu_name: str | None = None) -> MoeExpertsConfig:
    """prefill_config of the W4A8 op (the moe_experts_mxfp4_w4a8 space's 'prefill' phase)."""
    return prefill_config(gpu_name, "mxfp4", "fp8")
