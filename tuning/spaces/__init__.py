"""Search spaces: per kernel, the launch parameters Optuna may choose and the rules that prune invalid
or redundant combinations BEFORE anything runs. `framework.py` holds the machinery (GpuSpec, Problem,
Param, KernelSpace, shared rules); each `<op>.py` the space of the kernel implementing that
`torch.ops.dsv4` op (also the study and table key): fp8_quantize, fp4_quantize, newton_schulz,
hc_pre, hc_sinkhorn, sparse_attention (prefill), sparse_attention_cached (decode over the FP8 cache),
compress_kv (the compressors of a CSA and an HCA layer), indexer_topk (the lightning indexer's
selection), indexer_topk_cached (the same at decode, over the packed key cache), moe_experts (the
grouped routed experts), moe_experts_fp8 and moe_experts_fp8_w8a8 (the same over FP8 expert weights,
W8A16 and W8A8), moe_experts_mxfp4_w4a8 (over MXFP4 expert weights, W4A8), fp8_linear (the block-scaled
FP8 linear of as-shipped weights) and float32_linear (the float32 projections of the compressors). A kernel
package that is not importable makes its space `unavailable()` (the sweep skips it with the reason).
"""
from __future__ import annotations

import inspect

from .compress_kv import COMPRESS_KV
from .float32_linear import FLOAT32_LINEAR
from .fp4_quantize import FP4_QUANTIZE
from .fp8_linear import FP8_LINEAR
from .fp8_quantize import FP8_QUANTIZE
from .framework import GPUS, KERNELS_DIR, PHASES, GpuSpec, KernelSpace, Param, Problem, Rule, canonical_gpu, gpu_spec
from .hc_pre import HC_PRE
from .hc_sinkhorn import HC_SINKHORN
from .indexer_topk import INDEXER_TOPK
from .indexer_topk_cached import INDEXER_TOPK_CACHED
from .moe_experts import MOE_EXPERTS, MOE_EXPERTS_FP8, MOE_EXPERTS_FP8_W8A8, MOE_EXPERTS_MXFP4_W4A8
from .newton_schulz import NEWTON_SCHULZ
from .sparse_attention import SPARSE_ATTENTION
from .sparse_attention_cached import SPARSE_ATTENTION_CACHED

SPACES: dict[str, KernelSpace] = {s.name: s for s in (
    FP8_QUANTIZE, FP4_QUANTIZE, NEWTON_SCHULZ, HC_PRE, HC_SINKHORN, SPARSE_ATTENTION, SPARSE_ATTENTION_CACHED,
    COMPRESS_KV, INDEXER_TOPK, INDEXER_TOPK_CACHED, MOE_EXPERTS, MOE_EXPERTS_FP8, MOE_EXPERTS_FP8_W8A8,
    MOE_EXPERTS_MXFP4_W4A8, FP8_LINEAR, FLOAT32_LINEAR)}

# kernel -> its typical @triton.autotune configs (KernelSpace.typical), for tuning/compare.py.
TYPICAL: dict[str, list[dict]] = {s.name: [dict(c) for c in s.typical] for s in SPACES.values() if s.typical}


def get_space(name: str) -> KernelSpace:
    try:
        return SPACES[name]
    except KeyError:
        raise KeyError(f"unknown kernel {name!r}; accepted: {', '.join(SPACES)}") from None


def rule_sources() -> str:
    """The source of every rule (for reports: what pruned what)."""
    seen = {r for s in SPACES.values() for r in (*s.hard, *s.redundant)}
    return "\n\n".join(inspect.getsource(r) for r in sorted(seen, key=lambda r: r.__name__))


__all__ = ["GPUS", "KERNELS_DIR", "PHASES", "SPACES", "TYPICAL", "GpuSpec", "KernelSpace", "Param", "Problem", "Rule",
           "canonical_gpu", "get_space", "gpu_spec", "rule_sources"]
