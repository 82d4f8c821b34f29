"""Decode attention over the FP8 cache (`sparse_attention_cached`) at V4-Flash's decode shape, for a
profiler: each config is launched `--launches` times on one input set (the first compiles), and its
CUDA-graph time over 6 input sets is printed, so that an ncu capture of one launch per config can be
read beside the times of the same run.

    python bench/profile_decode_attention.py --configs ";block_k=32,num_stages=1,num_splits=2"
    python bench/profile_decode_attention.py --batch 64 --engine --configs ""   # as a [1, B] engine launches it
    ncu --clock-control none --set full -k regex:_sparse_attn_ --launch-skip 2 --launch-count 1 \\
        python bench/profile_decode_attention.py --configs "" --no-time
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _kernel_bench_util import DEVICE, graph_time_ms, parse_profile_args  # noqa: E402
from bench_attention import FLASH_H, HEAD_D, ROPE_D, decode_inputs  # noqa: E402
from dsv4_compile.model.context import parse_contexts  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", default="32k", help="context length (8k, 32k, 128k, ...)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--engine", action="store_true", help="launch as a decode engine does at this batch (its "
                        "batch symbolic): the grid's split axis one token's, the batch's split count run")
    args = parse_profile_args(parser, argv, "profile_decode_attention", "the default, auto splits", launches=3)
    if args is None:
        return 2
    from dsv4_compile.kernels.sparse_attention_cached.sparse_attention_cached import launched_as

    def attention(q, cache, idx, cfg):  # the op, or as an engine launches it at this batch
        return launched_as(q, cache, sink, idx, HEAD_D ** -0.5, ROPE_D, cfg, True if args.engine else None)

    S = parse_contexts(args.context)[0]
    torch.manual_seed(0)
    sets = [decode_inputs(S, args.batch, DEVICE) for _ in range(1 if args.no_time else 6)]
    sink = torch.randn(FLASH_H, device=DEVICE)
    q, cache, idx = sets[0]
    ref = torch.ops.dsv4.sparse_attention_cached(q.float(), cache, sink, idx, HEAD_D ** -0.5, ROPE_D)
    for cfg in args.configs.split(";"):
        cfg = cfg.strip()
        for _ in range(args.launches):
            out = attention(q, cache, idx, cfg)
        torch.cuda.synchronize()
        err = ((out.float() - ref).pow(2).mean() / ref.pow(2).mean()).sqrt().item()
        line = f"config {cfg or 'default(auto splits)'!r}: rel RMS vs plain fp32 {err:.2e}"
        if not args.no_time:
            ms = graph_time_ms([lambda q=q, c=c, i=i: attention(q, c, i, cfg) for q, c, i in sets])
            line += f", {ms * 1e3:.1f} us (CUDA graph over {len(sets)} input sets)"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
