"""Block-scaled FP8 linear (kernels/fp8_linear, activation quantization included) vs bf16 torch.mm and
torch._scaled_mm, at V4-Flash's linear shapes and 1, 64, 4096, 16384 tokens, one run.

bf16: x_bf16 @ W_bf16^T (the dequantized weight). _scaled_mm: FP8 x FP8, the activation quantization
not included, M padded to 16: rowwise scaling (one scale per row / column: not the op's semantics, a
speed reference), and blockwise 1x128 / 128x128 (the op's semantics) where this torch offers it.
Ours: the default config for the row count (what the substitution picks), and a small sweep of
configs per shape (Triton tiles and gemm=cublas; each in the CSV). Times: GPU time per call from
CUDA-graph replays (graph_time_ms), the same for all: do_bench would time each Python call, and our
launcher's Python costs tens of microseconds, more than the small-M GEMMs themselves. For few tokens
the weights rotate over copies that together exceed the L2 (as a decode step's many layers do), so
the weight is read from HBM, not from an L2 that kept it from the previous replay. Writes
bench/results/<GPU>/fp8_linear.{csv,md,png} (or $BENCH_OUT).

    python bench/bench_fp8_linear.py [--tokens 1,64,4096,16384] [--no-sweep] [--budget-s 240]
        [--shapes shared.w1,wq_b] [--configs "gemm=cublas;gemm=triton,split_k=16"]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _kernel_bench_util import DEVICE, ROTATE_BYTES, environment, gpu_ms, out_dir, print_table, write_csv  # noqa: E402

# V4-Flash linears (name, N, K)
SHAPES = [("wq_a", 1024, 4096), ("wq_b", 32768, 1024), ("wkv", 512, 4096), ("wo_b", 4096, 8192),
          ("indexer.wq_b", 8192, 1024), ("shared.w1", 2048, 4096), ("shared.w2", 4096, 2048)]
# each names gemm: a string is read over the default config, whose gemm varies with the shape
SWEEP_SMALL = ["gemm=triton,swap_ab=yes,block_m=16,block_n=64,num_warps=4,num_stages=4,quant=fused",
               "gemm=triton,swap_ab=yes,block_m=16,block_n=128,num_warps=4,num_stages=3,quant=fused",
               "gemm=triton,swap_ab=yes,block_m=16,block_n=128,num_warps=4,num_stages=3,quant=fused,split_k=4",
               "gemm=triton,swap_ab=yes,block_m=16,block_n=128,num_warps=4,num_stages=3,quant=fused,split_k=8",
               "gemm=triton,swap_ab=yes,block_m=16,block_n=128,num_warps=4,num_stages=3,quant=fused,split_k=16",
               "gemm=triton,swap_ab=yes,block_m=32,block_n=128,num_warps=4,num_stages=3,quant=fused,split_k=8",
               "gemm=cublas",
               # the CUDA-core GEMV (one program per block_n rows of W and row of x, no split-K): around the
               # one- and two-row default (block_n 8, block_k 1024; bench/results/H100/session35_gpu_runs.md)
               "gemm=gemv,block_n=8,block_k=512,num_warps=4",
               "gemm=gemv,block_n=4,block_k=1024,num_warps=4",
               "gemm=gemv,block_n=8,block_k=2048,num_warps=8",
               "gemm=gemv,block_n=16,block_k=1024,num_warps=8"]
SWEEP_LARGE = ["gemm=triton,block_m=128,block_n=128,num_warps=8,num_stages=4,quant=separate",
               "gemm=triton,block_m=128,block_n=256,num_warps=8,num_stages=3,quant=separate",
               "gemm=triton,block_m=64,block_n=128,num_warps=4,num_stages=4,quant=separate",
               "gemm=cublas"]
SMALL_TOKENS = 64
# A config's output against the plain op's (relative RMS): the FP8 products are exact on either side, so
# what differs is the bf16 output's rounding (2^-9) and the fp32 sums' order; past this the config is
# wrong (marked, never the best).
WRONG_REL_RMS = 1e-2


def scaled_mm_fns(x, weights):
    """Callables timing torch._scaled_mm per weight copy, by scaling: {'rowwise': [...], 'blockwise': [...]}
    (a scaling this torch rejects is left out)."""
    m, k = x.shape
    mp = max(16, -(-m // 16) * 16)
    a = torch.zeros(mp, k, device=x.device, dtype=torch.float8_e4m3fn)
    a[:m] = x.clamp(-448, 448).to(torch.float8_e4m3fn)
    a_block = torch.ones(k // 128, mp, device=x.device).t()  # 1x128: [M, K/128], M-major
    out = {}
    for kind in ("rowwise", "blockwise"):
        fns = []
        for w8, ws in weights:
            n = w8.shape[0]
            sa, sb = ((torch.ones(mp, 1, device=x.device), torch.ones(1, n, device=x.device)) if kind == "rowwise"
                      else (a_block, ws.t()))
            fns.append(lambda w8=w8, sa=sa, sb=sb: torch._scaled_mm(a, w8.t(), scale_a=sa, scale_b=sb,
                                                                    out_dtype=torch.bfloat16))
        try:
            fns[0]()
            torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 (this torch does not offer that scaling here)
            print(f"  _scaled_mm {kind}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
            continue
        out[kind] = fns
    return out


def plot(path: str, rows: list[dict]) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # noqa: BLE001
        print(f"no plot: {exc}")
        return
    tokens = sorted({r["tokens"] for r in rows})
    fig, axes = plt.subplots(1, len(tokens), figsize=(4 * len(tokens), 4), sharey=True)
    for ax, m in zip(axes if len(tokens) > 1 else [axes], tokens):
        rs = [r for r in rows if r["tokens"] == m]
        names = [r["linear"] for r in rs]
        xs = range(len(rs))
        for off, key, label in ((-0.27, "x_vs_bf16", "ours (default)"), (0.0, "best_x_vs_bf16", "ours (best of sweep)"),
                                (0.27, "scaled_mm_block_x_vs_bf16", "torch._scaled_mm blockwise, no quant")):
            ax.bar([x + off for x in xs], [r[key] for r in rs], width=0.27, label=label)
        ax.axhline(1.7 if m <= SMALL_TOKENS else 1.6, color="k", linestyle="--", linewidth=1)
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_xticks(list(xs), names, rotation=60, fontsize=7)
        ax.set_title(f"{m} tokens", fontsize=9)
    axes[0].set_ylabel("speed vs bf16 torch.mm (x)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    from dsv4_compile.kernels.fp8_linear import default_config, fp8_linear
    from dsv4_compile.kernels.fp8_linear.fp8_linear import cublas_blockwise_ready
    from dsv4_compile.metrics import rel_rms
    from dsv4_compile.model.weight_formats import e8m0_to_float, quantize_fp8_weight
    from dsv4_compile.tuning.spaces.fp8_linear import GEMV_MAX_ROWS

    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", default="1,64,4096,16384")
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--budget-s", type=float, default=float("inf"), help="stop sweeping after this many seconds")
    parser.add_argument("--shapes", default="", help="linears to run, comma-separated names (default: all)")
    parser.add_argument("--configs", default=None, help="';'-separated configs swept at every token count "
                        "(default: the built-in small- and large-M sweeps)")
    args = parser.parse_args(argv)
    tokens = [int(t) for t in args.tokens.split(",")]
    names = [s for s in args.shapes.split(",") if s]
    unknown = sorted(set(names) - {name for name, _, _ in SHAPES})
    if unknown:
        parser.error(f"--shapes {','.join(unknown)}: accepted {', '.join(name for name, _, _ in SHAPES)}")
    shapes = [shape for shape in SHAPES if not names or shape[0] in names]
    if DEVICE != "cuda":
        tokens, shapes = [1, 32], [(name, n, 256) for name, n, _ in shapes[:2]]
    sweeps = None if args.configs is None else [c.strip() for c in args.configs.split(";") if c.strip()]
    env = environment()
    start = time.monotonic()
    rows, sweep_rows = [], []
    g = torch.Generator().manual_seed(0)
    for name, n, k in shapes:
        w8, ws = quantize_fp8_weight(torch.randn(n, k, generator=g) * k ** -0.5)
        w8, ws = w8.to(DEVICE), e8m0_to_float(ws).to(DEVICE)
        for m in tokens:
            copies = max(1, math.ceil(ROTATE_BYTES / w8.numel())) if m <= SMALL_TOKENS and DEVICE == "cuda" else 1
            weights = [(w8.clone(), ws.clone()) for _ in range(copies)]
            w16s = [(w.float() * s.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]).bfloat16()
                    for w, s in weights]
            x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
            bf16_ms = gpu_ms([lambda w16=w16: x @ w16.t() for w16 in w16s])
            del w16s

            def ours(cfg=None):
                return gpu_ms([lambda w=w, s=s: fp8_linear(x, w, s, cfg) for w, s in weights])

            ref = torch.ops.dsv4.fp8_linear(x.float(), *weights[0])

            def error(cfg=None) -> float:
                return rel_rms(ref, fp8_linear(x, *weights[0], cfg).float())

            ours_ms, ours_err = ours(), error()
            default = default_config(None, m, n, k).to_str()
            best_ms, best = ours_ms, default
            swept = DEVICE == "cuda" and not args.no_sweep and time.monotonic() - start < args.budget_s
            sweep = sweeps if sweeps is not None else SWEEP_SMALL if m <= SMALL_TOKENS else SWEEP_LARGE
            for cfg in sweep if swept else []:
                if "gemm=gemv" in cfg and m > GEMV_MAX_ROWS:
                    continue
                try:
                    t, err = ours(cfg), error(cfg)
                except Exception as exc:  # noqa: BLE001 (a config this GPU rejects)
                    print(f"  {name} M={m} {cfg}: {type(exc).__name__}")
                    continue
                sweep_rows.append({"linear": name, "N": n, "K": k, "tokens": m, "config": cfg, "ms": t,
                                   "x_vs_bf16": bf16_ms / t, "rel_rms": err, "wrong": err > WRONG_REL_RMS})
                if err > WRONG_REL_RMS:
                    print(f"  {name} M={m} {cfg}: WRONG, relative RMS {err:.3g} against the plain op", flush=True)
                elif t < best_ms:
                    best_ms, best = t, cfg
            sm = scaled_mm_fns(x, weights) if DEVICE == "cuda" else {}
            row_ms = gpu_ms(sm["rowwise"]) if "rowwise" in sm else float("nan")
            block_ms = gpu_ms(sm["blockwise"]) if "blockwise" in sm else float("nan")
            flops = 2.0 * m * n * k
            rows.append({"linear": name, "N": n, "K": k, "tokens": m, "bf16_mm_ms": bf16_ms, "ours_ms": ours_ms,
                         "x_vs_bf16": bf16_ms / ours_ms, "best_ms": best_ms, "best_x_vs_bf16": bf16_ms / best_ms,
                         "scaled_mm_row_ms": row_ms, "scaled_mm_row_x_vs_bf16": bf16_ms / row_ms,
                         "scaled_mm_block_ms": block_ms, "scaled_mm_block_x_vs_bf16": bf16_ms / block_ms,
                         "ours_tflops": flops / ours_ms / 1e9, "ours_weight_tbs": w8.numel() / ours_ms / 1e9,
                         "weight_copies": copies, "default_config": default, "best_config": best,
                         "rel_rms": ours_err, "wrong": ours_err > WRONG_REL_RMS})
            print(f"{name} M={m}: bf16 {bf16_ms:.4f} ms, ours {ours_ms:.4f} ({bf16_ms / ours_ms:.2f}x; best "
                  f"{best_ms:.4f} = {bf16_ms / best_ms:.2f}x {best}), _scaled_mm row {row_ms:.4f} block {block_ms:.4f}",
                  flush=True)
            del weights
    path = out_dir()
    write_csv(os.path.join(path, "fp8_linear.csv"), rows)
    write_csv(os.path.join(path, "fp8_linear_sweep.csv"), sweep_rows)
    keys = ["linear", "N", "K", "tokens", "bf16_mm_ms", "ours_ms", "x_vs_bf16", "best_x_vs_bf16",
            "scaled_mm_row_x_vs_bf16", "scaled_mm_block_x_vs_bf16", "ours_tflops", "ours_weight_tbs", "rel_rms",
            "wrong"]
    table = print_table(rows, keys)
    env["cublas_blockwise_bf16"] = (cublas_blockwise_ready(torch.empty(1, 512, device=DEVICE, dtype=torch.bfloat16),
                                                           1024, 512) if DEVICE == "cuda" else False)
    header = "\n".join(f"- {k}: {v}" for k, v in env.items())
    with open(os.path.join(path, "fp8_linear.md"), "w") as f:
        f.write(f"# FP8 block-scaled linear vs bf16 torch.mm and torch._scaled_mm (one run)\n\n{header}\n\n"
                f"x_vs_bf16: bf16 time / ours (> 1: ours faster); ours includes the activation quantization, "
                f"_scaled_mm (scaled_mm_row: rowwise scales; scaled_mm_block: 1x128 / 128x128, the op's "
                f"semantics) does not. best_*: the best of the config sweep (fp8_linear_sweep.csv). "
                f"ours_weight_tbs: FP8 weight bytes per second (the bound for few tokens). rel_rms: the "
                f"default's output against the plain op's (wrong past {WRONG_REL_RMS:g}; the sweep's in "
                f"fp8_linear_sweep.csv). Configs in fp8_linear.csv.\n\n{table}\n")
    if DEVICE == "cuda":
        plot(os.path.join(path, "fp8_linear.png"), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
