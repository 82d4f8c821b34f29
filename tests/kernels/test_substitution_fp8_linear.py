"""The fp8_linear substitution: the node replaced by the Triton kernel (interpreter on the CPU),
numbers as eager, ops before and after, the config chosen by M, and what it refuses (with why).
Tolerance: as tests/kernels/test_fp8_linear.py (float32 output, summation order only: 1e-5 on the CPU)."""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel import (conftest does it too)

from torch.fx.experimental.proxy_tensor import make_fx  # noqa: E402

import dsv4_compile.model.ops  # noqa: E402,F401  (registers torch.ops.dsv4.*)
from dsv4_compile import passes  # noqa: E402
from dsv4_compile.kernels.fp8_linear.config import DEFAULT_CONFIGS, default_config  # noqa: E402
from dsv4_compile.model.weight_formats import e8m0_to_float, quantize_fp8_weight  # noqa: E402
from dsv4_compile.passes.kernel_substitutions import fp8_linear as sub  # noqa: E402
from helpers import assert_close, exported_op_args  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# A float32 FP8 linear against the plain op: the summation order on the CPU; on the GPU the FP8 MMA's
# ~14 bits inside each 128-step (test_fp8_linear.py's float32 tolerances).
FP8_VS_PLAIN = 1e-3 if DEVICE == "cuda" else 1e-5


def two_linears(x, w1, s1, w2, s2):
    h = torch.relu(torch.ops.dsv4.fp8_linear(x, w1, s1))
    return torch.ops.dsv4.fp8_linear(h, w2, s2)


def inputs(m=3):
    g = torch.Generator().manual_seed(0)
    w1, s1 = quantize_fp8_weight(torch.randn(256, 128, generator=g) * 0.1)
    w2, s2 = quantize_fp8_weight(torch.randn(70, 256, generator=g) * 0.1)
    to = lambda t: t.to(DEVICE)  # noqa: E731
    return (to(torch.randn(m, 5, 128, generator=g)), to(w1), to(e8m0_to_float(s1)), to(w2), to(e8m0_to_float(s2)))


def test_nodes_replaced_and_numbers_as_eager():
    args = inputs()
    gm = make_fx(two_linears, tracing_mode="fake")(*args)
    subs = sub.interpreter_substitutions() if DEVICE == "cpu" else [sub.SUBSTITUTION]
    manager = passes.PassManager(subs, gpu="H200" if DEVICE == "cuda" else "cpu")
    manager(gm.graph)
    gm.recompile()
    ops = manager.graph_ops[0]
    assert ops["before"]["dsv4.fp8_linear.default"] == 2
    assert "dsv4.fp8_linear.default" not in ops["after"] and ops["after"]["dsv4_triton.fp8_linear.default"] == 2
    assert manager.report.replaced("dsv4.fp8_linear") == 2
    # GPU: the second linear re-quantizes the first's output, and the FP8 MMA's rounding (relative RMS
    # <= 1e-3 a linear, test_fp8_linear.py) can move an element of it across an e4m3 rounding boundary: a
    # code one step away (2^-4 relative to that element). A few such flips among the 15 x 256 inputs give
    # some 1e-3 each, so 1e-2 bounds the chain; the CPU differs in summation order only.
    assert_close("substituted vs eager", two_linears(*args), gm(*args), 1e-2 if DEVICE == "cuda" else 1e-5)


def test_a_tuned_gemv_entry_reaches_the_kernel():
    """A decode table entry naming gemm=gemv (what the tuning space may pick for one row) is the config
    the substituted node carries, and the graph runs the GEMV with eager's numbers (fp32 sums in another
    order)."""
    args = inputs(m=1)
    x = args[0][:, :1]                                                     # [1, 1, 128]: one row
    gm = make_fx(two_linears, tracing_mode="fake")(x, *args[1:])
    gemv = {"gemm": "gemv", "block_n": 16, "block_k": 256}
    table = {"entries": {"a": {"phase": "decode", "batch": 1, "config": gemv}}}
    subs = sub.interpreter_substitutions() if DEVICE == "cpu" else [sub.SUBSTITUTION]
    manager = passes.PassManager(subs, gpu="H200", config_source=lambda name, gpu: table)
    manager(gm.graph)
    gm.recompile()
    configs = [n.args[3] for n in gm.graph.nodes if n.target is torch.ops.dsv4_triton.fp8_linear.default]
    assert len(configs) == 2 and all("gemm=gemv,block_k=256" in c and "block_n=16" in c for c in configs), configs
    assert_close("GEMV substituted vs eager", two_linears(x, *args[1:]), gm(x, *args[1:]),
                 1e-2 if DEVICE == "cuda" else 1e-5)


