"""dsv4_compile.Muon: the plain Muon (model/muon.py) with its steps on the Triton kernels for eager
CUDA steps (float32 parameters: the whole step fused; others: Newton-Schulz). CPU: the plain path, bit
for bit; the kernel routes themselves through the substitution's interpreter twin. GPU: an eager step
uses the kernels and agrees with torch.optim.Muon.

Tolerance kernel vs plain op: 3e-2 relative RMS, as tests/model/test_muon_compiled.py argues (the
kernel and the plain op round their bf16 products at different places: ~1e-2 on one call)."""
from __future__ import annotations

import pytest
import torch

import dsv4_compile
from dsv4_compile import optim
from dsv4_compile.model import Muon as PlainMuon
from dsv4_compile.model.muon import DSV4_NS_COEFFICIENTS, adjusted_lr, flat_ns_coefficients
from dsv4_compile.passes.kernel_substitutions.newton_schulz import SUBSTITUTION, interpreter_substitutions
from dsv4_compile.passes.registry import Target
from helpers import assert_close

KERNEL_VS_PLAIN = 3e-2
ARGS = dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True)


def _params(device="cpu", seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shapes = [(48, 80), (3, 40, 24)]  # a matrix and a stack of experts (tall: transposed inside)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(device, dtype)) for s in shapes]
    grads = [[torch.randn(s, generator=g).to(device, dtype) for s in shapes] for _ in range(3)]
    return params, grads


def _run(opt_class, device="cpu", dtype=torch.float32, **kwargs):
    params, grads = _params(device, dtype=dtype)
    opt = opt_class(params, **ARGS, **kwargs)
    for step_grads in grads:
        for p, gr in zip(params, step_grads):
            p.grad = gr
        opt.step()
    return [p.detach() for p in params]


def test_is_the_plain_muon_and_equal_on_cpu():
    assert dsv4_compile.Muon is optim.Muon and issubclass(optim.Muon, PlainMuon)
    for ours, plain in zip(_run(optim.Muon), _run(PlainMuon)):
        assert torch.equal(ours, plain)


def test_recipe_uses_the_kernel_muon():
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 16))
    opt = dsv4_compile.deepseek_v4_optimizer(model, 0.01)
    assert type(opt.optimizers["muon"]) is optim.Muon


@pytest.mark.parametrize("shape", [(48, 80), (80, 48), (3, 40, 24)])
def test_kernel_route_matches_plain_op(shape):
    """The route (predicate, config, replacement of the registered substitution) on CPU tensors through
    its interpreter twin: the kernel's result, within bf16 rounding of the plain op."""
    twin, = interpreter_substitutions()
    direction = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    coefficients = flat_ns_coefficients(DSV4_NS_COEFFICIENTS)
    out = optim.newton_schulz_on_kernel(direction, coefficients, Target("cpu"), twin)
    assert out is not None and out.shape == direction.shape and out.dtype == direction.dtype
    assert_close(f"kernel route {shape}", torch.ops.dsv4.newton_schulz(direction, coefficients), out, KERNEL_VS_PLAIN)


def test_kernel_route_declines_what_the_kernel_does_not_take():
    twin, = interpreter_substitutions()
    coefficients = flat_ns_coefficients(DSV4_NS_COEFFICIENTS)
    assert optim.newton_schulz_on_kernel(torch.randn(8, 8, dtype=torch.float64), coefficients, Target("cpu"), twin) is None
    assert optim.newton_schulz_on_kernel(torch.randn(8, 8), coefficients, Target("cpu"), SUBSTITUTION) is None  # CPU


