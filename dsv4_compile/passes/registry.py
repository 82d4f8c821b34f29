"""The substitution registry: what may replace a `torch.ops.dsv4.*` node, where, and with which config.

A `Substitution` says: "a node calling `op` may be replaced by `replacement(*args, **config)`, traced
inline, when `applies(target, *args)` returns None". `args` are the op's arguments in schema order
(defaults filled in); during the pass every tensor among them is a fake tensor (shape, dtype, device,
no data), so predicates and config functions look at metadata only.

Registering (a kernel engineer, in `dsv4_compile/passes/kernel_substitutions/<op>.py`, which
selection.discover() imports on first use):

    from dsv4_compile.passes import Substitution, register

    def applies(target, q, kv, attn_sink, topk_idxs, softmax_scale):
        if q.device.type != "cuda":
            return "needs CUDA tensors"                  # the report shows this reason per node
        return None

    def config(target, q, kv, attn_sink, topk_idxs, softmax_scale):
        # target.table: this substitution's tuned table for target.gpu (None when untuned)
        return pick_block_sizes(target.table, q.shape)   # JSON-able dict, passed as **kwargs

    register(Substitution(
        name="sparse_attention.triton",                   # selects with --passes sparse_attention[.triton]
        op=torch.ops.dsv4.sparse_attention.default,
        replacement=sparse_attention_triton,              # fn(q, kv, attn_sink, topk_idxs, softmax_scale, **config)
        applies=applies, config=config, version="1"))

Names: a selection token matches a substitution's full name or its family, the part before the first
dot ("decompose" selects every "decompose.<op>"). Among several enabled substitutions for one op, the
highest `priority` that applies wins; the built-in decompositions have the lowest priority, so they
are the fallback for nodes no kernel takes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

# (substitution name, gpu) -> that substitution's tuned table for that GPU, or None (untuned). The
# table must be JSON-serialisable: its contents are part of the pass manager's uuid().
ConfigSource = Callable[[str, str], "Mapping[str, Any] | None"]


def no_tables(name: str, gpu: str) -> None:
    """The default ConfigSource: nothing is tuned, every config function falls back to its default."""
    return None


@dataclass(frozen=True)
class Target:
    """What a predicate or config function knows besides the node's arguments."""

    gpu: str                                   # "cpu", "H100", "H200" (see dsv4_compile.compile.resolve_gpu)
    table: Mapping[str, Any] | None = None     # this substitution's tuned table for `gpu`, if any


def always(target: Target, *args) -> str | None:
    """Default predicate: applies everywhere."""
    return None


def no_config(target: Target, *args) -> dict:
    """Default config function: the replacement takes no configuration."""
    return {}


@dataclass(frozen=True)
class Substitution:
    """One way to replace the nodes of one `torch.ops.dsv4` op overload.

    name:        unique, "<family>.<what>" (e.g. "decompose.fp8_quantize", "sparse_attention.triton");
                 the name used by `--passes`, `bench --ops` and `tune --kernels`.
    op:          the OpOverload it replaces, e.g. torch.ops.dsv4.fp8_quantize.default.
    replacement: fn(*op_args, **config) -> the op's outputs (same structure, shapes and dtypes);
                 traced with make_fx on the node's fake arguments and inlined in place of the node.
                 It may call other dsv4 ops: those nodes are offered to the substitutions in turn.
    applies:     fn(target, *op_args) -> None if the node may be replaced, else the reason (one line).
    config:      fn(target, *op_args) -> JSON-able dict passed to `replacement` as keyword arguments.
    version:     bump when behaviour changes in a way the source hash cannot see (e.g. a data file).
    priority:    higher is tried first; the first substitution that applies wins.
    source_files: extra files whose contents are part of the identity (the uuid); the files that
                 define replacement/applies/config are always included.
    """

    name: str
    op: torch._ops.OpOverload
    replacement: Callable[..., Any]
    applies: Callable[..., str | None] = always
    config: Callable[..., dict] = no_config
    version: str = "1"
    priority: int = 0
    source_files: tuple[str, ...] = field(default=())

    @property
    def family(self) -> str:
        return self.name.split(".", 1)[0]


def op_key(op: torch._ops.OpOverload) -> str:
    """'dsv4.fp8_quantize' for the default overload, 'dsv4.x.overload' otherwise."""
    key = str(op)  # "dsv4.fp8_quantize.default"
    return key[: -len(".default")] if key.endswith(".default") else key


_REGISTRY: dict[str, Substitution] = {}


def register(sub: Substitution, *, replace: bool = False) -> Substitution:
    """Add `sub` to the registry. A second substitution with the same name is an error unless
    `replace` (meant for tests and notebooks that redefine a substitution)."""
    if not isinstance(sub.op, torch._ops.OpOverload):
        raise TypeError(f"substitution {sub.name!r}: op must be an OpOverload such as "
                        f"torch.ops.dsv4.fp8_quantize.default, got {sub.op!r}")
    if sub.name in ("all", "none") or not sub.name or "," in sub.name:
        raise ValueError(f"substitution name {sub.name!r} is reserved or contains a comma")
    if sub.name in _REGISTRY and not replace and _REGISTRY[sub.name] is not sub:
        raise ValueError(f"substitution {sub.name!r} is already registered; pass replace=True to redefine it")
    _REGISTRY[sub.name] = sub
    return sub


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def registered() -> dict[str, Substitution]:
    """Every substitution registered so far, by name (no discovery: see selection.substitutions)."""
    return dict(_REGISTRY)
