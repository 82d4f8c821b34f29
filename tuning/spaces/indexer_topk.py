"""Search space of the lightning-indexer top-k kernel (kernels/indexer_topk): tiles, paths and the
kernel's own refusals from its config module."""
from __future__ import annotations

import dataclasses
import math

from .framework import (ACC_PER_THREAD, CSA_RATIO, KernelSpace, Param, next_pow2, rule_threads, smem_reason,
                        threads)


def _indexer_tiles(cfg, problem) -> tuple[int, int, int, int]:
    """(BLOCK_S, BLOCK_H, BLOCK_D, C) as the launcher picks them (block_s only on the 16-bit paths;
    C = the workspace's candidate slots a query)."""
    kernel = INDEXER_TOPK.kernel_config()
    block_h, block_d = kernel.padded_heads_dims(problem.dim("H"), problem.dim("d"), _indexer_plan(cfg, problem))
    return (cfg.block_s if _indexer_mma16(problem) else 1, block_h, block_d,
            kernel.workspace_width(problem.dim("topk"), cfg))


def _indexer_plan(cfg, problem) -> str:
    """The kernel's `launch_plan` for this config and problem ('fp8', 'bf16', 'bf16_fix', 'fp16', 'exact')."""
    return INDEXER_TOPK.kernel_config().launch_plan(problem.dim("q_dtype"), problem.dim("k_dtype"), cfg.score_mma)


def _indexer_mma16(problem) -> bool:
    """The kernel's 16-bit MMA paths (its `launch_plan` other than 'exact'): q bf16 (keys of any dtype,
    fp32 keys rounded to bf16 by the launcher) or q and keys fp16. Otherwise (fp32 q, as in fp32 models)
    the exact path: fp32 copies, IEEE dots, one query a program."""
    return INDEXER_TOPK.kernel_config().launch_plan(problem.dim("q_dtype"), problem.dim("k_dtype")) != "exact"


def indexer_hard(cfg, problem, gpu) -> str | None:
    bs, bh, bd, c = _indexer_tiles(cfg, problem)
    # the kernel refuses these (wrong results measured): its own rule, imported with the config class
    refusal = INDEXER_TOPK.kernel_config().key_rows_refusal(dataclasses.replace(cfg, block_s=bs), bh)
    if refusal:
        return refusal
    mma16 = _indexer_mma16(problem)
    fp8 = _indexer_plan(cfg, problem) == "fp8"
    # selection="radix": the score kernel keeps no candidate rows (its scores go to a global workspace,
    # the radix select is a kernel of its own with its default tiles): no compaction sort, no sort
    # layout in shared memory
    radix = cfg.selection == "radix"
    n_threads = threads(cfg.num_warps)
    m = bs * bh                                                # queries x heads: the dot's M
    acc = m * cfg.block_n / n_threads
    if acc > ACC_PER_THREAD:
        return f"score accumulator [{m}, {cfg.block_n}] over {cfg.num_warps} warps = {acc:g} fp32 a thread > {ACC_PER_THREAD}"
    sort_regs = 0 if radix else 2 * 2 * c * bs / n_threads      # compaction: [bs, C] int64 rows and their swap partners
    if sort_regs > ACC_PER_THREAD:
        return (f"compaction sort [{bs}, {c}] int64 over {cfg.num_warps} warps = {sort_regs:g} registers a thread "
                f"> {ACC_PER_THREAD}")
    q_regs = m * bd * (0.25 if fp8 else 0.5 if mma16 else 1.0) / n_threads   # q stays resident for the whole loop
    key_regs = 2 * bs * cfg.block_n / n_threads                  # the tile's int64 keys, live across a compaction
    # The candidates live in global memory: the accumulator and the sort are never live together.
    total = q_regs + max(acc, sort_regs) + key_regs
    if total > 2 * ACC_PER_THREAD:
        return (f"resident q tile + max(accumulator, compaction sort) + tile keys = {total:g} registers a thread "
                f"> {2 * ACC_PER_THREAD}")
    k_elt = 1 if fp8 else 4 if not mma16 and problem.dim("k_dtype") == "float32" else 2
    # Pipelined key tiles [block_n, BLOCK_D] (bf16 on the 16-bit paths: the launcher rounds fp32 keys;
    # e4m3 on the fp8 path), the q tile where the MMA reads it from shared memory, and the compaction
    # sort's layout conversion. (The fp8 path's bf16 fallback tiles are not counted: rare, unpipelined.)
    need = (cfg.num_stages * cfg.block_n * bd * k_elt + (m * bd * (1 if fp8 else 2) if mma16 else 0)
            + (0 if radix else c * 8 * bs))
    return smem_reason(need, gpu, f"{cfg.num_stages} stages of [{cfg.block_n}, {bd}] key tiles + q [{m}, {bd}]")


