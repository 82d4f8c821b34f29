"""Kernel launchers traced at a symbolic batch decide on its bound, never on the size itself.

Under export (an engine's dynamic batch B in [1, max_batch], traced at B = 2) a launcher's Python runs on
symbolic sizes; a comparison such as `rows > 16` records a guard that silently narrows the range the
exported program holds for (run_decompositions does not check it). On the H100 (session 23) fp8_linear's
row-count rule did that for the as-shipped decode engine: B narrowed to [2, 16], the MoE's layout then
sized for 96 assignments instead of 384, and at B 64 the engine's logits were garbage. Here the launchers
are traced under the interpreter with the device named as the GPUs we ship tables for (their rules are
the GPU-only branches), and the whole as-shipped decode and prefill engines are exported that way:
export._export refuses any narrowing (export.narrowed_sizes)."""
from __future__ import annotations

import importlib
import os
import pkgutil

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel import (conftest does it too)

import pytest  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.export import Dim  # noqa: E402
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext  # noqa: E402

import dsv4_compile.model.ops  # noqa: E402,F401  (registers torch.ops.dsv4.*)
from dsv4_compile.kernels._common import largest_value  # noqa: E402
from helpers import wide_tiny  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's trace (a GPU exports for real)")

GPU_NAMES = ["NVIDIA H100 80GB HBM3", "NVIDIA H200"]
MAX_BATCH = 64


def _interpreter_substitutions() -> list:
    """Every kernel substitution's interpreter twin (they apply to CPU tensors under TRITON_INTERPRET)."""
    from dsv4_compile.passes import kernel_substitutions

    subs = []
    for info in pkgutil.iter_modules(kernel_substitutions.__path__):
        module = importlib.import_module(f"{kernel_substitutions.__name__}.{info.name}")
        if hasattr(module, "interpreter_substitutions"):
            subs += module.interpreter_substitutions()
        elif hasattr(module, "interpreter_substitution"):
            subs.append(module.interpreter_substitution())
    return subs


@pytest.fixture(params=GPU_NAMES, ids=["H100", "H200"])
def named_gpu(request, monkeypatch):
    """The launchers see `device_name()` return this GPU's name (nothing launches under fake tensors)."""
    import sys

    for name, module in list(sys.modules.items()):
        if name.startswith("dsv4_compile.kernels") and hasattr(module, "device_name"):
            monkeypatch.setattr(module, "device_name", lambda device=None: request.param)
    return request.param


def _symbolic_rows(env: ShapeEnv, example: int, most: int, width: int):
    """A fake [rows, width] tensor whose rows are a SymInt in [1, most] with hint `example`, as export
    makes a Dim, and its fake mode."""
    mode = FakeTensorMode(shape_env=env)
    x = mode.from_tensor(torch.empty(example, width, dtype=torch.bfloat16),
                         symbolic_context=StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC, DimDynamic.STATIC]))
    env.constrain_symbol_range(x.shape[0].node.expr, compiler_min=1, compiler_max=most)
    return x, mode


def test_launchers_decide_on_the_bound_of_a_symbolic_size(named_gpu):
    """fp8_linear's few-rows rules (cuBLAS past 16 rows, split-K) take a symbolic size's bound, the decode
    attention's split-K one token's count as its grid's split axis (the count itself an expression,
    test_split_count_of_a_symbolic_batch_is_evaluated_at_run_time): no guard, the range intact."""
    from dsv4_compile.kernels.fp8_linear import fp8_linear
    from dsv4_compile.kernels.sparse_attention.config import decode_default_config
    from dsv4_compile.kernels.sparse_attention_cached.config import auto_config

    for most in (8, MAX_BATCH):
        env = ShapeEnv()
        x, mode = _symbolic_rows(env, 2, most, 4096)
        with mode:
            weight = torch.empty(4096, 4096, dtype=torch.float8_e4m3fn)
            y = fp8_linear(x, weight, torch.empty(32, 32))                                   # [rows, 4096]
        base = decode_default_config(named_gpu)
        attention = auto_config(x.shape[0], 1, 64, 640, base, 132)
        assert env.guards == [] and largest_value(x.shape[0]) == most and y.shape[0].node.expr == x.shape[0].node.expr
        assert attention == auto_config(1, 1, 64, 640, base, 132)


@pytest.mark.parametrize("kind", ["decode", "prefill-cache"])
def test_as_shipped_engines_export_for_every_batch_on_the_gpus_rules(kind, named_gpu):
    """The as-shipped engines (FP8 linears, MXFP4 experts, FP8 cache) traced through every kernel's
    launcher under the GPU's name and with its tuned tables, B dynamic in [1, 64]: no launcher narrows
    B (or S). The decode attention runs its tuned entries where the table has them (H100) and its
    launcher's default where it has none (H200 since session 24); on a GPU its split count follows B at
    run time (the interpreter's launches keep their config's)."""
    from dsv4_compile.engines import DecodeStep, PrefillIntoCache, example_inputs
    from dsv4_compile.export import MIN_SEQ, _export
    from dsv4_compile.passes import select
    from dsv4_compile.passes.manager import PassManager
    from dsv4_compile.kernels.gpus import canonical_gpu
    from dsv4_compile.reference import eager_model
    from dsv4_compile.tuning import config_source

    config = wide_tiny(max_seq_len=128)
    model = eager_model(config, seed=0, state=None, cuda=False, as_shipped=True)
    gpu = canonical_gpu(named_gpu)
    manager = PassManager([*select("decompose"), *_interpreter_substitutions()], gpu=gpu, config_source=config_source)
    tuned = config_source("sparse_attention_cached.triton", gpu)
    assert manager.tables["sparse_attention_cached.triton_interpret"] == tuned, "the GPU's tuned decode entries, if any"
    b = Dim("B", min=1, max=MAX_BATCH)
    if kind == "decode":
        module, example = DecodeStep(model), example_inputs("decode", config, 2, 1, "cpu")
        first = {0: b}
    else:
        module, example = PrefillIntoCache(model, False), example_inputs("prefill-cache", config, 2, 64, "cpu")
        first = {0: b, 1: Dim("S", min=MIN_SEQ, max=config.max_seq_len)}
    shapes = (first, {0: b}, ({0: b},) * (len(example) - 2))
    program = _export(module, example, shapes, manager)  # raises on a narrowed size
    kernels = {str(n.target) for n in program.graph.nodes if str(n.target).startswith("dsv4_triton.")}
    assert {"dsv4_triton.fp8_linear.default", "dsv4_triton.moe_experts_mxfp4.default"} <= kernels, kernels
