"""Pass-framework registration: torch.ops.dsv4.hc_sinkhorn / hc_pre -> torch.ops.dsv4_triton.hc_sinkhorn
/ hc_pre ("hc_sinkhorn.triton", "hc_pre.triton").

Applies to CUDA tensors: logits [..., n, n] float32 / bfloat16 / float16; hc_pre x [..., n, D] of
those dtypes with float32 fn [(2+n) n, n D], scale [3], base [(2+n) n] and static n, D.
Config: a decode step's hc_pre (x [B, 1, n, D]: one token per sequence) takes the tuned decode entry of
the smallest batch >= B (else the largest; a symbolic B the largest), untuned the split decode default
(kernels/hc_sinkhorn/config.py: decode_config); every other call the tuned table's default, else the
kernel's per-GPU default.
`interpreter_substitutions()`: the same, on CPU tensors under TRITON_INTERPRET (tests only).
"""
from __future__ import annotations

import importlib

import torch

from torch.fx.experimental.symbolic_shapes import is_concrete_int

from ...kernels.hc_sinkhorn.config import decode_config, default_config
from ..registry import Substitution, register
from ._common import (KERNEL_PRIORITY, decode_entry_config, device_reason, interpreter_twin, kernel_files,
                      most_rows, register_kernel, table_config, target_gpu)

# registers torch.ops.dsv4_triton.hc_*
_kernel = importlib.import_module("...kernels.hc_sinkhorn.hc_sinkhorn", __package__)
_FILES = kernel_files("hc_sinkhorn/hc_sinkhorn.py", "hc_sinkhorn/config.py", "_jit_utils.py")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _sinkhorn_reason(logits, iters, eps, allow_cpu=False):
    reason = device_reason(logits, allow_cpu)
    if reason:
        return reason
    if logits.dtype not in _DTYPES:
        return f"logits are {logits.dtype}; needs float32 / bfloat16 / float16"
    if logits.dim() < 2 or not isinstance(logits.shape[-1], int) or logits.shape[-1] != logits.shape[-2]:
        return f"logits have shape {tuple(logits.shape)}; needs [..., n, n] with static n"
    return None


def _pre_reason(x, fn, scale, base, iters, norm_eps, hc_eps, allow_cpu=False):
    reason = device_reason(x, allow_cpu)
    if reason:
        return reason
    if x.dtype not in _DTYPES or any(t.dtype != torch.float32 for t in (fn, scale, base)):
        return f"x {x.dtype}, fn/scale/base {fn.dtype}/{scale.dtype}/{base.dtype}; needs float x and float32 weights"
    if x.dim() < 2 or not all(isinstance(s, int) for s in x.shape[-2:]):
        return f"x has shape {tuple(x.shape)}; needs [..., n, D] with static n, D"
    n, D = x.shape[-2:]
    W = (2 + n) * n
    if tuple(fn.shape) != (W, n * D) or tuple(scale.shape) != (3,) or tuple(base.shape) != (W,):
        return f"fn {tuple(fn.shape)} / scale {tuple(scale.shape)} / base {tuple(base.shape)} do not match n={n}, D={D}"
    return None


def _sinkhorn(logits, iters, eps, config: str = ""):
    return torch.ops.dsv4_triton.hc_sinkhorn(logits.contiguous(), iters, eps, config)


def _pre(x, fn, scale, base, iters, norm_eps, hc_eps, config: str = ""):
    return torch.ops.dsv4_triton.hc_pre(x.contiguous(), fn.contiguous(), scale.contiguous(), base.contiguous(),
                                        iters, norm_eps, hc_eps, config)


SINKHORN = register_kernel("hc_sinkhorn.triton", torch.ops.dsv4.hc_sinkhorn.default,
                           _sinkhorn, _sinkhorn_reason, default_config, _FILES)

def _pre_config(target, x, *rest):
    if x.dim() == 4 and is_concrete_int(x.shape[1]) and int(x.shape[1]) == 1:      # [B, 1, n, D]: decode
        rows = most_rows(x.shape[0]) or float("inf")                            # symbolic B: by its bound
        default = decode_config(target_gpu(target, x.device.type))
        return {"config": decode_entry_config(target.table, rows, default)}
    return table_config(target, default_config, x.device.type)


PRE = register(Substitution(
    name="hc_pre.triton", op=torch.ops.dsv4.hc_pre.default, replacement=_pre,
    applies=lambda target, *args: _pre_reason(*args), config=_pre_config,
    version="1", priority=KERNEL_PRIORITY, source_files=_FILES))


def interpreter_substitutions() -> list[Substitution]:
    return [interpreter_twin(SINKHORN, _sinkhorn_reason), interpreter_twin(PRE, _pre_reason)]
