"""How `build` schedules its exports: one task per (context bucket, engine kind, format group), how many
processes by default, and the order and timings it hands to the manifest. (The real parallel build, with its
workers, is the shared `built` fixture of test_build.py / test_generate.py.)"""
from __future__ import annotations

import argparse
import io
import sys
import types

import pytest
import torch

from dsv4_compile import build, steps
from dsv4_compile.manifest import EngineRecord, Verification
from dsv4_compile import ModelConfig
from dsv4_compile.plan import GPU_EXPORT_MARGIN, Plan, export_jobs, format_groups, task_threads, usable_cpus, weights_bytes


def _plan(tmp_path, *argv) -> Plan:
    parser = argparse.ArgumentParser()
    build.add_arguments(parser)
    return Plan(parser.parse_args(["--gpu", "cpu", "--out", str(tmp_path / "out"), *argv]))


def test_one_task_per_bucket_and_engine_kind_on_the_cpu(tmp_path):
    """On the CPU one program per engine serves every format: one task makes them all."""
    plan = _plan(tmp_path, "--context", "256,512")
    both = ("aoti", "onnx")
    assert plan.export_tasks() == [(256, "prefill", both), (256, "prefill-cache", both), (256, "decode", both),
                                   (512, "prefill", both), (512, "prefill-cache", both), (512, "decode", both)]


def test_a_gpu_build_exports_each_format_on_its_own():
    """On a GPU AOTInductor's and ONNX's programs share nothing: a task each, side by side (the build's
    longest chain was AOTInductor then ONNX, one after the other); TensorRT with ONNX, prefill only."""
    assert format_groups(["aoti", "onnx"], cuda=True) == [("aoti",), ("onnx",)]
    assert format_groups(["aoti", "onnx", "tensorrt"], cuda=True) == [("aoti",), ("onnx", "tensorrt")]
    assert format_groups(["onnx"], cuda=True) == [("onnx",)]
    assert format_groups(["aoti", "onnx"], cuda=False) == [("aoti", "onnx")]
    plan = types.SimpleNamespace(buckets=[256], formats=["aoti", "tensorrt"], cuda=True)  # no TensorRT here
    assert Plan.export_tasks(plan) == [(256, "prefill", ("aoti",)), (256, "prefill", ("tensorrt",)),
                                   (256, "prefill-cache", ("aoti",)), (256, "decode", ("aoti",))]


def test_default_jobs(tmp_path):
    assert _plan(tmp_path).jobs == min(3, usable_cpus())  # CPU, seeded weights: a process per task
    assert _plan(tmp_path, "--context", "256,512").jobs == min(6, usable_cpus())
    assert _plan(tmp_path, "--jobs", "5").jobs == 5


GIB = 1 << 30


def test_gpu_build_export_jobs_by_memory_and_cores():
    """A GPU build exports in parallel where the GPU holds a model copy per process (2 x weights + margin)
    and the host has the cores; never fewer than one process."""
    assert export_jobs(3, 16, 6 * GIB, 139 * GIB) == 3     # mini on an H200 host: its 3 engines at once
    assert export_jobs(6, 16, 6 * GIB, 139 * GIB) == 4     # 2 buckets: 4 by the host's 16 cores
    assert export_jobs(3, 16, 30 * GIB, 79 * GIB) == 1     # a 30 GiB model on an 80 GB H100: one copy
    assert export_jobs(3, 8, 6 * GIB, 139 * GIB) == 2      # 8 cores
    assert export_jobs(3, 16, 200 * GIB, 79 * GIB) == 1    # does not fit twice: still one process
    assert export_jobs(6, 2) == 2                          # a CPU build: by tasks and cores only
    # mini's 3 AOTInductor and 3 ONNX tasks: an ONNX task (single-threaded Python) takes one core
    assert export_jobs(6, 16, 6 * GIB, 139 * GIB, one_core_tasks=3) == 6
    assert export_jobs(6, 8, 6 * GIB, 139 * GIB, one_core_tasks=3) == 4
    assert export_jobs(6, 16, 6 * GIB, 79 * GIB, one_core_tasks=3) == 4  # 80 GB: 4 copies of 2 x 6 + 4 GiB


def test_gpu_default_jobs_reads_the_free_gpu_memory_and_the_models_size(monkeypatch):
    import torch

    from dsv4_compile import plan as plan_module

    config = ModelConfig.load("mini")
    size = weights_bytes(config)
    assert 4 * GIB < size < 8 * GIB                         # mini: about 5.6 GB in bf16 (its head in fp32)
    fake = types.SimpleNamespace(state=None, cuda=True, config=config,
                                 export_tasks=lambda: [(8192, k, ("aoti",)) for k in "abc"])
    monkeypatch.setattr(plan_module, "usable_cpus", lambda: 16)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (139 * GIB, 141 * GIB))
    assert Plan.default_jobs(fake) == 3
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (2 * size, 141 * GIB))   # a busy GPU
    assert Plan.default_jobs(fake) == 1
    # room for three export processes, but the build's own model (its compile check runs beside them)
    # takes one copy and its margin
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (3 * (2 * size + GPU_EXPORT_MARGIN), 141 * GIB))
    assert Plan.default_jobs(fake) == 2
    fake.state = {"weights": "loaded"}                                                 # weights from a file
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (139 * GIB, 141 * GIB))
    assert Plan.default_jobs(fake) == 1


