"""Newton-Schulz (Muon): our batched Triton kernels vs torch.optim.Muon's NS, the plain op eager and
torch.compile'd. One step at 4096x4096, 4096x14336, 14336x4096 (fp32 G, as Muon's fp32 params give);
the 10-step DeepSeek-V4 schedule at 4096x4096; and a batch of 96 2048x4096 matrices (32 V4-Flash
experts x 3), 5 steps. Then whole Muon steps (fp32 params, fp32 grads): one 4096x4096 matrix,
dsv4_compile.Muon called eagerly (the Triton Newton-Schulz on CUDA) vs torch.optim.Muon; and MoE
experts, ours (each [E, rows, cols] stack is ONE newton_schulz call) eager, compiled with the dsv4
passes, and the plain model Muon eager, vs a Python loop of torch.optim.Muon over the same matrices as
3E separate params, same arguments; for the mini preset's MoE layer (E = 8, w1/w3 [2048, 4096], w2
[4096, 2048]) and V4-Flash's 32 experts x 3 (anchor: torch.optim.Muon 89.9 ms/step).
Every rate is also given as % of the bf16 matmul peak measured in the same run.

TFLOP/s use the dense count of a step, 4 m^2 n + 2 m^3 (m = min dim): our kernels do 3 m^2 n + m^3
(symmetric halves), so their rate can exceed what the matmul units do.
Anchors (DESIGN.md section 4, lent H100): plain bf16 10-step NS on 4096x4096 7.13 ms eager, 6.70 ms
compiled; torch.optim.Muon step (5 NS steps, fp32 param) 4096x4096 3.46 ms, 4096x14336 9.51 ms;
torch.optim.Muon over 32 V4-Flash experts x 3 (2048x4096) 89.9 ms per step.

    python bench/bench_newton_schulz.py    # writes bench/results/<GPU>/newton_schulz.csv and .md
    python bench/bench_newton_schulz.py --muon-steps    # only the eager Muon steps (newton_schulz_muon_steps.*)
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _kernel_bench_util import (DEVICE, bench_ms, matmul_peak_tflops, out_dir, print_table, try_compile,  # noqa: E402
                                write_csv)

QUINTIC = (3.4445, -4.7750, 2.0315)
DEEPSEEK_V4 = list(QUINTIC) * 8 + [2.0, -1.5, 0.5] * 2


def _flops(M: int, N: int, steps: int, batch: int = 1) -> float:
    m, n = min(M, N), max(M, N)
    return batch * steps * (4.0 * m * m * n + 2.0 * m ** 3)


def _expert_stacks(E: int, dim: int, inter: int, generator: torch.Generator) -> list[torch.Tensor]:
    """An MoE layer's routed experts as model/moe.py stores them: w1, w3 [E, inter, dim], w2 [E, dim, inter]."""
    shapes = ((E, inter, dim), (E, dim, inter), (E, inter, dim))
    return [torch.randn(shape, generator=generator).to(DEVICE) * 0.02 for shape in shapes]