def test_config_follows_rows_and_refusals_say_why():
    target = passes.Target(gpu="H200")
    e = lambda *shape, dtype=torch.float32: torch.empty(*shape, device=DEVICE, dtype=dtype)  # noqa: E731
    w, s = e(64, 256, dtype=torch.float8_e4m3fn), e(1, 2)
    small = sub.SUBSTITUTION.config(target, e(1, 256), w, s)["config"]
    large = sub.SUBSTITUTION.config(target, e(64, 128, 256), w, s)["config"]
    gpu = "H200" if DEVICE == "cuda" else "interpreter"
    assert small == default_config(gpu, 1, 64, 256).to_str() and large == DEFAULT_CONFIGS[gpu].to_str()
    # prefill entries serve large M only; few rows take the decode entry of the smallest batch >= M
    tuned = passes.Target(gpu="H200", table={"by_context": {"8192": "block_m=32,block_n=32"}})
    assert sub.SUBSTITUTION.config(tuned, e(64, 128, 256), w, s)["config"] == "block_m=32,block_n=32"
    assert sub.SUBSTITUTION.config(tuned, e(1, 256), w, s)["config"] == small
    entries = {"a": {"phase": "decode", "batch": 8, "config": {"block_n": 32, "split_k": 4}},
               "b": {"phase": "decode", "batch": 64, "config": {"block_n": 128}}}
    decode = passes.Target(gpu="H200", table={"entries": entries})
    got = sub.SUBSTITUTION.config(decode, e(2, 256), w, s)["config"]
    assert got == default_config(gpu, 2, 64, 256).replace(block_n=32, split_k=4).to_str()
    assert "block_n=128" in sub.SUBSTITUTION.config(decode, e(40, 256), w, s)["config"]
    assert "multiple of 128" in sub._reason(e(4, 200), e(64, 200, dtype=torch.float8_e4m3fn), s, allow_cpu=True)
    assert "float8_e4m3fn" in sub._reason(e(4, 256), e(64, 256), s, allow_cpu=True)
    assert "int32" in sub._reason(e(4, 256, dtype=torch.int32), w, s, allow_cpu=True)
    if DEVICE == "cpu":
        assert "needs CUDA tensors" in sub._reason(e(4, 256), w, s)


def test_a_decode_engines_symbolic_rows_get_the_small_m_config():
    """An exported decode engine's x [B, 1, K] has a symbolic B <= max_batch: M's every value is at most
    SMALL_M, so the config is the small-M one of its bound (a tuned decode entry by batch), not the
    large-M default a symbolic M got before; a bound past SMALL_M keeps the large-M route."""
    e = lambda *shape, dtype=torch.float32: torch.randn(*shape).to(device=DEVICE, dtype=dtype)  # noqa: E731
    w, s = e(64, 256, dtype=torch.float8_e4m3fn), e(1, 2).abs()

    def op_args(max_batch):
        B = torch.export.Dim("B", min=2, max=max_batch)
        return exported_op_args(lambda x: torch.ops.dsv4.fp8_linear(x, w, s), (e(3, 1, 256),), ({0: B},),
                                torch.ops.dsv4.fp8_linear.default)

    gpu = "H200" if DEVICE == "cuda" else "interpreter"
    decode_sized, large = op_args(8), op_args(1024)
    assert not isinstance(decode_sized[0].shape[0], int), "the export did not keep B symbolic"
    target = passes.Target(gpu="H200")
    assert sub.SUBSTITUTION.config(target, *decode_sized)["config"] == default_config(gpu, 8, 64, 256).to_str()
    assert sub.SUBSTITUTION.config(target, *large)["config"] == DEFAULT_CONFIGS[gpu].to_str()
    # a tuned table (the interpreter's small- and large-M defaults are one config): the decode entry of
    # batch 8 for B <= 8, the table's default for B <= 1024
    entries = {"a": {"phase": "decode", "batch": 8, "config": {"block_n": 32, "split_k": 4}}}
    tuned = passes.Target(gpu="H200", table={"entries": entries, "default": "block_m=32,block_n=64"})
    assert sub.SUBSTITUTION.config(tuned, *decode_sized)["config"] == default_config(gpu, 8, 64, 256).replace(
        block_n=32, split_k=4).to_str()
    assert sub.SUBSTITUTION.config(tuned, *large)["config"] == "block_m=32,block_n=64"


