"""Newton-Schulz (Muon): our batched Triton kernels vs torch.optim.Muon's NS, the plain op eager and
torch.compile'd. One step at 4096x4096, 4096x14336, 14336x4096 (fp32 G, as Muon's fp32 params give);
the 10-step DeepSeek-V4 schedule at 4096x4096; and a batch of 96 2048x4096 matrices (32 V4-Flash
experts x 3), 5 steps.

TFLOP/s use the dense count of a step, 4 m^2 n + 2 m^3 (m = min dim): our kernels do 3 m^2 n + m^3
(symmetric halves), so their rate can exceed what the matmul units do.
Anchors (DESIGN.md section 4, lent H100): plain bf16 10-step NS on 4096x4096 7.13 ms eager, 6.70 ms
compiled; torch.optim.Muon step (5 NS steps, fp32 param) 4096x4096 3.46 ms, 4096x14336 9.51 ms.

    python bench/bench_newton_schulz.py    # writes bench/results/<GPU>/newton_schulz.csv
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _kernel_bench_util import DEVICE, bench_ms, out_dir, print_table, try_compile, write_csv  # noqa: E402

QUINTIC = (3.4445, -4.7750, 2.0315)
DEEPSEEK_V4 = list(QUINTIC) * 8 + [2.0, -1.5, 0.5] * 2


def _flops(M: int, N: int, steps: int, batch: int = 1) -> float:
    m, n = min(M, N), max(M, N)
    return batch * steps * (4.0 * m * m * n + 2.0 * m ** 3)


def run_newton_schulz_bench(full: bool = True, shapes=((4096, 4096), (4096, 14336), (14336, 4096)),
                            batched=(96, 2048, 4096), compile: bool = True) -> list[dict]:
    from dsv4_compile.kernels.newton_schulz import newton_schulz
    from dsv4_compile.model import ops

    plain = ops.newton_schulz._init_fn
    try:
        from torch.optim._muon import _zeropower_via_newtonschulz as muon_ns
    except ImportError:  # pragma: no cover
        muon_ns = None
    rows = []

    def add(case, impl, ms, flops, cfg=""):
        rows.append(dict(case=case, impl=impl, ms=ms, tflops=flops / ms / 1e9, config=cfg))
        print(f"{case:40s} {impl:30s} {ms:9.4f} ms {flops / ms / 1e9:7.1f} TFLOP/s", flush=True)

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
    return rows


def main():
    smoke = "--smoke" in sys.argv                       # tiny sizes, no compile: checks the script runs
    rows = (run_newton_schulz_bench(shapes=((64, 96), (96, 64)), batched=(2, 32, 64), compile=False) if smoke
            else run_newton_schulz_bench())
    path = os.path.join(out_dir(), "newton_schulz.csv")
    write_csv(path, rows)
    print_table(rows, ["case", "impl", "ms", "tflops", "config"])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
