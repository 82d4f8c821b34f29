"""Search space of the prefill sparse attention kernel (kernels/sparse_attention), and the rules and
problem shapes it shares with the decode kernel (sparse_attention_cached: the same launcher)."""
from __future__ import annotations

import math

from .framework import ACC_PER_THREAD, CSA_RATIO, KernelSpace, Param, next_pow2, rule_threads, smem_reason, threads


def _is_fp8(problem) -> bool:
    """The decode problems read the FP8 cache (they carry its entry size)."""
    return "entry_bytes" in problem.dims


def attn_hard(cfg, problem, gpu) -> str | None:
    config = SPARSE_ATTENTION.kernel_config()
    block_h, block_d = config.block_sizes(problem.dim("H"), problem.dim("D"), cfg)
    block_v = block_d // config.value_split(problem.dim("D"), cfg, _is_fp8(problem))   # this program's output columns
    acc = block_h * block_v / threads(cfg.num_warps)
    if acc > ACC_PER_THREAD:
        return f"accumulator [{block_h}, {block_v}] over {cfg.num_warps} warps = {acc:g} fp32 a thread > {ACC_PER_THREAD}"
    elt = 4 if problem.dim("dtype") == "float32" else 2
    if cfg.dequant == "chunks":
        # Pipelined 64-column chunks of q [block_h, 64] and of the kv tile [block_k, 64], plus the
        # probabilities [block_h, block_k] staged for the second dot (16-28 KB on sm_90a at V4's decode).
        need = (cfg.num_stages * (block_h + cfg.block_k) * 64 + block_h * cfg.block_k) * elt
        return smem_reason(need, gpu, f"{cfg.num_stages} stages of 64-column q and kv chunks")
    # Pipelined gathered kv tiles [block_k, D] (the FP8 cache is dequantised into the same dtype),
    # the value columns [block_k, block_v] when the head dim is split, plus the probabilities
    # [block_h, block_k] staged for the second dot. q [block_h, D] is left out: with it, block_k 64 x 3
    # stages would be pruned, yet triton 3.9 builds that kernel with two kv buffers, 192 KB; so a few
    # configs pass this rule and fail at launch (e.g. block_k 64, 2 stages, split_d 2: 256 KB,
    # bench/results/H200/attention_compile_report.md).
    need = (cfg.num_stages * cfg.block_k * (block_d + (block_v if block_v < block_d else 0))
            + block_h * cfg.block_k) * elt
    return smem_reason(need, gpu, f"{cfg.num_stages} stages of [{cfg.block_k}, {block_d}] kv tiles")


def attn_redundant(cfg, problem, gpu) -> str | None:
    H, K = problem.dim("H"), problem.dim("K")
    if cfg.block_h > max(16, next_pow2(H)):
        return f"block_h {cfg.block_h} > heads {H}: clamped by the launcher"
    steps = -(-K // cfg.block_k)
    if cfg.num_splits > steps:
        return f"num_splits {cfg.num_splits} > {steps} steps of block_k over K = {K}: clamped by the launcher"
    if cfg.block_k > next_pow2(K):
        return f"block_k {cfg.block_k} > K = {K}"
    split_d = SPARSE_ATTENTION.kernel_config().value_split(problem.dim("D"), cfg, _is_fp8(problem))
    if split_d < cfg.split_d:
        return f"split_d {cfg.split_d} > {split_d} parts of head dim {problem.dim('D')}: clamped by the launcher"
    return None


def attn_problem(mc, context, batch, phase):
    H, D, R = mc.n_heads, mc.head_dim, mc.rope_head_dim
    K = mc.window_size + mc.index_topk                       # a CSA layer: window + top-k compressed entries
    n_entries = math.ceil(context / CSA_RATIO)
    if phase == "decode":
        # One new token per sequence over the FP8 cache: window ring + compressed entries.
        from ...kernels.sparse_attention_cached.config import entry_layout

        entry = entry_layout(D, R)[1]
        N = mc.window_size + n_entries
        dims = {"B": batch, "S": 1, "H": H, "D": D, "rope_dim": R, "K": K, "N": N, "entry_bytes": entry,
                "window": mc.window_size, "dtype": mc.dtype}
        return dims, batch * (K * entry + 2 * H * D * 2)
    # Prefill: S queries over S raw tokens + S/4 compressed entries.
    S = context
    dims = {"B": batch, "S": S, "H": H, "D": D, "rope_dim": R, "K": K, "N": S + n_entries,
            "window": mc.window_size, "dtype": mc.dtype}
    elt = 2 if mc.dtype == "bfloat16" else 4
    return dims, batch * (2 * S * H * D * elt + (S + n_entries) * D * elt + S * K * 4)


# split_d 2: acc [64, 256] over 8 warps (64 fp32 a thread) instead of 128, for 2x the logits work
# (not measured yet: compile data in bench/results/H200/attention_compile_report.md).
ATTN_PARAMS = (Param("block_h", (16, 32, 64)), Param("block_k", (16, 32, 64, 128)),
               Param("num_warps", (4, 8, 16)), Param("num_stages", (1, 2, 3, 4)), Param("split_d", (1, 2)))

SPARSE_ATTENTION = KernelSpace(
    name="sparse_attention", package="sparse_attention", config_class="SparseAttentionConfig",
    function="sparse_attention:sparse_attention",
    params=ATTN_PARAMS + (Param("num_splits", (1,)),),
    problem=attn_problem, hard=(rule_threads, attn_hard), redundant=(attn_redundant,),
    # The fused-attention tutorial's pattern: all 64 heads as BLOCK_M, BLOCK_N 32/64 x warps 4/8 x stages 2/3.
    typical=tuple({"block_h": 64, "block_k": k, "num_warps": w, "num_stages": s}
                  for k in (32, 64) for w in (4, 8) for s in (2, 3)),
    doc="Prefill of one CSA layer: q [batch, context, n_heads, head_dim], kv [batch, context + context/4, "
        "head_dim] (raw tokens then compressed entries), K = window + index_topk indices per query "
        "(the causal window, then random visible compressed entries). num_splits stays 1 (enough programs).")
