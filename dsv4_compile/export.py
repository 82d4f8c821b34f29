"""Export the prefill interface (tokens [B, S] -> last-position logits [B, V]) as deployable engines.

One `torch.export` per context bucket feeds every format:

    ep = export_prefill(model)                    # dsv4 ops decomposed (plain code or kernels): none left
    export_aoti(ep, "aoti/prefill-512.pt2")       # AOTInductor package, loadable without our Python code
    export_onnx(ep, "onnx/prefill-512.onnx")      # standard ONNX ops only, run by onnxruntime
    export_tensorrt("onnx/...onnx", "...engine")  # TensorRT's ONNX parser + builder (where installed)

How the dsv4 ops disappear: torch.export keeps each `torch.ops.dsv4.*` call as one node, then
`ExportedProgram.run_decompositions` replaces every node with what the pass manager picks for its
arguments (`PassManager.decomposition_table`, the same choice `dsv4_compile.compile` makes in its
graph pass): on a GPU target the Triton kernel substitution (a `torch.library.triton_op`, which the
program keeps as a dsv4_triton node and AOTInductor compiles into the package, so the .pt2 needs none
of our Python code), else the op's plain code, which is also the ONNX route (standard ONNX ops only).
No process-global state changes. Two points keep the graph standard-ONNX-clean:

- fp4_quantize / fp4_dequantize pack nibbles with integer arithmetic (code_lo + 16 * code_hi, then
  // and %) in model/ops.py itself: the ONNX exporter emits BitShift / BitwiseOr with mismatched
  int8/uint8 types for bitwise ops on uint8.
- indexer_topk keeps its stable descending sort (ties to the lowest index, the op's contract); for
  ONNX, `aten.sort.stable` is translated to TopK with k = the axis length: ONNX TopK breaks ties by
  the lower index, which is the stable order. (torch.topk is NOT used: on CPU vs CUDA it picks
  different index sets among ties, DESIGN.md traps.) -1 padding is handled inside the plain code by
  clamp, gather, mask, so no gather ever sees -1.

Shapes: the model is built with max_seq_len = bucket, so every compressed-entry count is static;
the batch is dynamic in [1, max_batch_size] and S in [2, bucket] (`seq_range`). If a dynamic export
fails, `export_prefill` falls back to a static S = bucket and says so (the engine then takes exactly
`bucket` tokens).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from unittest import mock

import torch

from .compile import inductor_options

MIN_SEQ = 2  # torch.export specialises sizes 0 and 1


# ---- the pass manager's choice, per dsv4 node ----------------------------------------------------------

def export_manager(gpu: str = "cpu", passes="all", config_source=None):
    """The PassManager whose `decomposition_table()` decides each dsv4 node of an exported program.

    The kernels' own predicates look at the tensors' device: a CPU-target export of a model that lives
    on the GPU must still take the plain code, so only the decompositions are offered there."""
    from .passes import select
    from .passes.manager import PassManager

    if config_source is None:
        from .tuning import config_source
    enabled = [s for s in select(passes) if gpu != "cpu" or s.family == "decompose"]
    return PassManager(enabled, gpu=gpu, config_source=config_source)


def _export(model, args: tuple, dynamic_shapes, manager) -> torch.export.ExportedProgram:
    ep = torch.export.export(model, args, dynamic_shapes=dynamic_shapes)
    sizes = dynamic_sizes(ep)  # before the retrace, which may fix a size to a number
    decomposed = ep.run_decompositions(manager.decomposition_table())
    narrowed = narrowed_sizes(ep, sizes)
    if narrowed:
        raise RuntimeError(f"export: the kernel substitutions narrowed {'; '.join(narrowed)}: the program would be "
                           f"wrong outside that range (a launcher decided on a symbolic size; it must decide on "
                           f"its bound, kernels/_common.largest_value)")
    return decomposed


def dynamic_sizes(ep: torch.export.ExportedProgram) -> dict:
    """{symbol: ("input.shape[d]", its shape env)} of the program's dynamic input sizes."""
    sizes: dict = {}
    for node in ep.graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(val, torch.Tensor):
            for d, size in enumerate(val.shape):
                if isinstance(size, torch.SymInt) and size.node.expr.is_Symbol:
                    sizes.setdefault(size.node.expr, (f"{node.name}.shape[{d}]", size.node.shape_env))
    return sizes


