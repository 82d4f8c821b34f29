"""The kernels as torch ops (torch.ops.dsv4_triton.*): schemas mirror torch.ops.dsv4.* plus a config
string, the registered op equals the public function, fake tensors give the right shapes, opcheck's
checks pass, and a compiled graph keeps each op as one node (CPU: custom_op around the interpreter;
CUDA: triton_op, traced into by Inductor)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel import (conftest does it too)

import pytest  # noqa: E402

import dsv4_compile.model.ops  # noqa: E402,F401  (registers torch.ops.dsv4.*)
from dsv4_compile.kernels import _common  # noqa: E402
from dsv4_compile.kernels.fp4_quantize import fp4_quantize  # noqa: E402
from dsv4_compile.kernels.fp8_quantize import Fp8QuantConfig, default_config, fp8_quantize  # noqa: E402
from dsv4_compile.kernels.hc_sinkhorn import hc_pre  # noqa: E402
from dsv4_compile.kernels.newton_schulz import NewtonSchulzConfig, newton_schulz  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OPS = ["fp8_quantize", "fp8_dequantize", "fp4_quantize", "fp4_dequantize", "newton_schulz", "hc_sinkhorn", "hc_pre"]


def example_args(name):
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(shape, generator=g).to(DEVICE)

    x = r(3, 64)
    if name == "fp8_quantize":
        return (x, 32, True)
    if name == "fp8_dequantize":
        return tuple(torch.ops.dsv4.fp8_quantize(x, 32, False)) + (32,)
    if name == "fp4_quantize":
        return (x, 32, True)
    if name == "fp4_dequantize":
        return tuple(torch.ops.dsv4.fp4_quantize(x, 32, True)) + (32,)
    if name == "newton_schulz":
        return (r(2, 20, 24), [1.875, -1.25, 0.375])
    if name == "hc_sinkhorn":
        return (r(5, 4, 4), 20, 1e-6)
    if name == "hc_pre":
        return (r(1, 3, 4, 16), r(24, 64) * 0.1, torch.tensor([0.5, 0.7, 1.3], device=DEVICE), r(24) * 0.1, 20, 1e-6, 1e-6)


def test_registration_mode_follows_the_interpreter():
    assert _common.INTERPRET == (os.environ.get("TRITON_INTERPRET") == "1")
    assert set(OPS) <= set(_common.registered_ops())  # (other kernels register through _common too)


@pytest.mark.parametrize("name", OPS)
def test_schema_mirrors_dsv4(name):
    ours = getattr(torch.ops.dsv4_triton, name).default._schema
    plain = getattr(torch.ops.dsv4, name).default._schema
    assert [a.name for a in ours.arguments] == [a.name for a in plain.arguments] + ["config"]
    assert [str(a.type) for a in ours.arguments[:-1]] == [str(a.type) for a in plain.arguments]
    assert len(ours.returns) == len(plain.returns)


@pytest.mark.parametrize("name", OPS)
def test_op_matches_plain(name):
    args = example_args(name)
    out = getattr(torch.ops.dsv4_triton, name)(*args)
    ref = getattr(torch.ops.dsv4, name)(*args)
    out, ref = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
    for o, r in zip(out, ref):
        assert o.shape == r.shape and o.dtype == r.dtype
        tol = 1e-2 if name == "newton_schulz" else 1e-5
        assert ((o.float() - r.float()).norm() / r.float().norm().clamp_min(1e-30)).item() <= tol


@pytest.mark.parametrize("name", OPS)
def test_fake_tensors(name):
    from torch._subclasses.fake_tensor import FakeTensorMode
    args = example_args(name)
    real = getattr(torch.ops.dsv4_triton, name)(*args)
    with FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake = getattr(torch.ops.dsv4_triton, name)(*fake_args)
    real, fake = (real, fake) if isinstance(real, tuple) else ((real,), (fake,))
    assert [(t.shape, t.dtype) for t in real] == [(t.shape, t.dtype) for t in fake]


@pytest.mark.parametrize("name", ["fp8_quantize", "hc_sinkhorn"])
def test_opcheck(name):
    torch.library.opcheck(getattr(torch.ops.dsv4_triton, name).default, example_args(name),
                          test_utils=("test_schema", "test_faketensor"))


def test_config_string_reaches_the_kernel():
    x = example_args("fp8_quantize")[0]
    cfg = Fp8QuantConfig(block_elems=32)
    assert Fp8QuantConfig.from_str(cfg.to_str()) == cfg
    a = torch.ops.dsv4_triton.fp8_quantize(x, 32, True, cfg.to_str())
    b = fp8_quantize(x, 32, True, cfg)
    assert torch.equal(a[0].view(torch.uint8), b[0].view(torch.uint8)) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="cannot parse"):
        torch.ops.dsv4_triton.fp8_quantize(x, 32, True, "block_elemz=2")


def test_default_configs_by_gpu_name():
    assert default_config("NVIDIA H100 80GB HBM3") is default_config("h100")
    assert default_config("some other GPU") == Fp8QuantConfig()
    assert default_config("interpreter").block_elems == 8192
    assert NewtonSchulzConfig.from_str("block_m=64", NewtonSchulzConfig()).block_m == 64


def test_compiled_graph_keeps_one_node_per_op():
    """torch.compile (aot_eager: no code generation) traces through the ops without graph breaks."""
    x = example_args("fp8_quantize")[0]

    def f(x):
        codes, scale = torch.ops.dsv4_triton.fp8_quantize(x, 32, True)
        return torch.ops.dsv4_triton.fp8_dequantize(codes, scale, 32) * 2

    torch._dynamo.reset()
    out = torch.compile(f, backend="aot_eager", fullgraph=True)(x)
    assert torch.equal(out, f(x))


def test_public_functions_exported():
    for fn in (fp8_quantize, fp4_quantize, newton_schulz, hc_pre):
        assert "[" in fn.__doc__  # shapes stated


@pytest.mark.gpu
def test_gpu_inductor_sees_the_triton_kernels():
    """On CUDA the ops are triton_ops: Inductor traces into them and emits our kernels in its code."""
    from torch._inductor.utils import run_and_get_code
    assert _common.USE_TRITON_OP
    x = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)

    def f(x):
        codes, scale = torch.ops.dsv4_triton.fp8_quantize(x, 128, True)
        return torch.ops.dsv4_triton.fp8_dequantize(codes, scale, 128)

    torch._dynamo.reset()
    out, codes = run_and_get_code(torch.compile(f), x)
    assert torch.equal(out, f(x))
    assert any("_fp8_quantize_kernel" in c for c in codes) and any("_fp8_dequantize_kernel" in c for c in codes)


def test_launch_goes_through_wrap_triton_only_when_traced(monkeypatch):
    """Traces (fake tensors, make_fx) must record the kernel through wrap_triton; a direct eager call
    launches straight (wrap_triton's eager HOP dispatch costs Python time per launch)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    routes = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: routes.append("direct")

    def wrap_triton(kernel):
        class Wrapped:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: routes.append("wrap_triton")
        return Wrapped()

    monkeypatch.setattr(_common, "USE_TRITON_OP", True)  # as on a CUDA machine
    monkeypatch.setattr(torch.library, "wrap_triton", wrap_triton)
    x = torch.ones(2)
    _common.launch(Kernel(), (1,), x, 3, block=x)
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
    _common.launch(Kernel(), (1,), x, fake)

    def traced(t):
        _common.launch(Kernel(), (1,), t)
        return t + 1

    make_fx(traced)(x)
    assert routes == ["direct", "wrap_triton", "wrap_triton"]
