"""Pass-framework registration: torch.ops.dsv4.fp8_linear -> torch.ops.dsv4_triton.fp8_linear
("fp8_linear.triton"), the block-scaled FP8 GEMM of kernels/fp8_linear/.

Applies to CUDA tensors: x float32 / bfloat16 / float16 with a static K that is a multiple of 128,
weight float8_e4m3fn [N, K], scale float32 [cdiv(N, 128), K/128]. Otherwise the node is left to the
plain op, with the reason. The config follows the row count M (x's leading dims): up to SMALL_M rows
(decode, small batches; a symbolic M by its bound, as an exported decode engine's B <= max_batch) the
tuned decode entry by batch, else the small-M default (one or two rows: the CUDA-core GEMV where the
work is small; else the swapped tile with fused input quantization), never a prefill entry; where a
symbolic M's values span several few-rows regimes (ROW_TIERS: 1, GEMV_ROWS, FEW_M) whose configs differ,
the engine gets a torch.cond on M at each such bound (M <= bound: that bound's config). More rows (or
a symbolic M without such a bound): the tuned prefill table by token count ("by_context", as the
other kernels' context tables), else the large-M default. On the H100 / H200 the large-M default
routes the product to cuBLAS's blockwise-scaled FP8 GEMM (gemm=cublas: our quantization kernel, then
torch._scaled_mm with 1x128 / 128x128 scales) where the kernel's probe admits it, the Triton GEMM
otherwise (kernels/fp8_linear; bench/results/H200/fp8_linear.md says why).
`interpreter_substitutions()`: the same on CPU tensors under TRITON_INTERPRET (tests only).
"""
from __future__ import annotations

import importlib
import math

import torch

from ...kernels.fp8_linear.config import ROW_TIERS, SCALE_BLOCK, SMALL_M, default_config
from ..registry import Substitution, register
from ._common import (KERNEL_PRIORITY, config_string, decode_entry_config, device_reason, interpreter_twin,
                      kernel_files, most_rows, static_rows, target_gpu)

# registers torch.ops.dsv4_triton.fp8_linear
_kernel = importlib.import_module("...kernels.fp8_linear.fp8_linear", __package__)
_FILES = kernel_files("fp8_linear/fp8_linear.py", "fp8_linear/config.py", "_jit_utils.py")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _reason(x, weight, scale, allow_cpu=False):
    reason = device_reason(x, allow_cpu)
    if reason:
        return reason
    if x.dtype not in _DTYPES:
        return f"x is {x.dtype}; needs float32 / bfloat16 / float16"
    if weight.dtype != torch.float8_e4m3fn or scale.dtype != torch.float32:
        return f"weight {weight.dtype} / scale {scale.dtype}; needs float8_e4m3fn / float32"
    k = x.shape[-1] if x.dim() else 0
    if not isinstance(k, int) or k % SCALE_BLOCK:
        return f"K = {k} is not a static multiple of {SCALE_BLOCK}"
    return None


def _config(target, x, weight, scale) -> dict:
    n, k = weight.shape
    n = n if isinstance(n, int) else None
    gpu = target_gpu(target, x.device.type)
    most = most_rows(*x.shape[:-1])   # a symbolic M's bound: an exported decode engine's B <= max_batch
    if most is None or most > SMALL_M:
        m = static_rows(x)
        return {"config": config_string(target.table, m, default_config(gpu, m, n, k))}

    def at(rows):
        return decode_entry_config(target.table, rows, default_config(gpu, rows, n, k))

    config = {"config": at(most)}
    if static_rows(x) is None:
        # the engine's batches span several few-rows regimes: each bound below the engine's whose config
        # differs from the next regime's up becomes a cond on M (one token's GEMV, a few tokens' Triton
        # tile, the bound's cuBLAS GEMM)
        tiers, above = [], config["config"]
        for rows in sorted({r for r in ROW_TIERS if r < most}, reverse=True):
            here = at(rows)
            if here != above:
                tiers.insert(0, [rows, here])
            above = here
        if tiers:
            config["row_tiers"] = tiers
    return config


def _replacement(x, weight, scale, config: str = "", row_tiers=()):
    """The kernel op with `config`; with row_tiers ([[rows, config], ...], rows ascending), conds on x's
    row count M (symbolic: an engine's batch) run the first tier whose rows >= M, `config` above them."""
    args = (x.contiguous(), weight.contiguous(), scale.contiguous())
    if not row_tiers:
        return torch.ops.dsv4_triton.fp8_linear(*args, config)
    (rows, tier_config), higher = row_tiers[0], row_tiers[1:]
    return torch.cond(math.prod(x.shape[:-1]) <= rows,
                      lambda x, w, s: torch.ops.dsv4_triton.fp8_linear(x, w, s, tier_config),
                      lambda x, w, s: _replacement(x, w, s, config, higher), args)


SUBSTITUTION = register(Substitution(
    name="fp8_linear.triton", op=torch.ops.dsv4.fp8_linear.default, replacement=_replacement,
    applies=lambda target, *args: _reason(*args), config=_config, version="1", priority=KERNEL_PRIORITY,
    source_files=_FILES))


def interpreter_substitutions() -> list[Substitution]:
    return [interpreter_twin(SUBSTITUTION, _reason)]
