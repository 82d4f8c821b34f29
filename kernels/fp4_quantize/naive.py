"""Naive twins of the FP4 kernels: slow, float32, obviously right, and a different algorithm from
model/ops.py (distance to each of the 8 e2m1 magnitudes, the nearest wins, a tie goes to the even
code; packing by explicit arithmetic). Same signatures as the kernels' public functions."""
from __future__ import annotations

import torch

from ...model.ops import FP4_AMAX_FLOOR, FP4_MAX
from ..fp8_quantize.naive import block_scales

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def fp4_quantize(x: torch.Tensor, block_size: int, pow2_scale: bool = False, config=None):
    """x [..., D] -> (packed [..., D/2] uint8, scale [..., D/block_size] float32) on the CPU; config ignored."""
    if block_size % 2:
        raise ValueError(f"block_size {block_size} must be even")
    blocks, scale = block_scales(x, block_size, FP4_MAX, pow2_scale, FP4_AMAX_FLOOR)
    y = blocks / scale.unsqueeze(-1)
    dist = (y.abs().unsqueeze(-1) - E2M1).abs()                            # [R, NB, bs, 8]
    best = dist.min(-1, keepdim=True).values
    is_best = dist == best
    # Among the nearest codes (at most two, adjacent), prefer the even one.
    even_best = is_best & (torch.arange(8) % 2 == 0)
    code = torch.where(even_best.any(-1), even_best.float().argmax(-1), is_best.float().argmax(-1))
    code = torch.where(torch.isnan(y), torch.zeros_like(code), code)       # NaN -> +0
    code = code + 8 * (y < 0).long()
    code = code.reshape(*x.shape[:-1], x.shape[-1])
    packed = code[..., 0::2] + 16 * code[..., 1::2]
    return packed.to(torch.uint8), scale.reshape(*x.shape[:-1], -1)


def fp4_dequantize(packed: torch.Tensor, scale: torch.Tensor, block_size: int, config=None) -> torch.Tensor:
    """packed [..., D/2] uint8, scale [..., D/block_size] -> float32 [..., D]; config ignored."""
    p = packed.cpu().long()
    scale = scale.cpu()
    code = torch.stack([p % 16, p // 16], dim=-1).flatten(-2)
    value = E2M1[code % 8] * torch.where(code >= 8, -1.0, 1.0)
    return (value.unflatten(-1, (-1, block_size)) * scale.unsqueeze(-1)).flatten(-2)
