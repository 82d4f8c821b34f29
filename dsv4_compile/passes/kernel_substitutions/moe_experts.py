"""Pass-framework registration: torch.ops.dsv4.moe_experts / moe_experts_fp8 / moe_experts_fp8_w8a8 /
moe_experts_mxfp4 / moe_experts_mxfp4_w4a8 -> torch.ops.dsv4_triton.moe_experts / _fp8 / _fp8_w8a8 /
_mxfp4 / _mxfp4_w4a8 ("moe_experts.triton", "moe_experts_fp8.triton", "moe_experts_fp8_w8a8.triton",
"moe_experts_mxfp4.triton", "moe_experts_mxfp4_w4a8.triton"): one grouped-expert kernel, the weight
format a launch constant, whether the activations are quantized to FP8 (W8A8, W4A8) decided by the op
(never by a table).

Applies to CUDA tensors: x [T, D] float32 / bfloat16 / float16 with static D; topk_ids [T, k] int32 /
int64; topk_weights [T, k] float32; expert weights in x's dtype, FP8 e4m3 or MXFP4 (int8/uint8) with
e8m0 (or float32) scales; MXFP4 needs D and I multiples of 32, W8A8 and W4A8 multiples of 128.
Config by T's regime (kernels/moe_experts/config.py): prefill, the tuned entry of the smallest token
count >= T (else the largest, `config_string` over the table's "by_context"); decode, the decode entry
of the smallest batch >= T (tuned at T = batch), else the largest; untuned, the kernel's per-GPU
default for the regime (the W8A8 and W4A8 ops': kernels/moe_experts/config.py, w8a8_config and
w4a8_config). A symbolic T bounded within the decode regime (an exported decode engine's T = B <=
max_batch) is configured as its bound; any other symbolic T takes the table's "default" or "" (the
launcher's default for the prefill regime). Each op reads its own space's table (moe_experts_fp8,
moe_experts_fp8_w8a8, moe_experts_mxfp4_w4a8): tiles and routes only (the same numbers).
`interpreter_substitutions()`: the same, on CPU tensors under TRITON_INTERPRET (tests only).
"""
from __future__ import annotations

import importlib

import torch
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from ...kernels.moe_experts.config import ACT_BLOCK, default_config, regime
from ..registry import Substitution, register
from ._common import (KERNEL_PRIORITY, config_string, decode_entry_config, device_reason, interpreter_twin,
                      kernel_files, most_rows, target_gpu)

# registers torch.ops.dsv4_triton.moe_experts*
_kernel = importlib.import_module("...kernels.moe_experts.moe_experts", __package__)
_FILES = kernel_files("moe_experts/moe_experts.py", "moe_experts/config.py")
_X_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SCALE_DTYPES = (torch.float8_e8m0fnu, torch.uint8, torch.float32)


def _common_reason(x, topk_ids, topk_weights, allow_cpu):
    reason = device_reason(x, allow_cpu)
    if reason:
        return reason
    if x.dtype not in _X_DTYPES or x.dim() != 2 or not isinstance(x.shape[1], int):
        return f"x is {x.dtype} {tuple(x.shape)}; needs [T, D] float32 / bfloat16 / float16 with static D"
    if topk_ids.dtype not in (torch.int32, torch.int64) or topk_weights.dtype != torch.float32:
        return f"topk_ids {topk_ids.dtype}, topk_weights {topk_weights.dtype}; needs int32/int64 and float32"
    return None


def _float_reason(x, topk_ids, topk_weights, w1, w2, w3, swiglu_limit, allow_cpu=False):
    reason = _common_reason(x, topk_ids, topk_weights, allow_cpu)
    if reason is None and any(w.dtype != x.dtype for w in (w1, w2, w3)):
        return f"expert weights {w1.dtype}/{w2.dtype}/{w3.dtype}; needs x's dtype {x.dtype}"
    return reason


def _fp8_reason(x, topk_ids, topk_weights, w1, w2, w3, s1, s2, s3, swiglu_limit, allow_cpu=False):
    reason = _common_reason(x, topk_ids, topk_weights, allow_cpu)
    if reason is None and any(w.dtype != torch.float8_e4m3fn for w in (w1, w2, w3)):
        return f"expert weights {w1.dtype}; needs float8_e4m3fn"
    if reason is None and (s1.dtype not in _SCALE_DTYPES or len({s1.dtype, s2.dtype, s3.dtype}) != 1):
        return f"scales {s1.dtype}/{s2.dtype}/{s3.dtype}; needs one of float8_e8m0fnu, uint8, float32"
    return reason


def _fp8_w8a8_reason(x, topk_ids, topk_weights, w1, w2, w3, s1, s2, s3, swiglu_limit, allow_cpu=False):
    reason = _fp8_reason(x, topk_ids, topk_weights, w1, w2, w3, s1, s2, s3, swiglu_limit, allow_cpu)
    if reason is None and (x.shape[1] % ACT_BLOCK or w1.shape[1] % ACT_BLOCK):
        return f"D = {x.shape[1]}, I = {w1.shape[1]}; W8A8 needs multiples of {ACT_BLOCK}"
    return reason


def _mxfp4_reason(x, topk_ids, topk_weights, w1, w2, w3, s1, s2, s3, swiglu_limit, allow_cpu=False):
    reason = _common_reason(x, topk_ids, topk_weights, allow_cpu)
    if reason is None and any(w.dtype not in (torch.int8, torch.uint8) for w in (w1, w2, w3)):
        return f"expert weights {w1.dtype}; needs int8 / uint8 (two e2m1 codes per byte)"
    if reason is None and (s1.dtype not in _SCALE_DTYPES or len({s1.dtype, s2.dtype, s3.dtype}) != 1):
        return f"scales {s1.dtype}/{s2.dtype}/{s3.dtype}; needs one of float8_e8m0fnu, uint8, float32"
    if reason is None and (x.shape[1] % 32 or w1.shape[1] % 32):
        return f"D = {x.shape[1]}, I = {w1.shape[1]}; MXFP4 needs multiples of 32"
    return reason


