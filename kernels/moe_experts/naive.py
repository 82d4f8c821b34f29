"""Naive twin of the grouped-expert kernel: a Python loop over experts, each taking its (token, slot)
pairs, float32 matmuls, the weights dequantized by model/weight_formats one expert at a time. It
rounds where the kernel rounds (the SwiGLU activation to x's dtype, before w2; the routing weight on
w2's fp32 product) and sums a token's k contributions in slot order. W8A8 / W4A8 (act="fp8", the
moe_experts_fp8_w8a8 / moe_experts_mxfp4_w4a8 ops, FP8 / MXFP4 weights): x and the fp32 SwiGLU activation times its routing weight
quantized to e4m3 per row and 128-block with power-of-two scales and dequantized by kernels/fp8_quantize's
naive twin (a table search, not the kernels' bit arithmetic), the rest in float32 as above. Same
signature as the kernel's public function (config is not read); runs on x's device."""
from __future__ import annotations

import torch

from ...model.moe_ops import swiglu
from ...model.weight_formats import dequantize_fp8_weight, dequantize_mxfp4
from ..fp8_quantize import naive as fp8_naive
from .config import ACT_BLOCK


def fp8_act(a: torch.Tensor) -> torch.Tensor:
    """a [n, K] -> float32 [n, K] on a's device: fp8_quantize(a, 128, pow2=True), dequantized."""
    codes, scale = fp8_naive.fp8_quantize(a, ACT_BLOCK, True)
    return fp8_naive.fp8_dequantize(codes, scale, ACT_BLOCK).to(a.device)


def moe_experts(x, topk_ids, topk_weights, w1, w2, w3, swiglu_limit, config=None, weight_format="float", scales=None,
                act="x"):
    """x [T, D], topk_ids [T, k], topk_weights [T, k], expert weights as the kernel takes them -> [T, D] float32."""
    w8a8 = act == "fp8"
    if w8a8 and weight_format not in ("fp8", "mxfp4"):
        raise ValueError(f"act='fp8' needs FP8 or MXFP4 expert weights; got {weight_format!r}")
    decode = {"fp8": dequantize_fp8_weight, "mxfp4": dequantize_mxfp4}.get(weight_format)

    def expert(e):  # one expert's weights in float32, dequantized when used (V4-Flash's 256 at once: 26 GB)
        if decode is None:
            return tuple(w[e].float() for w in (w1, w2, w3))
        return tuple(decode(w[e], s[e]).float() for w, s in zip((w1, w2, w3), scales))

    T, k = topk_ids.shape
    xf = fp8_act(x) if w8a8 else x.float()
    slots = torch.zeros(T, k, x.shape[1], dtype=torch.float32, device=x.device)   # [T, k, D]; -1 ids stay 0
    for e in range(w1.shape[0]):
        t, j = (topk_ids == e).nonzero(as_tuple=True)
        if not t.numel():
            continue
        e1, e2, e3 = expert(e)
        h = swiglu(xf[t] @ e1.T, xf[t] @ e3.T, swiglu_limit)
        w = topk_weights[t, j].unsqueeze(-1)
        slots[t, j] = fp8_act(h * w) @ e2.T if w8a8 else (h.to(x.dtype).float() @ e2.T) * w
    out = torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device)
    for j in range(k):  # a token's contributions in slot order
        out += slots[:, j]
    return out
