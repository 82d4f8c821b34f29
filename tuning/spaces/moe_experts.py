"""Search space of the grouped-expert MoE kernel (kernels/moe_experts): the row block (the routing
layout's padding unit, shared by both launches), the gate/up launch's and the down launch's column
and K tiles, warps, pipeline stages and split-K ranges (split_k // T at T tokens: a split count that
runs as many ranges as its half is redundant); column tiles clamped by the launcher's own `fit_block`.
Tuned on V4-Flash's experts (D 4096, I 2048, E 256, top 6, bf16) with random routing: decode = one
token per sequence of the batch, prefill = context x batch tokens. The substitution reads prefill
entries by token count and decode entries by batch (passes/kernel_substitutions/moe_experts.py); the
decode problems of different contexts are the same problem (the experts do not see the cache).
moe_experts_fp8 (W8A16) and moe_experts_fp8_w8a8 (W8A8, FP8 tensor cores): the same kernel over FP8
expert weights, and moe_experts_mxfp4_w4a8 (W4A8) over MXFP4 ones, each op with its own space, table and
problems; their tiles and routes only (which activations the kernel multiplies is the op's semantics, not
a choice here)."""
from __future__ import annotations

import dataclasses

from ...kernels.moe_experts.config import ACT_BLOCK, run_splits
from .framework import ACC_PER_THREAD, KernelSpace, Param, rule_threads, smem_reason, threads


def _fit(block: int, dim: int) -> int:
    return MOE_EXPERTS.kernel_config().fit_block(block, dim)


def moe_hard(cfg, problem, gpu) -> str | None:
    D, I = problem.dim("D"), problem.dim("I")
    bm, bn, bk = cfg.block_m, _fit(cfg.block_n, I), cfg.block_k
    dbn, dbk = _fit(cfg.down_block_n, D), cfg.down_block_k
    w8a8 = problem.dims.get("act") == "fp8"
    if w8a8 and cfg.act_round == "gate_up" and bn % ACT_BLOCK:
        return (f"block_n {bn}: W8A8 quantizes whole {ACT_BLOCK}-blocks of the activation in the gate/up epilogue "
                f"(act_round gate_up)")
    if cfg.w4a8_mma == "fp8_swap" and bm > 16:   # the per-run tiles and the sums, transposed, of both weights
        return (f"w4a8_mma fp8_swap with block_m {bm}: decode's 16-row blocks only (128-row ones spilled 4 KB a "
                f"thread in the sm_90a compile)")
    acc = 2 * bm * bn / threads(cfg.num_warps)                       # gate and up accumulators
    if acc > ACC_PER_THREAD:
        return f"gate/up accumulators 2 x {bm}x{bn} over {cfg.num_warps} warps = {acc:g} fp32 a thread > {ACC_PER_THREAD}"
    acc = bm * dbn / threads(cfg.down_num_warps)
    if acc > ACC_PER_THREAD:
        return f"down accumulator {bm}x{dbn} over {cfg.down_num_warps} warps = {acc:g} fp32 a thread > {ACC_PER_THREAD}"
    # Tiles per pipeline stage: x [bm, bk] and w1, w3 [bk, bn]; act [bm, dbk] and w2 [dbk, dbn], as loaded:
    # activations bf16, or FP8 codes (1 byte) where FP8 tensor cores multiply them (W8A8; W4A8 with
    # w4a8_mma fp8), which also take one weight per gate/up K loop (the sm_90a compile's shared memory
    # exactly, bench/results/H200/moe_w8a8_offline.md); weights bf16, FP8 codes or MXFP4 words (half a
    # byte a weight, decoded in registers).
    fp8_tiles = w8a8 and (problem.dims.get("weights") == "fp8" or cfg.w4a8_mma != "bf16")
    act_size = 1 if fp8_tiles else 2
    weight_size = {"fp8": 1, "mxfp4": 0.5}.get(problem.dims.get("weights"), 2)
    gate_up_weights = 1 if fp8_tiles else 2
    reason = smem_reason(int(cfg.num_stages * (bm * bk * act_size + gate_up_weights * bk * bn * weight_size)), gpu,
                         f"gate/up {cfg.num_stages} stages")
    if reason:
        return reason
    return smem_reason(int(cfg.down_num_stages * (bm * dbk * act_size + dbk * dbn * weight_size)), gpu,
                       f"down {cfg.down_num_stages} stages")


