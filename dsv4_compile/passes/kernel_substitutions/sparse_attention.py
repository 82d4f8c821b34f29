"""Pass-framework registration: `torch.ops.dsv4.sparse_attention` -> `torch.ops.dsv4_triton.sparse_attention`.

"sparse_attention.triton" applies to CUDA tensors (bf16 / fp16 / fp32, q and kv of one dtype, fp32
sink, int32 indices, head dim <= 1024). On CPU tensors it declines with the reason, so the
decomposition takes those nodes. `interpreter_substitution()` is the same substitution applying to
CPU tensors under TRITON_INTERPRET=1: for tests, never registered (the "all" selection on a CPU
target keeps decomposing).

Config: `config_string(target.table, S, default)` (see `_common`): the tuned entry of the smallest
context >= S (else the largest), else the table's "default", else the kernel's per-GPU default for
the head dim.
"""
from __future__ import annotations

import importlib

import torch

from ...kernels.sparse_attention.config import default_config
from ..registry import Substitution, register
from ._common import INTERPRET, KERNEL_PRIORITY, config_string, interpreter_twin, kernel_files, target_gpu

# The module (the package re-exports a function of the same name): registers torch.ops.dsv4_triton.*
_kernel = importlib.import_module("...kernels.sparse_attention.sparse_attention", __package__)

MAX_HEAD_DIM = 1024  # acc [block_h, D] fp32 must fit in registers


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


def _reason(q, kv, attn_sink, topk_idxs, softmax_scale, allow_cpu: bool = False):
    return check_args(q, kv.dtype == q.dtype, attn_sink, topk_idxs, allow_cpu)


def _config(target, q, kv, attn_sink, topk_idxs, softmax_scale):
    D = q.shape[-1]
    default = default_config(target_gpu(target, q.device.type), D if isinstance(D, int) else None)
    return {"config": config_string(target.table, q.shape[1], default)}


_FILES = kernel_files("sparse_attention/sparse_attention.py", "sparse_attention/config.py")

SUBSTITUTION = register(Substitution(
    name="sparse_attention.triton",
    op=torch.ops.dsv4.sparse_attention.default,
    replacement=_replacement, applies=lambda target, *args: _reason(*args), config=_config,
    version="1", priority=KERNEL_PRIORITY, source_files=_FILES))


def interpreter_substitution() -> Substitution:
    """The same substitution, also applying to CPU tensors under TRITON_INTERPRET (tests only)."""
    return interpreter_twin(SUBSTITUTION, _reason)
