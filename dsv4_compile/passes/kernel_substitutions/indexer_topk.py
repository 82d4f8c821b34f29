"""Pass-framework registration: torch.ops.dsv4.indexer_topk -> torch.ops.dsv4_triton.indexer_topk
("indexer_topk.triton").

Applies to CUDA tensors: q and keys float32 / bfloat16 / float16, weights a float dtype, positions
int64, at most 128 heads x 256 dims, topk <= 4096. Otherwise (CPU tensors included) the node is left
to the decomposition, with the reason. `interpreter_substitution()`: the same, on CPU tensors under
TRITON_INTERPRET (tests only; never registered).
"""
from __future__ import annotations

import importlib

import torch

from ...kernels.indexer_topk.config import default_config
from ..registry import Substitution
from ._common import device_reason, interpreter_twin, kernel_files, register_kernel

# registers torch.ops.dsv4_triton.indexer_topk
_kernel = importlib.import_module("...kernels.indexer_topk.indexer_topk", __package__)
_FILES = kernel_files("indexer_topk/indexer_topk.py", "indexer_topk/config.py", "indexer_topk/sort_keys.py",
                      "indexer_topk/radix_topk.py")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _reason(q, weights, keys, positions, ratio, topk, allow_cpu=False):
    if keys.dtype not in _DTYPES:
        return f"keys {keys.dtype}; need float32 / bfloat16 / float16"
    return query_reason(q, weights, positions, ratio, topk, allow_cpu)


def query_reason(q, weights, positions, ratio, topk, allow_cpu=False) -> str | None:
    """Why the indexer kernels cannot take these queries, weights, positions, ratio and topk (the
    predicate indexer_topk and indexer_topk_cached share), or None."""
    reason = device_reason(q, allow_cpu)
    if reason:
        return reason
    if q.dtype not in _DTYPES or weights.dtype not in _DTYPES:
        return f"q {q.dtype} / weights {weights.dtype}; need float32 / bfloat16 / float16"
    if positions.dtype != torch.int64:
        return f"positions is {positions.dtype}; needs int64"
    H, D = q.shape[-2], q.shape[-1]
    if not isinstance(H, int) or not isinstance(D, int) or H > _kernel.MAX_HEADS or D > _kernel.MAX_HEAD_DIM:
        return f"{H} heads x {D} dims; the kernel takes static <= {_kernel.MAX_HEADS} x <= {_kernel.MAX_HEAD_DIM}"
    if not isinstance(topk, int) or not 0 <= topk <= _kernel.MAX_TOPK or not isinstance(ratio, int) or ratio < 1:
        return f"topk {topk} / ratio {ratio}; need 0 <= topk <= {_kernel.MAX_TOPK}, ratio >= 1"
    return None


def _replacement(q, weights, keys, positions, ratio, topk, config: str = ""):
    return torch.ops.dsv4_triton.indexer_topk(q.contiguous(), weights.contiguous(), keys.contiguous(),
                                              positions.contiguous(), ratio, topk, config)


SUBSTITUTION = register_kernel("indexer_topk.triton", torch.ops.dsv4.indexer_topk.default,
                               _replacement, _reason, default_config, _FILES)


def interpreter_substitution() -> Substitution:
    """The same substitution, also applying to CPU tensors under TRITON_INTERPRET (tests only)."""
    return interpreter_twin(SUBSTITUTION, _reason)
