"""Decompositions: each `torch.ops.dsv4.*` op written as its plain PyTorch implementation, traceable.

Two users:
- the pass manager: substitutions "decompose.<op>" replace an op node by its plain code traced
  inline, so Inductor fuses it with its neighbours instead of calling the opaque Python op. They have
  the lowest priority: a kernel substitution that applies wins, these take the rest.
- export (AOTInductor, ONNX): a .pt2 cannot run Python custom ops (DESIGN.md, Traps), so the exported
  program is decomposed by the pass manager's per-call choice, whose plain fallback is this table
  (`PassManager.decomposition_table`, used by dsv4_compile/export.py):

      ep = torch.export.export(model, args).run_decompositions(manager.decomposition_table())

  The plain functions call other dsv4 ops (compress_kv -> fp8_quantize); run_decompositions
  decomposes those too, as they are in the same table.

The chunked ops (sparse_attention, sparse_attention_cached, indexer_topk, indexer_topk_cached) loop
over Python ranges of the query length S to bound memory; a trace of that loop would bake S in. Their
decompositions call the per-chunk function on all queries at once (`ops.sparse_attention_chunk`,
`ops.indexer_topk_chunk`, `ops.indexer_topk_cached_chunk`), so a symbolic S traces, at the price of
materialising the unchunked intermediates ([B, S, K, D] for attention, [B, S, H, N] for the indexer,
plus the unpacked keys [B, N, d] for the cached one). The pass therefore leaves such a node alone when those
would exceed `ops.CHUNK_BYTES` or when a size is symbolic (it cannot bound them); the export table
decomposes unconditionally: exporting for 128K contexts needs a kernel substitution instead.

Every op's decomposition is exactly its registered implementation (`CustomOpDef._init_fn`, the
function the `@custom_op` decorator wrapped) or, for the chunked ops, its per-chunk function, so it
cannot drift from eager. (The plain code avoids tensor constants, which run_decompositions refuses:
FP4 codes are decoded arithmetically.)

Export needs functional decompositions (they run below export's functionalization: an in-place op in
the plain code, e.g. `masked_fill_` on a fresh tensor, fails "expected an entirely functional graph"),
so `decomposition_table()` wraps each function in functionalization. The pass functionalises its own
traces.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import torch
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from ..model import kv_layout, moe_ops, ops, weight_formats
from .registry import Substitution, Target, register

DECOMPOSE_PRIORITY = -100  # below every kernel substitution: the fallback


def _implementation(op_def) -> Callable:
    """The plain function a torch.library.custom_op was made from."""
    fn = getattr(op_def, "_init_fn", None)
    if fn is None:  # torch moved the attribute: fail loudly rather than decompose wrongly
        raise RuntimeError(f"cannot find the implementation of {op_def}: torch.library.CustomOpDef has no _init_fn")
    return fn


# ---- the chunked ops, unchunked ----------------------------------------------------------------

def sparse_attention(q, kv, attn_sink, topk_idxs, softmax_scale):
    """q [B, S, H, D], kv [B, N, D], attn_sink [H], topk_idxs [B, S, K] -> [B, S, H, D] (all S at once)."""
    return ops.sparse_attention_chunk(q, kv, attn_sink, topk_idxs, softmax_scale)


def sparse_attention_cached(q, cache, attn_sink, topk_idxs, softmax_scale, rope_dim):
    """q [B, S, H, D], cache [B, N, entry_bytes] uint8 -> [B, S, H, D]: unpack the FP8 entries, then attend."""
    kv = kv_layout.unpack_main_entries(cache, q.shape[-1], rope_dim).to(q.dtype)  # [B, N, D]
    return ops.sparse_attention_chunk(q, kv, attn_sink, topk_idxs, softmax_scale)


def indexer_topk(q, weights, keys, positions, ratio, topk):
    """q [B, S, H, d], weights [B, S, H], keys [B, N, d], positions [B, S] -> [B, S, topk] int32."""
    return ops.indexer_topk_chunk(q, weights, keys, positions, ratio, topk)


def indexer_topk_cached(q, weights, index_cache, positions, ratio, topk, fmt):
    """q [B, S, H, d], weights [B, S, H], index_cache [B, N, entry_bytes] uint8, positions [B, S] ->
    [B, S, topk] int32: unpack every key, then select."""
    return ops.indexer_topk_cached_chunk(q, weights, index_cache, positions, ratio, topk, fmt)


# ---- predicates: bound the unchunked intermediates -----------------------------------------------

def _unchunked_reason(what: str, dims: tuple, bytes_per_element_product: int) -> str | None:
    """None if prod(dims) * bytes fits the chunk budget, else why the node stays the chunked op."""
    if not all(is_concrete_int(d) for d in dims):
        return f"symbolic sizes {tuple(str(d) for d in dims)}: cannot bound the unchunked {what}; kept chunked"
    total = math.prod(int(d) for d in dims) * bytes_per_element_product
    if total > ops.CHUNK_BYTES:
        return (f"unchunked {what} would take {total / 2**30:.2f} GiB > the {ops.CHUNK_BYTES / 2**30:.2f} GiB "
                f"chunk budget; kept chunked")
    return None


def _attention_fits(target: Target, q, kv_or_cache, attn_sink, topk_idxs, *rest) -> str | None:
    B, S, H, D = q.shape
    K = topk_idxs.shape[-1]
    # Same per-query estimate as the op's own chunking: gathered entries [K, D] + logits/probs [H, K], fp32.
    return _unchunked_reason("[B, S, K, D + 2H] fp32 intermediates", (B, S, K, D + 2 * H), 4)


def _indexer_fits(target: Target, q, weights, keys, positions, ratio, topk) -> str | None:
    B, S, H, _ = q.shape
    N = keys.shape[1]
    return _unchunked_reason("[B, S, N, H + 2] fp32 scores", (B, S, N, H + 2), 4)


def _indexer_cached_fits(target: Target, q, weights, index_cache, positions, ratio, topk, fmt) -> str | None:
    B, S, H, d = q.shape
    N = index_cache.shape[1]
    # the per-head scores [B, S, H, N] (+ 2 for the summed scores and their sort) and the unpacked keys [B, N, d]
    return _unchunked_reason("[B, N, S (H + 2) + d] fp32 scores and keys", (B, N, S * (H + 2) + d), 4)


def _always(target: Target, *args) -> str | None:
    return None


# ---- the table and the substitutions -----------------------------------------------------------

# op overload -> (plain function, predicate used by the pass)
_DECOMPOSITIONS = {
    torch.ops.dsv4.fp8_quantize.default: (_implementation(ops.fp8_quantize), _always),
    torch.ops.dsv4.fp8_dequantize.default: (_implementation(ops.fp8_dequantize), _always),
    torch.ops.dsv4.fp4_quantize.default: (_implementation(ops.fp4_quantize), _always),
    torch.ops.dsv4.fp4_dequantize.default: (_implementation(ops.fp4_dequantize), _always),
    torch.ops.dsv4.newton_schulz.default: (_implementation(ops.newton_schulz), _always),
    torch.ops.dsv4.hc_sinkhorn.default: (_implementation(ops.hc_sinkhorn), _always),
    torch.ops.dsv4.hc_pre.default: (_implementation(ops.hc_pre), _always),
    torch.ops.dsv4.compress_kv.default: (_implementation(ops.compress_kv), _always),
    torch.ops.dsv4.fp8_linear.default: (_implementation(ops.fp8_linear), _always),
    torch.ops.dsv4.float32_linear.default: (_implementation(ops.float32_linear), _always),
    torch.ops.dsv4.sparse_attention.default: (sparse_attention, _attention_fits),
    torch.ops.dsv4.sparse_attention_cached.default: (sparse_attention_cached, _attention_fits),
    torch.ops.dsv4.indexer_topk.default: (indexer_topk, _indexer_fits),
    torch.ops.dsv4.indexer_topk_cached.default: (indexer_topk_cached, _indexer_cached_fits),
    # Grouped by expert with static shapes (chunked over blocks when the sizes are concrete).
    torch.ops.dsv4.moe_experts.default: (_implementation(moe_ops.moe_experts), _always),
    torch.ops.dsv4.moe_experts_fp8.default: (_implementation(moe_ops.moe_experts_fp8), _always),
    torch.ops.dsv4.moe_experts_fp8_w8a8.default: (_implementation(moe_ops.moe_experts_fp8_w8a8), _always),
    torch.ops.dsv4.moe_experts_mxfp4.default: (_implementation(moe_ops.moe_experts_mxfp4), _always),
    torch.ops.dsv4.moe_experts_mxfp4_w4a8.default: (_implementation(moe_ops.moe_experts_mxfp4_w4a8), _always),
}


# hc_sinkhorn's and hc_pre's plain code with the Sinkhorn rounds as one while_loop node, for the CPU
# engines' export: the same bits, ~20x fewer nodes for the rounds (AOTInductor lowers and compiles each
# node). Not on a GPU target, where a loop reads its counter on the host each round (a sync, and no CUDA
# graph), nor in the graph pass (while_loop has no autograd).
_LOOPED = {torch.ops.dsv4.hc_sinkhorn.default: functools.partial(ops._sinkhorn_plain, as_loop=True),
           torch.ops.dsv4.hc_pre.default: functools.partial(ops._hc_pre_plain, as_loop=True)}


def decomposition_table(loops: bool = False) -> dict[torch._ops.OpOverload, Callable]:
    """{torch.ops.dsv4.<op>.default: plain function with the op's signature}, a fresh dict. loops: the
    Sinkhorn rounds of hc_sinkhorn / hc_pre as one while_loop node (the CPU engines' export).

    For `ExportedProgram.run_decompositions(decomposition_table())` (merge it into
    `torch.export.default_decompositions()` to decompose aten ops too).
    """
    table = {op: functional(fn) for op, (fn, _) in _DECOMPOSITIONS.items()}
    if loops:
        table.update({op: functional(fn) for op, fn in _LOOPED.items()})
    return table


def functional(fn: Callable) -> Callable:
    """fn run under (Python) functionalization: in-place ops on its own tensors become out-of-place,
    as a decomposition applied by run_decompositions must be. (torch.func.functionalize's C++
    wrappers do not mix with export's fake tensors; FunctionalTensorMode does.)"""
    from torch._subclasses.functional_tensor import FunctionalTensorMode, dispatch_functionalize

    @functools.wraps(fn)
    def wrapper(*args):
        return dispatch_functionalize(fn, FunctionalTensorMode())(*args)

    return wrapper


for _op, (_fn, _applies) in _DECOMPOSITIONS.items():
    register(Substitution(
        name="decompose." + _op._schema.name.split("::")[1],
        op=_op,
        replacement=_fn,
        applies=_applies,
        version="1",
        priority=DECOMPOSE_PRIORITY,
        # The plain code lives in these files (helpers included): their contents are the identity.
        source_files=(ops.__file__, moe_ops.__file__, weight_formats.__file__, kv_layout.__file__, __file__),
    ))
