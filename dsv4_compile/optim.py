"""`dsv4_compile.Muon`: the plain Muon (model/muon.py, the reference) whose Newton-Schulz runs the
Triton kernel when a step is called eagerly on CUDA parameters.

Users call optimizers eagerly, outside `dsv4_compile.compile`, where the pass that swaps the plain
`torch.ops.dsv4.newton_schulz` for the kernel never runs. This subclass applies the same registered
substitution ("newton_schulz.triton": its predicate, its tuned config for this GPU, its replacement)
to each eager CUDA update. CPU parameters keep the plain op (the reference), and so do steps traced by
torch.compile, where the passes choose. Arguments, state and state dicts are the plain Muon's.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from .compile import resolve_gpu
from .model import Muon as PlainMuon
from .model import deepseek_v4_optimizer as plain_deepseek_v4_optimizer
from .passes.kernel_substitutions.newton_schulz import SUBSTITUTION as NEWTON_SCHULZ_KERNEL
from .passes.registry import Substitution, Target


@functools.cache
def kernel_target(gpu: str) -> Target:
    """The substitution's target on `gpu` ("H100", "H200", ...): that GPU's tuned table, if any."""
    from .tuning import config_source

    return Target(gpu=gpu, table=config_source(NEWTON_SCHULZ_KERNEL.name, gpu))


def newton_schulz_on_kernel(direction: Tensor, coefficients: list[float], target: Target,
                            substitution: Substitution = NEWTON_SCHULZ_KERNEL) -> Tensor | None:
    """The kernel's Newton-Schulz of `direction` [..., rows, cols] with `target`'s config, or None where
    the kernel does not apply (the substitution's predicate: device, dtype, coefficients). `substitution`:
    the registered one, or its interpreter twin (tests, CPU tensors)."""
    if substitution.applies(target, direction, coefficients) is not None:
        return None
    return substitution.replacement(direction, coefficients, **substitution.config(target, direction, coefficients))


class Muon(PlainMuon):
    __doc__ = PlainMuon.__doc__ + """
    Called eagerly on CUDA parameters, Newton-Schulz runs the Triton kernel with this GPU's tuned config
    (bf16 operands as the plain op; results agree to bf16 rounding, not bit for bit); elsewhere, and
    under torch.compile, it is the plain op.
    """

    def _newton_schulz(self, direction: Tensor, coefficients: list[float]) -> Tensor:
        if direction.is_cuda and not torch.compiler.is_compiling():
            out = newton_schulz_on_kernel(direction, coefficients, kernel_target(resolve_gpu("auto")))
            if out is not None:
                return out
        return super()._newton_schulz(direction, coefficients)


def deepseek_v4_optimizer(model: torch.nn.Module, lr: float, **kwargs):
    """The DeepSeek-V4 optimizer (model/muon.py `deepseek_v4_optimizer`, same arguments) with this
    module's Muon: the Triton Newton-Schulz for CUDA parameters."""
    return plain_deepseek_v4_optimizer(model, lr, muon_class=Muon, **kwargs)