def test_running_tasks_share_the_cores():
    """An ONNX task beside AOTInductor ones (a GPU build) takes one core, the AOTInductor tasks the rest;
    on the CPU every task compiles and they share the cores evenly."""
    kinds = ("prefill", "prefill-cache", "decode")
    gpu = [(8192, k, (fmt,)) for k in kinds for fmt in ("aoti", "onnx")]
    assert task_threads(gpu, 6, 16) == {True: 4, False: 1}     # 3 x 4 + 3 x 1 of 16 cores
    assert task_threads(gpu, 4, 8) == {True: 2, False: 1}      # 3 compile first, 1 ONNX
    assert task_threads(gpu, 2, 16)[True] == 8                  # the first two tasks both compile
    cpu = [(512, k, ("aoti", "onnx")) for k in kinds]
    assert task_threads(cpu, 2, 2)[True] == 1 and task_threads(cpu, 3, 16)[True] == 5


def test_jobs_must_be_positive(tmp_path):
    parser = argparse.ArgumentParser()
    build.add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--jobs", "0"])


def test_one_process_export_keeps_manifest_order_and_merges_timings(tmp_path, monkeypatch):
    """jobs = 1: the tasks run here, one model per bucket; engines come back in bucket, kind order and
    each bucket's timings hold every task's parts."""
    plan = _plan(tmp_path, "--context", "256,512", "--jobs", "1")
    built_models: list[int] = []
    monkeypatch.setattr(plan, "model", lambda bucket: built_models.append(bucket) or f"model-{bucket}")

    def fake_task(plan, bucket, kind, formats, tmp, note, model):
        assert model == f"model-{bucket}"
        note(f"{kind} {bucket}")
        record = EngineRecord(format="aoti", bucket=bucket, files=(f"aoti/{kind}-{bucket}.pt2",), seq_range=(2, bucket),
                              batch_range=(1, 2), dynamic=True, compute_dtype="float32", kernels={},
                              verified=Verification("pending"), kind=kind)
        return steps.ExportTaskResult(bucket, kind, formats, [record], {f"aoti[{kind}]": 1.0})

    monkeypatch.setattr(steps, "export_task", fake_task)
    out = io.StringIO()
    engines, timings = steps.ExportRun(plan, str(tmp_path), steps.Progress(out, live=False)).wait()
    assert [(e.bucket, e.kind) for e in engines] == [(bucket, kind) for bucket, kind, _ in plan.export_tasks()]
    assert built_models == [256, 512]
    assert timings == {b: {"aoti[prefill]": 1.0, "aoti[prefill-cache]": 1.0, "aoti[decode]": 1.0} for b in (256, 512)}
    assert "decode 512" in out.getvalue()


class HoldsAFrame(Exception):
    def __init__(self):
        super().__init__("lowering failed\nsecond line")
        self.frame = sys._getframe()


def test_a_failed_worker_task_reaches_the_build_as_one_picklable_line(tmp_path, monkeypatch, capsys):
    """An export error that holds frames (torch.export's do) cannot cross the pool's pipe: the worker
    prints its traceback and raises one line naming the task, which pickles."""
    import pickle

    def failing_task(*args):
        raise HoldsAFrame()

    plan = _plan(tmp_path)
    monkeypatch.setattr(plan, "model", lambda bucket: None)
    monkeypatch.setattr(steps, "export_task", failing_task)
    monkeypatch.setitem(steps._WORKER, "plan", plan)
    monkeypatch.setitem(steps._WORKER, "tmp", str(tmp_path))
    monkeypatch.setitem(steps._WORKER, "threads", {True: 1, False: 1})
    monkeypatch.setitem(steps._WORKER, "notes", types.SimpleNamespace(put=print))
    with pytest.raises(HoldsAFrame) as raw:
        failing_task()
    with pytest.raises(TypeError):
        pickle.dumps(raw.value)
    with pytest.raises(RuntimeError) as err:
        steps._export_worker_run((512, "decode", ("aoti",)))
    message = str(pickle.loads(pickle.dumps(err.value)))
    assert message.startswith("export of the decode engine (aoti) for context 512 failed: HoldsAFrame: lowering failed")
    assert "\n" not in message and "HoldsAFrame" in capsys.readouterr().err


