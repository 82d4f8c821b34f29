"""A decode step's hc_pre (x [B, 1, 4, 4096] bf16, V4's fn [24, 16384]) for a profiler: each config is
launched `--launches` times on one input set (the first compiles), and its CUDA-graph time over 4 input
sets is printed, so that an ncu capture of one launch per config can be read beside the times of the run.
`--prefill`: x [1, B, 4, 4096] (a prompt of B tokens), configs over the prefill default.

    python bench/profile_hc_decode.py --batch 1 --configs ";num_splits=16"
    python bench/profile_hc_decode.py --prefill --batch 4096 --configs ";block_k=128"
    ncu --clock-control none --set full -k regex:'_hc_' --launch-skip 2 --launch-count 2 \\
        python bench/profile_hc_decode.py --batch 1 --configs "" --no-time
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _kernel_bench_util import DEVICE, graph_time_ms, parse_profile_args  # noqa: E402
from bench_hc import hc_pre_inputs  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", default="1", help="decode batch B (tokens), comma-separated")
    parser.add_argument("--prefill", action="store_true", help="B tokens of one prompt, the prefill config")
    args = parse_profile_args(parser, argv, "profile_hc_decode", "the GPU's default for the phase", launches=2)
    if args is None:
        return 2
    from dsv4_compile.kernels.hc_sinkhorn import hc_pre
    from dsv4_compile.kernels.hc_sinkhorn.config import HcConfig, decode_config, default_config

    n, D = 4, 4096
    g = torch.Generator(device=DEVICE).manual_seed(0)
    for B in (int(b) for b in args.batch.split(",")):
        shape = (1, B, n, D) if args.prefill else (B, 1, n, D)
        sets = [hc_pre_inputs(shape, g) for _ in range(1 if args.no_time else 4)]
        for cfg in args.configs.split(";"):
            cfg = cfg.strip()
            config = HcConfig.from_str(cfg, base=default_config() if args.prefill else decode_config())
            for _ in range(args.launches):
                y, post, comb = hc_pre(*sets[0], 20, 1e-6, 1e-6, config=config)
            torch.cuda.synchronize()
            # the outputs' sums of squares to every bit: two runs of the same numbers print the same
            sums = [t.double().pow(2).sum().item() for t in (y, post, comb)]
            phase = "prefill" if args.prefill else "decode"
            line = f"config {cfg or 'default'!r}: {phase} B {B}, sum(y^2, post^2, comb^2) {sums!r}"
            if not args.no_time:
                ms = graph_time_ms([lambda a=a: hc_pre(*a, 20, 1e-6, 1e-6, config=config) for a in sets])
                line += f", {ms * 1e3:.2f} us (CUDA graph over {len(sets)} input sets)"
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
