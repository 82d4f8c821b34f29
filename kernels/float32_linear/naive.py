"""Naive twin of the float32 linear kernel: slow, float64, obviously right, and a different algorithm
from model/ops.py (a float64 product per (row, column), rounded to float32 once)."""
from __future__ import annotations

import torch


def float32_linear(x: torch.Tensor, weight: torch.Tensor, config=None) -> torch.Tensor:
    """x [..., K], weight [N, K] -> [..., N] float32 (CPU)."""
    rows = x.detach().cpu().double().reshape(-1, x.shape[-1])
    y = (rows.unsqueeze(1) * weight.detach().cpu().double().unsqueeze(0)).sum(-1)    # [M, N] float64
    return y.reshape(*x.shape[:-1], weight.shape[0]).float()
