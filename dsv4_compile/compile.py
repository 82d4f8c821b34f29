"""`dsv4_compile.compile(model, gpu=..., passes=...)`: torch.compile with our substitution passes.

    compiled = dsv4_compile.compile(model, gpu="auto", passes="all")
    out = compiled(*inputs)                      # compiles on the first call, as torch.compile does
    compiled.dsv4_report.to_dict()               # what was substituted where (JSON-able)

`compiled` is what torch.compile returns (an OptimizedModule for a module); two attributes are added:
`dsv4_report` (a passes.SubstitutionReport, filled as graphs compile) and `dsv4_pass_manager`.

The report and the FX graph cache: Inductor skips post-grad passes on a cache hit, so the pass cannot
record anything then. Our backend therefore saves the records of every graph it compiles in a side
file keyed by the Dynamo graph, its input metadata and the pass manager's uuid, and restores them
when the pass did not run (report.restored_graphs); if nothing was saved (cache filled by another
tool), report.unrecorded_graphs counts the graph and report.complete is False. For that, a training
graph's backward is compiled with its forward (not lazily at the first backward call).

`resolve_gpu` is the one place that turns --gpu into a target name; the build CLI uses it too.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from typing import Any, Sequence

import torch

from .passes import select
from .kernels.gpus import KNOWN_GPUS, canonical_gpu
from .passes.registry import ConfigSource
from .passes.report import NodeRecord, SubstitutionReport

GPU_CHOICES = ("auto", "cpu", *KNOWN_GPUS)


class GpuError(ValueError):
    """A bad or unavailable --gpu. Message: one line naming the value and what is accepted or present."""


def detect_gpu() -> str:
    """'cpu' without CUDA, else the short name of CUDA device 0: 'H100', 'H200', or (for other GPUs)
    the device name as torch reports it, e.g. 'NVIDIA A100-SXM4-80GB'."""
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name(0)
    return canonical_gpu(name) if canonical_gpu(name) in KNOWN_GPUS else name


def resolve_gpu(gpu: str = "auto") -> str:
    """'auto' | 'cpu' | 'H100' | 'H200' (case-insensitive) -> the target name, checked against this machine.

    'auto' is what detect_gpu() finds. 'H100'/'H200' must be the CUDA device 0 of this machine: asking
    for a GPU that is absent is an error, never a silent fallback to another target.
    """
    choice = str(gpu).strip()
    canon = {c.lower(): c for c in GPU_CHOICES}.get(choice.lower())
    if canon is None:
        raise GpuError(f"unknown gpu {choice!r}; accepted: {', '.join(GPU_CHOICES)}")
    if canon in ("auto", "cpu"):
        return detect_gpu() if canon == "auto" else "cpu"
    present = detect_gpu()
    if present != canon:
        where = "no CUDA device is visible" if present == "cpu" else f"CUDA device 0 is {torch.cuda.get_device_name(0)!r}"
        raise GpuError(f"gpu {canon!r} requested but {where}; use gpu='auto' or 'cpu', or run on a {canon}")
    return canon


def inductor_options() -> dict[str, Any]:
    """The Inductor options every compile and AOTInductor package of ours starts from.

    - emulate_precision_casts: keep every downcast-upcast the plain code writes. The model simulates
      its cache formats (FP8/FP4 round trips, bf16 rope dims), and by default Inductor drops a bf16
      round trip inside a fused fp32 kernel, so decomposed ops would stop matching eager.
    - cpp.simdlen: the vector width Inductor would pick here anyway, pinned. Left unset, Inductor
      picks it from ATEN_CPU_CAPABILITY, which its FX graph cache key does not hold: a process with
      ATEN_CPU_CAPABILITY=avx2 on an AVX512 machine then reuses a graph cached at AVX512, recompiles
      its AVX512-strided C++ with AVX2 flags and computes garbage (NaN logits on tiny; 4.7e14 off on a
      one-line function; torch 2.13). Pinned, the width is part of the key.
    """
    from torch._inductor import config
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    options: dict[str, Any] = {"emulate_precision_casts": True}
    width = pick_vec_isa().bit_width() if config.cpp.simdlen is None else 0
    if width:
        options["cpp.simdlen"] = width
    return options


def compile(model, gpu: str = "auto", passes: str | Sequence[str] | None = "all", *,
            config_source: ConfigSource | None = None, mode: str | None = None,
            options: dict[str, Any] | None = None, **compile_kwargs):
    """torch.compile `model` with the dsv4 substitution passes installed as Inductor's post-grad pass.

    gpu: see resolve_gpu. passes: "all", "none", "a,b" or a list of substitution names or families
    (see dsv4_compile.passes.accepted_names()); bad names raise PassSelectionError (one line).
    config_source: (substitution name, gpu) -> tuned table or None; default: the tuned tables
    (tuning/tables/<gpu>.yaml via dsv4_compile.tuning.config_source); passes.no_tables for none.
    mode / options: as torch.compile's (Inductor options; both may be given), over
    `inductor_options()`. Other keyword arguments (fullgraph, dynamic, ...) go to
    torch.compile unchanged.
    Returns torch.compile's result with `.dsv4_report` and `.dsv4_pass_manager` attached.
    """
    from .passes.manager import PassManager

    target = resolve_gpu(gpu)
    if config_source is None:
        from .tuning import config_source
    manager = PassManager(select(passes), gpu=target, config_source=config_source)
    patches = inductor_options()
    if mode not in (None, "default"):
        from torch._inductor import list_mode_options

        patches.update(list_mode_options(mode, compile_kwargs.get("dynamic")))
    patches.update(options or {})
    if "post_grad_custom_post_pass" in patches:
        raise ValueError("options['post_grad_custom_post_pass'] is taken by the dsv4 pass manager; "
                         "register a Substitution instead")
    patches["post_grad_custom_post_pass"] = manager
    compiled = torch.compile(model, backend=_ReportingInductor(manager, patches), **compile_kwargs)
    # object.__setattr__: an OptimizedModule would forward a plain setattr to the wrapped model.
    object.__setattr__(compiled, "dsv4_report", manager.report)
    object.__setattr__(compiled, "dsv4_pass_manager", manager)
    return compiled


class _ReportingInductor:
    """A Dynamo backend: Inductor with `patches`, plus the report side file for FX-graph-cache hits."""

    def __init__(self, manager, patches: dict[str, Any]):
        self.manager = manager
        self.patches = patches
        self.__name__ = "dsv4_inductor"

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        report = self.manager.report
        graphs_before, nodes_before = report.graphs, len(report.nodes)
        path = _report_path(self.manager.uuid(), gm, example_inputs)
        # Compile the backward now rather than at the first backward call, so that its graph's
        # records belong to this Dynamo graph (saved and restored with the forward's).
        with torch._functorch.config.patch(force_non_lazy_backward_lowering=True):
            compiled = compile_fx(gm, example_inputs, config_patches=self.patches)
        if report.graphs > graphs_before:  # the pass ran: remember what it did for later cache hits
            _save(path, report.graphs - graphs_before, report.nodes[nodes_before:], graphs_before)
        else:  # served by the FX graph cache: the pass did not run
            _restore(path, report)
        return compiled


def _report_path(uuid: str, gm: torch.fx.GraphModule, example_inputs) -> str:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    def meta(x):
        if isinstance(x, torch.Tensor):
            return f"{x.dtype}{tuple(map(str, x.shape))}{tuple(map(str, x.stride()))}{x.device}{x.requires_grad}"
        return repr(x)

    h = hashlib.sha256()
    for part in (uuid, gm.code, *map(meta, example_inputs), str(torch.is_grad_enabled())):
        h.update(part.encode())
        h.update(b"\0")
    return os.path.join(cache_dir(), "dsv4_reports", h.hexdigest() + ".json")


def _save(path: str, graphs: int, nodes: list[NodeRecord], first_graph: int) -> None:
    records = [{**asdict(r), "graph": r.graph - first_graph} for r in nodes]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump({"graphs": graphs, "nodes": records}, f)
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old or the new file, never half


def _restore(path: str, report: SubstitutionReport) -> None:
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        report.graphs += 1
        report.unrecorded_graphs += 1
        return
    first = report.graphs
    report.nodes.extend(NodeRecord(**{**r, "graph": r["graph"] + first}) for r in saved["nodes"])
    report.graphs += saved["graphs"]
    report.restored_graphs += saved["graphs"]
