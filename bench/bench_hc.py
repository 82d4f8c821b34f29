"""mHC: Sinkhorn on 4x4 matrices (20 rounds) and the fused hc_pre step, our Triton kernels vs the
plain ops eager and torch.compile'd, in tokens/s (and GB/s for hc_pre: x read + y written).

    python bench/bench_hc.py               # writes bench/results/<GPU>/hc.csv
    python bench/bench_hc.py --decode      # a decode step's hc_pre (x [B, 1, 4, 4096]) as CUDA graphs: its
                                           # split counts, and 1 Sinkhorn round vs 20 (what the rounds cost)
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _kernel_bench_util import DEVICE, bench_ms, graph_time_ms, out_dir, print_table, try_compile, write_csv  # noqa: E402


def hc_pre_inputs(shape: tuple, generator: torch.Generator | None = None) -> tuple:
    """hc_pre's tensors for streams x of `shape` [..., n, D] bf16: (x, fn [(2+n) n, n D], scale [3], base
    [(2+n) n]), fn scaled so the mixes are O(1)."""
    n, D = shape[-2:]
    W = (2 + n) * n
    return (torch.randn(shape, device=DEVICE, generator=generator).to(torch.bfloat16),
            torch.randn(W, n * D, device=DEVICE, generator=generator) * (n * D) ** -0.5,
            torch.tensor([0.5, 0.7, 1.3], device=DEVICE), torch.randn(W, device=DEVICE, generator=generator) * 0.3)


def run_hc_bench(tokens=(16384, 131072), pre_shapes=((4096, 4096), (4096, 7168)), compile: bool = True) -> list[dict]:
    from dsv4_compile.kernels.hc_sinkhorn import hc_pre, hc_sinkhorn
    from dsv4_compile.model import ops

    rows = []

    def add(case, impl, ms, tokens, nbytes=None, cfg=""):
        row = dict(case=case, impl=impl, ms=ms, mtok_s=tokens / ms / 1e3, config=cfg)
        if nbytes:
            row["gbs"] = nbytes / ms / 1e6
        rows.append(row)
        print(f"{case:40s} {impl:30s} {ms:9.4f} ms {tokens / ms / 1e3:9.2f} Mtok/s", flush=True)

    sinkhorn = ops._sinkhorn_plain
    compiled_sinkhorn = try_compile(sinkhorn, compile)
    for T in tokens:
        logits = torch.randn(T, 4, 4, device=DEVICE) * 3
        case = f"hc_sinkhorn {T}x4x4 20 rounds"
        add(case, "triton (default config)", bench_ms(lambda: hc_sinkhorn(logits, 20, 1e-6)), T)
        add(case, "triton (block_t=128)", bench_ms(lambda: hc_sinkhorn(logits, 20, 1e-6, config={"sinkhorn_block_t": 128})), T,
            cfg="sinkhorn_block_t=128")
        add(case, "eager torch (plain op)", bench_ms(lambda: sinkhorn(logits, 20, 1e-6)), T)
        if compiled_sinkhorn is not None:
            add(case, "torch.compile (plain op)", bench_ms(lambda: compiled_sinkhorn(logits, 20, 1e-6)), T)

    pre = ops._hc_pre_plain
    compiled_pre = try_compile(pre, compile)
    n = 4
    for S, D in pre_shapes:
        W = (2 + n) * n
        args = (*hc_pre_inputs((1, S, n, D)), 20, 1e-6, 1e-6)
        nbytes = S * n * D * 2 + S * D * 2 + W * n * D * 4
        case = f"hc_pre 1x{S}x{n}x{D} bf16"
        add(case, "triton (default config)", bench_ms(lambda: hc_pre(*args)), S, nbytes)
        for i, cfg in enumerate(({"block_k": 128, "num_stages": 4}, {"block_k": 512, "num_stages": 3, "num_warps": 8},
                                 {"block_t": 32, "num_stages": 3, "num_warps": 8}, {"dot_precision": "tf32"},
                                 {"dot_precision": "ieee"})):
            try:
                add(case, f"triton (alt config {i + 1})", bench_ms(lambda: hc_pre(*args, config=cfg)), S, nbytes, str(cfg))
            except Exception as exc:
                print(f"  config {cfg} failed: {type(exc).__name__}: {str(exc)[:120]}")
        add(case, "eager torch (plain op)", bench_ms(lambda: pre(*args)), S, nbytes)
        if compiled_pre is not None:
            add(case, "torch.compile (plain op)", bench_ms(lambda: compiled_pre(*args)), S, nbytes)
    return rows


def run_hc_decode_bench(batches=(1, 64), D=4096, splits=(1, 8, 16, 32, 64)) -> list[dict]:
    """hc_pre at a decode step's shape, x [B, 1, 4, D] bf16, timed as CUDA-graph replays (GPU time, as a
    graphed decode step sees it): the decode default, other split counts, and each with 1 Sinkhorn round
    instead of 20 (the difference is what the serial rounds cost); hc_sinkhorn alone on B matrices."""
    from dsv4_compile.kernels.hc_sinkhorn import hc_pre, hc_sinkhorn
    from dsv4_compile.kernels.hc_sinkhorn.config import decode_config

    n = 4
    rows = []
    for B in batches:
        sets = [hc_pre_inputs((B, 1, n, D)) for _ in range(4)]
        for num_splits in splits:
            cfg = decode_config().replace(num_splits=num_splits)
            for iters in (20, 1):
                ms = graph_time_ms([lambda a=a: hc_pre(*a, iters, 1e-6, 1e-6, config=cfg) for a in sets])
                rows.append(dict(case=f"hc_pre {B}x1x{n}x{D} bf16", impl=f"splits {num_splits}, {iters} rounds",
                                 us=ms * 1e3, config=cfg.to_str()))
                print(f"{rows[-1]['case']:28s} {rows[-1]['impl']:24s} {ms * 1e3:8.2f} us", flush=True)
        logits = [torch.randn(B, n, n, device=DEVICE) * 3 for _ in range(4)]
        ms = graph_time_ms([lambda lg=lg: hc_sinkhorn(lg, 20, 1e-6) for lg in logits])
        rows.append(dict(case=f"hc_sinkhorn {B}x4x4", impl="20 rounds", us=ms * 1e3, config=""))
        print(f"{rows[-1]['case']:28s} {rows[-1]['impl']:24s} {ms * 1e3:8.2f} us", flush=True)
    return rows


def main():
    smoke = "--smoke" in sys.argv                       # tiny sizes, no compile: checks the script runs
    if "--decode" in sys.argv:
        rows = run_hc_decode_bench()
        path = os.path.join(out_dir(), "hc_decode.csv")
        write_csv(path, rows)
        print_table(rows, ["case", "impl", "us", "config"])
        print(f"wrote {path}")
        return
    rows = run_hc_bench((64,), ((32, 64),), compile=False) if smoke else run_hc_bench()
    path = os.path.join(out_dir(), "hc.csv")
    write_csv(path, rows)
    print_table(rows, ["case", "impl", "ms", "mtok_s", "gbs", "config"])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