def narrowed_sizes(ep: torch.export.ExportedProgram, sizes: dict) -> list[str]:
    """Of `sizes` (dynamic_sizes(ep), taken right after the export), those whose range a later trace in
    the export's shape environment (run_decompositions) assumed narrower than the export declared
    (ep.range_constraints), or fixed to a number, each as "tokens.shape[0] from [1, 64] to [2, 16]
    (guard s0 <= 16 at file:line)".

    torch.export refuses such a guard in its own trace, but `run_decompositions` retraces without that
    check: a substitution whose launcher compares a symbolic size (`if rows > 16`) records a guard there
    that decides the launch for the example's size and silently narrows the range the program holds
    for (its sizes, grids and configs are then wrong outside it; on the H100 an FP8 linear's
    `m > FEW_M` made the as-shipped decode engine lay out a third of its MoE assignments at B 64)."""
    out = []
    for symbol, declared in ep.range_constraints.items():
        if symbol not in sizes:
            continue
        name, env = sizes[symbol]
        replaced = env.replacements.get(symbol)  # another size's expression, or a number (specialised)
        held = env.var_to_range.get(symbol, declared) if replaced is None else env.bound_sympy(replaced)
        if held.upper >= declared.upper and held.lower <= max(declared.lower, 2):
            continue  # backed sizes start at 2 in the trace (0/1 specialisation): not a narrowing
        sites = [(g.expr, _guard_site(g)) for g in env.guards if symbol in g.expr.free_symbols]
        ours = [(expr, site) for expr, site in sites if not site.startswith(" at torch/")]  # not export's own
        guards = [f"guard {expr}{site}" for expr, site in ours or sites]
        now = f"to [{held.lower}, {held.upper}]" + (f" (= {replaced})" if replaced is not None else "")
        out.append(f"{name} from [{declared.lower}, {declared.upper}] {now} ({', '.join(guards) or 'no guard recorded'})")
    return out


def _guard_site(guard) -> str:
    """' at file:line' of the code that made a shape guard, where torch records it."""
    frame = getattr(getattr(guard, "sloc", None), "framework_loc", None)
    if hasattr(frame, "filename"):
        return f" at {'/'.join(frame.filename.split(os.sep)[-3:])}:{frame.lineno}"
    return f" at {frame}" if isinstance(frame, str) else ""


# ---- torch.export -----------------------------------------------------------------------------------

@dataclass
class ExportResult:
    program: torch.export.ExportedProgram
    seq_range: tuple[int, int]     # accepted S, inclusive
    batch_range: tuple[int, int]   # accepted B, inclusive
    dynamic: bool
    kernels: dict                  # Triton kernel substitution -> {"calls", "configs"} traced in
    note: str | None = None        # why the export fell back to static shapes


def example_tokens(config, batch: int, seq: int, seed: int = 0, device=None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.vocab_size, (batch, seq), generator=gen, dtype=torch.int64)
    return tokens if device is None else tokens.to(device)


def _device_of(model) -> torch.device:
    return next(iter(model.parameters())).device