def _muon_layer_rows(add, name: str, E: int, dim: int, inter: int, compile: bool, peak: float) -> None:
    """One Muon step over an MoE layer's experts: ours (3 stacked params) called eagerly (the Triton
    Newton-Schulz on CUDA), compiled with the dsv4 passes, and the plain Muon eager (the op's bmm) vs a
    loop of torch.optim.Muon over the 3E matrices."""
    import dsv4_compile
    from dsv4_compile.model.muon import Muon as PlainMuon

    args = dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True, ns_coefficients=QUINTIC, ns_steps=5)
    g = torch.Generator().manual_seed(0)
    stacks = [torch.nn.Parameter(w) for w in _expert_stacks(E, dim, inter, g)]
    for p in stacks:
        p.grad = torch.randn(p.shape, generator=g).to(DEVICE)
    singles = [torch.nn.Parameter(w[i].clone()) for w in stacks for i in range(E)]
    for p, (w, i) in zip(singles, [(w, i) for w in stacks for i in range(E)]):
        p.grad = w.grad[i].clone()
    flops = _flops(inter, dim, 5, 3 * E)
    case = f"Muon step, {name}: {E} experts x 3 ({inter}x{dim}) fp32"
    ms_rep = dict(warmup_ms=300, rep_ms=600)                      # ~90 ms steps: a few repeats each
    ours = PlainMuon(stacks, **args)
    add(case, "dsv4_compile.Muon eager", bench_ms(dsv4_compile.Muon(stacks, **args).step, **ms_rep), flops, "", peak)
    if compile:
        step = dsv4_compile.compile(ours.step, gpu="auto", passes="newton_schulz.triton")
        step()                                                    # compiles (and is one step)
        used = step.dsv4_report.replaced(substitution="newton_schulz.triton")
        add(case, "triton (our Muon, compiled with passes)", bench_ms(step, **ms_rep), flops,
            f"newton_schulz.triton nodes: {used}", peak)
    add(case, "plain Muon eager (op's bmm)", bench_ms(ours.step, **ms_rep), flops, "", peak)
    theirs = torch.optim.Muon(singles, **args)
    add(case, "torch.optim.Muon loop", bench_ms(theirs.step, **ms_rep), flops, "", peak)


def _muon_matrix_rows(add, rows: int, cols: int, peak: float) -> None:
    """One Muon step over one fp32 matrix: dsv4_compile.Muon eager vs torch.optim.Muon."""
    import dsv4_compile

    args = dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True, ns_coefficients=QUINTIC, ns_steps=5)
    g = torch.Generator().manual_seed(0)
    ours = torch.nn.Parameter(torch.randn(rows, cols, generator=g).to(DEVICE))
    ours.grad = torch.randn(rows, cols, generator=g).to(DEVICE)
    theirs = torch.nn.Parameter(ours.detach().clone())
    theirs.grad = ours.grad.clone()
    case, flops = f"Muon step, one {rows}x{cols} fp32 matrix", _flops(rows, cols, 5)
    add(case, "dsv4_compile.Muon eager", bench_ms(dsv4_compile.Muon([ours], **args).step), flops, "", peak)
    add(case, "torch.optim.Muon", bench_ms(torch.optim.Muon([theirs], **args).step), flops, "", peak)


def _rows_with_peak():
    """(rows, add, peak): the result rows, opened with the bf16 matmul peak measured now, and
    add(case, impl, ms, flops, cfg="", peak=peak), which appends and prints one row."""
    peak = matmul_peak_tflops()
    rows = [dict(case="bf16 matmul peak", impl="torch.matmul 8192^3", ms=float("nan"), tflops=peak, pct_peak=100.0)]
    print(f"bf16 matmul peak {peak:.1f} TFLOP/s", flush=True)

    def add(case, impl, ms, flops, cfg="", peak=peak):
        rows.append(dict(case=case, impl=impl, ms=ms, tflops=flops / ms / 1e9, pct_peak=100 * flops / ms / 1e9 / peak,
                         config=cfg))
        print(f"{case:40s} {impl:30s} {ms:9.4f} ms {flops / ms / 1e9:7.1f} TFLOP/s", flush=True)

    return rows, add, peak


