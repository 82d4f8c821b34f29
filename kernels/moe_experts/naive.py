"""Naive twin of the grouped-expert kernel: a Python loop over experts, each taking its rows with a
boolean mask, float32 matmuls, the weights dequantized by model/weight_formats. It rounds where the
kernel rounds (the SwiGLU activation to x's dtype, before w2; the routing weight on w2's fp32 product)
and sums a token's k contributions in slot order. W8A8 (config act="fp8", FP8 weights): x and the fp32
SwiGLU activation quantized to e4m3 per row and 128-block with power-of-two scales and dequantized by
kernels/fp8_quantize's naive twin (a table search, not the kernels' bit arithmetic), the rest in float32
as above. Same signature as the kernel's public function (of config, only act is read); runs on x's
device."""
from __future__ import annotations

import torch

from ...model.moe_ops import swiglu
from ...model.weight_formats import dequantize_fp8_weight, dequantize_mxfp4
from ..fp8_quantize import naive as fp8_naive
from .config import ACT_BLOCK, MoeExpertsConfig


def fp8_act(a: torch.Tensor) -> torch.Tensor:
    """a [n, K] -> float32 [n, K] on a's device: fp8_quantize(a, 128, pow2=True), dequantized."""
    codes, scale = fp8_naive.fp8_quantize(a, ACT_BLOCK, True)
    return fp8_naive.fp8_dequantize(codes, scale, ACT_BLOCK).to(a.device)


def _act(config) -> str:
    if isinstance(config, MoeExpertsConfig):
        return config.act
    if isinstance(config, str):
        return MoeExpertsConfig.from_str(config).act
    return (config or {}).get("act", "x")


def moe_experts(x, topk_ids, topk_weights, w1, w2, w3, swiglu_limit, config=None, weight_format="float", scales=None):
    """x [T, D], topk_ids [T, k], topk_weights [T, k], expert weights as the kernel takes them -> [T, D] float32."""
    w8a8 = _act(config) == "fp8"
    if w8a8 and weight_format != "fp8":
        raise ValueError(f"act='fp8' needs FP8 expert weights; got {weight_format!r}")
    if weight_format == "fp8":
        w1, w2, w3 = (dequantize_fp8_weight(w, s) for w, s in zip((w1, w2, w3), scales))
    elif weight_format == "mxfp4":
        w1, w2, w3 = (dequantize_mxfp4(w, s) for w, s in zip((w1, w2, w3), scales))
    T, k = topk_ids.shape
    E = w1.shape[0]
    xf = fp8_act(x) if w8a8 else x.float()
    out = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)
    for j in range(k):
        for e in range(E):
            rows = topk_ids[:, j] == e
            if not rows.any():
                continue
            act = swiglu(xf[rows] @ w1[e].float().T, xf[rows] @ w3[e].float().T, swiglu_limit)
            act = fp8_act(act) if w8a8 else act.to(x.dtype).float()
            out[rows] += (act @ w2[e].float().T) * topk_weights[rows, j].unsqueeze(-1)
    return out