def export_prefill(model, dynamic: bool = True, gpu: str = "cpu", passes="all") -> ExportResult:
    """torch.export of model(tokens) for a model built with max_seq_len = its bucket.

    Every dsv4 op node becomes its plain code, or on a GPU target (gpu "H100", "H200") the Triton
    kernel the passes pick (see export_manager): no torch.ops.dsv4 node is left.
    Dynamic: B in [1, max_batch_size] (static 1 when max_batch_size is 1), S in [2, bucket]; the
    example uses B = 2 and S = bucket // 2 so that neither is specialised (0/1 specialisation).
    """
    from torch.export import Dim

    config = model.config
    bucket, max_b = config.max_seq_len, config.max_batch_size
    note = None
    if dynamic:
        b = min(2, max_b)
        example = example_tokens(config, b, max(MIN_SEQ + 1, bucket // 2), device=_device_of(model))
        spec = {1: Dim("S", min=MIN_SEQ, max=bucket)}
        if max_b > 1:
            spec[0] = Dim("B", min=1, max=max_b)
        manager = export_manager(gpu, passes)
        try:
            ep = _export(model, (example,), (spec,), manager)
            return ExportResult(ep, (MIN_SEQ, bucket), (1 if max_b > 1 else b, max_b if max_b > 1 else b), True,
                                dict(sorted(manager.exported_kernels.items())))
        except Exception as err:  # noqa: BLE001 (fall back to static shapes, and say why)
            note = f"dynamic export failed ({type(err).__name__}: {str(err).splitlines()[0][:200]}); static S = {bucket}"
    manager = export_manager(gpu, passes)
    example = example_tokens(config, 1, bucket, device=_device_of(model))
    ep = _export(model, (example,), None, manager)
    return ExportResult(ep, (bucket, bucket), (1, 1), False, dict(sorted(manager.exported_kernels.items())), note)


def export_program(module, args: tuple, dynamic_shapes, gpu: str = "cpu", passes="all"):
    """torch.export of `module(*args)`, every dsv4 node decided by the pass manager as in
    export_prefill -> (ExportedProgram, {kernel substitution: {"calls", "configs"}} traced in)."""
    manager = export_manager(gpu, passes)
    ep = _export(module, args, dynamic_shapes, manager)
    return ep, dict(sorted(manager.exported_kernels.items()))


# Custom-op namespaces a package may hold: triton_ops, which AOTInductor traces into and compiles, and
# torch.distributed's functional collectives (a parallel build's all-reduce), which AOTInductor of
# torch 2.13 packages and runs over the process's groups (gloo, CPU: distributed.py).
PACKAGEABLE_NAMESPACES = ("aten", "prims", "dsv4_triton", "_c10d_functional")


def leftover_custom_ops(ep: torch.export.ExportedProgram) -> list[str]:
    """Names of call targets that a .pt2 could not run without Python (must be empty before packaging)."""
    left = set()
    for node in ep.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            if node.target.namespace not in PACKAGEABLE_NAMESPACES:
                left.add(str(node.target))
    return sorted(left)


# ---- AOTInductor ----------------------------------------------------------------------------------

def runs_on_cuda(program: torch.export.ExportedProgram) -> bool:
    """Whether the program's weights or example inputs live on a CUDA device."""
    tensors = [*program.state_dict.values(), *program.constants.values(),
               *torch.utils._pytree.tree_leaves(program.example_inputs)]
    return any(isinstance(t, torch.Tensor) and t.is_cuda for t in tensors)


def aoti_options(cuda: bool) -> dict:
    """Inductor options of our AOTInductor packages: inductor_options() (without its emulated casts a
    package is 3e-3 to 3e-1 off eager on tiny), and on CUDA the two-pass compile: Inductor's default
    for AOTInductor tunes and compiles every Triton kernel by launching it alone on made-up inputs
    (random floats, zero integers), and a kernel that indexes memory through values computed from
    those inputs faults (pytorch issue 194018; seen as an illegal memory access in the mini prefill-
    cache engine with torch 2.11). Two passes run the graph once on the export's real example inputs
    instead, every kernel on the values it will see. And on CUDA, combo_kernels: independent small
    kernels launched as one (a decode step's norms, rotary and casts are latency, not bytes; the H200's
    flash-slice decode engine at 8K ran 1.048x at batch 1 and 1.011x at 64 with the same logits,
    bench/results/H200/session33_gpu_runs.md)."""
    options = inductor_options()
    if cuda:
        options["triton.autotune_at_compile_time"] = False
        options["combo_kernels"] = True
    return options


def export_aoti(result: ExportResult, path: str, inductor_configs: dict | None = None,
                with_constants: bool = True) -> str:
    """AOTInductor-compile and package `result.program` into `path` (.pt2). `with_constants=False`:
    the package holds code only (a build's engines share one weights file, shared_weights.py); it must
    get its constants (`load_constants`) before it runs."""
    left = leftover_custom_ops(result.program)
    if left:
        raise RuntimeError(f"cannot package: custom ops left in the graph ({', '.join(left)}); a .pt2 cannot run Python ops")
    cuda = runs_on_cuda(result.program)
    configs = {**aoti_options(cuda), **(inductor_configs or {})}
    if not with_constants:
        configs["aot_inductor.package_constants_in_so"] = False
    with wrapper_int_arrays_keyed_stably(), contextlib.nullcontext() if cuda else cpu_wrapper_declares_float8():
        return torch._inductor.aoti_compile_and_package(result.program, package_path=path, inductor_configs=configs)


def wrapper_int_arrays_keyed_stably() -> contextlib.AbstractContextManager:
    """AOTInductor's C++ wrapper with its size / stride array declarations cached per output buffer, as
    torch 2.13 does. torch 2.11 keys that cache on id(writeline), the transient id of a bound method: when
    two buffers' methods get the same id (memory planning writes its code twice, the first draft
    discarded), an array declared only in the discarded draft is reused and the wrapper fails to compile
    at random ("'int_array_52' was not declared in this scope": the as-shipped decode engine on the H100,
    torch 2.11, 2026-12-06, one of two identical exports). A torch whose method keys on the bound object
    already (`__self__` among its names) is left as it is."""
    from torch._inductor.codegen.cpp_wrapper_cpu import CppWrapperCpu

    if "__self__" in CppWrapperCpu.codegen_int_array_var.__code__.co_names:
        return contextlib.nullcontext()

    def codegen_int_array_var(self, int_array: str, writeline, known_statically=False, graph=None) -> str:
        key = (int_array, id(getattr(writeline, "__self__", writeline)), known_statically, id(graph) if graph else None)
        if key not in self.codegen_int_array_var_cache:
            self.codegen_int_array_var_cache[key] = self._codegen_int_array_var_impl(int_array, writeline,
                                                                                     known_statically)
        return self.codegen_int_array_var_cache[key]

    return mock.patch.object(CppWrapperCpu, "codegen_int_array_var", codegen_int_array_var)


def cpu_wrapper_declares_float8() -> contextlib.AbstractContextManager:
    """AOTInductor's CPU wrapper (the .cpp that calls the kernels) with c10's Float8_e4m3fn header included.
    It declares every kernel it calls, and a kernel writing the FP8 KV cache takes at::Float8_e4m3fn
    pointers; torch 2.13's runtime headers happen to define that type, torch 2.11's do not, and the
    wrapper failed to compile there ("'at::Float8_e4m3fn' has not been declared"). The include is
    harmless where the type is defined already; a torch without the hook patched here is left as it is."""
    from torch._inductor.codegen.cpp_wrapper_cpu import CppWrapperCpu

    original = getattr(CppWrapperCpu, "add_device_include", None)
    if original is None:
        return contextlib.nullcontext()

    def add_device_include(self, device: str) -> None:
        first = device not in getattr(self, "included_devices", ())
        original(self, device)
        if first and device == "cpu":
            self.header.splice("#include <c10/util/Float8_e4m3fn.h>")

    return mock.patch.object(CppWrapperCpu, "add_device_include", add_device_include)


# ---- ONNX -------------------------------------------------------------------------------------------

def _onnx_sort_stable(self, stable=None, dim: int = -1, descending: bool = False):
    """aten.sort.stable -> TopK over the whole axis (ONNX TopK: equal values keep the lower index first)."""
    from onnxscript import opset21 as op

    rank = len(self.shape) if getattr(self, "shape", None) is not None else None
    if dim != -1 and (rank is None or dim != rank - 1):
        raise NotImplementedError(f"sort over dim {dim} (only the last dim is translated)")
    k = op.Shape(self, start=-1)
    values, indices = op.TopK(self, k, axis=-1, largest=1 if descending else 0, sorted=1)
    return values, indices


ONNX_OPSET = 21


def export_onnx(result: ExportResult, path: str, example: torch.Tensor | tuple,
                input_names: list[str] = ("tokens",), output_names: list[str] = ("logits",),
                optimize: bool = False, weights=None, engine: str | None = None, prefix: str = "") -> list[str]:
    """Export to ONNX with standard ops only, check it; returns the files written (model [+ data]).
    `weights`: a shared_weights.WeightStore that gets the initializers (only those it does not hold
    yet; the model, engine `engine` of the store, points at offsets in its file; `prefix`: the
    model's FQN prefix in the exported module); None: they stay in the model, or in a data file
    beside it above 2 GB (torch.onnx's choice). `example`: the tokens, or the tuple of every input
    (engines with explicit state). `optimize`: run onnxscript's graph optimizer. Off by default:
    onnxruntime (and TensorRT's parser) optimize the graph again when they load it, and on these
    graphs the optimizer took 1-2.5x the translation's time (tiny decode: 544 s vs 212 s on a 2-core
    machine)."""
    import onnx

    from .files import written_atomically
    from .onnx_bitcast import onnx_view_dtype

    example = example if isinstance(example, tuple) else (example,)
    program = torch.onnx.export(result.program, example, dynamo=True, opset_version=ONNX_OPSET,
                                input_names=list(input_names), output_names=list(output_names),
                                custom_translation_table={torch.ops.aten.sort.stable: _onnx_sort_stable,
                                                          torch.ops.aten.view.dtype: onnx_view_dtype},
                                optimize=optimize, verbose=False)
    for node in program.model.graph.all_nodes():
        # The exporter's per-node stack traces, FX nodes and module paths: ~90% of a graph file's bytes
        # (tiny decode engine 11.7 -> 0.9 MB), read by nothing that runs the engine.
        node.metadata_props.clear()
    if weights is None:
        program.save(path)
    else:
        import onnx_ir as ir

        weights.add_onnx_model(program.model, path, engine or os.path.basename(path), prefix)
        with written_atomically(path) as tmp:
            ir.save(program.model, tmp)  # its external tensors keep their location (the store's file)
    model = onnx.load(path, load_external_data=False)
    external = sorted({t.location for t in _external_tensors(model)})
    onnx.checker.check_model(path if external else model, full_check=True)
    domains = {node.domain for node in model.graph.node} - {"", "ai.onnx"}
    if domains or model.functions:
        raise RuntimeError(f"ONNX graph uses non-standard domains {sorted(domains)} or functions "
                           f"{[f.name for f in model.functions]}")
    return sorted({path, *(os.path.join(os.path.dirname(path), location) for location in external)})


def _external_tensors(model):
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    for tensor in _get_all_tensors(model):
        if uses_external_data(tensor):
            yield ExternalDataInfo(tensor)


# ---- TensorRT -------------------------------------------------------------------------------------

TENSORRT_INSTALL = ("TensorRT is not installed: `pip install 'dsv4_compile[tensorrt]'` on a machine with a CUDA "
                    "GPU and access to NVIDIA's package index (pypi.nvidia.com)")


def tensorrt_unavailable() -> str | None:
    """None when TensorRT can build here (tensorrt imports and a CUDA GPU is visible), else why not."""
    try:
        import tensorrt  # noqa: F401
    except Exception:  # noqa: BLE001 (ImportError, or the PyPI stub failing to fetch the real package)
        return TENSORRT_INSTALL
    if not torch.cuda.is_available():
        return "TensorRT needs a CUDA GPU and none is visible; build the tensorrt format on a GPU machine"
    return None


def export_tensorrt(onnx_path: str, path: str, seq_range: tuple[int, int], batch_range: tuple[int, int]) -> str:
    """Serialized TensorRT engine from the ONNX file (parser + builder), one optimisation profile
    covering [batch_range] x [seq_range]. Not run by our tests (no TensorRT on our machines)."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_path):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    (b0, b1), (s0, s1) = batch_range, seq_range
    profile.set_shape(network.get_input(0).name, (b0, s0), (b1, s1), (b1, s1))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
    with open(path, "wb") as f:
        f.write(serialized)
    return path

