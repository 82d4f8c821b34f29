"""Pass-framework registrations of the quant / Newton-Schulz / mHC kernels: on a fake-traced graph
the PassManager replaces every dsv4 node of these ops (numbers vs eager, node counts, ops before and
after); the registered substitutions decline CPU tensors with their reason (CPU: the interpreter
twins do the replacing)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel import (conftest does it too)

import pytest  # noqa: E402
from torch.fx.experimental.proxy_tensor import make_fx  # noqa: E402

import dsv4_compile.model.ops  # noqa: E402,F401  (registers torch.ops.dsv4.*)
from helpers import assert_close  # noqa: E402

passes = pytest.importorskip("dsv4_compile.passes")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OPS = ["fp8_quantize", "fp8_dequantize", "fp4_quantize", "fp4_dequantize", "newton_schulz", "hc_sinkhorn", "hc_pre"]
QUINTIC = [1.875, -1.25, 0.375] * 2


def _subs(interpret: bool):
    from dsv4_compile.passes.kernel_substitutions import fp4_quantize as fp4
    from dsv4_compile.passes.kernel_substitutions import fp8_quantize as fp8
    from dsv4_compile.passes.kernel_substitutions import hc_sinkhorn as hc
    from dsv4_compile.passes.kernel_substitutions import newton_schulz as ns
    if interpret:
        return [*fp8.interpreter_substitutions(), *fp4.interpreter_substitutions(),
                *ns.interpreter_substitutions(), *hc.interpreter_substitutions()]
    return [fp8.QUANTIZE, fp8.DEQUANTIZE, fp4.QUANTIZE, fp4.DEQUANTIZE, ns.SUBSTITUTION, hc.SINKHORN, hc.PRE]


def model_fn(x, G, logits, h, fn, scale, base):
    codes, s8 = torch.ops.dsv4.fp8_quantize(x, 32, True)
    packed, s4 = torch.ops.dsv4.fp4_quantize(x * 2, 32, True)
    y8 = torch.ops.dsv4.fp8_dequantize(codes, s8, 32)
    y4 = torch.ops.dsv4.fp4_dequantize(packed, s4, 32)
    orth = torch.ops.dsv4.newton_schulz(G, QUINTIC)
    comb = torch.ops.dsv4.hc_sinkhorn(logits, 20, 1e-6)
    y, post, comb2 = torch.ops.dsv4.hc_pre(h, fn, scale, base, 20, 1e-6, 1e-6)
    return y8, y4, orth, comb, y, post, comb2


def inputs():
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g).to(DEVICE)  # noqa: E731
    return (r(3, 64), r(20, 28) * 0.02, r(5, 4, 4), r(1, 3, 4, 16), r(24, 64) * 0.1,
            torch.tensor([0.5, 0.7, 1.3], device=DEVICE), r(24) * 0.1)


def test_every_op_substituted():
    args = inputs()
    gm = make_fx(model_fn, tracing_mode="fake")(*args)
    manager = passes.PassManager(_subs(DEVICE == "cpu"), gpu="H100" if DEVICE == "cuda" else "cpu")
    manager(gm.graph)
    gm.recompile()
    before, after = manager.graph_ops[0]["before"], manager.graph_ops[0]["after"]
    for op in OPS:
        assert before[f"dsv4.{op}.default"] == 1, op
        assert f"dsv4.{op}.default" not in after, op
        assert manager.report.replaced(f"dsv4.{op}") == 1, op
    ref, out = model_fn(*args), gm(*args)
    names = ["fp8 sim", "fp4 sim", "newton_schulz", "sinkhorn", "hc_pre y", "hc_pre post", "hc_pre comb"]
    for name, r, o in zip(names, ref, out):
        assert_close(name, r, o, 1e-2 if name == "newton_schulz" else 1e-5)


@pytest.mark.skipif(DEVICE == "cuda", reason="CPU tensors only")
def test_registered_substitutions_decline_cpu_tensors():
    gm = make_fx(model_fn, tracing_mode="fake")(*inputs())
    manager = passes.PassManager(_subs(False), gpu="cpu")
    manager(gm.graph)
    left = manager.report.left_alone()
    assert len(left) == len(OPS) and all("needs CUDA tensors" in rec.reason for rec in left)


def test_predicates_name_what_they_refuse():
    from dsv4_compile.passes.kernel_substitutions import fp4_quantize as fp4
    from dsv4_compile.passes.kernel_substitutions import hc_sinkhorn as hc
    from dsv4_compile.passes.kernel_substitutions import newton_schulz as ns
    target = passes.Target(gpu="H100")
    e = lambda *shape: torch.empty(*shape, device=DEVICE)  # noqa: E731
    assert "even block_size" in fp4._quantize_reason(e(4, 30), 3, True, allow_cpu=True)
    assert "triple" in ns._reason(e(4, 4), [1.0, 2.0], allow_cpu=True)
    assert "static n" in hc._sinkhorn_reason(e(4, 3, 4), 20, 1e-6, allow_cpu=True)
    assert fp4.QUANTIZE.config(target, e(4, 32), 32, True)["config"]  # a default config string


def test_hc_pre_config_by_phase():
    """A decode step's hc_pre ([B, 1, n, D]) gets the split decode config (the tuned decode entry of the
    smallest batch >= B when the table has one); a prefill call keeps the unsplit default."""
    from dsv4_compile.kernels.hc_sinkhorn.config import HcConfig, decode_config, default_config
    from dsv4_compile.passes.kernel_substitutions import hc_sinkhorn as hc
    e = lambda *shape: torch.empty(*shape, device=DEVICE)  # noqa: E731
    gpu = "H100" if DEVICE == "cuda" else "interpreter"
    target = passes.Target(gpu="H100")
    config = lambda x, t=target: HcConfig.from_str(hc.PRE.config(t, x)["config"], default_config(gpu))  # noqa: E731
    assert config(e(3, 1, 4, 16)).num_splits == decode_config(gpu).num_splits > 1
    assert config(e(3, 7, 4, 16)).num_splits == 1
    tuned = {"entries": {"b4": {"phase": "decode", "batch": 4, "config": {"num_splits": 8, "block_k": 64}},
                         "b64": {"phase": "decode", "batch": 64, "config": {"num_splits": 4}}}}
    tuned_target = passes.Target(gpu="H100", table=tuned)
    assert (config(e(3, 1, 4, 16), tuned_target).num_splits, config(e(3, 1, 4, 16), tuned_target).block_k) == (8, 64)
    assert config(e(9, 1, 4, 16), tuned_target).num_splits == 4
