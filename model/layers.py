"""Small building blocks: RMSNorm, the FP8 linear, the output head (float32 logits), RoPE frequencies (with YaRN), the window index pattern."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .weight_formats import dequantize_fp8_weight


class RMSNorm(nn.Module):
    """y = x * rsqrt(mean(x^2) + eps) * weight, computed in float32, returned in x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps) * self.weight).to(x.dtype)


class FP8Linear(nn.Module):
    """A bias-free linear whose weight stays as shipped: FP8 e4m3 [out, in] with one float32 (power-of-
    two) scale per 128 x 128 tile [ceil(out/128), in/128]; forward is `torch.ops.dsv4.fp8_linear` (the
    input quantized to FP8, as DeepSeek's inference does). `quantize_input=False` (a model with
    `simulate_quantization=False`) multiplies by the dequantized weight instead, with no FP8 rounding of
    the input. Buffers, not parameters: these weights are for inference."""

    def __init__(self, in_features: int, out_features: int, device=None, quantize_input: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.quantize_input = in_features, out_features, quantize_input
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn, device=device))
        self.register_buffer("scale", torch.empty(-(-out_features // 128), -(-in_features // 128),
                                                  dtype=torch.float32, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quantize_input:
            return F.linear(x, dequantize_fp8_weight(self.weight, self.scale, dtype=x.dtype))
        return torch.ops.dsv4.fp8_linear(x, self.weight, self.scale)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight=float8_e4m3fn"


def float32_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., in] @ weight [out, in]^T as float32 [..., out]: `torch.ops.dsv4.float32_linear` (inference;
    on CUDA a 16-bit weight's GEMM writes its float32 accumulator, a float32 weight's is a kernel's to
    take), or where autograd records (the op has no derivative) F.linear on the float32 operands."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return F.linear(x.float(), weight.float())
    return torch.ops.dsv4.float32_linear(x, weight)


class Head(nn.Linear):
    """The output head: a bias-free [vocab, dim] weight in the model's dtype (bf16 as the release ships
    it), logits in float32 (`float32_product`). DeepSeek's inference upcasts the weight to float32 "for
    easier computation"; a bf16 input's products are exact in float32 either way, so the logits are the
    same up to the float32 sum's order, without a float32 GEMM at CUDA-core speed or a float32 copy."""

    def __init__(self, dim: int, vocab_size: int, device=None, dtype=None):
        super().__init__(dim, vocab_size, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., dim] -> logits [..., vocab] float32."""
        return float32_product(x, self.weight)


def rope_inv_freq(rope_dim: int, theta: float, yarn_original_len: int = 0, factor: float = 1.0,
                  beta_fast: int = 32, beta_slow: int = 1) -> torch.Tensor:
    """Inverse frequencies [rope_dim / 2] for interleaved-pair RoPE.

    With `yarn_original_len` > 0 (compressed layers), YaRN blends interpolated (freq / factor) and
    original frequencies with a linear ramp between the dims that turn beta_fast and beta_slow times
    over the original length; no attention-scale correction (mscale) is applied.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim))
    if yarn_original_len > 0:
        def correction_dim(rotations: float) -> float:
            return rope_dim * math.log(yarn_original_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low = max(math.floor(correction_dim(beta_fast)), 0)
        high = min(math.ceil(correction_dim(beta_slow)), rope_dim - 1)
        ramp = ((torch.arange(rope_dim // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)).clamp(0, 1)
        inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    return inv_freq.float()


def rope_angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [...] int -> cos, sin [..., rope_dim / 2] float32."""
    angles = positions.float().unsqueeze(-1) * inv_freq
    return torch.cos(angles), torch.sin(angles)


def window_indices(positions: torch.Tensor, window: int) -> torch.Tensor:
    """positions [B, S] -> [B, S, window] int64: the positions t - window + 1 .. t, -1 before 0."""
    idx = positions.unsqueeze(-1) - (window - 1) + torch.arange(window, device=positions.device)
    return torch.where(idx >= 0, idx, -1)


def visible_block_indices(positions: torch.Tensor, n_blocks: int, ratio: int) -> torch.Tensor:
    """positions [B, S] -> [B, S, n_blocks] int64: block i where i < (t + 1) // ratio, else -1."""
    idx = torch.arange(n_blocks, device=positions.device).expand(*positions.shape, n_blocks)
    visible = idx < torch.div(positions + 1, ratio, rounding_mode="floor").unsqueeze(-1)
    return torch.where(visible, idx, -1)
