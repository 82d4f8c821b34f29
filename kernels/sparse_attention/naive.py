"""Naive twin of the sparse attention kernel: slow, float64, obviously right, and a different
algorithm from model/ops.py (a loop over tokens; the sink is one more logit column whose probability
is dropped after an ordinary softmax; -1 holes are skipped, not masked). Same signature as the
kernel's public function."""
from __future__ import annotations

import torch


def sparse_attention(q: torch.Tensor, kv: torch.Tensor, attn_sink: torch.Tensor, topk_idxs: torch.Tensor,
                     softmax_scale: float, config=None) -> torch.Tensor:
    """q [B, S, H, D], kv [B, N, D], attn_sink [H], topk_idxs [B, S, K] -> [B, S, H, D] in q's dtype."""
    B, S, H, D = q.shape
    out = torch.zeros(B, S, H, D, dtype=torch.float64)
    qd, kvd, sink = q.double().cpu(), kv.double().cpu(), attn_sink.double().cpu()
    idx = topk_idxs.cpu()
    for b in range(B):
        for s in range(S):
            sel = [int(j) for j in idx[b, s] if j >= 0]
            if not sel:
                continue                                   # no entries: zeros, whatever the sink
            rows = kvd[b, sel]                              # [k, D]
            logits = softmax_scale * qd[b, s] @ rows.T      # [H, k]
            probs = torch.softmax(torch.cat([logits, sink[:, None]], dim=1), dim=1)[:, :-1]
            out[b, s] = probs @ rows
    return out.to(q.dtype).to(q.device)
