"""Naive twin of the compress_kv kernel: Python loops over (batch, entry), per-channel two-pass softmax
over the block's token list in float64, RoPE / RMSNorm in float64, a Hadamard matrix (Sylvester), and
quantization by nearest-value search in the enumerated FP8 e4m3 / FP4 e2m1 grids with power-of-two
scales from frexp. Slow, for tests only; a different algorithm from both the kernel and the plain op,
so it agrees with them up to fp32 rounding before quantization (a rare code flip).
"""
from __future__ import annotations

import math

import torch


def _e4m3_grid() -> torch.Tensor:
    """All finite non-negative e4m3fn values, ascending, as float64 (index = code)."""
    vals = [m / 8 * 2.0 ** -6 for m in range(8)]
    vals += [(1 + m / 8) * 2.0 ** (e - 7) for e in range(1, 16) for m in range(8) if not (e == 15 and m == 7)]
    return torch.tensor(vals, dtype=torch.float64)


_E4M3 = _e4m3_grid()
_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)


def _pow2_scale(amax: float, qmax: float) -> float:
    """2^ceil(log2(max(amax, floor) / qmax)) in float32 arithmetic, computed with frexp; the floor is
    DeepSeek's: 1e-4 for FP8 (qmax 448), 6 * 2^-126 for FP4 (qmax 6)."""
    floor = 6.0 * 2.0 ** -126 if qmax == 6.0 else 1e-4
    s = float(torch.tensor(max(amax, floor), dtype=torch.float32) / torch.tensor(qmax, dtype=torch.float32))
    m, e = math.frexp(s)  # s = m * 2^e, m in [0.5, 1)
    return 2.0 ** (e - 1) if m == 0.5 else 2.0 ** e


def _nearest(grid: torch.Tensor, y: float) -> float:
    """The grid value nearest |y| (ties to the even index), with y's sign."""
    a = abs(y)
    dist = (grid - a).abs()
    best = dist.min()
    idx = [j for j in range(len(grid)) if dist[j] == best]
    j = idx[0] if len(idx) == 1 else next(j for j in idx if j % 2 == 0)
    return math.copysign(float(grid[j]), y)


def _quant_blocks(x: torch.Tensor, block: int, grid: torch.Tensor, qmax: float) -> torch.Tensor:
    out = torch.empty_like(x)
    for s0 in range(0, x.numel(), block):
        blk = x[s0:s0 + block]
        scale = _pow2_scale(float(blk.abs().max()), qmax)
        for j in range(blk.numel()):
            y = min(max(float(blk[j]) / scale, -qmax), qmax)
            out[s0 + j] = _nearest(grid, y) * scale
    return out


def _hadamard_matrix(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def compress_kv(kv, score, ape, norm_weight, cos, sin, ratio: int, overlap: bool, norm_eps: float,
                quant: str) -> torch.Tensor:
    """Same contract as the kernel's `compress_kv` (returns [B, N, d] float32 on kv's device)."""
    dev = kv.device
    kv, score, ape = kv.double().cpu(), score.double().cpu(), ape.double().cpu()
    w, cos, sin = norm_weight.double().cpu(), cos.double().cpu(), sin.double().cpu()
    B, T, C = kv.shape
    d = C // 2 if overlap else C
    N, R = cos.shape[-2], 2 * cos.shape[-1]
    out = torch.zeros(B, N, d, dtype=torch.float32)
    for b in range(B):
        for i in range(N):
            # (token, channel offset, ape row) of every row of this entry's softmax
            rows = []
            if overlap and i > 0:
                rows += [((i - 1) * ratio + j, 0, j) for j in range(ratio)]
            rows += [(i * ratio + j, d if overlap else 0, j) for j in range(ratio)]
            pooled = torch.zeros(d, dtype=torch.float64)
            for c in range(d):
                gates = [(score[b, t, off + c] + ape[j, off + c], kv[b, t, off + c])
                         for t, off, j in rows if t < T and score[b, t, off + c] != float("-inf")]
                if not gates:
                    continue
                top = max(float(g) for g, _ in gates)
                ws = [math.exp(float(g) - top) for g, _ in gates]
                pooled[c] = sum(wj * float(x) for wj, (_, x) in zip(ws, gates)) / sum(ws)
            y = pooled / math.sqrt(float(pooled.square().mean()) + norm_eps) * w
            cs = cos[b, i] if cos.dim() == 3 else cos[i]
            sn = sin[b, i] if sin.dim() == 3 else sin[i]
            for k in range(R // 2):
                p = d - R + 2 * k
                re, im = float(y[p]), float(y[p + 1])
                y[p], y[p + 1] = re * cs[k] - im * sn[k], re * sn[k] + im * cs[k]
            y = y.float()
            if quant == "fp8":
                res = torch.cat([_quant_blocks(y[:d - R].double(), 64, _E4M3, 448.0),
                                 y[d - R:].bfloat16().double()])
            else:
                hy = (_hadamard_matrix(d) @ y.double() / math.sqrt(d)).float().double()
                res = _quant_blocks(hy, 32, _E2M1, 6.0)
            out[b, i] = res.float()
    return out.to(dev)
