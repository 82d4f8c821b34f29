"""DeepSeek-MoE: sqrt-softplus scores, bias-based selection (or a fixed hash table in the first
layers), weights from the unbiased scores, clamped SwiGLU experts and one shared expert.

The routed experts are one op, `torch.ops.dsv4.moe_experts` (model/moe_ops.py; `_fp8`, `_fp8_w8a8`,
`_mxfp4`, `_mxfp4_w4a8` for the weights as shipped: FP8Experts, MXFP4Experts, both ShippedExperts):
tokens grouped by expert with static shapes, so it exports; DeepSeek's per-expert loop (`bincount().tolist()`) would split the graph per
expert on data-dependent sizes.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import float32_product
from .moe_ops import swiglu
from .ops import FP8_LINEAR_BLOCK


class SharedExpert(nn.Module):
    def __init__(self, dim: int, inter_dim: int, limit: float):
        super().__init__()
        self.limit = limit
        self.w1 = nn.Linear(dim, inter_dim, bias=False)
        self.w2 = nn.Linear(inter_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, inter_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(swiglu(self.w1(x), self.w3(x), self.limit).to(x.dtype))


class RoutedExperts(nn.Module):
    """E experts stacked: w1, w3 [E, inter, dim], w2 [E, dim, inter] (Muon treats them as a batch)."""

    def __init__(self, n_experts: int, dim: int, inter_dim: int, limit: float):
        super().__init__()
        self.limit = limit
        self.w1 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, inter_dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """x [T, dim], topk_ids [T, k] int32, topk_weights [T, k] float32 -> [T, dim] float32."""
        return torch.ops.dsv4.moe_experts(x, topk_ids, topk_weights, self.w1, self.w2, self.w3, self.limit)


class ShippedExperts(nn.Module):
    """The routed experts' weights as a release ships them (buffers w1, w2, w3 and their *_scale, set up
    by the subclass), run by QUANTIZED_OP (the activations quantized to FP8 per 128, as DeepSeek's
    inference runs them) where `self.quantize_input`, else by PLAIN_OP (multiplied in x's dtype)."""

    WEIGHTS: ClassVar[str]
    QUANTIZED_OP: ClassVar[Any]
    PLAIN_OP: ClassVar[Any]

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """x [T, dim], topk_ids [T, k] int32, topk_weights [T, k] float32 -> [T, dim] float32."""
        op = self.QUANTIZED_OP if self.quantize_input else self.PLAIN_OP
        return op(x, topk_ids, topk_weights, self.w1, self.w2, self.w3, self.w1_scale, self.w2_scale, self.w3_scale,
                  self.limit)

    def extra_repr(self) -> str:
        return f"weights={self.WEIGHTS}, quantize_input={self.quantize_input}"


class MXFP4Experts(ShippedExperts):
    """The routed experts as the releases ship them (MXFP4, for inference): w1, w3 [E, inter, dim/2],
    w2 [E, dim, inter/2] int8 (two e2m1 codes per byte) with e8m0 scales per 1 x 32 along the
    reduction dim, held as the shipped bytes (uint8: a quarter of float32's bytes, and float8_e8m0fnu
    has no ONNX type). forward is `torch.ops.dsv4.moe_experts_mxfp4_w4a8` (the activations
    quantized to FP8 per 128, as DeepSeek's inference runs the MXFP4 experts: W4A8), or
    `moe_experts_mxfp4` (W4A16: multiplied in x's dtype) with `quantize_input=False` (a model with
    `simulate_quantization=False`) and where dim or inter is not a multiple of 128 (small test models:
    W4A8 quantizes whole 128-blocks); `self.quantize_input` says which runs. Buffers, not parameters."""

    WEIGHTS, QUANTIZED_OP, PLAIN_OP = "mxfp4", torch.ops.dsv4.moe_experts_mxfp4_w4a8, torch.ops.dsv4.moe_experts_mxfp4

    def __init__(self, n_experts: int, dim: int, inter_dim: int, limit: float, device=None, quantize_input: bool = True):
        super().__init__()
        self.limit = limit
        self.quantize_input = quantize_input and dim % FP8_LINEAR_BLOCK == 0 and inter_dim % FP8_LINEAR_BLOCK == 0
        for name, rows, cols in (("w1", inter_dim, dim), ("w2", dim, inter_dim), ("w3", inter_dim, dim)):
            self.register_buffer(name, torch.empty(n_experts, rows, cols // 2, dtype=torch.int8, device=device))
            self.register_buffer(name + "_scale", torch.empty(n_experts, rows, cols // 32, dtype=torch.uint8,
                                                              device=device))



class FP8Experts(ShippedExperts):
    """The routed experts with FP8 weights as base models ship them (for inference): w1, w3 [E, inter, dim],
    w2 [E, dim, inter] float8_e4m3fn with float32 (power-of-two) scales [E, ceil(rows/128), ceil(cols/128)],
    one per 128 x 128 tile. forward is `torch.ops.dsv4.moe_experts_fp8_w8a8` (the activations quantized
    to FP8 per 128, as DeepSeek's inference runs FP8 weights; dim and inter multiples of 128), or with
    `quantize_input=False` (a model with `simulate_quantization=False`) `moe_experts_fp8`, which
    multiplies by the dequantized weights with no FP8 rounding of the activations. Buffers, not
    parameters (FP8Linear's counterpart)."""

    WEIGHTS, QUANTIZED_OP, PLAIN_OP = "float8_e4m3fn", torch.ops.dsv4.moe_experts_fp8_w8a8, torch.ops.dsv4.moe_experts_fp8

    def __init__(self, n_experts: int, dim: int, inter_dim: int, limit: float, device=None, quantize_input: bool = True):
        super().__init__()
        self.limit, self.quantize_input = limit, quantize_input
        for name, rows, cols in (("w1", inter_dim, dim), ("w2", dim, inter_dim), ("w3", inter_dim, dim)):
            self.register_buffer(name, torch.empty(n_experts, rows, cols, dtype=torch.float8_e4m3fn, device=device))
            self.register_buffer(name + "_scale", torch.empty(n_experts, -(-rows // 128), -(-cols // 128),
                                                              dtype=torch.float32, device=device))



def top_indices(key: torch.Tensor, k: int) -> torch.Tensor:
    """The indices of the k largest of key [T, E] along E, largest first, ties to the lowest index (NaN above
    all, as torch.topk) -> [T, k] int64: k rounds of argmax, each masking its pick. The same picks as
    torch.topk's, as row reductions that a compiler fuses into one kernel with the scores (torch.topk is
    a select and a sort launch of their own: bench/results/H100/session30_decode_step_engine64_profile.md)."""
    columns = torch.arange(key.shape[-1], device=key.device)
    picked = []
    for _ in range(k):
        picked.append(key.argmax(-1, keepdim=True))                                      # [T, 1]
        key = torch.where(columns == picked[-1], float("-inf"), key)
    return torch.cat(picked, -1)


class Gate(nn.Module):
    def __init__(self, config: ModelConfig, hashed: bool):
        super().__init__()
        self.topk, self.route_scale, self.hashed = config.n_activated_experts, config.route_scale, hashed
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.dim))
        if hashed:  # token id -> its experts: a fixed table (part of the checkpoint, not trained)
            self.register_buffer("tid2eid", torch.zeros(config.vocab_size, self.topk, dtype=torch.int32))
        else:  # auxiliary-loss-free balancing: shifts the selection only
            self.bias = nn.Parameter(torch.zeros(config.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, dim], token_ids [T] -> (picked experts [T, k] int32, their weights [T, k] float32)."""
        scores = torch.sqrt(F.softplus(float32_product(x, self.weight)))              # [T, E]
        if self.hashed:
            picked = self.tid2eid[token_ids].long()                                      # [T, k]
        else:
            picked = top_indices(scores + self.bias, self.topk)
        weights = scores.gather(-1, picked)
        weights = weights / weights.sum(-1, keepdim=True) * self.route_scale
        return picked.to(torch.int32), weights


class MoE(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        c = config
        self.gate = Gate(c, hashed=layer_id < c.n_hash_layers)
        self.experts = RoutedExperts(c.n_routed_experts, c.dim, c.moe_inter_dim, c.swiglu_limit)
        self.shared = SharedExpert(c.dim, c.moe_inter_dim, c.swiglu_limit)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """x [B, S, dim], token_ids [B, S] -> [B, S, dim]."""
        flat = x.flatten(0, 1)
        topk_ids, topk_weights = self.gate(flat, token_ids.flatten())
        y = self.experts(flat, topk_ids, topk_weights) + self.shared(flat).float()
        return y.to(x.dtype).view_as(x)
