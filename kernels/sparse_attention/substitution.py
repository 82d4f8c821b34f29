"""Pass-framework registration: `torch.ops.dsv4.sparse_attention` -> `torch.ops.dsv4_triton.sparse_attention`.

"sparse_attention.triton" applies to CUDA tensors (bf16 / fp16 / fp32, q and kv of one dtype, fp32
sink, int32 indices, head dim <= 1024). On CPU tensors it declines with the reason, so the
decomposition takes those nodes. `interpreter_substitution()` is the same substitution applying to
CPU tensors under TRITON_INTERPRET=1: for tests, never registered (the "all" selection on a CPU
target keeps decomposing).

Config: `config_for(target, S)`: the tuned table (if any) maps context lengths to config strings,
{"by_context": {"8192": "block_k=32,...", "32768": ...}, "default": "..."}: the entry of the smallest
context >= S (else the largest), else "default", else the kernel's per-GPU default. The chosen config
travels as the op's trailing `config` string and shows in the substitution report.
"""
from __future__ import annotations

import importlib
import os

import torch

from .._common import INTERPRET
from .config import SparseAttentionConfig, default_config
# The module (the package re-exports a function of the same name): registers torch.ops.dsv4_triton.*
_kernel = importlib.import_module(".sparse_attention", __package__)

from dsv4_compile.passes import Substitution, register

MAX_HEAD_DIM = 1024  # acc [block_h, D] fp32 must fit in registers


def config_for(table, S, default: SparseAttentionConfig) -> str:
    """The config string for a context of S queries from a tuned table (see the module docstring)."""
    table = table or {}
    by_context = table.get("by_context") or {}
    if by_context and isinstance(S, int):
        sizes = sorted(int(k) for k in by_context)
        fit = [n for n in sizes if n >= S]
        return str(by_context[str(fit[0] if fit else sizes[-1])])
    return str(table.get("default") or default.to_str())


def check_args(q, kv_dtype_ok: bool, attn_sink, topk_idxs, allow_cpu: bool) -> str | None:
    """None if the kernel takes these (fake) arguments, else the one-line reason."""
    if q.device.type != "cuda" and not (allow_cpu and INTERPRET):
        return f"needs CUDA tensors (q is on {q.device.type})"
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32) or not kv_dtype_ok:
        return f"q is {q.dtype}; needs bf16/fp16/fp32 with keys of the same dtype"
    if attn_sink.dtype != torch.float32 or topk_idxs.dtype != torch.int32:
        return f"attn_sink {attn_sink.dtype} / topk_idxs {topk_idxs.dtype}; needs float32 / int32"
    D = q.shape[-1]
    if isinstance(D, int) and D > MAX_HEAD_DIM:
        return f"head dim {D} > {MAX_HEAD_DIM}"
    return None


def _replacement(q, kv, attn_sink, topk_idxs, softmax_scale, config: str = ""):
    return torch.ops.dsv4_triton.sparse_attention(q.contiguous(), kv.contiguous(), attn_sink.contiguous(),
                                                  topk_idxs.contiguous(), softmax_scale, config)


def _applies(target, q, kv, attn_sink, topk_idxs, softmax_scale, allow_cpu: bool = False):
    return check_args(q, kv.dtype == q.dtype, attn_sink, topk_idxs, allow_cpu)


def _config(target, q, kv, attn_sink, topk_idxs, softmax_scale):
    gpu = "interpreter" if q.device.type != "cuda" else target.gpu
    D = q.shape[-1]
    return {"config": config_for(target.table, q.shape[1], default_config(gpu, D if isinstance(D, int) else None))}


def _applies_cpu(target, *args):
    return _applies(target, *args, allow_cpu=True)


_FILES = (__file__, _kernel.__file__, os.path.join(os.path.dirname(__file__), "config.py"))

SUBSTITUTION = register(Substitution(
    name="sparse_attention.triton",
    op=torch.ops.dsv4.sparse_attention.default,
    replacement=_replacement, applies=_applies, config=_config,
    version="1", priority=10, source_files=_FILES))


def interpreter_substitution() -> Substitution:
    """The same substitution, also applying to CPU tensors under TRITON_INTERPRET (tests only)."""
    import dataclasses

    return dataclasses.replace(SUBSTITUTION, name="sparse_attention.triton_interpret", applies=_applies_cpu)
