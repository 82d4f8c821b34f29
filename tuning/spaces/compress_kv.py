"""Search space of the compressor kernels (kernels/compress_kv): one config serves the compressors of
a CSA and an HCA layer, timed together; tiles from the launcher's own `tiles`."""
from __future__ import annotations

import math

from .framework import CSA_RATIO, ELEMS_PER_THREAD, KernelSpace, Param, next_pow2, rule_threads, smem_reason, threads


def compress_variants(problem) -> list[tuple[str, int, int, str, bool]]:
    """(name, d, ratio, quant, overlap) of each compressor call the problem times (see COMPRESS_KV)."""
    d, di, hca = problem.dim("d"), problem.dim("index_d"), problem.dim("hca_ratio")
    calls = [("csa", d, CSA_RATIO, "fp8", True), ("indexer", di, CSA_RATIO, "hadamard_fp4", True)]
    return calls + ([("hca", d, hca, "fp8", False)] if hca else [])


def compress_hard(cfg, problem, gpu) -> str | None:
    n_threads = threads(cfg.num_warps)
    tiles = COMPRESS_KV.kernel_config().tiles
    for name, d, ratio, quant, _ in compress_variants(problem):
        bn, br, bc = tiles(cfg, d, ratio, math.ceil(problem.dim("T") / ratio))
        # Live [bn, br, bc] fp32 tiles of score, kv and probabilities: each counted once (element-wise).
        per = bn * br * bc / n_threads
        if per > ELEMS_PER_THREAD:
            return (f"{name}: tile {bn}x{br}x{bc} (entries x rows x channels) over {cfg.num_warps} warps "
                    f"= {per:g} fp32 a thread > {ELEMS_PER_THREAD}")
        elt = 2 if problem.dim("dtype") in ("bfloat16", "float16") else 4
        reason = smem_reason(cfg.num_stages * bn * br * bc * 2 * elt, gpu,
                             f"{name}: {cfg.num_stages} stages of kv and score tiles")
        if reason:
            return reason
    return None


def compress_redundant(cfg, problem, gpu) -> str | None:
    variants = compress_variants(problem)
    widest = max(d for _, d, _, _, _ in variants)
    if cfg.block_c > next_pow2(widest):
        return f"block_c {cfg.block_c} > the widest row ({widest} channels): clamped by the launcher"
    longest = max(ratio for _, _, ratio, _, _ in variants)
    if cfg.num_stages > 1 and cfg.block_r >= longest:
        return f"num_stages {cfg.num_stages} but block_r {cfg.block_r} covers every block in one step: nothing to pipeline"
    return None


def _compress_problem(mc, context, batch, phase):
    # The compressors of one CSA layer (main entries: fp8, overlap; indexer keys: Hadamard + fp4,
    # overlap) and one HCA layer (fp8, the model's other ratio): one config serves every call, so the
    # objective is their sum. Inputs are the fp32 projections (Compressor.project); N = ceil(T / ratio).
    hca = max((r for r in mc.compress_ratios if r > CSA_RATIO), default=0)
    dims = {"B": batch, "T": context, "d": mc.head_dim, "index_d": mc.index_head_dim, "rope_dim": mc.rope_head_dim,
            "hca_ratio": hca, "dtype": "float32"}
    work = 0
    for width, ratio, overlap in ((mc.head_dim, CSA_RATIO, True), (mc.index_head_dim, CSA_RATIO, True),
                                  (mc.head_dim, hca, False)):
        if ratio:
            channels = width * (2 if overlap else 1)
            work += batch * (2 * context * channels * 4 + math.ceil(context / ratio) * width * 4)
    return dims, work


COMPRESS_KV = KernelSpace(
    name="compress_kv", package="compress_kv", config_class="CompressKVConfig", function="compress_kv:compress_kv",
    params=(Param("block_r", tuple(1 << i for i in range(8))), Param("block_c", tuple(1 << i for i in range(4, 10))),
            Param("num_warps", (1, 2, 4, 8, 16)), Param("num_stages", (1, 2, 3, 4))),
    problem=_compress_problem, hard=(rule_threads, compress_hard), redundant=(compress_redundant,),
    doc="The compressors of one CSA and one HCA layer, timed together (one config serves all three calls): "
        "kv, score [batch, context, 2 head_dim] -> context/4 fp8 entries (overlap), [batch, context, 2 "
        "index_head_dim] -> context/4 Hadamard+fp4 indexer keys (overlap), [batch, context, head_dim] -> "
        "context/128 fp8 entries. Pooling programs own (block_r // ratio entries or one entry's block_r-row "
        "steps, block_c channels): block_c sets the parallelism of the HCA call (context/128 entries), "
        "block_r the entries a program of the CSA calls holds.")
