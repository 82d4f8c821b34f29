"""Pass-framework registration: torch.ops.dsv4.fp4_quantize / fp4_dequantize ->
torch.ops.dsv4_triton.fp4_quantize / fp4_dequantize ("fp4_quantize.triton", "fp4_dequantize.triton").

Applies to CUDA tensors: quantize x float32 / bfloat16 / float16 with an even block_size dividing
the last dim; dequantize uint8 packed codes with float32 scales of the matching shape. Otherwise the
node is left to the decomposition, with the reason. `interpreter_substitutions()`: the same, on CPU
tensors under TRITON_INTERPRET (tests only).
"""
from __future__ import annotations

import importlib

import torch

from ...kernels.fp4_quantize.config import default_config
from ..registry import Substitution
from ._common import device_reason, interpreter_twin, kernel_files, register_kernel

# registers torch.ops.dsv4_triton.fp4_*
_kernel = importlib.import_module("...kernels.fp4_quantize.fp4_quantize", __package__)
_FILES = kernel_files("fp4_quantize/fp4_quantize.py", "fp4_quantize/config.py", "_jit_utils.py")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _quantize_reason(x, block_size, pow2_scale=False, allow_cpu=False):
    reason = device_reason(x, allow_cpu)
    if reason:
        return reason
    if x.dtype not in _DTYPES:
        return f"x is {x.dtype}; needs float32 / bfloat16 / float16"
    D = x.shape[-1] if x.dim() else 0
    if not isinstance(D, int) or block_size < 2 or block_size % 2 or D % block_size:
        return f"last dim {D} is not a static multiple of an even block_size ({block_size})"
    return None


def _dequantize_reason(packed, scale, block_size, allow_cpu=False):
    reason = device_reason(packed, allow_cpu)
    if reason:
        return reason
    if packed.dtype != torch.uint8 or scale.dtype != torch.float32:
        return f"packed {packed.dtype} / scale {scale.dtype}; needs uint8 / float32"
    D = 2 * packed.shape[-1] if packed.dim() else 0
    if not isinstance(D, int) or block_size < 2 or block_size % 2 or D % block_size \
            or tuple(scale.shape) != (*packed.shape[:-1], D // block_size):
        return f"packed {tuple(packed.shape)} / scale {tuple(scale.shape)} do not match block_size {block_size}"
    return None


def _quantize(x, block_size, pow2_scale=False, config: str = ""):
    return torch.ops.dsv4_triton.fp4_quantize(x.contiguous(), block_size, pow2_scale, config)


def _dequantize(packed, scale, block_size, config: str = ""):
    return torch.ops.dsv4_triton.fp4_dequantize(packed.contiguous(), scale.contiguous(), block_size, config)


QUANTIZE = register_kernel("fp4_quantize.triton", torch.ops.dsv4.fp4_quantize.default,
                           _quantize, _quantize_reason, default_config, _FILES)

DEQUANTIZE = register_kernel("fp4_dequantize.triton", torch.ops.dsv4.fp4_dequantize.default,
                             _dequantize, _dequantize_reason, default_config, _FILES)


def interpreter_substitutions() -> list[Substitution]:
    return [interpreter_twin(QUANTIZE, _quantize_reason), interpreter_twin(DEQUANTIZE, _dequantize_reason)]
