"""Naive twin of the FP8 linear kernel: slow, float64, obviously right, and a different algorithm
from model/ops.py (per row and 128-block: the scale from frexp, each element rounded to the nearest
e4m3 value by a table search, ties to the even code; then a float64 product per (row, column))."""
from __future__ import annotations

import math

import torch

BLOCK = 128


def e4m3_table() -> torch.Tensor:
    """The 127 finite non-negative e4m3fn values, ascending (index = code)."""
    return torch.tensor([m / 8 * 2.0 ** -6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
                         for e in range(16) for m in range(8) if (e, m) != (15, 7)], dtype=torch.float64)


def _round_e4m3(y: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """float64 y (|y| <= 448) -> nearest e4m3 value, ties to the even code."""
    mag = y.abs().unsqueeze(-1)
    dist = (mag - table).abs()
    best = dist.min(-1, keepdim=True).values
    is_best = dist == best
    even = is_best & (torch.arange(len(table)) % 2 == 0)
    idx = torch.where(even.any(-1), even.double().argmax(-1), is_best.double().argmax(-1))
    return table[idx] * torch.sign(y)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, config=None) -> torch.Tensor:
    """x [..., K], weight [N, K] float8_e4m3fn, scale [ceil(N/128), K/128] -> [..., N] in x's dtype (CPU)."""
    k = x.shape[-1]
    if k % BLOCK:
        raise ValueError(f"K {k} is not a multiple of {BLOCK}")
    table = e4m3_table()
    rows = x.detach().cpu().double().reshape(-1, k)
    xq = torch.empty_like(rows)
    for b in range(0, k, BLOCK):
        blk = rows[:, b:b + BLOCK]
        amax = blk.abs().amax(-1).clamp_min(torch.tensor(1e-4).float().item()).float()
        s = torch.tensor([2.0 ** (math.frexp(v)[1] - (math.frexp(v)[0] == 0.5)) for v in (amax / 448.0).tolist()],
                         dtype=torch.float64)
        xq[:, b:b + BLOCK] = _round_e4m3((blk / s[:, None]).clamp(-448, 448), table) * s[:, None]
    n = weight.shape[0]
    w = weight.cpu().double() * scale.cpu().double().repeat_interleave(BLOCK, 0)[:n].repeat_interleave(BLOCK, 1)[:, :k]
    return (xq @ w.T).reshape(*x.shape[:-1], n).to(x.dtype)