def _mxfp4_w4a8_reason(x, topk_ids, topk_weights, w1, w2, w3, s1, s2, s3, swiglu_limit, allow_cpu=False):
    reason = _mxfp4_reason(x, topk_ids, topk_weights, w1, w2, w3, s1, s2, s3, swiglu_limit, allow_cpu)
    if reason is None and (x.shape[1] % ACT_BLOCK or w1.shape[1] % ACT_BLOCK):
        return f"D = {x.shape[1]}, I = {w1.shape[1]}; W4A8 needs multiples of {ACT_BLOCK}"
    return reason


def _config(target, x, topk_ids, *rest, weight_format: str = "float", act: str = "x"):
    T, k = topk_ids.shape
    k = int(k)
    table = target.table or {}
    # A symbolic T whose every value is decode-sized (an exported decode engine: T = B <= max_batch) takes
    # the decode config of its largest value; any other symbolic T the table's default or the launcher's.
    rows = most_rows(T)
    if rows is None or (not is_concrete_int(T) and regime(rows * k) == "prefill"):
        return {"config": str(table.get("default") or "")}
    default = default_config(target_gpu(target, x.device.type), rows * k, weight_format, act)
    if regime(rows * k) == "prefill":  # prefill entries are keyed by their token count (context x batch 1)
        return {"config": config_string({"by_context": table.get("by_context")}, rows, default)}
    # Decode entries were tuned at T = their batch (one token per sequence).
    return {"config": decode_entry_config(table, rows, default)}


def _w8a8_config(target, *args):
    """The W8A8 op's config: its defaults (w8a8_config) under its own table."""
    return _config(target, *args, weight_format="fp8", act="fp8")


def _w4a8_config(target, *args):
    """The W4A8 op's config: its defaults (w4a8_config) under its own table."""
    return _config(target, *args, weight_format="mxfp4", act="fp8")


def _float(x, topk_ids, topk_weights, w1, w2, w3, swiglu_limit, config: str = ""):
    c = [t.contiguous() for t in (x, topk_ids, topk_weights, w1, w2, w3)]
    return torch.ops.dsv4_triton.moe_experts(*c, swiglu_limit, config)


def _fp8(x, topk_ids, topk_weights, w1, w2, w3, s1, s2, s3, swiglu_limit, config: str = ""):
    c = [t.contiguous() for t in (x, topk_ids, topk_weights, w1, w2, w3, s1, s2, s3)]
    return torch.ops.dsv4_triton.moe_experts_fp8(*c, swiglu_limit, config)


def _fp8_w8a8(x, topk_ids, topk_weights, w1, w2, w3, s1, s2, s3, swiglu_limit, config: str = ""):
    c = [t.contiguous() for t in (x, topk_ids, topk_weights, w1, w2, w3, s1, s2, s3)]
    return torch.ops.dsv4_triton.moe_experts_fp8_w8a8(*c, swiglu_limit, config)


def _mxfp4(x, topk_ids, topk_weights, w1, w2, w3, s1, s2, s3, swiglu_limit, config: str = ""):
    c = [t.contiguous() for t in (x, topk_ids, topk_weights, w1, w2, w3, s1, s2, s3)]
    return torch.ops.dsv4_triton.moe_experts_mxfp4(*c, swiglu_limit, config)


def _mxfp4_w4a8(x, topk_ids, topk_weights, w1, w2, w3, s1, s2, s3, swiglu_limit, config: str = ""):
    c = [t.contiguous() for t in (x, topk_ids, topk_weights, w1, w2, w3, s1, s2, s3)]
    return torch.ops.dsv4_triton.moe_experts_mxfp4_w4a8(*c, swiglu_limit, config)


def _register(name, op, replacement, reason, config=_config) -> Substitution:
    return register(Substitution(
        name=name, op=op, replacement=replacement, applies=lambda target, *args: reason(*args), config=config,
        version="1", priority=KERNEL_PRIORITY, source_files=_FILES))


FLOAT = _register("moe_experts.triton", torch.ops.dsv4.moe_experts.default, _float, _float_reason)
FP8 = _register("moe_experts_fp8.triton", torch.ops.dsv4.moe_experts_fp8.default, _fp8, _fp8_reason)
FP8_W8A8 = _register("moe_experts_fp8_w8a8.triton", torch.ops.dsv4.moe_experts_fp8_w8a8.default, _fp8_w8a8,
                     _fp8_w8a8_reason, _w8a8_config)
MXFP4 = _register("moe_experts_mxfp4.triton", torch.ops.dsv4.moe_experts_mxfp4.default, _mxfp4, _mxfp4_reason)
MXFP4_W4A8 = _register("moe_experts_mxfp4_w4a8.triton", torch.ops.dsv4.moe_experts_mxfp4_w4a8.default, _mxfp4_w4a8,
                       _mxfp4_w4a8_reason, _w4a8_config)


def interpreter_substitutions() -> list[Substitution]:
    return [interpreter_twin(FLOAT, _float_reason), interpreter_twin(FP8, _fp8_reason),
            interpreter_twin(FP8_W8A8, _fp8_w8a8_reason), interpreter_twin(MXFP4, _mxfp4_reason),
            interpreter_twin(MXFP4_W4A8, _mxfp4_w4a8_reason)]
