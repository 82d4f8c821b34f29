"""Pass-framework registration: torch.ops.dsv4.fp8_quantize / fp8_dequantize ->
torch.ops.dsv4_triton.fp8_quantize / fp8_dequantize ("fp8_quantize.triton", "fp8_dequantize.triton").

Applies to CUDA tensors: quantize x float32 / bfloat16 / float16 with block_size dividing the last
dim; dequantize float8_e4m3fn codes with float32 scales of the matching shape. Otherwise the node is
left to the decomposition, with the reason. `interpreter_substitutions()`: the same, on CPU tensors
under TRITON_INTERPRET (tests only).
"""
from __future__ import annotations

import importlib

import torch

from ...kernels.fp8_quantize.config import default_config
from ..registry import Substitution
from ._common import device_reason, interpreter_twin, kernel_files, register_kernel

# registers torch.ops.dsv4_triton.fp8_*
_kernel = importlib.import_module("...kernels.fp8_quantize.fp8_quantize", __package__)
_FILES = kernel_files("fp8_quantize/fp8_quantize.py", "fp8_quantize/config.py", "_jit_utils.py")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _quantize_reason(x, block_size, pow2_scale, allow_cpu=False):
    reason = device_reason(x, allow_cpu)
    if reason:
        return reason
    if x.dtype not in _DTYPES:
        return f"x is {x.dtype}; needs float32 / bfloat16 / float16"
    D = x.shape[-1] if x.dim() else 0
    if not isinstance(D, int) or block_size < 1 or D % block_size:
        return f"last dim {D} is not a static multiple of block_size {block_size}"
    return None


def _dequantize_reason(x_fp8, scale, block_size, allow_cpu=False):
    reason = device_reason(x_fp8, allow_cpu)
    if reason:
        return reason
    if x_fp8.dtype != torch.float8_e4m3fn or scale.dtype != torch.float32:
        return f"codes {x_fp8.dtype} / scale {scale.dtype}; needs float8_e4m3fn / float32"
    D = x_fp8.shape[-1] if x_fp8.dim() else 0
    if not isinstance(D, int) or block_size < 1 or D % block_size or tuple(scale.shape) != (*x_fp8.shape[:-1], D // block_size):
        return f"codes {tuple(x_fp8.shape)} / scale {tuple(scale.shape)} do not match block_size {block_size}"
    return None


def _quantize(x, block_size, pow2_scale, config: str = ""):
    return torch.ops.dsv4_triton.fp8_quantize(x.contiguous(), block_size, pow2_scale, config)


def _dequantize(x_fp8, scale, block_size, config: str = ""):
    return torch.ops.dsv4_triton.fp8_dequantize(x_fp8.contiguous(), scale.contiguous(), block_size, config)


QUANTIZE = register_kernel("fp8_quantize.triton", torch.ops.dsv4.fp8_quantize.default,
                           _quantize, _quantize_reason, default_config, _FILES)

DEQUANTIZE = register_kernel("fp8_dequantize.triton", torch.ops.dsv4.fp8_dequantize.default,
                             _dequantize, _dequantize_reason, default_config, _FILES)


def interpreter_substitutions() -> list[Substitution]:
    return [interpreter_twin(QUANTIZE, _quantize_reason), interpreter_twin(DEQUANTIZE, _dequantize_reason)]
