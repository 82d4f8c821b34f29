"""Search space of the FP8 blockwise quantizer (kernels/fp8_quantize), and the quantization-tile rules
it shares with fp4_quantize (one launcher layout: [Q, block_size] blocks, `quant_tile` a program)."""
from __future__ import annotations

import math
from typing import Any, Callable

from .framework import CSA_RATIO, ELEMS_PER_THREAD, KernelSpace, Param, next_pow2, rule_threads, smem_reason, threads


def _quant_tile(cfg, problem) -> tuple[int, int]:
    """(quantization blocks per program, elements per program), as the launcher picks them."""
    blocks, block_s = FP8_QUANTIZE.kernel_config().quant_tile(cfg.block_elems, problem.dim("block_size"))
    return blocks, blocks * block_s


def quant_hard(cfg, problem, gpu) -> str | None:
    nb, elems = _quant_tile(cfg, problem)
    per_thread = elems / threads(cfg.num_warps)
    if per_thread > ELEMS_PER_THREAD:
        return (f"tile {nb}x{next_pow2(problem.dim('block_size'))} over {cfg.num_warps} warps = {per_thread:g} "
                f"values a thread > {ELEMS_PER_THREAD}")
    # The [blocks, block] tile may go through shared memory for the per-block reductions.
    return smem_reason(elems * 4, gpu, "tile layout conversion")


def quant_redundant(cfg, problem, gpu) -> str | None:
    block_s = next_pow2(problem.dim("block_size"))
    n_blocks = problem.dim("rows") * problem.dim("cols") // problem.dim("block_size")
    nb, elems = _quant_tile(cfg, problem)
    if cfg.block_elems < block_s:
        return f"block_elems {cfg.block_elems} < one quantization block ({block_s}): same program as block_elems={block_s}"
    if nb > next_pow2(n_blocks):
        return f"{nb} blocks a program but the tensor has {n_blocks}"
    if elems < threads(cfg.num_warps):
        return f"{elems} elements for {threads(cfg.num_warps)} threads: threads idle"
    return None


def quant_problem(cols_of: Callable[[Any], int], block: int):
    def problem(mc, context, batch, phase):
        # One CSA layer's compressed entries (context / 4 per sequence), quantized in one call.
        rows = batch * math.ceil(context / CSA_RATIO)
        cols = cols_of(mc)
        dims = {"rows": rows, "cols": cols, "block_size": block, "pow2_scale": True, "dtype": "float32"}
        out_bytes = rows * cols if block == 64 else rows * cols // 2
        return dims, rows * cols * 4 + out_bytes + rows * (cols // block) * 4
    return problem


WARPS = Param("num_warps", (1, 2, 4, 8, 16))

FP8_QUANTIZE = KernelSpace(
    name="fp8_quantize", package="fp8_quantize", config_class="Fp8QuantConfig", function="fp8_quantize:fp8_quantize",
    params=(Param("block_elems", tuple(1 << i for i in range(6, 16))), WARPS,
            Param("cast", ("bits", "native"), optional=True)),
    problem=quant_problem(lambda mc: mc.head_dim - mc.rope_head_dim, 64),
    hard=(rule_threads, quant_hard), redundant=(quant_redundant,),
    doc="x [rows = batch * context/4, head_dim - rope_dim] fp32, block 64, pow2 scales: the non-rope dims "
        "of one CSA layer's compressed entries (kv_layout.pack_main_entries). num_stages is not tuned "
        "(no loop in the kernel). cast (bits / native e4m3 conversion) is tuned where the config has it: "
        "the gate requires a bit-exact match, so 'native' wins only where it is exact.")
