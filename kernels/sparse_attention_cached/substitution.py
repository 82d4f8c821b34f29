"""Pass-framework registration: `torch.ops.dsv4.sparse_attention_cached` ->
`torch.ops.dsv4_triton.sparse_attention_cached` (decode over the FP8 cache).

"sparse_attention_cached.triton" applies to CUDA tensors (q bf16 / fp16 / fp32, uint8 cache whose last
dim is the main-entry size for q's head dim and rope_dim, (D - rope_dim) a multiple of 64). CPU
tensors: declined with the reason; `interpreter_substitution()` applies there under TRITON_INTERPRET
(tests only, not registered). Config: a tuned table as in `sparse_attention.substitution`; untuned,
the config string is "" = the GPU's decode default with num_splits chosen from the grid at run time.
"""
from __future__ import annotations

import dataclasses
import importlib
import os

import torch

from ..sparse_attention.config import decode_default_config
from ..sparse_attention.substitution import check_args, config_for
# The module (the package re-exports a function of the same name): registers torch.ops.dsv4_triton.*
_kernel = importlib.import_module(".sparse_attention_cached", __package__)

from dsv4_compile.passes import Substitution, register


def _replacement(q, cache, attn_sink, topk_idxs, softmax_scale, rope_dim, config: str = ""):
    return torch.ops.dsv4_triton.sparse_attention_cached(q.contiguous(), cache.contiguous(), attn_sink.contiguous(),
                                                         topk_idxs.contiguous(), softmax_scale, rope_dim, config)


def _applies(target, q, cache, attn_sink, topk_idxs, softmax_scale, rope_dim, allow_cpu: bool = False):
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
    gpu = "interpreter" if q.device.type != "cuda" else target.gpu
    return {"config": config_for(target.table, q.shape[1], decode_default_config(gpu))}


def _applies_cpu(target, *args):
    return _applies(target, *args, allow_cpu=True)


_FILES = (__file__, _kernel.__file__,
          os.path.join(os.path.dirname(_kernel.__file__), "..", "sparse_attention", "sparse_attention.py"),
          os.path.join(os.path.dirname(_kernel.__file__), "..", "sparse_attention", "config.py"))

SUBSTITUTION = register(Substitution(
    name="sparse_attention_cached.triton",
    op=torch.ops.dsv4.sparse_attention_cached.default,
    replacement=_replacement, applies=_applies, config=_config,
    version="1", priority=10, source_files=_FILES))


def interpreter_substitution() -> Substitution:
    """The same substitution, also applying to CPU tensors under TRITON_INTERPRET (tests only)."""
    return dataclasses.replace(SUBSTITUTION, name="sparse_attention_cached.triton_interpret", applies=_applies_cpu)
