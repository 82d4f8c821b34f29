"""Search space of the FP4 blockwise quantizer (kernels/fp4_quantize): fp8_quantize's tile rules."""
from __future__ import annotations

from .fp8_quantize import WARPS, quant_hard, quant_problem, quant_redundant
from .framework import KernelSpace, Param, rule_threads

FP4_QUANTIZE = KernelSpace(
    name="fp4_quantize", package="fp4_quantize", config_class="Fp4QuantConfig", function="fp4_quantize:fp4_quantize",
    params=(Param("block_elems", tuple(1 << i for i in range(5, 15))), WARPS),
    problem=quant_problem(lambda mc: mc.index_head_dim, 32),
    hard=(rule_threads, quant_hard), redundant=(quant_redundant,),
    doc="keys [rows = batch * context/4, index_head_dim] fp32, block 32, pow2 scales: one CSA layer's "
        "indexer keys (kv_layout.pack_indexer_keys, fp4 format).")
