"""Radix-select top-k (kernels/indexer_topk/radix_topk.py) vs torch.topk and torch's stable sort (the
plain op's exact rule) on rows of fp32 scores: the selection half of the planned two-kernel indexer.

    python bench/bench_radix_topk.py                          # R 4096 x N 32768, k 512 (CUDA)
    python bench/bench_radix_topk.py --rows 64 --keys 131072 --k 1024
Prints ms a call (CUDA events, median; CPU: with TRITON_INTERPRET=1, a smoke test at small sizes only), the
effective GB/s of one read of the scores, and torch.topk's time / ours. Checks our result equals the
stable sort's first k (ties to the lowest index) before timing.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _kernel_bench_util import DEVICE, bench_ms  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4096 if DEVICE == "cuda" else 4)
    p.add_argument("--keys", type=int, default=32768 if DEVICE == "cuda" else 2048)
    p.add_argument("--k", type=int, default=512)
    p.add_argument("--configs", default="|digit_bits=11|block_n=4096|block_n=1024,num_warps=4",
                   help="'|'-separated radix_topk configs ('' = the device's default)")
    args = p.parse_args(argv)
    from dsv4_compile.kernels.indexer_topk import radix_topk

    R, N, k = args.rows, args.keys, args.k
    g = torch.Generator().manual_seed(0)
    # weighted-ReLU-like scores: non-negative, many exact zeros (ties), a Gaussian tail
    scores = torch.randn(R, N, generator=g).relu_().to(DEVICE)
    ref = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k].int()
    assert torch.equal(radix_topk(scores, None, k), ref), "radix_topk differs from the stable sort"
    nbytes = R * N * 4
    print(f"{DEVICE}: R {R} x N {N} fp32, k {k}")
    t_topk = bench_ms(lambda: torch.topk(scores, k, dim=-1, sorted=True))
    t_sort = bench_ms(lambda: torch.sort(scores, dim=-1, descending=True, stable=True))
    print(f"{'torch.topk (sorted; ties unordered)':44s} {t_topk:9.4f} ms {nbytes / t_topk / 1e6:8.1f} GB/s")
    print(f"{'torch.sort stable (the exact rule)':44s} {t_sort:9.4f} ms {nbytes / t_sort / 1e6:8.1f} GB/s")
    for cfg in args.configs.split("|"):
        ms = bench_ms(lambda: radix_topk(scores, None, k, cfg))
        print(f"{'radix_topk ' + (cfg or '(default)'):44s} {ms:9.4f} ms {nbytes / ms / 1e6:8.1f} GB/s "
              f"topk/ours {t_topk / ms:5.2f}x")


if __name__ == "__main__":
    main()