def indexer_redundant(cfg, problem, gpu) -> str | None:
    if cfg.block_n > max(16, next_pow2(problem.dim("N"))):
        return f"block_n {cfg.block_n} > the {problem.dim('N')} keys"
    if cfg.score_mma == "fp8" and _indexer_plan(cfg, problem) != "fp8":
        return f"score_mma fp8 is ignored for {problem.dim('q_dtype')} q (the fp8 path takes bf16 q)"
    if cfg.block_s > 1 and not _indexer_mma16(problem):
        return f"block_s {cfg.block_s} is ignored on the exact (fp32) path: one query a program"
    if cfg.block_s > next_pow2(problem.dim("S")):
        return f"block_s {cfg.block_s} > the {problem.dim('S')} queries"
    if cfg.buffer_factor > 2 and cfg.selection == "radix":
        return f"buffer_factor {cfg.buffer_factor} is ignored by selection=radix (no candidate rows)"
    kb = max(next_pow2(problem.dim("topk")), cfg.block_n)
    if cfg.buffer_factor > 2 and problem.dim("N") <= 2 * kb:
        return (f"buffer_factor {cfg.buffer_factor}: the {problem.dim('N')} keys fit in {2 * kb} slots (buffer_factor 2) "
                f"without a compaction; a larger buffer only makes the final sort longer")
    return None


def _indexer_problem(mc, context, batch, phase):
    # Prefill of one CSA layer: `context` queries at positions 0..context-1 over context/4 keys; query t
    # sees the first (t+1)//4. Dtypes as in the model: q and weights in the model dtype, keys fp32
    # (the compressor's output).
    S, H, d = context, mc.index_n_heads, mc.index_head_dim
    N = math.ceil(context / CSA_RATIO)
    dims = {"B": batch, "S": S, "H": H, "d": d, "N": N, "ratio": CSA_RATIO, "topk": mc.index_topk,
            "q_dtype": mc.dtype, "k_dtype": "float32"}
    q_elt = 2 if mc.dtype in ("bfloat16", "float16") else 4
    return dims, batch * (S * H * (d + 1) * q_elt + N * d * 4 + S * mc.index_topk * 4)


INDEXER_TOPK = KernelSpace(
    name="indexer_topk", package="indexer_topk", config_class="IndexerTopkConfig", function="indexer_topk:indexer_topk",
    params=(Param("block_s", (1, 2, 4, 8)), Param("block_n", (16, 32, 64, 128, 256)), Param("buffer_factor", (2, 4)),
            Param("score_rows", ("keys", "heads")), Param("score_mma", ("bf16", "fp8")),
            Param("selection", ("threshold", "radix")), Param("num_warps", (2, 4, 8, 16)),
            Param("num_stages", (1, 2, 3, 4))),
    problem=_indexer_problem, hard=(rule_threads, indexer_hard), redundant=(indexer_redundant,),
    doc="Prefill selection of one CSA layer: q [batch, context, index_n_heads, index_head_dim] (model dtype), "
        "weights [batch, context, index_n_heads], keys [batch, context/4, index_head_dim] fp32, positions "
        "0..context-1, top index_topk. Compute-bound: each query scores its visible keys (bf16 MMA of "
        "block_s queries x heads by block_n keys for bf16 models, bf16 or FP8 e4m3 operands: score_mma) and, with "
        "selection=threshold, appends those above its running threshold to a candidate row of buffer_factor x KB "
        "slots, sorted back to top-k when it could overflow; with selection=radix, writes chunks of scores to a "
        "workspace for the radix select (histogram passes over the score bits).")