def test_fused_route_matches_the_plain_steps():
    """Three steps of a matrix and a tall expert stack through the fused route (the twin's predicate and
    config, the kernel in the interpreter) against the plain Muon's: buffers to float32 rounding, the
    parameters' change to the kernel's bf16 tolerance."""
    twin, = interpreter_substitutions()
    coefficients = flat_ns_coefficients(DSV4_NS_COEFFICIENTS)
    params, grads = _params(seed=2)
    plain_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    plain = PlainMuon(plain_params, **ARGS, ns_coefficients=DSV4_NS_COEFFICIENTS)
    bufs = [torch.zeros_like(p) for p in params]
    for step_grads in grads:
        for p, q, gr, buf in zip(params, plain_params, step_grads, bufs):
            q.grad = gr
            assert optim.muon_step_on_kernel(
                p.data, gr, buf, coefficients, momentum=ARGS["momentum"], nesterov=True,
                decay=1 - ARGS["lr"] * ARGS["weight_decay"], alpha=-adjusted_lr(ARGS["lr"], None, p.shape),
                target=Target("cpu"), substitution=twin)
        plain.step()
    start = [p.detach() for p in _params(seed=2)[0]]
    for i, (p, q, buf, s) in enumerate(zip(params, plain_params, bufs, start)):
        assert_close(f"param {i}: momentum buffer", plain.state[q]["momentum_buffer"], buf, 1e-6)
        assert_close(f"param {i}: change", q.detach() - s, p.detach() - s, KERNEL_VS_PLAIN)


def test_fused_route_declines_what_the_kernel_does_not_take():
    twin, = interpreter_substitutions()
    coefficients = flat_ns_coefficients(DSV4_NS_COEFFICIENTS)
    args = dict(momentum=0.95, nesterov=True, decay=1.0, alpha=-0.01, target=Target("cpu"))
    param, grad, buf = (torch.randn(8, 8) for _ in range(3))
    before = [t.clone() for t in (param, grad, buf)]
    assert not optim.muon_step_on_kernel(param.bfloat16(), grad.bfloat16(), buf.bfloat16(), coefficients, **args,
                                         substitution=twin)
    assert not optim.muon_step_on_kernel(param, grad.t(), buf, coefficients, **args, substitution=twin)   # strided
    assert not optim.muon_step_on_kernel(param, grad, buf, coefficients, **args, substitution=SUBSTITUTION)  # CPU
    assert all(torch.equal(a, b) for a, b in zip(before, (param, grad, buf)))


def _spy(monkeypatch, name):
    calls, route = [], getattr(optim, name)

    def spy(*args, **kwargs):
        out = route(*args, **kwargs)
        calls.append(out is not None and out is not False)
        return out

    monkeypatch.setattr(optim, name, spy)
    return calls


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32-fused-step", "bf16-kernel-ns"])
def test_gpu_eager_step_runs_the_kernel_and_matches_torch_muon(monkeypatch, dtype):
    fused, ns_only = _spy(monkeypatch, "muon_step_on_kernel"), _spy(monkeypatch, "newton_schulz_on_kernel")
    ours = _run(optim.Muon, "cuda", ns_coefficients=(3.4445, -4.7750, 2.0315), ns_steps=5, dtype=dtype)
    if dtype == torch.float32:
        assert fused and all(fused) and not ns_only, (fused, ns_only)
    else:
        assert fused and not any(fused) and ns_only and all(ns_only), (fused, ns_only)
    params, grads = _params("cuda", dtype=dtype)
    singles = [torch.nn.Parameter(m.clone()) for p in params for m in (p.detach() if p.dim() == 3 else p.detach()[None])]
    theirs = torch.optim.Muon(singles, **ARGS, ns_coefficients=(3.4445, -4.7750, 2.0315), ns_steps=5)
    for step_grads in grads:
        for p, gr in zip(singles, [m for gr in step_grads for m in (gr if gr.dim() == 3 else gr[None])]):
            p.grad = gr
        theirs.step()
    start = [m for p in _params("cuda", dtype=dtype)[0] for m in (p.detach() if p.dim() == 3 else p.detach()[None])]
    got = [m for p in ours for m in (p if p.dim() == 3 else p[None])]
    for i, (a, b, s) in enumerate(zip(got, [p.detach() for p in singles], start)):
        assert_close(f"matrix {i}: change", (b - s).float(), (a - s).float(), KERNEL_VS_PLAIN)
