"""Pass-framework registration: torch.ops.dsv4.float32_linear -> torch.ops.dsv4_triton.float32_linear
("float32_linear.triton"), the bf16-pieces float32 GEMM of kernels/float32_linear/.

Applies to CUDA tensors: x bfloat16 [..., K] against a float32 weight [N, K] (the compressors' wkv /
wgate and the MoE gate of a float32 checkpoint: cuBLAS runs those on CUDA cores). A 16-bit weight (the
head, a bf16 gate) is left to the plain op's 16-bit GEMM with its float32 accumulator, and a float32 x
to cuBLAS (its products are not exact over bf16 pieces of W alone). The config follows the row count
M (x's leading dims): up to SMALL_M rows (decode; a symbolic M by its bound, as an exported decode
engine's B <= max_batch) the tuned decode entry by batch, else the few-rows default with K split for
the weight's shape; more rows the tuned prefill table by row count, else the large-M default.
`interpreter_substitutions()`: the same on CPU tensors under TRITON_INTERPRET (tests only).
"""
from __future__ import annotations

import importlib

import torch

from ...kernels.float32_linear.config import SMALL_M, default_config
from ..registry import Substitution, register
from ._common import (KERNEL_PRIORITY, config_string, decode_entry_config, device_reason, interpreter_twin,
                      kernel_files, most_rows, static_rows, target_gpu)

# registers torch.ops.dsv4_triton.float32_linear
_kernel = importlib.import_module("...kernels.float32_linear.float32_linear", __package__)
_FILES = kernel_files("float32_linear/float32_linear.py", "float32_linear/config.py", "_jit_utils.py")


def _reason(x, weight, allow_cpu=False):
    reason = device_reason(x, allow_cpu)
    if reason:
        return reason
    if x.dtype != torch.bfloat16:
        return f"x is {x.dtype}; needs bfloat16 (its products with W's bf16 pieces are exact)"
    if weight.dtype != torch.float32:
        return f"weight is {weight.dtype}; needs float32 (a 16-bit weight's GEMM writes float32 already)"
    return None


def _config(target, x, weight) -> dict:
    n, k = (d if isinstance(d, int) else None for d in weight.shape)
    gpu = target_gpu(target, x.device.type)
    most = most_rows(*x.shape[:-1])   # a symbolic M's bound: an exported decode engine's B <= max_batch
    if most is not None and most <= SMALL_M:
        return {"config": decode_entry_config(target.table, most, default_config(gpu, most, n, k))}
    m = static_rows(x)
    return {"config": config_string(target.table, m, default_config(gpu, m, n, k))}


def _replacement(x, weight, config: str = ""):
    return torch.ops.dsv4_triton.float32_linear(x.contiguous(), weight.contiguous(), config)


SUBSTITUTION = register(Substitution(
    name="float32_linear.triton", op=torch.ops.dsv4.float32_linear.default, replacement=_replacement,
    applies=lambda target, *args: _reason(*args), config=_config, version="1", priority=KERNEL_PRIORITY,
    source_files=_FILES))


def interpreter_substitutions() -> list[Substitution]:
    return [interpreter_twin(SUBSTITUTION, _reason)]
