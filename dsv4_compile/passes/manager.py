"""The pass manager: Inductor's post-grad custom pass that applies the enabled substitutions.

Install it as `torch._inductor.config.post_grad_custom_post_pass` (dsv4_compile.compile does). On each
graph (forward, and backward when training) it walks the `torch.ops.dsv4.*` call_function nodes in
order, offers each to the enabled substitutions for its op (highest priority first), and replaces it
by the first one whose predicate returns None: the replacement function is traced with make_fx on
the node's fake arguments (shapes, dtypes, devices; symbolic sizes stay symbolic) under Inductor's
decomposition table, functionalised, and its nodes are inlined in place of the node. dsv4 nodes the
replacement itself calls (compress_kv's plain code calls fp8_quantize) are offered in turn, except
to the substitutions that produced them. Every dsv4 node ends in the report: replaced, with which
substitution and config, or left alone, with the reasons.

uuid(): Inductor puts it in the FX graph cache key, and a post-grad pass does NOT run on a cache hit.
So the uuid hashes everything that decides the rewritten graph: this package's own source, the target
GPU, and for each enabled substitution its name, version, priority, op, the source of its
replacement/predicate/config functions, the contents of the files defining them (helpers included)
plus its `source_files`, and its tuned table. File contents, never paths: every checkout of the same
source gets the same uuid. The tables are read once, when the manager is built,
so the uuid and the pass always agree.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import inspect
import json
import operator
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from .registry import ConfigSource, Substitution, Target, no_tables, op_key
from .report import REPORT_FORMAT, NodeRecord, SubstitutionReport

_HERE = os.path.dirname(os.path.abspath(__file__))
# The framework's own files: a change to how graphs are rewritten must change the uuid too.
_FRAMEWORK_FILES = tuple(os.path.join(_HERE, f) for f in ("manager.py", "registry.py"))


class PassManager(CustomGraphPass):
    """Rewrites dsv4 nodes with `substitutions` for `gpu` and records a SubstitutionReport.

    substitutions: the enabled ones (selection.select(...)); gpu: "cpu", "H100", "H200";
    config_source: (name, gpu) -> tuned table or None, read once here.
    After each graph, `graph_ops` gets {"before": Counter, "after": Counter} of every call_function
    target (str) in that graph: what the tests compare, not part of the report.
    """

    def __init__(self, substitutions: Sequence[Substitution], gpu: str = "cpu",
                 config_source: ConfigSource | None = None):
        self.substitutions = sorted(substitutions, key=lambda s: s.name)
        self.gpu = gpu
        source = config_source or no_tables
        self.tables: dict[str, Any] = {s.name: source(s.name, gpu) for s in self.substitutions}
        self._by_op: dict[Any, list[Substitution]] = collections.defaultdict(list)
        for s in sorted(self.substitutions, key=lambda s: (-s.priority, s.name)):
            self._by_op[s.op].append(s)
        self._uuid = _hash_identity(self.gpu, self.substitutions, self.tables)
        self.report = SubstitutionReport(gpu=gpu, enabled=[s.name for s in self.substitutions], uuid=self._uuid)
        self.graph_ops: list[dict[str, collections.Counter]] = []
        self.exported_kernels: dict[str, dict] = {}

    def uuid(self) -> str:
        return self._uuid

    # ---- the pass -----------------------------------------------------------------------------

    def __call__(self, graph: fx.Graph) -> None:
        index = self.report.graphs
        self.report.graphs += 1
        before = _op_histogram(graph)
        # node -> names of the substitutions whose replacements produced it (never offered to them again)
        lineage: dict[fx.Node, tuple[str, ...]] = {}
        seen: set[fx.Node] = set()
        replaced = 0
        while True:  # until the replacements bring no new dsv4 nodes
            todo = [n for n in graph.nodes if n not in seen and self._is_candidate(n)]
            if not todo:
                break
            for node in todo:
                seen.add(node)
                replaced += self._rewrite(graph, index, node, lineage)
        if replaced:
            graph.eliminate_dead_code()  # traced replacements may leave unused outputs behind
        self.graph_ops.append({"before": before, "after": _op_histogram(graph)})

    def _is_candidate(self, node: fx.Node) -> bool:
        target = node.target
        return node.op == "call_function" and isinstance(target, torch._ops.OpOverload) and (
            target.namespace == "dsv4" or target in self._by_op)

    def choose(self, op: torch._ops.OpOverload, values: Sequence[Any], ancestry: Sequence[str] = ()
               ) -> tuple[Substitution | None, dict, str]:
        """The first enabled substitution (by priority) that applies to `values` (the op's arguments
        in schema order, fake or real) and is not in `ancestry`, with its config; else (None, {}, the
        reasons each one gave)."""
        reasons = []
        for sub in self._by_op.get(op, []):
            if sub.name in ancestry:
                continue
            target = Target(gpu=self.gpu, table=self.tables[sub.name])
            reason = sub.applies(target, *values)
            if reason is not None:
                reasons.append(f"{sub.name}: {reason}")
                continue
            config = sub.config(target, *values)
            _check_config(sub, config)
            return sub, config, ""
        return None, {}, "; ".join(reasons)

    def decomposition_table(self) -> dict[torch._ops.OpOverload, Callable]:
        """{torch.ops.dsv4.<op>.default: function} for `ExportedProgram.run_decompositions`: the same
        choice as the graph pass, made per call. Each call takes the enabled substitution `choose`
        picks for its arguments: a kernel's replacement (a `torch.library.triton_op`, which the
        program keeps as a dsv4_triton node and AOTInductor compiles in), else the op's plain code
        (its decomposition, functionalised as run_decompositions needs). Plain code calling other dsv4
        ops (compress_kv -> fp8_quantize) is decomposed by the same table. Kernel calls are counted in
        `exported_kernels`: substitution name -> {"calls": n, "configs": [config dicts used]}."""
        from .decompose import decomposition_table as plain_table

        return {op: self._route(op, plain) for op, plain in plain_table(loops=self.gpu == "cpu").items()}

    def _route(self, op: torch._ops.OpOverload, plain: Callable) -> Callable:
        def route(*args, **kwargs):
            values = bind_arguments(op, args, kwargs)
            sub, config, _ = self.choose(op, values)
            if sub is None or sub.family == "decompose":
                return plain(*values)
            used = self.exported_kernels.setdefault(sub.name, {"calls": 0, "configs": []})
            used["calls"] += 1
            if config not in used["configs"]:
                used["configs"].append(config)
            return sub.replacement(*values, **config)

        return route

    def _rewrite(self, graph: fx.Graph, index: int, node: fx.Node, lineage: dict) -> bool:
        """Replace `node` by the first enabled substitution that applies; record what happened."""
        op = node.target
        args = _bind(op, node)
        values = fx.map_arg(args, lambda n: n.meta["val"])       # fake tensors / SymInts / constants
        ancestry = lineage.get(node, ())
        record = NodeRecord(graph=index, node=node.name, op=op_key(op), args=_describe(values),
                            via=ancestry[-1] if ancestry else None)
        sub, config, reason = self.choose(op, values, ancestry)
        if sub is None:
            record.reason = reason or f"no enabled substitution for {record.op}"
        else:
            new_nodes = _replace(graph, node, args, values, sub, config)
            for n in new_nodes:
                lineage[n] = (*ancestry, sub.name)
            record.substitution, record.version, record.config = sub.name, sub.version, config
        self.report.nodes.append(record)
        return record.replaced


# ================================================================================================
# Tracing a replacement and inlining it
# ================================================================================================

def _bind(op: torch._ops.OpOverload, node: fx.Node) -> list:
    """The node's arguments in schema order, defaults filled in (so replacements see every argument)."""
    try:
        return bind_arguments(op, node.args, node.kwargs)
    except TypeError as err:
        raise RuntimeError(f"{node.format_node()}: {err}") from None


