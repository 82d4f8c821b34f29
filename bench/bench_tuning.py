"""Tuned configs vs the kernel's default vs a typical @triton.autotune list vs a full grid, in one run
(the recorded comparison). The work is in tuning/compare.py (its docstring says what is measured
and how); this is the bench entry (`python -m dsv4_compile bench --ops tuning`).

    python bench/bench_tuning.py [--kernels sparse_attention,newton_schulz] [--contexts 8k,32k] [--budget 450]
    python bench/bench_tuning.py --cost standin --gpu H100 --out /tmp/cmp     # no GPU: the machinery only

Writes tuning_compare.csv, tuning_compare_configs.csv, tuning_compare.md and tuning_compare.png under
--out (default bench/results/<gpu>/).
"""
import argparse
import os
import sys
from typing import Sequence

from dsv4_compile.model.context import parse_contexts
from dsv4_compile.tuning.compare import GRIDS, compare, summary_lines, write_outputs
from dsv4_compile.tuning.spaces import TYPICAL, canonical_gpu


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", default="sparse_attention,newton_schulz",
                        help=f"comma-separated, of: {', '.join(sorted(set(GRIDS) & set(TYPICAL)))}")
    parser.add_argument("--contexts", default="8k,32k", help="context buckets (context-free kernels run once)")
    parser.add_argument("--trials", type=int, default=None, help="configs Optuna runs (default: a third of the grid)")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for the whole run (default 450)")
    parser.add_argument("--replays", type=int, default=10, help="Optuna seeds replayed on the measured grid (default 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cost", choices=("auto", "cuda", "standin"), default="auto",
                        help="cuda: gate and CUDA-event timing; standin: the machinery with a stand-in cost (default: "
                             "cuda where a GPU is visible)")
    parser.add_argument("--gpu", default=None, help="GPU the stand-in cost and rules assume (default: this GPU, else H100)")
    parser.add_argument("--config", default="flash", help="model preset or YAML (the shapes; default flash)")
    parser.add_argument("--out", default=None, help="output folder (default bench/results/<gpu>)")
    args = parser.parse_args(argv)

    import torch

    cost = args.cost if args.cost != "auto" else ("cuda" if torch.cuda.is_available() else "standin")
    if cost == "cuda" and not torch.cuda.is_available():
        print("bench_tuning: --cost cuda needs a CUDA GPU; use --cost standin to exercise the machinery")
        return 2
    gpu = args.gpu or (canonical_gpu(torch.cuda.get_device_name(0)) if cost == "cuda" else "H100")
    out_dir = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", canonical_gpu(gpu))
    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    result = compare(kernels, parse_contexts(args.contexts), gpu=gpu, runner=cost, model=args.config,
                     n_run=args.trials, budget_s=args.budget, replays=args.replays, seed=args.seed,
                     log=lambda line: print(line, flush=True))
    for path in write_outputs(result, out_dir):
        print("wrote", path)
    print("\n".join(summary_lines(result)))
    for note in result.notes:
        print("note:", note)
    return 0 if result.problems else 1


if __name__ == "__main__":
    sys.exit(main())
