"""Search space of the cached indexer top-k (kernels/indexer_topk_cached: indexer_topk's kernels reading
the packed FP4 key cache) at decode: indexer_topk's tiles and rules, decode shapes."""
from __future__ import annotations

import math

from ...model.kv_layout import indexer_entry_bytes
from .framework import CSA_RATIO, KernelSpace, Param, rule_threads
from .indexer_topk import indexer_hard, indexer_redundant


def _cached_problem(mc, context, batch, phase):
    # One decode step of one CSA layer: a query a sequence over the context/4 keys of its FP4 cache.
    # k_dtype is what the FP4 keys decode to exactly (bf16): the launcher's plan, which indexer_topk's
    # rules read (16-bit MMA for bf16 q, the key tile bf16 in shared memory).
    H, d = mc.index_n_heads, mc.index_head_dim
    N = math.ceil(context / CSA_RATIO)
    dims = {"B": batch, "S": 1, "H": H, "d": d, "N": N, "ratio": CSA_RATIO, "topk": mc.index_topk,
            "q_dtype": mc.dtype, "k_dtype": "bfloat16", "fmt": "fp4"}
    q_elt = 2 if mc.dtype in ("bfloat16", "float16") else 4
    return dims, batch * (N * indexer_entry_bytes(d, "fp4") + H * (d + 1) * q_elt + mc.index_topk * 4)


INDEXER_TOPK_CACHED = KernelSpace(
    name="indexer_topk_cached", package="indexer_topk_cached", config_class="IndexerTopkConfig",
    function="indexer_topk_cached:indexer_topk_cached", uses=("indexer_topk",),
    # block_s 1 (one query a sequence), score_mma bf16 (the only one the cached op takes)
    params=(Param("block_s", (1,)), Param("block_n", (16, 32, 64, 128, 256)), Param("buffer_factor", (2, 4)),
            Param("score_rows", ("keys", "heads")), Param("score_mma", ("bf16",)),
            Param("selection", ("threshold", "radix")), Param("num_warps", (2, 4, 8, 16)),
            Param("num_stages", (1, 2, 3, 4))),
    problem=_cached_problem, phases=("decode",), hard=(rule_threads, indexer_hard), redundant=(indexer_redundant,),
    defaults={"decode": "default_config"},
    doc="Decode selection of one CSA layer over the packed FP4 indexer cache: q [batch, 1, index_n_heads, "
        "index_head_dim] (model dtype), weights [batch, 1, index_n_heads], the cache [batch, context/4, 68 B], "
        "sequences at different positions, top index_topk. Bandwidth- and occupancy-bound: selection=radix "
        "spreads each query's keys over the GPU (score kernel) before the radix select; threshold runs one "
        "program a sequence.")
