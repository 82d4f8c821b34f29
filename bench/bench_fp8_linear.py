"""Block-scaled FP8 linear (kernels/fp8_linear, activation quantization included) vs bf16 torch.mm and
torch._scaled_mm, at V4-Flash's linear shapes and 1, 64, 4096, 16384 tokens, one run.

bf16: x_bf16 @ W_bf16^T (the dequantized weight). _scaled_mm: FP8 x FP8 with the scaling it offers on
this torch (1x128 / 128x128 blockwise where available, else rowwise; named in the table), the
activation quantization not included, M padded to 16 where it needs it. Times: GPU time per call from
CUDA-graph replays (graph_time_ms), the same for all three: do_bench would time each Python call, and
our launcher's Python (checks, config lookup) costs tens of microseconds, more than the small-M GEMMs
themselves (the first H200 run, timed with do_bench, showed exactly that). Also a small config sweep
of ours per shape (the best is reported beside the default). Writes bench/results/<GPU>/
fp8_linear.{csv,md} (or $BENCH_OUT).

    python bench/bench_fp8_linear.py [--tokens 1,64,4096,16384]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _kernel_bench_util import DEVICE, bench_ms, environment, graph_time_ms, out_dir, print_table, write_csv  # noqa: E402


def gpu_ms(fn) -> float:
    """GPU milliseconds per call (CUDA-graph replays on the GPU; wall-clock runs on a CPU smoke test)."""
    return graph_time_ms([fn]) if DEVICE == "cuda" else bench_ms(fn)

# V4-Flash linears (name, N, K)
SHAPES = [("wq_a", 1024, 4096), ("wq_b", 32768, 1024), ("wkv", 512, 4096), ("wo_b", 4096, 8192),
          ("indexer.wq_b", 8192, 1024), ("shared.w1", 2048, 4096), ("shared.w2", 4096, 2048)]
SWEEP_SMALL = ["block_m=16,block_n=32,num_warps=4,num_stages=4,quant=fused",
               "block_m=16,block_n=64,num_warps=4,num_stages=4,quant=fused",
               "block_m=16,block_n=128,num_warps=4,num_stages=3,quant=fused",
               "block_m=64,block_n=64,num_warps=4,num_stages=4,quant=fused",
               "block_m=16,block_n=64,num_warps=4,num_stages=4,quant=fused,split_k=4",
               "block_m=16,block_n=128,num_warps=4,num_stages=3,quant=fused,split_k=8"]
SWEEP_LARGE = ["block_m=128,block_n=128,num_warps=8,num_stages=4,quant=separate",
               "block_m=128,block_n=256,num_warps=8,num_stages=3,quant=separate",
               "block_m=64,block_n=128,num_warps=4,num_stages=4,quant=separate",
               "block_m=128,block_n=128,num_warps=8,num_stages=4,quant=fused"]


def scaled_mm_fn(x, w8, w_scale):
    """A callable timing torch._scaled_mm on this shape, and the scaling it uses (None if unusable)."""
    m, k = x.shape
    n = w8.shape[0]
    mp = max(16, -(-m // 16) * 16)
    a = torch.zeros(mp, k, device=x.device, dtype=torch.float8_e4m3fn)
    a[:m] = x.to(torch.float8_e4m3fn)
    b = w8.t()  # column-major [K, N], as _scaled_mm wants
    tries = [("blockwise 1x128 / 128x128", torch.ones(mp, k // 128, device=x.device),
              w_scale.t().contiguous()),  # experimental scaling modes differ by torch version
             ("rowwise", torch.ones(mp, 1, device=x.device), torch.ones(1, n, device=x.device))]
    for name, sa, sb in tries:
        try:
            fn = lambda: torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)  # noqa: E731
            fn()
            torch.cuda.synchronize()
            return fn, name
        except Exception:  # noqa: BLE001 (this torch does not offer that scaling here)
            continue
    return None, None


def main(argv=None) -> int:
    from dsv4_compile.kernels.fp8_linear import default_config, fp8_linear
    from dsv4_compile.model.weight_formats import e8m0_to_float, quantize_fp8_weight

    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", default="1,64,4096,16384")
    parser.add_argument("--no-sweep", action="store_true")
    args = parser.parse_args(argv)
    tokens = [int(t) for t in args.tokens.split(",")]
    if DEVICE != "cuda":
        tokens, shapes = [1, 32], [(n, 256, 256) for n, _, _ in SHAPES[:2]]
    else:
        shapes = SHAPES
    env = environment()
    rows = []
    g = torch.Generator().manual_seed(0)
    for name, n, k in shapes:
        w8, ws = quantize_fp8_weight(torch.randn(n, k, generator=g) * k ** -0.5)
        w8, ws = w8.to(DEVICE), e8m0_to_float(ws).to(DEVICE)
        w16 = (w8.float() * ws.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]).bfloat16()
        for m in tokens:
            x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
            bf16_ms = gpu_ms(lambda: x @ w16.t())
            ours_ms = gpu_ms(lambda: fp8_linear(x, w8, ws))
            default = default_config(None, m).to_str()
            best_ms, best = ours_ms, default
            if DEVICE == "cuda" and not args.no_sweep:
                for cfg in SWEEP_SMALL if m <= 64 else SWEEP_LARGE:
                    try:
                        t = gpu_ms(lambda: fp8_linear(x, w8, ws, cfg))
                    except Exception as exc:  # noqa: BLE001 (a config this GPU rejects)
                        print(f"  {name} M={m} {cfg}: {type(exc).__name__}")
                        continue
                    if t < best_ms:
                        best_ms, best = t, cfg
            sm_fn, sm_kind = scaled_mm_fn(x, w8, ws) if DEVICE == "cuda" else (None, None)
            sm_ms = gpu_ms(sm_fn) if sm_fn else float("nan")
            flops = 2.0 * m * n * k
            rows.append({"linear": name, "N": n, "K": k, "tokens": m, "bf16_mm_ms": bf16_ms, "triton_fp8_ms": ours_ms,
                         "triton_best_ms": best_ms, "scaled_mm_ms": sm_ms, "scaled_mm_scaling": sm_kind or "-",
                         "x_vs_bf16": bf16_ms / ours_ms, "best_x_vs_bf16": bf16_ms / best_ms,
                         "x_vs_scaled_mm": sm_ms / ours_ms if sm_fn else float("nan"),
                         "triton_tflops": flops / ours_ms / 1e9, "best_config": best})
            print(f"{name} M={m}: bf16 {bf16_ms:.4f} ms, ours {ours_ms:.4f} (best {best_ms:.4f}), _scaled_mm {sm_ms:.4f} ms")
    path = out_dir()
    write_csv(os.path.join(path, "fp8_linear.csv"), rows)
    keys = ["linear", "N", "K", "tokens", "bf16_mm_ms", "triton_fp8_ms", "scaled_mm_ms", "x_vs_bf16", "best_x_vs_bf16",
            "x_vs_scaled_mm", "triton_tflops", "scaled_mm_scaling"]
    table = print_table(rows, keys)
    header = "\n".join(f"- {k}: {v}" for k, v in env.items())
    with open(os.path.join(path, "fp8_linear.md"), "w") as f:
        f.write(f"# FP8 block-scaled linear vs bf16 torch.mm and torch._scaled_mm (one run)\n\n{header}\n\n"
                f"x_vs_*: their time / ours (> 1: ours faster). Ours includes the activation quantization; "
                f"_scaled_mm does not. best_*: the best of a small config sweep (configs in the CSV).\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
