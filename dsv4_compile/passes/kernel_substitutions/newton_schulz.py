"""Pass-framework registration: torch.ops.dsv4.newton_schulz -> torch.ops.dsv4_triton.newton_schulz
("newton_schulz.triton").

Applies to CUDA tensors G [..., M, N] float32 / bfloat16 / float16 with static M, N and one (a, b, c)
triple per step. The result matches the plain op to bf16 accuracy (relative RMS ~1e-2), not bit for
bit. `interpreter_substitutions()`: the same, on CPU tensors under TRITON_INTERPRET (tests only).
"""
from __future__ import annotations

import importlib

import torch

from ...kernels.newton_schulz.config import default_config
from ..registry import Substitution
from ._common import device_reason, interpreter_twin, kernel_files, register_kernel

# registers torch.ops.dsv4_triton.newton_schulz
_kernel = importlib.import_module("...kernels.newton_schulz.newton_schulz", __package__)
_FILES = kernel_files("newton_schulz/newton_schulz.py", "newton_schulz/config.py", "_jit_utils.py")


def _reason(G, coefficients, allow_cpu=False):
    reason = device_reason(G, allow_cpu)
    if reason:
        return reason
    if G.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"G is {G.dtype}; needs float32 / bfloat16 / float16"
    if G.dim() < 2 or not all(isinstance(s, int) for s in G.shape[-2:]):
        return f"G has shape {tuple(G.shape)}; needs [..., M, N] with static M, N"
    if not coefficients or len(coefficients) % 3:
        return f"{len(coefficients)} coefficients; needs one (a, b, c) triple per step"
    return None


def _replacement(G, coefficients, config: str = ""):
    return torch.ops.dsv4_triton.newton_schulz(G.contiguous(), coefficients, config)


SUBSTITUTION = register_kernel("newton_schulz.triton", torch.ops.dsv4.newton_schulz.default,
                               _replacement, _reason, default_config, _FILES)


def interpreter_substitutions() -> list[Substitution]:
    return [interpreter_twin(SUBSTITUTION, _reason)]
