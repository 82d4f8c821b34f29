"""Search space of the float32 linear (kernels/float32_linear: a bf16 x against a float32 W, W split into
three exact bf16 pieces in registers): V4's CSA compressor projection `wkv` (N = 2 x head_dim: the
overlapping blocks' two halves, K = dim) over a prefill's tokens (M = context x batch) or a decode
step's sequences (M = batch)."""
from __future__ import annotations

from .framework import ACC_PER_THREAD, KernelSpace, Param, next_pow2, rule_threads, smem_reason, threads


def float32_linear_hard(cfg, problem, gpu) -> str | None:
    acc = cfg.block_m * cfg.block_n / threads(cfg.num_warps)
    if acc > ACC_PER_THREAD:
        return f"accumulator {cfg.block_m}x{cfg.block_n} over {cfg.num_warps} warps = {acc:g} fp32 a thread > {ACC_PER_THREAD}"
    # per pipeline stage a bf16 [block_m, block_k] x tile and a float32 [block_n, block_k] W tile
    return smem_reason(cfg.num_stages * cfg.block_k * (2 * cfg.block_m + 4 * cfg.block_n), gpu, f"{cfg.num_stages} stages")


def float32_linear_redundant(cfg, problem, gpu) -> str | None:
    m, n, k = problem.dim("m"), problem.dim("n"), problem.dim("k")
    if cfg.block_m > max(16, next_pow2(m)):
        return f"block_m {cfg.block_m} > the {m} rows need (tl.dot's minimum 16 aside)"
    if cfg.block_n > next_pow2(n):
        return f"block_n {cfg.block_n} > the {n} columns need"
    if cfg.split_k > -(-k // cfg.block_k):
        return f"split_k {cfg.split_k} > the {-(-k // cfg.block_k)} K steps: clamped by the launcher"
    return None


def _problem(mc, context, batch, phase):
    m = batch if phase == "decode" else context * batch
    n, k = 2 * mc.head_dim, mc.dim
    return {"m": m, "n": n, "k": k, "dtype": "bfloat16"}, m * k * 2 + n * k * 4 + m * n * 4


FLOAT32_LINEAR = KernelSpace(
    name="float32_linear", package="float32_linear", config_class="Float32LinearConfig",
    function="float32_linear:float32_linear",
    params=(Param("block_m", (16, 32, 64, 128)), Param("block_n", (32, 64, 128, 256)), Param("block_k", (16, 32, 64, 128)),
            Param("num_warps", (4, 8)), Param("num_stages", (1, 2, 3, 4, 5)), Param("group_m", (1, 8)),
            Param("split_k", (1, 2, 4, 8, 16, 32)), Param("swap_ab", ("no", "yes"))),
    problem=_problem, phases=("prefill", "decode"),
    defaults={"prefill": "default_config", "decode": "decode_config"},
    hard=(rule_threads, float32_linear_hard), redundant=(float32_linear_redundant,),
    doc="x [M, K] bf16 @ W [N, K]^T float32 (three exact bf16 pieces of W): V4's CSA compressor wkv (N = 2 x "
        "head_dim, K = dim); M = the prefill's tokens or the decode batch. The substitution reads the prefill "
        "table by row count for M > SMALL_M and the decode entries by batch below (kernel_substitutions).")
