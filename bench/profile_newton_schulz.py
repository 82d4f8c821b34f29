"""Per-kernel times of one Newton-Schulz step (normalise, A = X X^T, B = b A + c A A, X <- a X + B X)
for a few shapes and configs: where the time of `newton_schulz` goes. TFLOP/s count the FLOPs each kernel
does (a symmetric product: its upper triangle of tiles, half the dense count), and "% peak" sets them
against the bf16 matmul peak measured in the same run (issue 17: the symmetric products >= 75%).

    python bench/profile_newton_schulz.py  # prints a table, writes ns_breakdown.csv
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _kernel_bench_util import DEVICE, bench_ms, matmul_peak_tflops, out_dir, print_table, write_csv  # noqa: E402


def run_breakdown(shapes=((1, 4096, 4096), (1, 4096, 14336), (8, 2048, 4096), (32, 2048, 4096)), configs=None,
                  peak: float | None = None) -> list[dict]:
    from dsv4_compile.kernels.newton_schulz import default_config
    from dsv4_compile.kernels.newton_schulz import newton_schulz as ns_mod
    nsm = sys.modules["dsv4_compile.kernels.newton_schulz.newton_schulz"]
    base = default_config(None)
    configs = configs or {"default": base,
                          "sym64": base.replace(sym_block=64, sym_block_k=64, sym_num_warps=4, sym_num_stages=4),
                          "gemm128x256": base.replace(block_n=256, num_stages=3),
                          "stages4": base.replace(num_stages=4, sym_num_stages=4)}
    rows = []
    for Bt, M, N in shapes:
        m, n = min(M, N), max(M, N)
        G = torch.randn(Bt, M, N, device=DEVICE)
        X = torch.randn(Bt, m, n, device=DEVICE).bfloat16() * 0.01
        A = torch.empty(Bt, m, m, device=DEVICE, dtype=torch.bfloat16)
        B = torch.empty_like(A)
        X2 = torch.empty_like(X)
        for name, cfg in configs.items():
            t = {
                "normalize": bench_ms(lambda: nsm._launch_normalize(G, X2, Bt, M, N, cfg)),
                "sym A=XX^T": bench_ms(lambda: nsm._launch_sym(X, A, 0.0, 1.0, Bt, m, n, cfg, add_x=False)),
                "sym B=bA+cAA": bench_ms(lambda: nsm._launch_sym(A, B, -4.775, 2.0315, Bt, m, m, cfg, add_x=True)),
                "gemm aX+BX": bench_ms(lambda: nsm._launch_gemm(B, X, X2, 3.4445, Bt, m, n, (n, 1, m * n), cfg)),
            }
            flops = {"sym A=XX^T": Bt * m * m * n, "sym B=bA+cAA": Bt * m ** 3, "gemm aX+BX": 2 * Bt * m * m * n}
            for part, ms in t.items():
                row = dict(shape=f"{Bt}x{M}x{N}", config=name, part=part, ms=ms)
                if part in flops:
                    row["tflops"] = flops[part] / ms / 1e9
                    if peak:
                        row["% peak"] = 100 * row["tflops"] / peak
                rows.append(row)
            full = bench_ms(lambda: ns_mod(G, [3.4445, -4.775, 2.0315], config=cfg))
            rows.append(dict(shape=f"{Bt}x{M}x{N}", config=name, part="newton_schulz 1 step", ms=full,
                             parts_sum=sum(t.values())))
            print(f"{Bt}x{M}x{N} {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in t.items()) + f", whole {full:.3f} ms", flush=True)
    return rows


def main():
    smoke = "--smoke" in sys.argv
    peak = None if smoke else matmul_peak_tflops()
    if peak:
        print(f"bf16 matmul peak this run: {peak:.0f} TFLOP/s", flush=True)
    rows = run_breakdown(shapes=((1, 64, 96),)) if smoke else run_breakdown(peak=peak)
    path = os.path.join(out_dir(), "ns_breakdown.csv")
    write_csv(path, rows)
    print_table(rows, ["shape", "config", "part", "ms", "tflops", "% peak"])


if __name__ == "__main__":
    main()
