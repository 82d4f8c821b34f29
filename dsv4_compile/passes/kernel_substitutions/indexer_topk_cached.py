"""Pass-framework registration: torch.ops.dsv4.indexer_topk_cached ->
torch.ops.dsv4_triton.indexer_topk_cached ("indexer_topk_cached.triton", the decode indexer over the
packed key cache).

Applies to CUDA tensors: q float32 / bfloat16 / float16, weights a float dtype, positions int64, a
uint8 index cache whose last dim is the entry size of `fmt` ("fp4" / "fp8") for q's head dim (fp4: a
multiple of 32), at most 128 heads x 256 dims, topk <= 4096. Otherwise (CPU tensors included) the
node is left to the decomposition, with the reason. Config: the tuned decode entry of the smallest
batch >= the node's B x S query rows (tuning/spaces/indexer_topk_cached.py), else the kernel's decode
default for the GPU (kernels/indexer_topk_cached/config.py). `interpreter_substitution()`: the same,
on CPU tensors under TRITON_INTERPRET (tests only; never registered).
"""
from __future__ import annotations

import importlib

import torch

from ...kernels.indexer_topk_cached.config import default_config
from ...kernels.indexer_topk.indexer_topk import PACKED_KEY_FORMATS
from ...model.kv_layout import FP4_BLOCK, index_cache_mismatch
from ..registry import Substitution, register
from ._common import KERNEL_PRIORITY, decode_entry_config, interpreter_twin, kernel_files, most_rows, target_gpu
from .indexer_topk import query_reason

# registers torch.ops.dsv4_triton.indexer_topk_cached
_kernel = importlib.import_module("...kernels.indexer_topk_cached.indexer_topk_cached", __package__)
_FILES = kernel_files("indexer_topk_cached/indexer_topk_cached.py", "indexer_topk_cached/config.py",
                      "indexer_topk/indexer_topk.py", "indexer_topk/config.py", "indexer_topk/sort_keys.py",
                      "indexer_topk/radix_topk.py")


def _reason(q, weights, index_cache, positions, ratio, topk, fmt, allow_cpu=False):
    if fmt not in PACKED_KEY_FORMATS:
        return f"fmt {fmt!r}; the kernel reads {' / '.join(PACKED_KEY_FORMATS)} caches"
    reason = query_reason(q, weights, positions, ratio, topk, allow_cpu)
    if reason:
        return reason
    D = q.shape[-1]
    if fmt == "fp4" and D % FP4_BLOCK:
        return f"head dim {D} with fmt fp4; needs a multiple of {FP4_BLOCK}"
    return index_cache_mismatch(index_cache, D, fmt)


def _replacement(q, weights, index_cache, positions, ratio, topk, fmt, config: str = ""):
    return torch.ops.dsv4_triton.indexer_topk_cached(q.contiguous(), weights.contiguous(), index_cache.contiguous(),
                                                     positions.contiguous(), ratio, topk, fmt, config)


def _config(target, q, *rest):
    B, S = q.shape[:2]
    rows = most_rows(B, S) or float("inf")                                      # symbolic: by its bound
    return {"config": decode_entry_config(target.table, rows, default_config(target_gpu(target, q.device.type)))}


SUBSTITUTION = register(Substitution(
    name="indexer_topk_cached.triton", op=torch.ops.dsv4.indexer_topk_cached.default, replacement=_replacement,
    applies=lambda target, *args: _reason(*args), config=_config,
    version="1", priority=KERNEL_PRIORITY, source_files=_FILES))


def interpreter_substitution() -> Substitution:
    """The same substitution, also applying to CPU tensors under TRITON_INTERPRET (tests only)."""
    return interpreter_twin(SUBSTITUTION, _reason)