def _branch_configs(gm) -> list:
    """The fp8_linear configs of a graph, each cond as [true branch's, false branch's] (nested)."""
    found = []
    for node in gm.graph.nodes:
        if node.target is torch.ops.dsv4_triton.fp8_linear.default:
            found.append(node.args[3])
        elif node.target is torch.ops.higher_order.cond:
            found.append([_branch_configs(getattr(gm, a.target)) for a in node.args[1:3]])
    return found


def test_an_engine_spanning_the_few_rows_regimes_runs_each_batchs_config(monkeypatch):
    """A [1, 64] engine's M covers one or two tokens (the GEMV), up to FEW_M (the Triton few-rows tile)
    and 17..64 rows (cuBLAS's GEMM at N >= 2048 on the H100 / H200): the export holds a cond on M at
    each bound, its branches carrying the configs, and each batch runs its own (the H100's rules on CPU
    tensors here): the config the kernel was called with, and numbers within fp32 noise of the plain op
    (FP8_VS_PLAIN)."""
    from dsv4_compile.export import _export
    from dsv4_compile.kernels.fp8_linear import config as config_module
    from dsv4_compile.kernels.fp8_linear.config import FEW_M, GEMV_ROWS

    kernel = sys.modules["dsv4_compile.kernels.fp8_linear.fp8_linear"]  # the op calls its fp8_linear
    run_fp8_linear, ran = kernel.fp8_linear, []

    def recording_fp8_linear(x, weight, scale, config=None):
        ran.append(config)
        return run_fp8_linear(x, weight, scale, config)

    monkeypatch.setattr(kernel, "fp8_linear", recording_fp8_linear)

    if DEVICE == "cpu":
        monkeypatch.setattr(sub, "target_gpu", lambda target, device_type: target.gpu)
    g = torch.Generator().manual_seed(1)
    w, s = quantize_fp8_weight(torch.randn(2048, 256, generator=g) * 0.1)
    w, s = w.to(DEVICE), e8m0_to_float(s).to(DEVICE)

    class Linear(torch.nn.Module):
        def forward(self, x):
            return torch.ops.dsv4.fp8_linear(x, w, s)

    subs = sub.interpreter_substitutions() if DEVICE == "cpu" else [sub.SUBSTITUTION]
    manager = passes.PassManager(subs, gpu="H100")
    x = torch.randn(3, 1, 256, generator=g).to(DEVICE)
    ep = _export(Linear(), (x,), ({0: torch.export.Dim("B", min=1, max=64)},), manager)
    gemv, few, many = (default_config("H100", rows, 2048, 256).to_str() for rows in (GEMV_ROWS, FEW_M, 64))
    assert "gemm=gemv" in gemv and "gemm=triton" in few and "gemm=cublas" in many
    assert _branch_configs(ep.graph_module) == [[[gemv], [[[few], [many]]]]], ep.graph

    def runs_each_batchs_config(program, batches):
        for rows, config in batches:
            xr = torch.randn(rows, 1, 256, generator=g).to(DEVICE)
            ran.clear()
            got = program.module()(xr)
            assert ran == [config], (rows, ran)
            assert_close(f"{rows} rows", torch.ops.dsv4.fp8_linear(xr, w, s), got, FP8_VS_PLAIN)

    runs_each_batchs_config(ep, ((1, gemv), (GEMV_ROWS, gemv), (GEMV_ROWS + 1, few), (FEW_M, few), (FEW_M + 1, many),
                                 (40, many)))
    # a W whose two rows exceed GEMV_MAX_WORK: one row alone takes the GEMV, two the tile
    work = config_module.GEMV_MAX_WORK
    monkeypatch.setattr(config_module, "GEMV_MAX_WORK", 2048 * 256)
    one_gemv = default_config("H100", 1, 2048, 256).to_str()
    wide = _export(Linear(), (x,), ({0: torch.export.Dim("B", min=1, max=64)},), manager)
    assert "gemm=gemv" in one_gemv and "gemm=triton" in default_config("H100", GEMV_ROWS, 2048, 256).to_str()
    assert _branch_configs(wide.graph_module) == [[[one_gemv], [[[few], [many]]]]], wide.graph
    runs_each_batchs_config(wide, ((1, one_gemv), (2, few)))
    monkeypatch.setattr(config_module, "GEMV_MAX_WORK", work)
    # an engine within one regime keeps one call, no cond
    one_regime = _export(Linear(), (x[:GEMV_ROWS],), ({0: torch.export.Dim("B", min=1, max=GEMV_ROWS)},), manager)
    assert _branch_configs(one_regime.graph_module) == [gemv]
