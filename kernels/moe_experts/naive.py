"""Naive twin of the grouped-expert kernel: a Python loop over experts, each taking its rows with a
boolean mask, float32 matmuls, the weights dequantized by model/weight_formats. It rounds where the
kernel rounds (the SwiGLU activation to x's dtype, before w2; the routing weight on w2's fp32 product)
and sums a token's k contributions in slot order. Same signature as the kernel's public function
(config ignored)."""
from __future__ import annotations

import torch

from ...model.moe_ops import swiglu
from ...model.weight_formats import dequantize_fp8_weight, dequantize_mxfp4


def moe_experts(x, topk_ids, topk_weights, w1, w2, w3, swiglu_limit, config=None, weight_format="float", scales=None):
    """x [T, D], topk_ids [T, k], topk_weights [T, k], expert weights as the kernel takes them -> [T, D] float32."""
    if weight_format == "fp8":
        w1, w2, w3 = (dequantize_fp8_weight(w, s) for w, s in zip((w1, w2, w3), scales))
    elif weight_format == "mxfp4":
        w1, w2, w3 = (dequantize_mxfp4(w, s) for w, s in zip((w1, w2, w3), scales))
    T, k = topk_ids.shape
    E = w1.shape[0]
    xf = x.float()
    out = torch.zeros(T, x.shape[1], dtype=torch.float32)
    for j in range(k):
        for e in range(E):
            rows = topk_ids[:, j] == e
            if not rows.any():
                continue
            act = swiglu(xf[rows] @ w1[e].float().T, xf[rows] @ w3[e].float().T, swiglu_limit)
            act = act.to(x.dtype).float()
            out[rows] += (act @ w2[e].float().T) * topk_weights[rows, j].unsqueeze(-1)
    return out
