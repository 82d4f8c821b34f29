"""Search space of the decode sparse attention kernel over the FP8 cache (kernels/sparse_attention_cached,
whose config class and defaults are sparse_attention's): the split factor and `dequant` are tuned too."""
from __future__ import annotations

from .framework import GpuSpec, KernelSpace, Param, Problem, rule_threads
from .sparse_attention import ATTN_PARAMS, attn_hard, attn_problem, attn_redundant


def _decode_baseline(params: dict, problem: Problem, gpu: GpuSpec) -> dict:
    """The decode kernel's default picks num_splits from the grid size at run time (its auto_config)."""
    from ...kernels.sparse_attention_cached.config import auto_config

    cfg = SPARSE_ATTENTION_CACHED.config_cls()(**params)
    cfg = auto_config(problem.dim("B"), problem.dim("S"), problem.dim("H"), problem.dim("K"), cfg, gpu.n_sms)
    return {**params, "num_splits": cfg.num_splits}


SPARSE_ATTENTION_CACHED = KernelSpace(
    name="sparse_attention_cached", package="sparse_attention_cached", config_package="sparse_attention",
    config_class="SparseAttentionConfig", function="sparse_attention_cached:sparse_attention_cached",
    # dequant "chunks": no spill at V4's decode shape on sm_90a, block_k 16-64 (split_d 2 over 4 warps:
    # 2 CTAs/SM), not timed yet (bench/results/H200/attention_compile_report.md)
    params=ATTN_PARAMS + (Param("num_splits", (1, 2, 4, 8, 16)), Param("dequant", ("tile", "chunks"))),
    problem=attn_problem, phases=("decode",), hard=(rule_threads, attn_hard), redundant=(attn_redundant,),
    defaults={"decode": "decode_default_config"}, baseline=_decode_baseline,
    doc="Decode of one CSA layer over the FP8 cache: q [batch, 1, n_heads, head_dim], cache [batch, window "
        "+ context/4, 584 B], K = window + index_topk. The split factor (flash-decoding) and the dequantisation "
        "(whole tile / 64-column chunks) are tuned; the baseline is the kernel's default with its automatic split count.")
