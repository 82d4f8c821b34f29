"""Lightning-indexer top-k over the packed indexer key cache (`torch.ops.dsv4.indexer_topk_cached`
semantics, see model/ops.py): the decode path.

The kernels are `kernels/indexer_topk`'s (the fused threshold kernel and the radix selection's score
kernel + radix select) with KEY_FORMAT set: each key tile is read from the cache as bytes in the
kernel's body and decoded in registers (`_packed_key_values`: e2m1 nibbles times 2^(e - 127), or e4m3
codes times the float32 scale), bit for bit the float32 values `unpack_indexer_keys` gives, then scored
by the same dots, head sum and selection as `indexer_topk`. Nothing is unpacked to memory: a decode
step reads entry_bytes a key (68 B for V4's FP4 keys) instead of writing and re-reading float32 and
bf16 copies of the whole cache (~0.6 KB a key).
Paths (q dtype x cache format; kernels/indexer_topk/DESIGN.md): bf16 q over FP4 keys = the 'bf16' plan
(bf16 keys are exact), bf16 q over FP8 keys = 'bf16_fix' (fp32 keys = three bf16 terms, three MMAs),
fp32 / fp16 q = the exact fp32 path. The default config (config.py) selects by "radix", whose score
kernel spreads each query's keys over enough programs to fill the GPU at decode.
Bytes: B x N x entry_bytes of keys + the [B, N] fp32 scores (radix) + q.
"""
from __future__ import annotations

import torch

from ...model.kv_layout import FP4_BLOCK, indexer_entry_bytes
from .._common import check, check_tensor, kernel_op, resolve_config
from ..indexer_topk.config import IndexerTopkConfig
from ..indexer_topk.indexer_topk import PACKED_KEY_FORMATS, check_common, launch_indexer_topk
from .config import default_config


def indexer_topk_cached(q: torch.Tensor, weights: torch.Tensor, index_cache: torch.Tensor, positions: torch.Tensor,
                        ratio: int, topk: int, fmt: str, config=None) -> torch.Tensor:
    """q [B, S, H, d] indexer queries (float32 / bfloat16 / float16), weights [B, S, H], index_cache
    [B, N, entry_bytes] uint8 packed keys in format `fmt` ("fp4": d a multiple of 32; "fp8"),
    positions [B, S] int64 -> [B, S, topk] int32: `indexer_topk` over the keys the cache holds (the
    visible keys n < (t + 1) // ratio with the highest scores, best first, ties to the lowest index,
    NaN first, -1 padding). All contiguous. config: as `indexer_topk`'s (None / "": this op's default
    for the device, config.py), except score_mma, which must stay "bf16"."""
    op = "indexer_topk_cached"
    check_common(op, q, weights, positions, ratio, topk)
    B, S, H, D = q.shape
    check(fmt in PACKED_KEY_FORMATS, f"{op}: fmt {fmt!r}; accepted: {', '.join(PACKED_KEY_FORMATS)}")
    check(fmt != "fp4" or D % FP4_BLOCK == 0, f"{op}: head dim {D} with fmt fp4; need a multiple of {FP4_BLOCK}")
    entry = indexer_entry_bytes(D, fmt)
    check_tensor(op, "index_cache", index_cache, (torch.uint8,), ndim=3, device=q.device)
    check(index_cache.shape[0] == B and index_cache.shape[2] == entry,
          f"{op}: index_cache has shape {tuple(index_cache.shape)}; need [B, N, entry_bytes] = [{B}, N, {entry}] "
          f"for {fmt} keys of head dim {D}")
    check(index_cache.shape[1] < 2 ** 31, f"{op}: {index_cache.shape[1]} keys; need < 2^31")
    cfg = resolve_config(IndexerTopkConfig, config, default_config, q.device)
    out = torch.empty((B, S, topk), dtype=torch.int32, device=q.device)
    launch_indexer_topk(q, weights, index_cache, positions, out, ratio, topk, cfg, key_format=fmt)
    return out


@kernel_op("indexer_topk_cached")
def _indexer_topk_cached_op(q: torch.Tensor, weights: torch.Tensor, index_cache: torch.Tensor, positions: torch.Tensor,
                            ratio: int, topk: int, fmt: str, config: str = "") -> torch.Tensor:
    return indexer_topk_cached(q, weights, index_cache, positions, ratio, topk, fmt, config)