def moe_redundant(cfg, problem, gpu) -> str | None:
    for name, dim in (("block_n", problem.dim("I")), ("down_block_n", problem.dim("D"))):
        if getattr(cfg, name) > _fit(getattr(cfg, name), dim):
            return f"{name} {getattr(cfg, name)} > the matrix needs ({_fit(getattr(cfg, name), dim)}): clamped by the launcher"
    if cfg.mxfp4_scaling == "one" and (problem.dims.get("weights") != "mxfp4" or cfg.w4a8_mma != "bf16"):
        return "mxfp4_scaling one: MXFP4 weights on bf16 tensor cores only (elsewhere the same kernel as two)"
    if cfg.block_m > 16 and problem.dim("T") * problem.dim("k") <= problem.dim("E"):
        return f"block_m {cfg.block_m}: at most one row per expert in use, 16 rows pad the least"
    for name in ("split_k", "down_split_k"):   # 1: the unsplit launches; 2 and up: the split path
        split, T = getattr(cfg, name), problem.dim("T")
        if split > 2 and run_splits(split // 2, T) == run_splits(split, T):
            return f"{name} {split} at T = {T}: {run_splits(split, T)} range(s) (split_k // T), as {name} {split // 2}"
    return None


def _moe_problem(mc, context, batch, phase, weight_bytes: float = 2):
    T = batch if phase == "decode" else context * batch
    E, k, D, I = mc.n_routed_experts, mc.n_activated_experts, mc.dim, mc.moe_inter_dim
    used = E * (1 - (1 - k / E) ** T)                                  # experts a random routing touches
    dims = {"T": T, "k": k, "E": E, "D": D, "I": I, "dtype": "bfloat16"}
    return dims, int(used * 3 * I * D * weight_bytes + T * D * (2 + 4))


def _moe_fp8_problem(mc, context, batch, phase):
    dims, work = _moe_problem(mc, context, batch, phase, weight_bytes=1 + 1 / 128 ** 2)
    return {**dims, "weights": "fp8"}, work


def _moe_fp8_w8a8_problem(mc, context, batch, phase):
    dims, work = _moe_fp8_problem(mc, context, batch, phase)
    return {**dims, "act": "fp8"}, work


def _moe_mxfp4_w4a8_problem(mc, context, batch, phase):
    dims, work = _moe_problem(mc, context, batch, phase, weight_bytes=0.5 + 1 / 32)   # e2m1 + an e8m0 scale per 32
    return {**dims, "weights": "mxfp4", "act": "fp8"}, work


def _typical(bm: int, bn: int, bk: int, warps: int, stages: int) -> dict:
    # One shape for both launches, as a single @triton.autotune list would (vLLM's fused_moe style).
    return {"block_m": bm, "block_n": bn, "block_k": bk, "group_m": 8, "num_warps": warps, "num_stages": stages,
            "down_block_n": bn, "down_block_k": bk, "down_num_warps": warps, "down_num_stages": stages}


MOE_EXPERTS = KernelSpace(
    name="moe_experts", package="moe_experts", config_class="MoeExpertsConfig", function="moe_experts:moe_experts",
    params=(Param("block_m", (16, 32, 64, 128)), Param("block_n", (32, 64, 128, 256)), Param("block_k", (32, 64, 128)),
            Param("group_m", (1, 4, 8, 16)), Param("num_warps", (4, 8)), Param("num_stages", (2, 3, 4, 5)),
            Param("down_block_n", (32, 64, 128, 256)), Param("down_block_k", (32, 64, 128)),
            Param("down_num_warps", (4, 8)), Param("down_num_stages", (2, 3, 4, 5)),
            Param("split_k", (1, 2, 4, 8)), Param("down_split_k", (1, 2, 4, 8))),
    problem=_moe_problem, phases=("prefill", "decode"),
    defaults={"prefill": "prefill_config", "decode": "decode_config"},
    hard=(rule_threads, moe_hard), redundant=(moe_redundant,),
    # vLLM's fused_moe starting points (small-M and large-M) and the matmul tutorial's common shapes.
    typical=tuple(_typical(*c) for c in ((16, 32, 64, 4, 4), (16, 64, 128, 4, 3), (32, 64, 64, 4, 4),
                                         (64, 64, 32, 4, 4), (64, 128, 64, 4, 3), (128, 128, 64, 8, 3),
                                         (128, 64, 64, 4, 4))),
    doc="x [T, 4096] bf16, ids [T, 6] of 256 experts (random), w1/w3 [256, 2048, 4096], w2 [256, 4096, 2048] "
        "bf16. Decode: T = batch; prefill: T = context x batch. Weight formats FP8 / MXFP4 share the "
        "config (their tile decode is in the same K loop).")


# The FP8 ops' spaces: moe_experts' params over FP8 weights. W8A8 and W4A8 also choose where the SwiGLU
# output is rounded (act_round: the gate/up epilogue, whose column tiles must hold whole activation
# blocks, or a pass between the launches, under any column tile); their defaults the regime's made the
# op's (config.w8a8_config, w4a8_config), their typical configs moe_experts' with 128-wide column tiles at
# least in the epilogue and as they are by a pass. Each trial's gate compares with its op's reference
# (tuning/tasks.py: the plain W8A16 op, the W8A8 / W4A8 naive twin).
_ROUNDING = Param("act_round", ("gate_up", "pass"))
_ROUNDED_TYPICAL = (*({**c, "block_n": max(c["block_n"], ACT_BLOCK), "act_round": "gate_up"} for c in MOE_EXPERTS.typical),
                    *({**c, "act_round": "pass"} for c in MOE_EXPERTS.typical if c["block_n"] < ACT_BLOCK))
MOE_EXPERTS_FP8 = dataclasses.replace(
    MOE_EXPERTS, name="moe_experts_fp8", problem=_moe_fp8_problem,
    doc="moe_experts' problems with w1/w3 [256, 2048, 4096], w2 [256, 4096, 2048] FP8 e4m3 (one e8m0 scale per "
        "128 x 128 tile), multiplied in x's dtype (W8A16).")
MOE_EXPERTS_FP8_W8A8 = dataclasses.replace(
    MOE_EXPERTS_FP8, name="moe_experts_fp8_w8a8", params=(*MOE_EXPERTS.params, _ROUNDING),
    problem=_moe_fp8_w8a8_problem, defaults={"prefill": "w8a8_prefill_config", "decode": "w8a8_decode_config"},
    typical=_ROUNDED_TYPICAL,
    doc="moe_experts_fp8's problems with x and the SwiGLU output quantized to FP8 per 128-block (W8A8, FP8 tensor "
        "cores), the latter in the gate/up epilogue (block_n 128 or 256: whole activation blocks) or by a pass "
        "(act_round).")
MOE_EXPERTS_MXFP4_W4A8 = dataclasses.replace(
    MOE_EXPERTS_FP8_W8A8, name="moe_experts_mxfp4_w4a8", problem=_moe_mxfp4_w4a8_problem,
    params=(*MOE_EXPERTS_FP8_W8A8.params, Param("w4a8_mma", ("bf16", "fp8", "fp8_swap")),
            Param("mxfp4_scaling", ("two", "one"))),
    defaults={"prefill": "w4a8_prefill_config", "decode": "w4a8_decode_config"},
    doc="moe_experts' problems with w1/w3 [256, 2048, 2048], w2 [256, 4096, 1024] MXFP4 (two e2m1 a byte, an e8m0 "
        "scale per 1 x 32), x and the SwiGLU output quantized to FP8 per 128-block (W4A8): moe_experts_fp8_w8a8's "
        "params and rules, which tensor cores multiply (w4a8_mma: bf16, FP8, or FP8 with the weights as the first "
        "operand) and how the bf16 route scales the decoded weights (mxfp4_scaling: one multiply or two).")
