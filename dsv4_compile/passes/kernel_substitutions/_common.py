"""Shared pieces of the kernel substitutions (`passes/kernel_substitutions/<op>.py`): the device predicate,
the tuned-table lookup, the registration of a kernel substitution and its interpreter twin.

Tuned table (what `target.table` holds for one substitution and GPU: `tuning.config_source`), one
shape for every kernel:

    {"default": "<KernelConfig.to_str()>",                 # the config without a context
     "by_context": {"8192": "<config string>", ...},      # optional: per prefill context
     "entries": {...}}                                    # the raw entries (tuning.tables.pick), each
                                                          #   {phase, context, batch, config, dims}

`config_string` reads it: the entry of the smallest context >= the node's context (else the largest)
when the substitution passes a context and the table has "by_context"; else "default"; else the
kernel's per-GPU default. The chosen config travels as the dsv4_triton op's trailing `config` string
and shows in the report.
"""
from __future__ import annotations

import dataclasses
import math
import os

from ...kernels import _common as kernel_common
from ...kernels._common import INTERPRET, largest_value
from ..registry import Substitution, register

KERNEL_PRIORITY = 10  # above the decompositions (-100): where a kernel applies, it wins
KERNELS_DIR = os.path.dirname(os.path.abspath(kernel_common.__file__))


def kernel_files(*relative: str) -> tuple[str, ...]:
    """Paths of kernel source files ('fp8_quantize/config.py', '_jit_utils.py'): part of a
    substitution's identity (the pass manager's uuid hashes their contents)."""
    return tuple(os.path.join(KERNELS_DIR, path) for path in relative)


def device_reason(t, allow_cpu: bool) -> str | None:
    """None when the kernel can run on t's device: CUDA, or (allow_cpu) CPU under TRITON_INTERPRET."""
    if t.device.type == "cuda" or (allow_cpu and INTERPRET):
        return None
    return f"needs CUDA tensors ({t.device.type})"


def most_rows(*sizes) -> int | None:
    """The product of `sizes` (ints or symbolic sizes) if static, else its upper bound (an exported
    engine's Dim maxima: a decode engine's rows B <= max_batch), None when unbounded. What picks a
    decode-sized config for a node whose every possible size is decode-sized."""
    return largest_value(math.prod(sizes))


def static_rows(x) -> int | None:
    """A GEMM input x [..., K]'s row count M = the product of its leading dims; None when one is symbolic."""
    dims = x.shape[:-1]
    return math.prod(dims) if all(isinstance(d, int) for d in dims) else None


def config_string(table, context, default) -> str:
    """The config string for a node from a tuned table (see the module docstring): `context` is the
    node's query count (None: context-free), `default` the kernel's config for the GPU."""
    table = table or {}
    by_context = table.get("by_context") or {}
    if by_context and isinstance(context, int):
        sizes = sorted(int(k) for k in by_context)
        fit = [n for n in sizes if n >= context]
        return str(by_context[str(fit[0] if fit else sizes[-1])])
    return str(table.get("default") or default.to_str())


def fields_over(default, fields) -> str:
    """`default` with a tuned entry's `fields` (None: none), as a config string; an entry from another
    version of the config (unknown or invalid fields), `default`."""
    try:
        return (default.replace(**fields) if fields else default).to_str()
    except (TypeError, ValueError):
        return default.to_str()


def decode_entry_config(table, rows: int, default) -> str:
    """The config string for a decode-sized call of `rows` rows: the tuned decode entry of the smallest
    batch >= rows, else the largest (decode entries are tuned at rows = their batch); a table with none
    keeps `default` (never a prefill entry)."""
    decode = sorted(((e["batch"], e["config"]) for e in ((table or {}).get("entries") or {}).values()
                     if e.get("phase") == "decode"), key=lambda entry: entry[0])
    fit = [c for b, c in decode if b >= rows] or [c for _, c in decode[-1:]]
    return fields_over(default, fit[0] if fit else None)


def decode_entry_by_size(table, dim: str, size: int, default) -> str | None:
    """The config string of the tuned decode entry whose problem's `dim` is the smallest >= `size`, else
    the largest (its fields over `default`); None where no decode entry records `dim`. For a kernel whose
    decode entries differ by a size the node shows (the cached attention's cache entries N, which its
    context sets), where decode_entry_config's batch does not tell them apart."""
    sized = [e for e in ((table or {}).get("entries") or {}).values()
             if e.get("phase") == "decode" and dim in (e.get("dims") or {})]
    if not sized:
        return None
    sizes = sorted({int(e["dims"][dim]) for e in sized})
    chosen = next((n for n in sizes if n >= size), sizes[-1])
    # among entries of that size, the batch nearest 64 (as the table's default: tuned where decode is busy)
    entry = min((e for e in sized if int(e["dims"][dim]) == chosen),
                key=lambda e: abs(math.log2(max(1, e.get("batch", 1)) / 64)))
    return fields_over(default, entry["config"])


def target_gpu(target, device_type: str) -> str:
    """The GPU whose default config applies: the target's on CUDA, 'interpreter' otherwise."""
    return target.gpu if device_type == "cuda" else "interpreter"


def table_config(target, default_config, device_type: str) -> dict:
    """{"config": str} for a context-free kernel: the tuned "default", else the kernel's default."""
    return {"config": config_string(target.table, None, default_config(target_gpu(target, device_type)))}


def register_kernel(name: str, op, replacement, reason, default_config, source_files) -> Substitution:
    """Register `replacement` (a dsv4_triton op call taking the dsv4 op's arguments + config) for `op`.

    `reason(*op_args, allow_cpu=False)` is None where the kernel applies, else why the node is left
    alone; the config is the tuned table's, else `default_config(gpu)`, keyed on the first argument's
    device.
    """
    return register(Substitution(
        name=name, op=op, replacement=replacement,
        applies=lambda target, *args: reason(*args),
        config=lambda target, first, *rest: table_config(target, default_config, first.device.type),
        version="1", priority=KERNEL_PRIORITY, source_files=source_files))


def interpreter_twin(sub: Substitution, applies) -> Substitution:
    """The same substitution applying to CPU tensors under TRITON_INTERPRET (tests only; never
    registered: the 'all' selection on a CPU target keeps decomposing). `applies(*op_args,
    allow_cpu=True)` is the substitution's reason function."""
    return dataclasses.replace(sub, name=sub.name + "_interpret",
                               applies=lambda target, *args: applies(*args, allow_cpu=True))