def bind_arguments(op: torch._ops.OpOverload, args: Sequence[Any], kwargs: Mapping[str, Any]) -> list:
    """A call's arguments in `op`'s schema order, defaults filled in."""
    out = []
    for i, arg in enumerate(op._schema.arguments):
        if i < len(args):
            out.append(args[i])
        elif arg.name in kwargs:
            out.append(kwargs[arg.name])
        elif arg.has_default_value():
            out.append(arg.default_value)
        else:
            raise TypeError(f"argument {arg.name!r} of {op} is missing")
    return out


def trace_replacement(fn: Callable, args: Sequence[Any], values: Sequence[Any]) -> tuple[fx.GraphModule, list]:
    """Trace fn(*values) into an aten graph whose placeholders are the fx.Nodes among `args`.

    args: the node's arguments (fx.Nodes and constants); values: the same with each Node replaced by
    its fake value. Returns (graph module, the Nodes in placeholder order). Constants are closed over,
    so the traced graph is specialised to them (block sizes, flags), as the op call was.
    """
    from torch._dispatch.python import enable_python_dispatcher
    from torch._guards import detect_fake_mode
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx

    leaves, spec = torch.utils._pytree.tree_flatten(list(args))
    value_leaves = torch.utils._pytree.tree_flatten(list(values))[0]
    slots = [i for i, leaf in enumerate(leaves) if isinstance(leaf, fx.Node)]

    def call(*inputs):
        filled = list(value_leaves)
        for i, x in zip(slots, inputs):
            filled[i] = x
        return fn(*torch.utils._pytree.tree_unflatten(filled, spec))

    inputs = [value_leaves[i] for i in slots]
    fake_mode = detect_fake_mode(inputs)
    # Functionalised because post-grad IR is functional (plain code may use `+=` on fresh tensors).
    traced = torch.func.functionalize(call, remove="mutations")
    with fake_mode or contextlib.nullcontext(), enable_python_dispatcher():
        gm = make_fx(traced, select_decomp_table(), tracing_mode="real")(*inputs)
    gm.graph.eliminate_dead_code()
    return gm, [leaves[i] for i in slots]


