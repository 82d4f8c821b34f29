"""The routed experts at a decode size (V4-Flash: D 4096, I 2048, E 256, top 6) in one weight format, for a
profiler: each config is launched `--launches` times on one input set (the first compiles), and its
CUDA-graph time over 4 input sets (other routings, the same weights) is printed, so that an ncu capture of
one launch per config can be read beside the times of the same run.

    python bench/profile_moe_decode.py --tokens 64 --configs ";block_n=64,down_block_n=64"
    ncu --clock-control none --set full -k regex:'_(gate_up|down)_kernel' --launch-skip 2 --launch-count 2 \\
        python bench/profile_moe_decode.py --tokens 64 --configs "" --no-time
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _kernel_bench_util import DEVICE, graph_time_ms, parse_profile_args  # noqa: E402
from bench_moe import routing  # noqa: E402

FORMATS = ("bf16", "fp8", "mxfp4")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="64", help="tokens T (a decode batch), comma-separated")
    parser.add_argument("--format", default="mxfp4", choices=FORMATS, help="expert weight format")
    parser.add_argument("--act", default="x", choices=("x", "fp8"), help="activations: as given, or FP8 (W8A8 / W4A8)")
    args = parse_profile_args(parser, argv, "profile_moe_decode", "the op's default for T", launches=2)
    if args is None:
        return 2
    from dsv4_compile.kernels.moe_experts import moe_experts
    from dsv4_compile.model import weight_formats

    D, I, E, k, limit = 4096, 2048, 256, 6, 10.0
    g = torch.Generator(device=DEVICE).manual_seed(0)
    ws = [(torch.randn(shape, device=DEVICE, generator=g) * shape[-1] ** -0.5).to(torch.bfloat16)
          for shape in ((E, I, D), (E, D, I), (E, I, D))]
    weight_format, scales = "float", None
    if args.format != "bf16":
        quantize = weight_formats.quantize_fp8_weight if args.format == "fp8" else weight_formats.quantize_mxfp4
        pairs = [weight_formats.quantize_experts(quantize, w) for w in ws]
        ws, scales, weight_format = [q for q, _ in pairs], tuple(s for _, s in pairs), args.format
    for T in (int(t) for t in args.tokens.split(",")):
        sets = [(torch.randn(T, D, device=DEVICE, generator=g).to(torch.bfloat16), *routing(T, k, E, "random", seed))
                for seed in range(1 if args.no_time else 4)]
        x, ids, w = sets[0]
        for cfg in args.configs.split(";"):
            cfg = cfg.strip()
            for _ in range(args.launches):
                out = moe_experts(x, ids, w, *ws, limit, cfg or None, weight_format, scales, args.act)
            torch.cuda.synchronize()
            # the output's sum of squares to every bit: two runs of the same numbers print the same
            line = (f"config {cfg or 'default'!r}: T {T}, {args.format}, act {args.act}, "
                    f"sum(out^2) {out.double().pow(2).sum().item()!r}")
            if not args.no_time:
                ms = graph_time_ms([lambda x=x, i=i, w=w: moe_experts(x, i, w, *ws, limit, cfg or None, weight_format,
                                                                      scales, args.act) for x, i, w in sets])
                line += f", {ms * 1e3:.1f} us (CUDA graph over {len(sets)} input sets)"
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
