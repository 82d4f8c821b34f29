"""Naive twin of the cached sparse attention kernel: decode each cache entry byte by byte in Python
(e4m3 fields -> value, e8m0 -> ldexp, two bytes -> bf16 via the fp32 bit pattern), a different route
from kv_layout.unpack_main_entries (dtype views and the fp8_dequantize op), then the naive attention."""
from __future__ import annotations

import math
import struct

import torch

from ..fp8_quantize.naive import e4m3_value
from ..sparse_attention import naive as attention_naive


def unpack_entry(entry: list[int], head_dim: int, rope_dim: int) -> list[float]:
    nope = head_dim - rope_dim
    scales = entry[nope + 2 * rope_dim: nope + 2 * rope_dim + nope // 64]
    values = [e4m3_value(entry[i]) * (math.ldexp(1.0, scales[i // 64] - 127) if scales[i // 64] else 0.0)
              for i in range(nope)]
    for r in range(rope_dim):
        lo, hi = entry[nope + 2 * r], entry[nope + 2 * r + 1]
        values.append(struct.unpack("<f", bytes([0, 0, lo, hi]))[0])
    return values


def sparse_attention_cached(q: torch.Tensor, cache: torch.Tensor, attn_sink: torch.Tensor, topk_idxs: torch.Tensor,
                            softmax_scale: float, rope_dim: int, config=None) -> torch.Tensor:
    """q [B, S, H, D], cache [B, N, entry_bytes] uint8 -> [B, S, H, D] in q's dtype (float64 inside)."""
    B, N, _ = cache.shape
    D = q.shape[-1]
    rows = cache.cpu().tolist()
    kv = torch.tensor([[unpack_entry(rows[b][n], D, rope_dim) for n in range(N)] for b in range(B)],
                      dtype=torch.float64).reshape(B, N, D)
    kv = kv.to(q.dtype)  # the op dequantises to q's dtype before use
    return attention_naive.sparse_attention(q, kv, attn_sink, topk_idxs, softmax_scale)
