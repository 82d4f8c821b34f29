"""Pass-framework registration: `torch.ops.dsv4.sparse_attention_cached` ->
`torch.ops.dsv4_triton.sparse_attention_cached` (decode over the FP8 cache).

"sparse_attention_cached.triton" applies to CUDA tensors (q bf16 / fp16 / fp32, uint8 cache whose last
dim is the main-entry size for q's head dim and rope_dim, (D - rope_dim) a multiple of 64). CPU
tensors: declined with the reason; `interpreter_substitution()` applies there under TRITON_INTERPRET
(tests only, not registered). Config: the tuned decode entry whose cache held the fewest entries at
least the node's (tuned per context: a cache of window + context / ratio entries), else the largest;
a table without entry sizes, as for `sparse_attention`; untuned, the config string is "" = the GPU's
decode default with num_splits chosen from the grid at run time.
"""
from __future__ import annotations

import importlib

import torch

from ...kernels.sparse_attention.config import decode_default_config
from ..registry import Substitution, register
from ._common import KERNEL_PRIORITY, config_string, decode_entry_by_size, interpreter_twin, kernel_files, target_gpu
from .sparse_attention import check_args

# The module (the package re-exports a function of the same name): registers torch.ops.dsv4_triton.*
_kernel = importlib.import_module("...kernels.sparse_attention_cached.sparse_attention_cached", __package__)


def _replacement(q, cache, attn_sink, topk_idxs, softmax_scale, rope_dim, config: str = ""):
    return torch.ops.dsv4_triton.sparse_attention_cached(q.contiguous(), cache.contiguous(), attn_sink.contiguous(),
                                                         topk_idxs.contiguous(), softmax_scale, rope_dim, config)


def _reason(q, cache, attn_sink, topk_idxs, softmax_scale, rope_dim, allow_cpu: bool = False):
    reason = check_args(q, True, attn_sink, topk_idxs, allow_cpu)
    if reason is not None:
        return reason
    D = q.shape[-1]
    if cache.dtype != torch.uint8:
        return f"cache is {cache.dtype}; needs uint8 main entries"
    if isinstance(D, int):
        nope, entry = _kernel.entry_layout(D, rope_dim)
        if not (0 <= rope_dim <= D and nope % 64 == 0):
            return f"head dim {D} - rope_dim {rope_dim} is not a multiple of 64"
        if isinstance(cache.shape[-1], int) and cache.shape[-1] != entry:
            return f"cache entries of {cache.shape[-1]} bytes; head dim {D}, rope_dim {rope_dim} needs {entry}"
    return None


def _config(target, q, cache, attn_sink, topk_idxs, softmax_scale, rope_dim):
    if not target.table:
        return {"config": ""}
    default = decode_default_config(target_gpu(target, q.device.type))
    # the entry tuned at this cache's size (its entries N: the window plus the context over the ratio)
    n_entries = cache.shape[1]
    by_size = decode_entry_by_size(target.table, "N", n_entries, default) if isinstance(n_entries, int) else None
    return {"config": by_size or config_string(target.table, q.shape[1], default)}


_FILES = kernel_files("sparse_attention_cached/sparse_attention_cached.py", "sparse_attention/sparse_attention.py",
                      "sparse_attention/config.py")

SUBSTITUTION = register(Substitution(
    name="sparse_attention_cached.triton",
    op=torch.ops.dsv4.sparse_attention_cached.default,
    replacement=_replacement, applies=lambda target, *args: _reason(*args), config=_config,
    version="1", priority=KERNEL_PRIORITY, source_files=_FILES))


def interpreter_substitution() -> Substitution:
    """The same substitution, also applying to CPU tensors under TRITON_INTERPRET (tests only)."""
    return interpreter_twin(SUBSTITUTION, _reason)
