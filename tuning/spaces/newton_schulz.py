"""Search space of the Newton-Schulz kernels (kernels/newton_schulz): the GEMM and the symmetric
kernel's tiles, clamped by the launcher's own `fit_block`."""
from __future__ import annotations

from .framework import ACC_PER_THREAD, KernelSpace, Param, rule_threads, smem_reason, threads


def _fit(block: int, dim: int) -> int:
    return NEWTON_SCHULZ.kernel_config().fit_block(block, dim)


def ns_hard(cfg, problem, gpu) -> str | None:
    m, n = problem.dim("m"), problem.dim("n")
    bm, bn, bk = _fit(cfg.block_m, m), _fit(cfg.block_n, n), _fit(cfg.block_k, m)
    sb, sbk = _fit(cfg.sym_block, m), _fit(cfg.sym_block_k, n)
    acc = bm * bn / threads(cfg.num_warps)
    if acc > ACC_PER_THREAD:
        return f"gemm accumulator {bm}x{bn} over {cfg.num_warps} warps = {acc:g} fp32 a thread > {ACC_PER_THREAD}"
    sym_acc = sb * sb / threads(cfg.sym_num_warps)
    if sym_acc > ACC_PER_THREAD:
        return f"sym accumulator {sb}x{sb} over {cfg.sym_num_warps} warps = {sym_acc:g} fp32 a thread > {ACC_PER_THREAD}"
    # bf16 operands, one [bm, bk] and one [bk, bn] tile per pipeline stage.
    reason = smem_reason(cfg.num_stages * (bm * bk + bk * bn) * 2, gpu, f"gemm {cfg.num_stages} stages")
    if reason:
        return reason
    return smem_reason(cfg.sym_num_stages * 2 * sb * sbk * 2, gpu, f"sym {cfg.sym_num_stages} stages")


def ns_redundant(cfg, problem, gpu) -> str | None:
    m, n = problem.dim("m"), problem.dim("n")
    for name, dim in (("block_m", m), ("block_n", n), ("block_k", m), ("sym_block", m), ("sym_block_k", n)):
        if getattr(cfg, name) > _fit(getattr(cfg, name), dim):
            return f"{name} {getattr(cfg, name)} > the matrix needs ({_fit(getattr(cfg, name), dim)}): clamped by the launcher"
    return None


def _ns_problem(mc, context, batch, phase):
    # Muon over a stack of expert matrices (moe_inter_dim x dim), fp32 parameters, DeepSeek-V4's 10
    # steps; X is [m, n] with m <= n after the transpose of tall matrices.
    rows, cols = mc.moe_inter_dim, mc.dim
    mats = 8
    m, n = min(rows, cols), max(rows, cols)
    dims = {"mats": mats, "rows": rows, "cols": cols, "m": m, "n": n, "steps": 10, "dtype": "float32"}
    per_step = (m * n * 2) * 3 + m * m * 2 * 4                       # X read twice, written; A, B
    return dims, mats * (rows * cols * 8 + 10 * per_step)


def _typical(bm: int, bn: int, bk: int, warps: int, stages: int) -> dict:
    # The sym kernel (A = X X^T, square tiles) gets the same shape as the GEMM, as one list would.
    return {"block_m": bm, "block_n": bn, "block_k": bk, "group_m": 8, "num_warps": warps, "num_stages": stages,
            "sym_block": min(bm, bn), "sym_block_k": bk, "sym_num_warps": warps, "sym_num_stages": stages}


NEWTON_SCHULZ = KernelSpace(
    name="newton_schulz", package="newton_schulz", config_class="NewtonSchulzConfig",
    function="newton_schulz:newton_schulz",
    params=(Param("block_m", (32, 64, 128, 256)), Param("block_n", (32, 64, 128, 256)), Param("block_k", (32, 64, 128)),
            Param("group_m", (1, 4, 8, 16)), Param("num_warps", (4, 8)), Param("num_stages", (2, 3, 4, 5)),
            Param("sym_block", (32, 64, 128)), Param("sym_block_k", (32, 64, 128)),
            Param("sym_num_warps", (4, 8)), Param("sym_num_stages", (2, 3, 4))),
    problem=_ns_problem, context_free=True,
    hard=(rule_threads, ns_hard), redundant=(ns_redundant,),
    # The matmul tutorial's CUDA list (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages), GROUP_M 8.
    typical=tuple(_typical(*c) for c in ((128, 256, 64, 8, 3), (64, 256, 32, 4, 4), (128, 128, 32, 4, 4),
                                         (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (128, 32, 32, 4, 4),
                                         (64, 32, 32, 2, 5), (32, 64, 32, 2, 5))),
    doc="G [8, moe_inter_dim, dim] fp32 (Muon on a stack of expert matrices), DeepSeek-V4's 10 steps. "
        "Context-free: one study per GPU (bucket 'any'). norm_block / norm_tile keep the defaults (the "
        "norm kernels are a small fraction of a step).")