def test_cpu_packages_include_the_float8_header_before_the_wrapper_declares_a_float8_kernel(tmp_path):
    """AOTInductor's CPU wrapper declares each kernel it calls; one writing FP8 (the KV cache) takes
    at::Float8_e4m3fn pointers, which torch 2.11's wrapper headers leave undeclared (the whole CPU build
    failed to compile there). export_aoti puts c10's header ahead of that declaration on every torch
    (here the package's sources alone, not compiled: the tiny build compiles them)."""
    import zipfile

    import torch

    from dsv4_compile import export

    class WritesFloat8(torch.nn.Module):
        def forward(self, x):
            return (x * 2).to(torch.float8_e4m3fn)

    program = torch.export.export(WritesFloat8(), (torch.randn(3, 8),))
    path = export.export_aoti(export.ExportResult(program, (3, 3), (1, 1), False, {}), str(tmp_path / "x.pt2"),
                              inductor_configs={"aot_inductor.package_cpp_only": True})
    with zipfile.ZipFile(path) as package:
        (wrapper,) = [package.read(n).decode() for n in package.namelist() if n.endswith(".wrapper.cpp")]
    assert 0 <= wrapper.find("#include <c10/util/Float8_e4m3fn.h>") < wrapper.find("at::Float8_e4m3fn*")


def test_wrapper_declares_each_int_array_in_every_draft_that_uses_it():
    """AOTInductor's wrapper writes its code twice (memory planning's first draft is discarded): each
    draft must declare the size / stride arrays it uses. torch 2.11 cached the array names by the id of
    the draft's bound writeline method, which the next draft's method takes over at once, so the second
    draft used the first's undeclared name ("'int_array_52' was not declared", an H100 export);
    export_aoti keys them on the draft itself (export.wrapper_int_arrays_keyed_stably), as torch 2.13 does."""
    import functools
    import itertools

    from torch._inductor.codegen.cpp_wrapper_cpu import CppWrapperCpu
    from torch._inductor.utils import IndentedBuffer
    from torch.utils._ordered_set import OrderedSet

    from dsv4_compile.export import wrapper_int_arrays_keyed_stably

    wrapper = types.SimpleNamespace(codegen_int_array_var_cache={}, int_array_id=itertools.count(),
                                    declared_int_array_vars=OrderedSet())
    wrapper._codegen_int_array_var_impl = functools.partial(CppWrapperCpu._codegen_int_array_var_impl, wrapper)
    drafts = [IndentedBuffer(), IndentedBuffer()]
    with wrapper_int_arrays_keyed_stably():
        names = [CppWrapperCpu.codegen_int_array_var(wrapper, "{4L, 128L}", draft.writeline) for draft in drafts]
        assert CppWrapperCpu.codegen_int_array_var(wrapper, "{4L, 128L}", drafts[1].writeline) == names[1]
    for name, draft in zip(names, drafts):
        assert f"{name}[] = {{4L, 128L}};" in draft.getvalue(), (names, [d.getvalue() for d in drafts])


def test_compile_check_says_when_the_substitution_count_misses_cached_graphs(monkeypatch):
    """A graph served by Inductor's FX graph cache without its substitution record is not counted: the
    build's line says so instead of reporting fewer (or 0) substituted nodes as if complete."""
    import types

    import torch

    from dsv4_compile.passes.report import SubstitutionReport

    compile_module = sys.modules["dsv4_compile.compile"]  # the package re-exports the function under this name

    model = torch.nn.Identity()
    model.config = types.SimpleNamespace(max_seq_len=8, vocab_size=16)
    model.parameters = lambda: iter([torch.zeros(1)])
    compiled = lambda tokens: model(tokens)  # noqa: E731
    compiled.dsv4_report = SubstitutionReport(gpu="cpu", enabled=["decompose"], unrecorded_graphs=1)
    monkeypatch.setattr(compile_module, "compile", lambda *a, **k: compiled)
    plan = types.SimpleNamespace(target="cpu", passes="all", seed=0, config=types.SimpleNamespace(dtype="float32"))
    out = io.StringIO()
    result = steps.compile_check(plan, model, steps.Progress(out, live=False))
    assert result["report"]["unrecorded_graphs"] == 1
    assert "0 dsv4 nodes substituted, 0 left (in the graphs with a record; 1 came from Inductor's FX graph cache" \
        in out.getvalue()


def test_aoti_packages_of_cuda_programs_compile_in_two_passes():
    """On CUDA, AOTInductor's default tunes every kernel on made-up inputs, which faults where indices come
    from them (pytorch issue 194018): our CUDA packages run the graph on the real example inputs instead."""
    import torch

    from dsv4_compile import export

    assert export.aoti_options(cuda=True)["triton.autotune_at_compile_time"] is False
    assert "triton.autotune_at_compile_time" not in export.aoti_options(cuda=False)
    program = torch.export.export(torch.nn.Linear(3, 2), (torch.ones(1, 3),))
    assert not export.runs_on_cuda(program)