def _replace(graph: fx.Graph, node: fx.Node, args: list, values: list, sub: Substitution, config: dict) -> list[fx.Node]:
    """Replace `node` by sub.replacement(*args, **config) traced inline; returns the new nodes."""
    fn = sub.replacement if not config else (lambda *a: sub.replacement(*a, **config))
    try:
        gm, inputs = trace_replacement(fn, args, values)
    except Exception as err:
        raise RuntimeError(f"substitution {sub.name!r} failed to trace on node {node.name} "
                           f"({_describe(values)}): {type(err).__name__}: {err}") from err
    env: dict[fx.Node, Any] = {}
    new_nodes: list[fx.Node] = []
    placeholders = iter(inputs)
    owner = graph.owning_module
    with graph.inserting_before(node):
        for n in gm.graph.nodes:
            if n.op == "placeholder":
                env[n] = next(placeholders)
            elif n.op == "get_attr":  # a constant tensor (e.g. a lookup table) or a cond's branch
                env[n] = graph.get_attr(_add_attribute(owner, getattr(gm, n.target)))
                env[n].meta.update(n.meta)
                new_nodes.append(env[n])
            elif n.op == "call_function":
                a, kw = fx.map_arg((n.args, n.kwargs), lambda x: env[x])
                new = graph.call_function(n.target, a, kw)
                new.meta.update(n.meta)
                new.meta["dsv4_substitution"] = sub.name
                for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
                    if key in node.meta:
                        new.meta.setdefault(key, node.meta[key])
                env[n] = new
                new_nodes.append(new)
            elif n.op == "output":
                outputs = fx.map_arg(n.args[0], lambda x: env[x])
            else:
                raise RuntimeError(f"substitution {sub.name!r}: unexpected {n.op} node in its traced graph")
    _check_outputs(sub, node, outputs)
    if len(node.target._schema.returns) > 1:  # tuple output: users are getitem(node, i)
        for user in list(node.users):
            if user.op != "call_function" or user.target is not operator.getitem:
                raise RuntimeError(f"substitution {sub.name!r}: {node.name} has a non-getitem user {user.name}")
            user.replace_all_uses_with(outputs[user.args[1]])
            graph.erase_node(user)
    else:
        out = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
        node.replace_all_uses_with(out)
    graph.erase_node(node)
    return new_nodes


def _add_attribute(owner: torch.nn.Module, value: torch.Tensor | fx.GraphModule) -> str:
    """Give `owner` a traced replacement's attribute under a fresh name: a constant tensor as a buffer,
    a subgraph (a torch.cond branch) as a submodule."""
    prefix = "_dsv4_subgraph_" if isinstance(value, fx.GraphModule) else "_dsv4_const_"
    k = 0
    while hasattr(owner, f"{prefix}{k}"):
        k += 1
    if isinstance(value, fx.GraphModule):
        owner.add_submodule(f"{prefix}{k}", value)
    else:
        owner.register_buffer(f"{prefix}{k}", value, persistent=False)
    return f"{prefix}{k}"


