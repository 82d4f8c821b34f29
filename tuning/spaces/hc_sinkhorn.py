"""Search space of the Sinkhorn kernel alone (kernels/hc_sinkhorn)."""
from __future__ import annotations

from .framework import ELEMS_PER_THREAD, KernelSpace, Param, next_pow2, rule_threads, threads


def sinkhorn_hard(cfg, problem, gpu) -> str | None:
    np_ = HC_SINKHORN.kernel_config().padded_n(problem.dim("n"))
    per = cfg.sinkhorn_block_t * np_ * np_ / threads(cfg.sinkhorn_num_warps)
    if per > ELEMS_PER_THREAD:
        return f"tile {cfg.sinkhorn_block_t}x{np_}x{np_} = {per:g} fp32 a thread > {ELEMS_PER_THREAD}"
    return None


def sinkhorn_redundant(cfg, problem, gpu) -> str | None:
    np_ = HC_SINKHORN.kernel_config().padded_n(problem.dim("n"))
    if cfg.sinkhorn_block_t > next_pow2(problem.dim("matrices")):
        return f"sinkhorn_block_t {cfg.sinkhorn_block_t} > matrices {problem.dim('matrices')}"
    if cfg.sinkhorn_block_t * np_ * np_ < threads(cfg.sinkhorn_num_warps):
        return "fewer elements than threads: threads idle"
    return None


def _sinkhorn_problem(mc, context, batch, phase):
    T, n = batch * context, mc.hc_mult
    return {"matrices": T, "n": n, "iters": mc.hc_sinkhorn_iters, "dtype": "float32"}, T * n * n * 8


HC_SINKHORN = KernelSpace(
    name="hc_sinkhorn", package="hc_sinkhorn", config_class="HcConfig", function="hc_sinkhorn:hc_sinkhorn",
    params=(Param("sinkhorn_block_t", (16, 32, 64, 128, 256, 512, 1024)), Param("sinkhorn_num_warps", (1, 2, 4, 8))),
    problem=_sinkhorn_problem, hard=(rule_threads, sinkhorn_hard), redundant=(sinkhorn_redundant,),
    doc="logits [batch * context, hc_mult, hc_mult] fp32, hc_sinkhorn_iters rounds.")
