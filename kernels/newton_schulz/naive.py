"""Naive twin of the Newton-Schulz kernel: slow, float32 throughout (no bf16 rounding), one matrix at
a time, and a different association from model/ops.py: X <- a X + b (A X) + c (A (A X)), never
forming A A. Same signatures as the kernel's public functions (config ignored).

It is the exact-arithmetic target that both bf16 implementations approximate: compare them to it
with bf16 tolerances, not bit for bit."""
from __future__ import annotations

import torch


def newton_schulz(G: torch.Tensor, coefficients: list[float], config=None) -> torch.Tensor:
    """G [..., M, N] -> [..., M, N] in G's dtype; coefficients flat (a, b, c) per step."""
    if len(coefficients) % 3 or not coefficients:
        raise ValueError(f"need one (a, b, c) triple per step, got {len(coefficients)} values")
    *lead, M, N = G.shape
    mats = G.float().reshape(-1, M, N)
    out = torch.empty_like(mats)
    for idx in range(mats.shape[0]):
        X = mats[idx]
        X = X / (X.square().sum().sqrt() + 1e-7)
        if M > N:
            X = X.T
        for step in range(len(coefficients) // 3):
            a, b, c = coefficients[3 * step: 3 * step + 3]
            A = X @ X.T
            AX = A @ X
            X = a * X + b * AX + c * (A @ AX)
        out[idx] = X.T if M > N else X
    return out.reshape(G.shape).to(G.dtype)


def fused_muon_step(param: torch.Tensor, grad: torch.Tensor, momentum_buffer: torch.Tensor, coefficients: list[float],
                    *, momentum: float, nesterov: bool, decay: float, alpha: float, config=None) -> None:
    """Muon's step of `param` in place (the kernel's `fused_muon_step` signature), unfused, with the fp32
    Newton-Schulz above: momentum_buffer <- lerp(buf, grad, 1 - momentum); U = lerp(grad, buf, momentum)
    or buf; param <- param * decay + alpha * NS(U)."""
    momentum_buffer.lerp_(grad, 1 - momentum)
    direction = grad.lerp(momentum_buffer, momentum) if nesterov else momentum_buffer
    param.mul_(decay).add_(newton_schulz(direction, coefficients), alpha=alpha)