def _check_outputs(sub: Substitution, node: fx.Node, outputs) -> None:
    """The replacement must return what the op returns: same count, dtypes, ranks and static sizes."""
    want = node.meta.get("val")
    want = list(want) if isinstance(want, (tuple, list)) else [want]
    got = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
    got = [g.meta.get("val") if isinstance(g, fx.Node) else g for g in got]
    if len(got) != len(want):
        raise RuntimeError(f"substitution {sub.name!r} returns {len(got)} outputs, {node.target} returns {len(want)}")
    for w, g in zip(want, got):
        if not isinstance(w, torch.Tensor):
            continue
        same = isinstance(g, torch.Tensor) and g.dtype == w.dtype and g.dim() == w.dim() and all(
            not (isinstance(a, int) and isinstance(b, int)) or a == b for a, b in zip(g.shape, w.shape))
        if not same:
            raise RuntimeError(f"substitution {sub.name!r} on {node.name}: returns {_describe([g])}, "
                               f"{node.target} returns {_describe([w])}")


def _check_config(sub: Substitution, config) -> None:
    if not isinstance(config, dict) or not all(isinstance(k, str) for k in config):
        raise TypeError(f"substitution {sub.name!r}: config must be a dict with str keys, got {config!r}")
    try:
        json.dumps(config)
    except TypeError as err:
        raise TypeError(f"substitution {sub.name!r}: config {config!r} is not JSON-serialisable ({err})") from None


# ================================================================================================
# Small helpers: argument summaries, op histograms, the identity hash
# ================================================================================================

_DTYPE_SHORT = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
                torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8", torch.bool: "b8",
                torch.float8_e4m3fn: "f8e4m3"}


def _describe(values: Iterable[Any]) -> str:
    """'f32[2, 7, 64], 64, True': tensors as dtype[shape] (symbolic sizes by name), others by repr."""
    parts = []
    for v in values:
        if isinstance(v, torch.Tensor):
            dims = ", ".join(str(d) for d in v.shape)
            parts.append(f"{_DTYPE_SHORT.get(v.dtype, str(v.dtype))}[{dims}]" + ("" if v.device.type == "cpu" else f"@{v.device}"))
        else:
            parts.append(repr(v) if not isinstance(v, torch.SymInt) else str(v))
    return ", ".join(parts)


def _op_histogram(graph: fx.Graph) -> collections.Counter:
    return collections.Counter(str(n.target) for n in graph.nodes if n.op == "call_function")


def callable_identity(fn: Callable) -> tuple[str, list[str]]:
    """(text that changes when fn's code changes, files that define it).

    Source via inspect where available; functools.partial adds its bound arguments; a callable
    without source (a C function, a lambda typed in a REPL) falls back to its qualified name and
    bytecode.
    """
    import functools

    if isinstance(fn, functools.partial):
        text, files = callable_identity(fn.func)
        return f"partial({text}, {fn.args!r}, {sorted(fn.keywords.items())!r})", files
    target = inspect.unwrap(fn)
    files = []
    try:
        files.append(os.path.abspath(inspect.getsourcefile(target)))
    except (TypeError, OSError):
        pass
    try:
        text = inspect.getsource(target)
    except (TypeError, OSError):
        code = getattr(target, "__code__", None)
        text = f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', repr(target))}"
        if code is not None:
            text += code.co_code.hex() + repr(code.co_consts)
    return text, files


def _hash_identity(gpu: str, subs: Sequence[Substitution], tables: dict[str, Any]) -> str:
    h = hashlib.sha256()

    def put(text: str) -> None:
        h.update(text.encode())
        h.update(b"\0")

    def file_digest(path: str) -> bytes:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).digest()

    def put_file(path: str) -> None:
        h.update(file_digest(path))

    put(f"dsv4 passes, report format {REPORT_FORMAT}, gpu {gpu}")
    for path in _FRAMEWORK_FILES:
        put_file(path)
    for sub in subs:  # sorted by name by the caller
        put(f"{sub.name}|{sub.version}|{sub.priority}|{sub.op}")
        files = set(os.path.abspath(p) for p in sub.source_files)
        for fn in (sub.replacement, sub.applies, sub.config):
            text, fn_files = callable_identity(fn)
            put(text)
            files.update(fn_files)
        # Contents only, in content order: two checkouts (or installs) of one source share cache keys.
        for digest in sorted(file_digest(path) for path in files):
            h.update(digest)
        put(json.dumps(tables.get(sub.name), sort_keys=True, default=repr))
    return h.hexdigest()
