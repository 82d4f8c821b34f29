"""Naive twins of the mHC kernels: slow, float32, obviously right, written differently from
model/ops.py (explicit loops over rows, columns and streams; the mixes as a sum of per-stream
products; sigmoid as 1 / (1 + exp(-z)); softmax via exp(z - max) / sum). Same signatures as the
kernels' public functions (config ignored)."""
from __future__ import annotations

import torch


def hc_sinkhorn(logits: torch.Tensor, iters: int, eps: float, config=None) -> torch.Tensor:
    """logits [..., n, n] -> [..., n, n] float32."""
    n = logits.shape[-1]
    z = logits.float()
    e = torch.exp(z - z.max(-1, keepdim=True).values)
    # A NaN anywhere in a row makes its softmax NaN (max() above may or may not have kept it).
    e = torch.where(torch.isnan(z).any(-1, keepdim=True), torch.full_like(e, float("nan")), e)
    c = e / e.sum(-1, keepdim=True) + eps
    rows = [c[..., i, :] for i in range(n)]                                  # each [..., n]

    def normalise_columns(rows):
        col = [sum(rows[i][..., j] for i in range(n)) + eps for j in range(n)]
        return [torch.stack([rows[i][..., j] / col[j] for j in range(n)], -1) for i in range(n)]

    def normalise_rows(rows):
        return [r / (r.sum(-1, keepdim=True) + eps) for r in rows]

    rows = normalise_columns(rows)
    for _ in range(iters - 1):
        rows = normalise_columns(normalise_rows(rows))
    return torch.stack(rows, -2)


def hc_pre(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, iters: int,
           norm_eps: float, hc_eps: float, config=None):
    """x [..., n, D] -> (y [..., D] in x's dtype, post [..., n] float32, comb [..., n, n] float32)."""
    n, D = x.shape[-2:]
    xf = x.float()
    fn, scale, base = fn.float(), scale.float(), base.float()
    # mixes = sum over streams i of x_i @ fn[:, i D:(i+1) D]^T; mean square = sum_i |x_i|^2 / (n D)
    mixes = sum(xf[..., i, :] @ fn[:, i * D:(i + 1) * D].T for i in range(n))
    mean_sq = sum(xf[..., i, :].square().sum(-1) for i in range(n)) / (n * D)
    mixes = mixes / torch.sqrt(mean_sq + norm_eps).unsqueeze(-1)
    z_pre = mixes[..., :n] * scale[0] + base[:n]
    z_post = mixes[..., n:2 * n] * scale[1] + base[n:2 * n]
    z_comb = mixes[..., 2 * n:] * scale[2] + base[2 * n:]
    pre = 1.0 / (1.0 + torch.exp(-z_pre)) + hc_eps
    post = 2.0 / (1.0 + torch.exp(-z_post))
    comb = hc_sinkhorn(z_comb.unflatten(-1, (n, n)), iters, hc_eps)
    y = sum(pre[..., i:i + 1] * xf[..., i, :] for i in range(n))
    return y.to(x.dtype), post, comb
