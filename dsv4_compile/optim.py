"""`dsv4_compile.Muon`: the plain Muon (model/muon.py, the reference) whose steps run the Triton
Newton-Schulz when called eagerly on CUDA parameters.

Users call optimizers eagerly, outside `dsv4_compile.compile`, where the pass that swaps the plain
`torch.ops.dsv4.newton_schulz` for the kernel never runs. This subclass applies the same registered
substitution ("newton_schulz.triton": its predicate, its tuned config for this GPU) to each eager CUDA
update: a float32 parameter's whole step runs as the kernel's `fused_muon_step` (the momentum in the
norm's first pass, the update in the last product's epilogue: the step's elementwise passes cost as
much memory traffic as Newton-Schulz's own at an MoE layer's expert stacks), other CUDA parameters
get the kernel's Newton-Schulz between the plain momentum and update. CPU parameters keep the plain op
(the reference), and so do steps traced by torch.compile, where the passes choose. Arguments, state
and state dicts are the plain Muon's.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from .compile import resolve_gpu
from .kernels.newton_schulz import fused_muon_step
from .model import Muon as PlainMuon
from .model import deepseek_v4_optimizer as plain_deepseek_v4_optimizer
from .model.muon import adjusted_lr, flat_ns_coefficients
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


def muon_step_on_kernel(param: Tensor, grad: Tensor, momentum_buffer: Tensor, coefficients: list[float], *,
                        momentum: float, nesterov: bool, decay: float, alpha: float, target: Target,
                        substitution: Substitution = NEWTON_SCHULZ_KERNEL) -> bool:
    """Muon's step of one parameter in place as the kernel's `fused_muon_step` with `target`'s config
    (param <- param * decay + alpha * NS(U), the buffer advanced); False, nothing touched, where it does
    not apply: the substitution's predicate on `grad`, or a tensor that is not float32 and contiguous."""
    if not all(t.dtype == torch.float32 and t.is_contiguous() and t.shape == param.shape
               for t in (param, grad, momentum_buffer)):
        return False
    if substitution.applies(target, grad, coefficients) is not None:
        return False
    fused_muon_step(param, grad, momentum_buffer, coefficients, momentum=momentum, nesterov=nesterov, decay=decay,
                    alpha=alpha, **substitution.config(target, grad, coefficients))
    return True


class Muon(PlainMuon):
    __doc__ = PlainMuon.__doc__ + """
    Called eagerly on CUDA parameters, a step runs the Triton kernels with this GPU's tuned config: a
    float32 parameter's whole step fused (momentum, Newton-Schulz, update), others Newton-Schulz only
    (bf16 operands as the plain op; results agree to bf16 rounding, not bit for bit); elsewhere, and
    under torch.compile, it is the plain op.
    """

    def _step_group(self, params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], group) -> None:
        if torch.compiler.is_compiling() or not any(p.is_cuda for p in params):
            return super()._step_group(params, grads, momentum_buffers, group)
        lr = float(group["lr"])
        coefficients = flat_ns_coefficients(group["ns_coefficients"], group["ns_steps"])
        target = kernel_target(resolve_gpu("auto"))
        rest = []
        for p, g, buf in zip(params, grads, momentum_buffers, strict=True):
            if not (p.is_cuda and muon_step_on_kernel(
                    p, g, buf, coefficients, momentum=group["momentum"], nesterov=group["nesterov"],
                    decay=1 - lr * group["weight_decay"], alpha=-adjusted_lr(lr, group["adjust_lr_fn"], p.shape),
                    target=target)):
                rest.append((p, g, buf))
        if rest:
            super()._step_group(*(list(column) for column in zip(*rest)), group)

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
