"""The DeepSeek-V4 optimizer (Muon + AdamW, model/muon.py) stepped compiled with the dsv4 passes vs
eager: same start, same random gradients, two steps; the compiled step's newton_schulz nodes must
be the Triton kernel (the substitution report says so).

GPU: the mini preset whole (4 layers + MTP, bf16, ~2.8B parameters: ~35 GB with the optimizer state
and the saved copies; one model, stepped eagerly then compiled from the same start), through
`dsv4_compile.compile(opt.step, passes="all")`. CPU: the tiny preset (fp32) with the kernel's
interpreter twin installed as the post-grad pass (the registered substitution declines CPU tensors),
one CSA layer only and two Newton-Schulz steps (~45 s on 2 cores; all four layers and ten steps took
~4.5 min).

Tolerances, on each parameter's total change (relative RMS), since the change is what the optimizer
computes (the parameters themselves would hide it):
- Muon parameters: 3e-2. The momentum buffers depend on the gradients only, so both runs orthogonalise
  the same matrices; the kernel and the plain op round the bf16 products at different places, which
  gives ~1e-2 relative RMS on one Newton-Schulz call (kernels/newton_schulz docstring); x3 headroom.
  With bf16 parameters (GPU) the change is also quantised to the parameter's bf16 step (~1% of it).
- AdamW parameters: the same code both ways, reordered by Inductor: 1e-4 in fp32 (CPU, fp32
  reassociation only) and 5e-2 in bf16 (GPU: Inductor keeps eager's bf16 roundings
  (emulate_precision_casts) but computes each fused expression in fp32, so a few intermediate
  roundings differ, each up to 2^-8 of the update).
"""
import dataclasses
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel import (conftest does it too)

import pytest  # noqa: E402

import dsv4_compile  # noqa: E402
from dsv4_compile import ModelConfig, Transformer  # noqa: E402
from dsv4_compile.model.muon import DSV4_NS_COEFFICIENTS, deepseek_v4_optimizer, split_params  # noqa: E402
from helpers import assert_close  # noqa: E402

# Two steps: the first creates the optimizer state (one compiled graph), the second runs the
# steady-state graph with momentum carried over; more steps rerun that same graph.
STEPS = 2
LR = 0.02


def run_steps(model, start, make_step, **optimizer_options) -> list[torch.Tensor]:
    """Reset the parameters to `start`, build a fresh DeepSeek-V4 optimizer (optimizer_options: its
    keywords), take STEPS steps of make_step(opt) with seeded random gradients; returns each
    parameter's change (float32)."""
    params = list(model.parameters())
    with torch.no_grad():
        for p, p0 in zip(params, start):
            p.copy_(p0)
    opt = deepseek_v4_optimizer(model, lr=LR, **optimizer_options)
    step = make_step(opt)
    for k in range(STEPS):
        gen = torch.Generator(params[0].device).manual_seed(1000 + k)
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen, device=p.device) * 0.01).to(p.dtype)
        step()
    with torch.no_grad():
        return [(p.float() - p0.float()) for p, p0 in zip(params, start)]


def check(model, eager, compiled, muon_tol, adamw_tol):
    names = [n for n, _ in model.named_parameters()]
    muon = {n for n, _ in split_params(model)[0]}
    assert muon and len(muon) < len(names)
    for name, ref, out in zip(names, eager, compiled):
        assert ref.abs().max() > 0, f"{name} did not move"
        assert_close(name, ref, out, muon_tol if name in muon else adamw_tol)
    return len(muon)


@pytest.mark.slow
def test_compiled_step_matches_eager_tiny_cpu_interpreter(tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("the CPU variant (interpreter twin); the GPU test covers CUDA")
    from dsv4_compile.passes.kernel_substitutions import newton_schulz as ns
    from dsv4_compile.passes.manager import PassManager

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # a cache hit would skip the pass
    torch._dynamo.reset()
    # One CSA layer of tiny, no MTP: every kind of Muon parameter (attention, indexer, compressor,
    # router, shared and stacked experts) at a fraction of the compile time of all four layers.
    config = dataclasses.replace(ModelConfig.from_preset("tiny"), n_layers=1, compress_ratios=(4,), n_hash_layers=0,
                                 n_mtp_layers=0)
    model = Transformer(config, seed=0)
    start = [p.detach().clone() for p in model.parameters()]
    # Two Newton-Schulz steps, DeepSeek's first and last kinds: the coefficients are the node's
    # arguments, so the graph and its substitution are the ten steps' (the interpreter runs each step's
    # three launches in Python: ten steps took half the test's time).
    two_ns_steps = dict(ns_coefficients=(DSV4_NS_COEFFICIENTS[0], DSV4_NS_COEFFICIENTS[-1]))
    eager = run_steps(model, start, lambda opt: opt.step, **two_ns_steps)
    manager = PassManager(ns.interpreter_substitutions(), gpu="cpu")
    compiled = run_steps(model, start, lambda opt: torch.compile(
        opt.step, options={"post_grad_custom_post_pass": manager, "emulate_precision_casts": True}), **two_ns_steps)
    torch._dynamo.reset()
    n_muon = check(model, eager, compiled, muon_tol=3e-2, adamw_tol=1e-4)
    report = manager.report
    assert report.replaced("dsv4.newton_schulz", "newton_schulz.triton_interpret") >= n_muon
    assert report.left_alone("dsv4.newton_schulz") == []


@pytest.mark.gpu
def test_compiled_step_matches_eager_mini_gpu():
    config = ModelConfig.from_preset("mini")
    with torch.device("cuda"):
        model = Transformer(config, seed=0)
    start = [p.detach().clone() for p in model.parameters()]
    eager = run_steps(model, start, lambda opt: opt.step)
    report = {}

    def make_compiled(opt):
        step = dsv4_compile.compile(opt.step, gpu="auto", passes="all")
        report["r"] = step.dsv4_report
        return step

    compiled = run_steps(model, start, make_compiled)
    n_muon = check(model, eager, compiled, muon_tol=3e-2, adamw_tol=5e-2)
    r = report["r"]
    # One graph for the first step (state created) and one for the later steps: every Muon
    # parameter's newton_schulz node went to the Triton kernel in each (unless the FX graph cache
    # served a graph and the side file restored its records: counted the same).
    assert r.replaced("dsv4.newton_schulz", "newton_schulz.triton") >= n_muon, r.table()
    assert r.left_alone("dsv4.newton_schulz") == [], r.table()
