"""`python -m dsv4_compile tune`: Optuna sweeps of the Triton kernels per GPU and context length.

    python -m dsv4_compile tune --gpu H100 --context 8k,32k,128k [--kernels fp8_quantize,hc_pre]
        [--trials 50] [--timeout SECONDS] [--storage URL] [--tables-dir DIR] [--workers N] [--batch 1]
        [--decode-batch 64] [--config flash]

Each (kernel, context bucket) is one Optuna study in RDB storage (default: SQLite file
tuning/studies.db; any SQLAlchemy URL, e.g. postgresql+psycopg://user:pw@host/db, to share a sweep
between machines). Re-running the same command resumes; workers share studies; a killed worker's
trial is retried. At the end: a summary table, the best configs in tuning/tables/<gpu>.yaml, and PNG
plots in tuning/tables/<gpu>/ (`--tables-dir` puts both elsewhere). `--timeout` bounds the sweep's
wall clock: no trial starts after it, finished trials are kept, and the same command continues later.

--cost: `cuda` times the kernels with CUDA events (needs the named GPU); `standin` exercises the
whole machinery: the "latency" is a deterministic stand-in cost; with --gpu cpu the correctness gate
still runs the real kernels (Triton interpreter, small shapes), on a GPU nothing runs. Stand-in tables
say so in their `device` field, and by default go to ./standin-tables/ (table, plots and studies) in the
current folder: never into the package's tuned tables or studies.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from .arguments import UsageError, add_config_argument, contexts_arg, positive_int_arg
from .model.context import format_context

DEFAULT_CONTEXTS = "8k,32k,128k"
# Where stand-in runs write by default (relative to the current folder): their costs are not measurements.
STANDIN_DIR = "standin-tables"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .tuning.spaces import SPACES

    parser.add_argument("--gpu", default="auto", metavar="auto|cpu|H100|H200",
                        help="target GPU, checked against this machine (default: auto)")
    parser.add_argument("--context", type=contexts_arg, default=None, metavar="LIST",
                        help=f"context buckets, e.g. 8k,32k,128k (default: {DEFAULT_CONTEXTS})")
    parser.add_argument("--kernels", default=None, metavar="LIST",
                        help=f"comma-separated kernels (default: all available): {', '.join(SPACES)}")
    parser.add_argument("--trials", type=positive_int_arg, default=50, metavar="N",
                        help="configs measured per study (pruned and duplicate trials do not count; default: 50)")
    parser.add_argument("--timeout", type=_seconds, default=None, metavar="SECONDS",
                        help="start no trial after this many seconds (the one in flight finishes; every study "
                             "gets a share; re-run to continue; default: no limit)")
    parser.add_argument("--storage", default=None, metavar="URL",
                        help="Optuna storage, any SQLAlchemy URL (default: sqlite file tuning/studies.db)")
    parser.add_argument("--workers", type=positive_int_arg, default=1, metavar="N",
                        help="worker processes sharing the studies (CUDA: at most one per visible GPU; default: 1)")
    parser.add_argument("--batch", type=positive_int_arg, default=1, metavar="N", help="prefill batch (default: 1)")
    parser.add_argument("--decode-batch", type=positive_int_arg, default=64, metavar="N",
                        help="decode batch for decode kernels (default: 64)")
    add_config_argument(parser, default="flash")
    parser.add_argument("--cost", choices=("auto", "cuda", "standin"), default="auto",
                        help="cuda: CUDA-event timing; standin: deterministic stand-in cost, for testing the "
                             "machinery (default auto: cuda on a GPU, else an error)")
    parser.add_argument("--tables-dir", default=None, metavar="DIR",
                        help=f"where <gpu>.yaml and the plots go (default: tuning/tables; with --cost standin "
                             f"./{STANDIN_DIR}, with the studies too)")
    parser.add_argument("--study-prefix", default="dsv4", metavar="NAME", help="study name prefix (default: dsv4)")
    parser.add_argument("--seed", type=int, default=0, help="sampler seed (default: 0)")
    parser.add_argument("--heartbeat", type=positive_int_arg, default=10, metavar="S",
                        help="heartbeat interval in seconds; a trial silent for 6x this is failed and retried (default: 10)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"bad value {text!r}: expected a number of seconds > 0")
    return value


def run(args: argparse.Namespace) -> int:
    from .compile import GpuError, resolve_gpu

    try:
        gpu = resolve_gpu(args.gpu)
    except GpuError as err:
        raise UsageError(str(err)) from None
    cost = args.cost
    if cost == "auto":
        if gpu == "cpu":
            raise UsageError("no CUDA GPU here: timing needs one (run on the GPU), or pass --cost standin to "
                             "exercise the tuning machinery with a stand-in cost")
        cost = "cuda"
    if cost == "cuda" and gpu == "cpu":
        raise UsageError("--cost cuda needs a CUDA GPU and none is visible; use --cost standin on this machine")
    if gpu == "cpu":
        # The gate runs the kernels in Triton's interpreter: it must be chosen before kernels are imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    # standin: on a CPU machine the gate still runs the real kernels (interpreter, small shapes).
    runner = "cuda" if cost == "cuda" else ("cpu" if gpu == "cpu" else "standin")

    from .tuning import sweep
    from .tuning.spaces import SPACES
    from .tuning.storage import redact

    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()] if args.kernels else None
    unknown = [k for k in kernels or [] if k not in SPACES]
    if kernels is not None and (unknown or not kernels):
        raise UsageError(f"unknown kernel(s) {', '.join(unknown) or repr(args.kernels)}; accepted: {', '.join(SPACES)}")
    contexts = args.context or [8192, 32768, 131072]
    if runner == "cuda":
        import torch

        visible = torch.cuda.device_count()
        if args.workers > visible:
            raise UsageError(f"--workers {args.workers} but {visible} GPU(s) visible: concurrent timings on one GPU "
                             f"disturb each other; use at most {visible} per machine (more machines can share "
                             f"one --storage)")
    tables_dir, storage = args.tables_dir, args.storage
    if cost == "standin":
        tables_dir = tables_dir or STANDIN_DIR
        storage = storage or f"sqlite:///{os.path.abspath(os.path.join(tables_dir, 'studies.db'))}"
    request = sweep.TuneRequest(
        gpu=gpu, contexts=contexts, kernels=kernels, trials=args.trials, storage=storage, workers=args.workers,
        batch=args.batch, decode_batch=args.decode_batch, model=args.config,
        runner=runner,
        seed=args.seed, tables_dir=tables_dir, study_prefix=args.study_prefix, timeout_s=args.timeout,
        heartbeat_interval=args.heartbeat, grace_period=6 * args.heartbeat,
        plots=not args.no_plots, progress=not args.no_progress and sys.stderr.isatty())
    storage = redact(request.storage_url())
    print(f"tune: gpu {gpu}, contexts {','.join(format_context(c) for c in contexts)}, "
          f"{args.trials} measured configs per study, {args.workers} worker(s), cost {cost}, storage {storage}, "
          f"tables {tables_dir or 'tuning/tables'}"
          + (f", timeout {args.timeout:g} s" if args.timeout else ""), file=sys.stderr)
    result = sweep.tune(request)

    if args.json:
        print(json.dumps(_as_json(result), indent=2))
    else:
        print(sweep.format_summary(result.summaries))
        for note in result.notes:
            print(f"note: {note}")
        for s in result.summaries:
            if s.best_ms is None:
                detail = s.first_wrong or s.first_error or "no trial was measured"
                print(f"warning: {s.kernel} {s.bucket}: no valid config ({detail})")
        if result.table_path:
            print(f"table: {result.table_path}")
        if result.plots:
            print(f"plots: {len(result.plots)} PNG in {result.plots[0].parent}")
    for worker, error in sorted(result.worker_errors.items()):
        print(f"dsv4_compile tune: worker {worker} stopped: {error} "
              f"(re-run the same command to resume)", file=sys.stderr)
    return 0 if result.ok else 1


def _as_json(result) -> dict:
    import dataclasses

    return {"gpu": result.request.gpu, "table": str(result.table_path) if result.table_path else None,
            "plots": [str(p) for p in result.plots], "notes": result.notes,
            "worker_errors": {str(k): v for k, v in result.worker_errors.items()},
            "studies": [{**dataclasses.asdict(s), "speedup": s.speedup} for s in result.summaries],
            "elapsed_s": round(result.elapsed_s, 3)}
