"""Naive twin of the indexer top-k kernel: slow, float64, obviously right, and a different algorithm
from model/ops.py (a loop over queries, each scoring only its visible keys, then one Python sort by
the key (NaN first, -score, index) instead of a stable descending tensor sort over masked scores).
Same signature as the kernel's public function. `radix_topk`: the twin of the radix select
(radix_topk.py), the same per-row rule on given scores."""
from __future__ import annotations

import math

import torch


def indexer_topk(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor,
                 ratio: int, topk: int, config=None) -> torch.Tensor:
    """q [B, S, H, d], weights [B, S, H], keys [B, N, d], positions [B, S] int64 -> [B, S, topk] int32."""
    B, S, H, _ = q.shape
    N = keys.shape[1]
    qd, wd, kd, pos = q.double().cpu(), weights.double().cpu(), keys.double().cpu(), positions.cpu()
    out = torch.full((B, S, topk), -1, dtype=torch.int32)
    for b in range(B):
        for s in range(S):
            n_visible = min(N, max(0, (int(pos[b, s]) + 1) // ratio))
            if n_visible == 0:
                continue
            dots = qd[b, s] @ kd[b, :n_visible].T                          # [H, n_visible]
            scores = (wd[b, s, :, None] * dots.clamp_min(0.0).where(~dots.isnan(), dots)).sum(0).tolist()
            out[b, s] = _best(scores, topk)
    return out.to(q.device)


def radix_topk(scores: torch.Tensor, lengths: torch.Tensor | None, k: int, config=None) -> torch.Tensor:
    """scores [R, N], lengths [R] or None -> [R, k] int32: each row's k best of keys [0, lengths[r])."""
    R, N = scores.shape
    rows = scores.double().cpu().tolist()
    out = torch.empty((R, k), dtype=torch.int32)
    for r in range(R):
        n = N if lengths is None else min(N, max(0, int(lengths[r])))
        out[r] = _best(rows[r][:n], k)
    return out.to(scores.device)


def _best(scores: list[float], k: int) -> torch.Tensor:
    """The indices of the k best scores (NaN first, then descending, ties to the lowest index; -0.0 ==
    +0.0 as Python compares them), -1 past the end -> [k] int32."""
    order = sorted(range(len(scores)), key=lambda n: (0, 0.0, n) if math.isnan(scores[n]) else (1, -scores[n], n))
    return torch.tensor((order[:k] + [-1] * k)[:k], dtype=torch.int32)
