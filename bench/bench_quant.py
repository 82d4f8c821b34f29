"""FP8 / FP4 blockwise quantization: our Triton kernels vs eager torch and torch.compile of the same
plain function (model/ops.py), in GB/s (bytes read + written) against the device's copy bandwidth.

Anchor (DESIGN.md section 4, lent H100): FP8 block-128 quantization of a 16384 x 7168 bf16 tensor,
eager 0.23 TB/s, torch.compile 2.91 TB/s (97% of copy).

    python bench/bench_quant.py            # writes bench/results/<GPU>/quant.csv
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _kernel_bench_util import DEVICE, bench_ms, copy_bandwidth_gbs, out_dir, print_table, try_compile, write_csv  # noqa: E402

# Small sweep of launch configs: the best goes in the table (the tuner does this properly).
QUANT_SWEEP = [dict(block_elems=e, num_warps=w)
               for e, w in ((1024, 4), (2048, 4), (4096, 4), (4096, 8), (8192, 8), (16384, 8))]


def _sweep(fn, configs):
    best = None
    for cfg in configs:
        try:
            ms = bench_ms(lambda: fn(cfg))
        except Exception as exc:  # a config the compiler rejects: skip, report
            print(f"  config {cfg} failed: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        if best is None or ms < best[0]:
            best = (ms, cfg)
    return best


def run_quant_bench(R: int = 16384, D: int = 7168, copy_gbs: float | None = None, sweep: bool = True,
                    compile: bool = True) -> list[dict]:
    from dsv4_compile.kernels.fp4_quantize import fp4_dequantize, fp4_quantize
    from dsv4_compile.kernels.fp8_quantize import fp8_dequantize, fp8_quantize
    from dsv4_compile.model import ops

    copy_gbs = copy_gbs or copy_bandwidth_gbs()
    x = torch.randn(R, D, device=DEVICE, dtype=torch.bfloat16)
    plain_fp8 = ops.fp8_quantize._init_fn
    plain_fp4 = ops.fp4_quantize._init_fn
    plain_fp8_dq = ops.fp8_dequantize._init_fn
    rows = []

    def add(case, impl, ms, nbytes, cfg=""):
        rows.append(dict(case=case, impl=impl, ms=ms, gbs=nbytes / ms / 1e6, pct_copy=100 * nbytes / ms / 1e6 / copy_gbs,
                         config=cfg))
        print(f"{case:38s} {impl:28s} {ms:8.4f} ms {nbytes / ms / 1e6:8.1f} GB/s", flush=True)

    rows.append(dict(case="copy", impl="torch copy_", ms=float("nan"), gbs=copy_gbs, pct_copy=100.0, config=""))
    cases = [
        ("fp8 quant b128 exact", 128, False, fp8_quantize, plain_fp8, R * D * 2 + R * D + R * (D // 128) * 4),
        ("fp8 quant b128 pow2", 128, True, fp8_quantize, plain_fp8, R * D * 2 + R * D + R * (D // 128) * 4),
        ("fp4 quant b32 pow2", 32, True, fp4_quantize, plain_fp4, R * D * 2 + R * D // 2 + R * (D // 32) * 4),
    ]
    for case, bs, pow2, kernel, plain, nbytes in cases:
        case = f"{case} {R}x{D} bf16"
        add(case, "triton (default config)", bench_ms(lambda: kernel(x, bs, pow2)), nbytes)
        if sweep and kernel is not fp8_quantize:
            best = _sweep(lambda cfg: kernel(x, bs, pow2, config=cfg), QUANT_SWEEP)
            if best:
                add(case, "triton (best of sweep)", best[0], nbytes, str(best[1]))
        if kernel is fp8_quantize:  # each e4m3 conversion at its best sweep config (default: native)
            for cast in ("native", "bits"):
                best = _sweep(lambda cfg: kernel(x, bs, pow2, config={**cfg, "cast": cast}),
                              QUANT_SWEEP if sweep else [{}])
                if best:
                    add(case, f"triton (cast={cast}, best)", best[0], nbytes, str({**best[1], "cast": cast}))
        add(case, "eager torch (plain op)", bench_ms(lambda: plain(x, bs, pow2)), nbytes)
        compiled = try_compile(plain, compile)
        if compiled is not None:
            add(case, "torch.compile (plain op)", bench_ms(lambda: compiled(x, bs, pow2)), nbytes)

    codes, scale = fp8_quantize(x, 128, False)
    packed, scale4 = fp4_quantize(x, 32, True)
    dequant_cases = [
        (f"fp8 dequant b128 {R}x{D} -> fp32", fp8_dequantize, plain_fp8_dq, (codes, scale, 128),
         R * D + R * (D // 128) * 4 + R * D * 4),
        (f"fp4 dequant b32 {R}x{D} -> fp32", fp4_dequantize, ops.fp4_dequantize._init_fn, (packed, scale4, 32),
         R * D // 2 + R * (D // 32) * 4 + R * D * 4),
    ]
    for case, kernel, plain, args, nbytes in dequant_cases:
        add(case, "triton (default config)", bench_ms(lambda: kernel(*args)), nbytes)
        add(case, "eager torch (plain op)", bench_ms(lambda: plain(*args)), nbytes)
        compiled = try_compile(plain, compile)
        if compiled is not None:
            add(case, "torch.compile (plain op)", bench_ms(lambda: compiled(*args)), nbytes)
    return rows


def main():
    smoke = "--smoke" in sys.argv                       # tiny sizes, no compile: checks the script runs
    rows = run_quant_bench(64, 256, sweep=False, compile=False) if smoke else run_quant_bench()
    path = os.path.join(out_dir(), "quant.csv")
    write_csv(path, rows)
    print_table(rows, ["case", "impl", "ms", "gbs", "pct_copy", "config"])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