def run_newton_schulz_bench(full: bool = True, shapes=((4096, 4096), (4096, 14336), (14336, 4096)),
                            batched=(96, 2048, 4096), compile: bool = True,
                            muon_layers=(("mini MoE layer", "mini", None), ("V4-Flash", "flash", 32))) -> list[dict]:
    """muon_layers: (label, preset, experts or None for the preset's n_routed_experts) per Muon-step case."""
    from dsv4_compile.kernels.newton_schulz import newton_schulz
    from dsv4_compile.model import ops

    plain = ops.newton_schulz._init_fn
    try:
        from torch.optim._muon import _zeropower_via_newtonschulz as muon_ns
    except ImportError:  # pragma: no cover
        muon_ns = None
    rows, add, peak = _rows_with_peak()
    cases = [(shape, 1) for shape in shapes]
    if full:
        cases.append((shapes[0], 10))
    compiled_plain = try_compile(plain, compile, dynamic=True)     # one compile for every shape
    for (M, N), steps in cases:
        G = torch.randn(M, N, device=DEVICE)
        coeffs = list(QUINTIC) if steps == 1 else DEEPSEEK_V4
        case = f"NS {steps} step{'s' if steps > 1 else ''} {M}x{N} fp32"
        flops = _flops(M, N, steps)
        add(case, "triton (default config)", bench_ms(lambda: newton_schulz(G, coeffs)), flops)
        if steps == 1:
            for i, cfg in enumerate((dict(block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=3),
                                     dict(sym_block=128, sym_block_k=64, sym_num_stages=4, num_stages=4))):
                try:
                    add(case, f"triton (alt config {i + 1})", bench_ms(lambda: newton_schulz(G, coeffs, config=cfg)), flops, str(cfg))
                except Exception as exc:
                    print(f"  config {cfg} failed: {type(exc).__name__}: {str(exc)[:120]}")
        add(case, "eager torch (plain op)", bench_ms(lambda: plain(G, coeffs)), flops)
        if compiled_plain is not None:
            add(case, "torch.compile (plain op)", bench_ms(lambda: compiled_plain(G, coeffs)), flops)
        if muon_ns is not None:
            add(case, "torch.optim.Muon NS", bench_ms(lambda: muon_ns(G, QUINTIC, steps, 1e-7)), flops)
    if full:
        (batch, M, N), steps = batched, 5
        G = torch.randn(batch, M, N, device=DEVICE)
        coeffs = list(QUINTIC) * steps
        case = f"NS {steps} steps {batch}x{M}x{N} fp32 (batched)"
        flops = _flops(M, N, steps, batch)
        add(case, "triton (one batched launch seq)", bench_ms(lambda: newton_schulz(G, coeffs), rep_ms=300), flops)
        add(case, "eager torch (plain op, bmm)", bench_ms(lambda: plain(G, coeffs), rep_ms=300), flops)
        if muon_ns is not None:
            add(case, "torch.optim.Muon NS (loop)",
                bench_ms(lambda: [muon_ns(G[i], QUINTIC, steps, 1e-7) for i in range(batch)], rep_ms=300), flops)
        del G
    from dsv4_compile.model.config import ModelConfig
    _muon_matrix_rows(add, *shapes[0], peak)
    for label, preset, experts in muon_layers:
        mc = ModelConfig.from_preset(preset)
        _muon_layer_rows(add, label, experts or mc.n_routed_experts, mc.dim, mc.moe_inter_dim, compile, peak)
        if DEVICE == "cuda":
            torch.cuda.empty_cache()                              # V4-Flash's case needs ~20 GB
    return rows


def run_muon_steps_bench() -> list[dict]:
    """Only the eager Muon steps (no compile): one 4096x4096 matrix and V4-Flash's 32 experts x 3."""
    from dsv4_compile.model.config import ModelConfig

    rows, add, peak = _rows_with_peak()
    _muon_matrix_rows(add, 4096, 4096, peak)
    mc = ModelConfig.from_preset("flash")
    _muon_layer_rows(add, "V4-Flash", 32, mc.dim, mc.moe_inter_dim, False, peak)
    return rows


def main():
    smoke = "--smoke" in sys.argv                       # tiny sizes, no compile: checks the script runs
    if "--muon-steps" in sys.argv:                      # the eager Muon steps only (an A/B of the optimizer)
        rows, name = run_muon_steps_bench(), "newton_schulz_muon_steps"
    else:
        rows, name = (run_newton_schulz_bench(shapes=((64, 96), (96, 64)), batched=(2, 32, 64), compile=False,
                                              muon_layers=(("tiny MoE layer", "tiny", None),)) if smoke
                      else run_newton_schulz_bench()), "newton_schulz"
    path = os.path.join(out_dir(), f"{name}.csv")
    write_csv(path, rows)
    table = print_table(rows, ["case", "impl", "ms", "tflops", "pct_peak", "config"])
    with open(os.path.join(out_dir(), f"{name}.md"), "w") as f:
        f.write(table + "\n")
    print(f"wrote {path} and {name}.md")


if __name__ == "__main__":
    main()
