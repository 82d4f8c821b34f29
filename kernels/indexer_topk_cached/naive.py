"""Naive twin of the cached indexer top-k kernel: decode each cache entry byte by byte in Python (nibbles
by divmod, e2m1 from its sign/exponent/mantissa fields, e8m0 by ldexp, e4m3 by its fields, the fp8
format's float32 scale by struct), a different route from kv_layout.unpack_indexer_keys (dtype views
and the dequantize ops), then the indexer's naive twin (float64 scores)."""
from __future__ import annotations

import math
import struct

import torch

from ...model.kv_layout import FP4_BLOCK
from ..fp8_quantize.naive import e4m3_value
from ..indexer_topk import naive as indexer_naive


def e2m1_value(code: int) -> float:
    """One e2m1 nibble: sign bit, 2 exponent bits, 1 mantissa bit (0, 0.5, 1, 1.5, 2, 3, 4, 6)."""
    sign = -1.0 if code & 8 else 1.0
    e, m = (code >> 1) & 3, code & 1
    return sign * (m / 2 if e == 0 else (1 + m / 2) * 2.0 ** (e - 1))


def unpack_key(entry: list[int], d: int, fmt: str) -> list[float]:
    """One indexer cache entry (its bytes) -> its d values (Python floats, the float32 values)."""
    if fmt == "fp4":
        scales = [math.ldexp(1.0, s - 127) if s < 255 else math.inf for s in entry[d // 2:]]
        return [e2m1_value(divmod(entry[i // 2], 16)[1 - i % 2]) * scales[i // FP4_BLOCK] for i in range(d)]
    scale = struct.unpack("<f", bytes(entry[d:d + 4]))[0]
    # code x scale is exact in float64 (4 + 24 significant bits); float32 rounds it as torch does
    return torch.tensor([e4m3_value(c) * scale for c in entry[:d]], dtype=torch.float64).float().tolist()


def indexer_topk_cached(q: torch.Tensor, weights: torch.Tensor, index_cache: torch.Tensor, positions: torch.Tensor,
                        ratio: int, topk: int, fmt: str, config=None) -> torch.Tensor:
    """q [B, S, H, d], weights [B, S, H], index_cache [B, N, entry_bytes] uint8, positions [B, S] int64
    -> [B, S, topk] int32."""
    B, N, _ = index_cache.shape
    d = q.shape[-1]
    rows = index_cache.cpu().tolist()
    keys = torch.tensor([[unpack_key(rows[b][n], d, fmt) for n in range(N)] for b in range(B)],
                        dtype=torch.float32).reshape(B, N, d)
    return indexer_naive.indexer_topk(q, weights, keys.to(q.device), positions, ratio, topk)
