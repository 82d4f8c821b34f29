"""`python -m dsv4_compile bench --gpu H100 [--ops attention,...] [--context 8k,32k]`.

Runs the side-by-side benchmark scripts of bench/ (one run, each writing CSV + PNG + a markdown with
GPU, versions, date and ratios under bench/results/<gpu>/). `--ops` takes the substitution families
that `--passes` and `tune --kernels` use; `attention` is short for both sparse-attention families;
`moe` (the three moe_experts families: one bench_moe.py run, V4-Flash's 256 experts) times the
grouped-expert kernel; `layers` (bench_layers.py) and `decode_step` (bench_decode_step.py) time whole layers and a whole
decode step, at the --context lengths (decode_step: those within the mini preset's max_seq_len).
`tuning` (not part of `all`: about 8 minutes) compares tuned configs with the defaults, a typical
@triton.autotune list and a full grid (bench/bench_tuning.py, tuning/compare.py).
The scripts live in the source checkout, not in the installed package: from an installed package
(`pip install .`) bench says so in one line (exit 2); a checkout or an editable install runs them.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from .arguments import UsageError, contexts_arg
from .model.context import format_context

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"
# family -> (bench module, the part of it that covers the family)
FAMILIES = {
    "sparse_attention": ("bench_attention", None),
    "sparse_attention_cached": ("bench_attention", None),
    "indexer_topk_cached": ("bench_attention", None),    # its decode rows (idx_dec) against unpack + indexer_topk
    "fp8_quantize": ("bench_kernels", "quant"),
    "fp4_quantize": ("bench_kernels", "quant"),
    "newton_schulz": ("bench_kernels", "ns"),
    "hc_pre": ("bench_kernels", "hc"),
    "hc_sinkhorn": ("bench_kernels", "hc"),
    "moe_experts": ("bench_moe", None),
    "moe_experts_fp8": ("bench_moe", None),
    "moe_experts_fp8_w8a8": ("bench_moe", None),
    "moe_experts_mxfp4": ("bench_moe", None),
    "moe_experts_mxfp4_w4a8": ("bench_moe", None),
    # Not substitution families: whole-layer attention (CSA, HCA vs dense FA2) and the mini preset's
    # whole decode step (eager vs CUDA graph).
    "layers": ("bench_layers", None),
    "decode_step": ("bench_decode_step", None),
}
ALIASES = {"attention": ("sparse_attention", "sparse_attention_cached"), "quant": ("fp8_quantize", "fp4_quantize"),
           "moe": ("moe_experts", "moe_experts_fp8", "moe_experts_fp8_w8a8", "moe_experts_mxfp4",
                   "moe_experts_mxfp4_w4a8"),
           "all": tuple(FAMILIES)}
# Benchmarks that are not a substitution family (and not part of `all`): name -> bench module.
EXTRAS = {"tuning": "bench_tuning"}
ACCEPTED = sorted(set(FAMILIES) | set(ALIASES) | set(EXTRAS))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpu", default="auto", help="auto, H100 or H200 (a named GPU that is absent is an error)")
    parser.add_argument("--ops", default="all", help=f"comma-separated: {', '.join(ACCEPTED)} (default all)")
    parser.add_argument("--context", type=contexts_arg, default=[8192, 32768],
                        help="attention context lengths, e.g. 8k,32k,128k (default 8k,32k)")
    parser.add_argument("--out", default=None, help="output folder (default bench/results/<gpu>)")


def _families(text: str) -> list[str]:
    picked: list[str] = []
    for name in (s.strip() for s in text.split(",") if s.strip()):
        if name not in ACCEPTED:
            raise UsageError(f"--ops: unknown {name!r}; accepted: {', '.join(ACCEPTED)}")
        picked += [f for f in ALIASES.get(name, (name,)) if f not in picked]
    if not picked:
        raise UsageError("--ops: empty; accepted: " + ", ".join(ACCEPTED))
    return picked


def run(args: argparse.Namespace) -> int:
    from .compile import GpuError, resolve_gpu

    families = _families(args.ops)
    try:
        gpu = resolve_gpu(args.gpu)
    except GpuError as err:
        raise UsageError(str(err)) from None
    if gpu == "cpu":
        raise UsageError("bench: no CUDA GPU here; the benchmarks time kernels on H100/H200 (run them on the device)")
    if not (BENCH_DIR / "bench_attention.py").is_file():
        raise UsageError(f"bench: the benchmark scripts ship with the source checkout, not the installed package "
                         f"({BENCH_DIR} is missing); run it in a checkout (pip install -e .)")
    sys.path.insert(0, str(BENCH_DIR))
    status = 0
    kernels = [f for f in families if f in FAMILIES]
    if any(FAMILIES[f][0] == "bench_attention" for f in kernels):
        argv = ["--contexts", ",".join(format_context(c) for c in args.context)] + (["--out", args.out] if args.out else [])
        status = max(status, importlib.import_module("bench_attention").main(argv))
    parts = sorted({FAMILIES[f][1] for f in kernels if FAMILIES[f][0] == "bench_kernels"})
    if parts:
        importlib.import_module("bench_kernels").run_all(tuple(parts), args.out, False)
    if any(FAMILIES[f][0] == "bench_moe" for f in kernels):  # one run covers the three weight formats
        status = max(status, importlib.import_module("bench_moe").main(["--out", args.out] if args.out else []))
    for name in ("layers", "decode_step"):
        if name in families:
            argv = ["--contexts", ",".join(map(format_context, args.context))] + (["--out", args.out] if args.out else [])
            status = max(status, importlib.import_module(FAMILIES[name][0]).main(argv))
    if "tuning" in families:
        argv = ["--contexts", ",".join(format_context(c) for c in args.context)] + (["--out", args.out] if args.out else [])
        status = max(status, importlib.import_module(EXTRAS["tuning"]).main(argv))
    return status
