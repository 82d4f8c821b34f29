"""float32 linear (kernels/float32_linear: bf16 x, float32 W as three exact bf16 pieces on tensor cores) vs
the plain op (cuBLAS's float32 GEMM of the upcast x: what the compressors and a float32 gate ran before),
at V4-Flash's float32 projections and 1, 64, 4096, 16384 tokens, one run.

Times: GPU time per call from CUDA-graph replays (graph_time_ms); for few tokens the weights rotate over
copies that together exceed the L2, so W is read from HBM as in a decode step. Every timed config's
output is held to the plain op's (relative RMS <= 1e-5, the kernel tests' tolerance). Writes
bench/results/<GPU>/float32_linear.{csv,md,png} (or $BENCH_OUT).

    python bench/bench_float32_linear.py [--tokens 1,64,4096,16384] [--configs "split_k=8;block_k=128"]
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _kernel_bench_util import DEVICE, ROTATE_BYTES, environment, gpu_ms, out_dir, print_table, write_csv  # noqa: E402

# V4-Flash's float32 projections (name, N, K): the CSA compressor's wkv / wgate (overlapping blocks: 2 x 512),
# the HCA compressor's, the indexer compressor's (2 x 128)
SHAPES = [("csa.compressor", 1024, 4096), ("hca.compressor", 512, 4096), ("indexer.compressor", 256, 4096)]
SMALL_TOKENS = 64


def plot(path: str, rows: list[dict]) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # noqa: BLE001
        print(f"no plot: {exc}")
        return
    tokens = sorted({r["tokens"] for r in rows})
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(SHAPES)
    for i, (name, _, _) in enumerate(SHAPES):
        rs = {r["tokens"]: r for r in rows if r["projection"] == name}
        ax.bar([t + (i - (len(SHAPES) - 1) / 2) * width for t in range(len(tokens))],
               [rs[m]["best_x_vs_plain"] if m in rs else 0 for m in tokens], width=width, label=name)
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xticks(range(len(tokens)), [str(m) for m in tokens])
    ax.set_xlabel("tokens (rows of x)")
    ax.set_ylabel("speed vs cuBLAS float32 GEMM (x)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    from dsv4_compile.kernels.float32_linear import default_config, float32_linear
    from dsv4_compile.model import ops  # noqa: F401  (registers torch.ops.dsv4.*)

    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", default="1,64,4096,16384")
    parser.add_argument("--configs", default="", help="';'-separated configs over the default, timed at every size")
    args = parser.parse_args(argv)
    tokens = [int(t) for t in args.tokens.split(",")]
    shapes = SHAPES if DEVICE == "cuda" else [(name, n // 8, 256) for name, n, _ in SHAPES[:1]]
    if DEVICE != "cuda":
        tokens = [1, 32]
    sweeps = [c.strip() for c in args.configs.split(";") if c.strip()]
    g = torch.Generator().manual_seed(0)
    rows, sweep_rows = [], []
    for name, n, k in shapes:
        w = (torch.randn(n, k, generator=g) * k ** -0.5).to(DEVICE)
        for m in tokens:
            copies = max(1, math.ceil(ROTATE_BYTES / (4 * w.numel()))) if m <= SMALL_TOKENS and DEVICE == "cuda" else 1
            weights = [w.clone() for _ in range(copies)]
            x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
            ref = torch.ops.dsv4.float32_linear(x, w)
            plain_ms = gpu_ms([lambda wc=wc: torch.ops.dsv4.float32_linear(x, wc) for wc in weights])
            default = default_config(None, m, n, k).to_str()
            timed = {}
            for cfg in [""] + sweeps:
                try:
                    y = float32_linear(x, w, cfg)
                    error = ((y - ref).norm() / ref.norm()).item()
                    assert error <= 1e-5, f"relative RMS error {error:.2e} > 1e-5"
                    timed[cfg] = gpu_ms([lambda wc=wc, cfg=cfg: float32_linear(x, wc, cfg) for wc in weights])
                except Exception as exc:  # noqa: BLE001 (a config this GPU rejects is a result)
                    print(f"  {name} M={m} {cfg or 'default'}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
                    continue
                sweep_rows.append({"projection": name, "N": n, "K": k, "tokens": m, "config": cfg or default,
                                   "ms": timed[cfg], "x_vs_plain": plain_ms / timed[cfg]})
            if "" not in timed:
                continue
            best = min(timed, key=timed.get)
            rows.append({"projection": name, "N": n, "K": k, "tokens": m, "plain_ms": plain_ms, "ours_ms": timed[""],
                         "x_vs_plain": plain_ms / timed[""], "best_x_vs_plain": plain_ms / timed[best],
                         "ours_weight_tbs": 4 * w.numel() / timed[""] / 1e9,
                         "plain_weight_tbs": 4 * w.numel() / plain_ms / 1e9,
                         "ours_tflops": 2.0 * m * n * k / timed[""] / 1e9, "default_config": default,
                         "best_config": best or default, "weight_copies": copies})
            print(f"{name} M={m}: plain {plain_ms:.4f} ms, ours {timed['']:.4f} ({plain_ms / timed['']:.2f}x; "
                  f"best {plain_ms / timed[best]:.2f}x {best or 'default'})", flush=True)
    path = out_dir()
    write_csv(os.path.join(path, "float32_linear.csv"), rows)
    write_csv(os.path.join(path, "float32_linear_sweep.csv"), sweep_rows)
    table = print_table(rows, ["projection", "N", "K", "tokens", "plain_ms", "ours_ms", "x_vs_plain",
                               "best_x_vs_plain", "ours_weight_tbs", "plain_weight_tbs", "ours_tflops"])
    header = "\n".join(f"- {k}: {v}" for k, v in environment().items())
    with open(os.path.join(path, "float32_linear.md"), "w") as f:
        f.write(f"# float32 linear (bf16 x, float32 W in three exact bf16 pieces) vs cuBLAS's float32 GEMM "
                f"(one run)\n\n{header}\n\nx_vs_plain: the plain op's time / ours (> 1: ours faster); best_*: the "
                f"best of the configs timed (float32_linear_sweep.csv); *_weight_tbs: float32 weight bytes per "
                f"second (the bound for few tokens). Every timed output within 1e-5 (relative RMS) of the plain "
                f"op's. Configs in float32_linear.csv.\n\n{table}\n")
    if DEVICE == "cuda":
        plot(os.path.join(path, "float32_linear.png"), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
