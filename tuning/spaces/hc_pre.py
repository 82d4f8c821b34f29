"""Search space of the fused mHC pre-mix (kernels/hc_sinkhorn serves hc_pre and hc_sinkhorn)."""
from __future__ import annotations

from .framework import ACC_PER_THREAD, ELEMS_PER_THREAD, KernelSpace, Param, next_pow2, rule_threads, smem_reason, threads


def hc_pre_hard(cfg, problem, gpu) -> str | None:
    np_ = HC_PRE.kernel_config().padded_n(problem.dim("n"))
    nw = max(2 * np_ * np_, 16)
    n_threads = threads(cfg.num_warps)
    x_bytes = 2 if problem.dim("dtype") in ("bfloat16", "float16") else 4
    if cfg.block_t * cfg.block_k / n_threads > ELEMS_PER_THREAD * 2:
        return f"x tile {cfg.block_t}x{cfg.block_k} = {cfg.block_t * cfg.block_k / n_threads:g} fp32 a thread > {2 * ELEMS_PER_THREAD}"
    if cfg.block_k * nw / n_threads > ELEMS_PER_THREAD * 2:
        return f"fn tile {cfg.block_k}x{nw} = {cfg.block_k * nw / n_threads:g} fp32 a thread > {2 * ELEMS_PER_THREAD}"
    if cfg.block_t < 16 and cfg.block_t * cfg.block_k * nw / n_threads > ELEMS_PER_THREAD * 4:   # the FMA products
        return (f"products {cfg.block_t}x{cfg.block_k}x{nw} = {cfg.block_t * cfg.block_k * nw / n_threads:g} fp32 a "
                f"thread > {4 * ELEMS_PER_THREAD}")
    if cfg.block_t * np_ * cfg.block_d / n_threads > ACC_PER_THREAD:
        return (f"stream tile {cfg.block_t}x{np_}x{cfg.block_d} = {cfg.block_t * np_ * cfg.block_d / n_threads:g} "
                f"fp32 a thread > {ACC_PER_THREAD}")
    return smem_reason(cfg.num_stages * (cfg.block_t * cfg.block_k * x_bytes + cfg.block_k * nw * 4), gpu,
                       f"mixes GEMV, {cfg.num_stages} stages")


def hc_pre_redundant(cfg, problem, gpu) -> str | None:
    T, n, D = problem.dim("tokens"), problem.dim("n"), problem.dim("D")
    splits = HC_PRE.kernel_config().hc_pre_splits(cfg, n * D)
    if splits < cfg.num_splits:
        return f"num_splits {cfg.num_splits} > {splits} steps of block_k over n*D = {n * D}: clamped by the launcher"
    if cfg.num_splits > 1 and 2 * -(-T // cfg.block_t) > gpu.n_sms:
        return f"num_splits {cfg.num_splits} with {-(-T // cfg.block_t)} token blocks: the grid fills the GPU unsplit"
    if cfg.block_t > max(16, next_pow2(T)):
        return f"block_t {cfg.block_t} > tokens {T}"
    if cfg.dot_precision != "ieee" and (cfg.block_t < 16 or T == 1):   # the few-token sweep (one token: any block_t)
        return (f"dot_precision {cfg.dot_precision} with block_t {cfg.block_t} at {T} token(s): fp32 FMAs (as "
                f"ieee)")
    if cfg.block_k > next_pow2(n * D):
        return f"block_k {cfg.block_k} > n*D = {n * D}"
    if cfg.block_d > next_pow2(D):
        return f"block_d {cfg.block_d} > D = {D}"
    return None


def _hc_pre_problem(mc, context, batch, phase):
    T = batch if phase == "decode" else batch * context
    n, D = mc.hc_mult, mc.dim
    dims = {"tokens": T, "n": n, "D": D, "iters": mc.hc_sinkhorn_iters, "dtype": mc.dtype}
    elt = 2 if mc.dtype == "bfloat16" else 4
    return dims, T * n * D * elt + T * D * elt + (2 + n) * n * n * D * 4


HC_PRE = KernelSpace(
    name="hc_pre", package="hc_sinkhorn", config_class="HcConfig", function="hc_sinkhorn:hc_pre",
    params=(Param("block_t", (1, 2, 4, 8, 16, 32, 64, 128)), Param("block_k", (32, 64, 128, 256, 512, 1024)),
            Param("block_d", (64, 128, 256, 512, 1024)), Param("num_warps", (2, 4, 8)),
            Param("num_stages", (1, 2, 3, 4)), Param("dot_precision", ("ieee", "tf32x3", "tf32")),
            Param("num_splits", (1, 2, 4, 8, 16, 32, 64))),
    problem=_hc_pre_problem, phases=("prefill", "decode"),
    defaults={"prefill": "default_config", "decode": "decode_config"},
    hard=(rule_threads, hc_pre_hard), redundant=(hc_pre_redundant,),
    doc="x [batch * context (decode: batch), hc_mult, dim] in the model dtype, fn [(2+n) n, n dim] fp32: the "
        "mHC pre-mix of one layer. num_splits cuts n dim into ranges (decode's few tokens); block_t below 16 makes "
        "the mixes fp32 FMAs (decode). dot_precision is tuned too: the correctness gate decides whether tf32 is "
        "accurate enough (it prunes the configs that are not).")
