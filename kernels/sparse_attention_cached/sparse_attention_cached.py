"""Sparse attention over the FP8 production KV cache (`torch.ops.dsv4.sparse_attention_cached`
semantics, see model/ops.py): the decode path.

The kernel is `kernels/sparse_attention`'s with KV_FP8=True: each gathered cache row (kv_layout: D - R
FP8 e4m3 codes | R BF16 rope values | (D - R) / 64 e8m0 scale bytes | pad) is dequantised in registers
(code * 2^(byte - 127), the BF16 values read as such) and rounded to q's dtype, exactly the values
`unpack_main_entries(...).to(q.dtype)` gives, as two tiles (the FP8 dims, the rope dims), each used by
both dots. The cache is read once per program; nothing is unpacked to memory. Batches of sequences of different lengths are expressed by -1
in the indices (a hole reads nothing).

Split-K (flash-decoding): a decode step has B * S tokens, often fewer programs than SMs; with
num_splits > 1 each token's K indices are cut into ranges, each a program, merged by a combine kernel.
The default config (config None / "") on a GPU picks the number of splits from the grid size
(`auto_config`); an explicit config is used as given, but for its split count at a symbolic batch (an
engine's: the count then follows the batch at run time, `split_count`).
Bytes: K * entry_bytes per token (584 for V4: 0.37 MB per token at K = 640) + q and out.
"""
from __future__ import annotations

import torch

from .._common import INTERPRET, check, check_tensor, kernel_op, resolve_config, sm_count
from ..sparse_attention.config import SparseAttentionConfig, decode_default_config
from ..sparse_attention.sparse_attention import check_common, launch_sparse_attention
from .config import FP8_BLOCK, auto_config, entry_layout, split_count


def sparse_attention_cached(q: torch.Tensor, cache: torch.Tensor, attn_sink: torch.Tensor, topk_idxs: torch.Tensor,
                            softmax_scale: float, rope_dim: int,
                            config: SparseAttentionConfig | dict | str | None = None) -> torch.Tensor:
    """`sparse_attention` over the FP8 cache, dequantising in the kernel.

    q [B, S, H, D] bf16 / fp16 / fp32; cache [B, N, entry_bytes] uint8 main entries (kv_layout, with
    D - rope_dim a multiple of 64 and entry_bytes = main_entry_bytes(D, rope_dim)); attn_sink [H] fp32;
    topk_idxs [B, S, K] int32 in [-1, N). out [B, S, H, D] in q's dtype; the entries are dequantised to
    q's dtype before use (as the plain op does), the rest is `sparse_attention`'s contract.
    A scale byte of 0 (2^-127) reads as 0. config: as `sparse_attention`'s; None/"" on a GPU picks
    num_splits from the grid size (`auto_config`).
    """
    return launched_as(q, cache, attn_sink, topk_idxs, softmax_scale, rope_dim, config, None)


def launched_as(q: torch.Tensor, cache: torch.Tensor, attn_sink: torch.Tensor, topk_idxs: torch.Tensor,
                softmax_scale: float, rope_dim: int, config, engine_batch: bool | None) -> torch.Tensor:
    """sparse_attention_cached with its splits chosen as an engine's symbolic batch has them at q's batch
    (engine_batch True: how benchmarks see an engine at a concrete batch), or as q's batch is (None:
    the op)."""
    op = "sparse_attention_cached"
    check_common(op, q, attn_sink, topk_idxs)
    check_tensor(op, "cache", cache, (torch.uint8,), ndim=3, device=q.device)
    B, S, H, D = q.shape
    nope, entry = entry_layout(D, rope_dim)
    check(0 <= rope_dim <= D and nope % FP8_BLOCK == 0,
          f"{op}: head dim {D} - rope_dim {rope_dim} = {nope} FP8 dims; need a non-negative multiple of {FP8_BLOCK}")
    check(cache.shape[0] == B and cache.shape[2] == entry,
          f"{op}: cache has shape {tuple(cache.shape)}; need [B, N, entry_bytes] = [{B}, N, {entry}] for "
          f"head_dim {D}, rope_dim {rope_dim}")
    cfg = resolve_config(SparseAttentionConfig, config, decode_default_config, q.device)
    run_splits = None
    engine_batch = not isinstance(B * S, int) if engine_batch is None else engine_batch
    if (config is None or config == "" or engine_batch) and not INTERPRET and q.device.type == "cuda":
        # the default; and any config at a symbolic batch (an engine's): its num_splits was tuned at one
        # batch size, the engine runs them all
        cfg, run_splits = split_launch(B, S, H, topk_idxs.shape[-1], cfg, sm_count(q.device), engine_batch)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    launch_sparse_attention(q, cache, attn_sink, topk_idxs, out, softmax_scale, cfg, N=cache.shape[1],
                            kv_fp8=True, nope=nope, entry_bytes=entry, run_splits=run_splits)
    return out


def split_launch(B, S, H: int, K: int, cfg: SparseAttentionConfig, n_sm: int, symbolic_batch: bool):
    """(config, run_splits) of a launch with automatic splits: auto_config's split count for B * S tokens
    and run_splits None; with symbolic_batch (an engine's batch, whose B * S is symbolic) the grid's
    split axis is auto_config's (one token's for a symbolic B * S) and run_splits the count for B * S
    that the launch evaluates at run time (launched_as takes it at a concrete B too, as benchmarks see
    an engine at that batch)."""
    grid_cfg = auto_config(1 if symbolic_batch else B, 1 if symbolic_batch else S, H, K, cfg, n_sm)
    return grid_cfg, split_count(B, S, H, K, grid_cfg, n_sm) if symbolic_batch else None


def cache_bytes_read(topk_idxs: torch.Tensor, entry_bytes: int) -> int:
    """Bytes of cache entries the op reads: entry_bytes per valid (token, index) pair."""
    return entry_bytes * int((topk_idxs >= 0).sum())


@kernel_op("sparse_attention_cached")
def _sparse_attention_cached_op(q: torch.Tensor, cache: torch.Tensor, attn_sink: torch.Tensor,
                                topk_idxs: torch.Tensor, softmax_scale: float, rope_dim: int,
                                config: str = "") -> torch.Tensor:
    return sparse_attention_cached(q, cache, attn_sink, topk_idxs, softmax_scale, rope_dim, config)
