"""Pass-framework registration: torch.ops.dsv4.compress_kv -> torch.ops.dsv4_triton.compress_kv
("compress_kv.triton").

Applies to CUDA tensors with the kernel's constraints (float kv/score, float32 ape / norm_weight /
cos / sin, d <= 1024, static shapes; fp8: (d - R) % 64 == 0; hadamard_fp4: d a power of two, multiple
of 32). Otherwise the node is left to the decomposition, with the reason. `interpreter_substitution()`:
the same, on CPU tensors under TRITON_INTERPRET (tests only, never registered).
"""
from __future__ import annotations

import importlib

import torch

from ...kernels.compress_kv.config import default_config
from ..registry import Substitution
from ._common import device_reason, interpreter_twin, kernel_files, register_kernel

# registers torch.ops.dsv4_triton.compress_kv
_kernel = importlib.import_module("...kernels.compress_kv.compress_kv", __package__)
_FILES = kernel_files("compress_kv/compress_kv.py", "compress_kv/config.py", "_jit_utils.py", "fp4_quantize/fp4_quantize.py")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _reason(kv, score, ape, norm_weight, cos, sin, ratio, overlap, norm_eps, quant, allow_cpu=False):
    reason = device_reason(kv, allow_cpu)
    if reason:
        return reason
    if kv.dtype not in _DTYPES or score.dtype not in _DTYPES:
        return f"kv {kv.dtype} / score {score.dtype}; needs float32 / bfloat16 / float16"
    if any(t.dtype != torch.float32 for t in (ape, norm_weight, cos, sin)):
        return "ape / norm_weight / cos / sin must be float32"
    if quant not in _kernel.QUANTS:
        return f"quant {quant!r} unknown"
    C, R = kv.shape[-1], 2 * cos.shape[-1] if cos.dim() else 0
    if not isinstance(C, int) or not isinstance(R, int) or (overlap and C % 2):
        return f"channels {C} / rope dims {R} not static (or odd C with overlap)"
    d = C // 2 if overlap else C
    if not 1 <= d <= _kernel.MAX_DIM or not 2 <= R <= d:
        return f"d = {d} (rope {R}) outside the kernel's range (d <= {_kernel.MAX_DIM}, 2 <= R <= d)"
    if quant == "fp8" and (d - R) % 64:
        return f"fp8 needs d - R = {d - R} to be a multiple of 64"
    if quant == "hadamard_fp4" and (d % 32 or d & (d - 1)):
        return f"hadamard_fp4 needs d = {d} to be a power of two and a multiple of 32"
    if cos.dim() not in (2, 3) or tuple(sin.shape) != tuple(cos.shape):
        return f"cos {tuple(cos.shape)} / sin {tuple(sin.shape)}: need [N, R/2] or [B, N, R/2], equal"
    return None


def _replacement(kv, score, ape, norm_weight, cos, sin, ratio, overlap, norm_eps, quant, config: str = ""):
    return torch.ops.dsv4_triton.compress_kv(kv.contiguous(), score.contiguous(), ape.contiguous(),
                                             norm_weight.contiguous(), cos.contiguous(), sin.contiguous(),
                                             ratio, overlap, norm_eps, quant, config)


SUBSTITUTION = register_kernel("compress_kv.triton", torch.ops.dsv4.compress_kv.default,
                               _replacement, _reason, default_config, _FILES)


def interpreter_substitution() -> Substitution:
    """The same substitution, also applying to CPU tensors under TRITON_INTERPRET (tests only)."""
    return interpreter_twin(SUBSTITUTION, _reason)