def test_shipped_layout_on_the_meta_device_holds_what_the_quantized_model_holds():
    """plan.weights_bytes sizes the as-shipped weights on the meta device: the same bytes as the tiny
    model really quantized."""
    import torch

    from dsv4_compile.checkpoint.shipped import quantize_as_shipped, weight_sizes
    from dsv4_compile.model import Transformer

    config = ModelConfig.load("tiny")
    real = quantize_as_shipped(Transformer(config, seed=0))
    assert weights_bytes(config, "as-shipped") == weight_sizes(real)[1] < weights_bytes(config, "bf16")
    with torch.device("meta"):
        assert weight_sizes(Transformer(config, seed=0))[1] == weights_bytes(config, "bf16")


@pytest.mark.parametrize("formats, free_share, refused", [("aoti", 0.95, False), ("aoti", 0.85, True),
                                                            ("aoti,onnx", 1.9, False), ("aoti,onnx", 1.7, True)])
def test_a_build_its_disk_cannot_hold_is_refused_before_anything_is_written(tmp_path, monkeypatch, formats, free_share,
                                                                          refused):
    """The weights each format's files must hold (DISK_LOWER_BOUND of them, per copy) against the free
    space of --out's disk: refused in one line naming both and what would fit, before the build starts."""
    import collections
    import shutil

    from dsv4_compile.arguments import UsageError

    weights = weights_bytes(ModelConfig.load("tiny"), "bf16")
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(0, 0, int(free_share * weights)))
    if not refused:
        _plan(tmp_path, "--format", formats)
        return
    with pytest.raises(UsageError, match=r"its disk has .* GB free; the engines' weights need at least .*"
                                         r"accepted: free space, fewer formats \(--format aoti\), --weights-format as-shipped"):
        _plan(tmp_path, "--format", formats)
    assert not (tmp_path / "out").exists()


# A stand-in op and two substitutions for it: one launcher deciding on the symbolic row count itself (the
# fault of session 23's H100 decode engine, through fp8_linear's `m > FEW_M`), one on its bound.
@torch.library.custom_op("dsv4_test::rows_op", mutates_args=())
def _rows_op(x: torch.Tensor) -> torch.Tensor:
    return x * 2


_rows_op.register_fake(lambda x: torch.empty_like(x))


def _decides_on_the_size(x: torch.Tensor) -> torch.Tensor:
    return x * 2 if x.shape[0] > 16 else x + x  # a guard on the symbolic size: the example (2) decides


def _specialises_the_size(x: torch.Tensor) -> torch.Tensor:
    return x * 2 if x.shape[0] == 2 else x + x  # Eq(B, 2): B replaced by the example's 2


def _decides_on_the_bound(x: torch.Tensor) -> torch.Tensor:
    from dsv4_compile.kernels._common import largest_value

    return x * 2 if largest_value(x.shape[0]) > 16 else x + x


class _RowsModule(torch.nn.Module):
    def forward(self, x):
        return torch.ops.dsv4_test.rows_op(x) + 1


@pytest.mark.parametrize("replacement", [_decides_on_the_size, _specialises_the_size, _decides_on_the_bound],
                         ids=["size", "specialised", "bound"])
def test_an_export_whose_substitution_narrows_a_dynamic_size_is_refused(replacement):
    """run_decompositions retraces without torch.export's check of the declared ranges: a substitution that
    branches on a symbolic size silently narrows the range the program holds for. _export says so, naming
    the input, both ranges and the guard's site; a substitution deciding on the bound exports."""
    from dsv4_compile import export

    manager = types.SimpleNamespace(decomposition_table=lambda: {torch.ops.dsv4_test.rows_op.default: replacement})
    spec = ({0: torch.export.Dim("B", min=1, max=64)},)
    if replacement is _decides_on_the_bound:
        program = export._export(_RowsModule(), (torch.ones(2, 3),), spec, manager)
        assert list(program.range_constraints.values())[0].upper == 64
        assert torch.equal(program.module()(torch.ones(40, 3)), torch.full((40, 3), 3.0))
        return
    with pytest.raises(RuntimeError) as err:
        export._export(_RowsModule(), (torch.ones(2, 3),), spec, manager)
    message = str(err.value)
    if replacement is _decides_on_the_size:
        assert "narrowed x.shape[0] from [1, 64] to [2, 16] (guard" in message and "<= 16 at " in message
    else:
        assert "narrowed x.shape[0] from [1, 64] to [2, 2] (= 2) (guard Eq(" in message
    assert "tests/dsv4_compile/test_export_tasks.py:" in message  # where the launcher compared the size
