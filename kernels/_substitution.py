"""Shared pieces of the pass-framework registrations of the quant / Newton-Schulz / mHC kernels
(`kernels/<op>/substitution.py`): the device predicate, the tuned-table lookup, and the
interpreter twin of a substitution.

Tuned table format (what `target.table` holds for one substitution and GPU, written by tuning):
{"default": "<KernelConfig.to_str()>"}; absent or untuned -> the kernel's per-GPU default config.
The chosen config travels as the dsv4_triton op's trailing `config` string and shows in the report.
"""
from __future__ import annotations

import dataclasses

from dsv4_compile.passes import Substitution, register

from ._common import INTERPRET

KERNEL_PRIORITY = 10  # above the decompositions (-100): where a kernel applies, it wins


def device_reason(t, allow_cpu: bool) -> str | None:
    """None when the kernel can run on t's device: CUDA, or (allow_cpu) CPU under TRITON_INTERPRET."""
    if t.device.type == "cuda" or (allow_cpu and INTERPRET):
        return None
    return f"needs CUDA tensors ({t.device.type})"


def table_config(target, default_config, device_type: str) -> dict:
    """{"config": str} from the tuned table's "default" entry, else the kernel's default for the GPU."""
    table = target.table or {}
    if table.get("default"):
        return {"config": str(table["default"])}
    gpu = target.gpu if device_type == "cuda" else "interpreter"
    return {"config": default_config(gpu).to_str()}


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


def interpreter_twin(sub: Substitution, reason) -> Substitution:
    """The same substitution applying to CPU tensors under TRITON_INTERPRET (tests only; never
    registered: the 'all' selection on a CPU target keeps decomposing)."""
    return dataclasses.replace(sub, name=sub.name + "_interpret",
                               applies=lambda target, *args: reason(*args, allow_cpu=True))
