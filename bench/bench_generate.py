"""Decode tokens/s of the generation loop (dsv4_compile/runtime.py) on the GPU: the eager model's decode
step launched from Python vs the same step replayed as a CUDA graph, at batch 1 and 8.

    python bench/bench_generate.py [--config mini] [--context 8k] [--prompt 1000] [--new 64] [--out DIR]

Per batch B: B random prompts of --prompt tokens (ragged: each 0-10% shorter) run through
`generate(prompts, N)`; the decode time is that of N new tokens minus that of 1 (the prefill and the
first sample), so tokens/s = B * (N - 1) / decode time. Both runs warm (the graph captured before
timing). Also checks that both variants generate the same greedy tokens. Output: generate.md.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time

import torch

from dsv4_compile import ModelConfig
from dsv4_compile.reference import eager_model
from dsv4_compile.model.context import parse_context
from dsv4_compile.runtime import EagerSteps


def _timed(steps, prompts, n: int) -> tuple[float, list[list[int]]]:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = steps.generate(prompts, n)
    torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="mini")
    parser.add_argument("--context", default="8k")
    parser.add_argument("--prompt", type=int, default=1000)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--out", default=".")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_generate: needs a CUDA GPU", file=sys.stderr)
        return 2
    context = parse_context(args.context)
    config = ModelConfig.load(args.config).replace(max_seq_len=context)
    model = eager_model(config, seed=0, state=None, cuda=True)
    batches = [int(b) for b in args.batches.split(",")]
    rng = random.Random(0)
    rows = [f"# generate decode tokens/s: {config.name}, context {args.context}, prompts ~{args.prompt} tokens, "
            f"{args.new} new tokens, {torch.cuda.get_device_name(0)}, torch {torch.__version__}", "",
            "| batch | variant | decode ms/step | decode tokens/s (total) | tokens/s per sequence | same tokens as launched |",
            "| --- | --- | --- | --- | --- | --- |"]
    for batch in batches:
        prompts = [[rng.randrange(config.vocab_size) for _ in range(args.prompt - rng.randrange(args.prompt // 10 + 1))]
                   for _ in range(batch)]
        results = {}
        for name, graphs in (("launched", False), ("CUDA graph", True)):
            steps = EagerSteps(model, max(batches), graphs=graphs)
            steps.generate(prompts, 4)                    # warm-up: kernels, caches, the graph capture
            t_one, _ = _timed(steps, prompts, 1)
            t_all, tokens = _timed(steps, prompts, args.new)
            step_s = (t_all - t_one) / (args.new - 1)
            results[name] = tokens
            same = "-" if name == "launched" else ("yes" if tokens == results["launched"] else "NO")
            rows.append(f"| {batch} | {name} | {step_s * 1e3:.2f} | {batch / step_s:.1f} | {1 / step_s:.1f} | {same} |")
            print(rows[-1], flush=True)
            del steps
            torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "generate.md"), "w") as f:
        f.write("\n".join(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
