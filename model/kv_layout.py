"""Byte layout of one cached entry, shared by the KV cache, the ops and the accounting.

Main entry (window and compressed alike), for head_dim D with R rope dims (V4: D = 512, R = 64):

    [ (D-R) FP8 e4m3 values | R BF16 values (2R bytes) | (D-R)/64 scale bytes | pad to 8 ]
    V4: 448 + 128 + 7 + 1 = 584 bytes

A scale byte is an e8m0 power of two (byte = exponent + 127), so FP8 blocks must use power-of-two
scales (`fp8_quantize(..., pow2_scale=True)`), which the model's FP8 simulation does.

Indexer key, head dim d (V4: 128):
    "fp4": [ d/2 bytes of packed e2m1 codes | d/32 e8m0 scale bytes ]   V4: 64 + 4 = 68 bytes
    "fp8": [ d FP8 e4m3 values | one float32 scale (4 bytes) ]          V4: 128 + 4 = 132 bytes
"""
from __future__ import annotations

import torch

FP8_BLOCK = 64   # main entries: one scale per 64 FP8 values
FP4_BLOCK = 32   # indexer keys in FP4: one scale per 32 values


def _pad8(n: int) -> int:
    return (n + 7) // 8 * 8


def main_entry_bytes(head_dim: int, rope_dim: int) -> int:
    nope = head_dim - rope_dim
    return _pad8(nope + 2 * rope_dim + nope // FP8_BLOCK)


def indexer_entry_bytes(index_head_dim: int, fmt: str) -> int:
    if fmt == "fp4":
        return index_head_dim // 2 + index_head_dim // FP4_BLOCK
    if fmt == "fp8":
        return index_head_dim + 4
    raise ValueError(f"indexer cache format {fmt!r}; accepted: fp4, fp8")


def index_cache_mismatch(index_cache: torch.Tensor, index_head_dim: int, fmt: str) -> str | None:
    """None when index_cache is uint8 [B, N, entry_bytes] holding `fmt` keys of index_head_dim, else what it
    is and what is needed (the plain op raises it, the kernel's pass declines with it)."""
    entry = indexer_entry_bytes(index_head_dim, fmt)
    if index_cache.dtype == torch.uint8 and index_cache.dim() == 3 and index_cache.shape[-1] == entry:
        return None
    return (f"index_cache is {index_cache.dtype} {tuple(index_cache.shape)}; need uint8 [B, N, {entry}] "
            f"({fmt} keys of head dim {index_head_dim})")


def _pow2_to_e8m0(scale: torch.Tensor) -> torch.Tensor:
    return (torch.log2(scale).round() + 127).clamp(0, 255).to(torch.uint8)


def _e8m0_to_pow2(byte: torch.Tensor) -> torch.Tensor:
    return torch.exp2(byte.float() - 127)


def pack_main_entries(kv: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """kv [..., D] (FP8-simulated non-rope dims, rope dims BF16-exact) -> [..., entry_bytes] uint8.

    Exact for values the model produced (power-of-two FP8 blocks, BF16 rope dims).
    """
    D = kv.shape[-1]
    nope = D - rope_dim
    codes, scale = torch.ops.dsv4.fp8_quantize(kv[..., :nope].float(), FP8_BLOCK, True)
    parts = [codes.view(torch.uint8),
             kv[..., nope:].to(torch.bfloat16).contiguous().view(torch.uint8),
             _pow2_to_e8m0(scale)]
    used = nope + 2 * rope_dim + nope // FP8_BLOCK
    pad = main_entry_bytes(D, rope_dim) - used
    if pad:
        parts.append(kv.new_zeros((*kv.shape[:-1], pad), dtype=torch.uint8))
    return torch.cat(parts, dim=-1)


def unpack_main_entries(entries: torch.Tensor, head_dim: int, rope_dim: int) -> torch.Tensor:
    """[..., entry_bytes] uint8 -> [..., D] float32."""
    nope = head_dim - rope_dim
    codes = entries[..., :nope].contiguous().view(torch.float8_e4m3fn)
    rope = entries[..., nope:nope + 2 * rope_dim].contiguous().view(torch.bfloat16)
    scale = _e8m0_to_pow2(entries[..., nope + 2 * rope_dim: nope + 2 * rope_dim + nope // FP8_BLOCK])
    values = torch.ops.dsv4.fp8_dequantize(codes, scale, FP8_BLOCK)
    return torch.cat([values, rope.float()], dim=-1)


def pack_indexer_keys(keys: torch.Tensor, fmt: str) -> torch.Tensor:
    """keys [..., d] (FP4-simulated with power-of-two scales) -> [..., indexer_entry_bytes] uint8.

    "fp4" is exact for such keys; "fp8" re-quantizes with one float32 scale per key (lossy).
    """
    if fmt == "fp4":
        packed, scale = torch.ops.dsv4.fp4_quantize(keys.float(), FP4_BLOCK, True)
        return torch.cat([packed, _pow2_to_e8m0(scale)], dim=-1)
    codes, scale = torch.ops.dsv4.fp8_quantize(keys.float(), keys.shape[-1], False)
    return torch.cat([codes.view(torch.uint8), scale.contiguous().view(torch.uint8)], dim=-1)


def unpack_indexer_keys(entries: torch.Tensor, index_head_dim: int, fmt: str) -> torch.Tensor:
    """[..., indexer_entry_bytes] uint8 -> [..., d] float32."""
    d = index_head_dim
    if fmt == "fp4":
        scale = _e8m0_to_pow2(entries[..., d // 2:])
        return torch.ops.dsv4.fp4_dequantize(entries[..., :d // 2].contiguous(), scale, FP4_BLOCK)
    codes = entries[..., :d].contiguous().view(torch.float8_e4m3fn)
    scale = entries[..., d:d + 4].contiguous().view(torch.float32)
    return torch.ops.dsv4.fp8_dequantize(codes, scale, d)
