"""Optuna autotuning of the Triton kernels per GPU and context length; tuned tables as data.

- spaces/:      search spaces, one file per kernel (params, rules that prune before running), and the
                framework (GPU limits, problems)
- tasks.py:     inputs, plain-op reference, kernel call and tolerance per kernel (the correctness gate)
- objective.py: the Optuna objective (rules -> dedupe -> gate -> timing) and its runners
- storage.py:   RDB storage (SQLite default with busy timeout, PostgreSQL), heartbeats and retries
- sweep.py:     plans, studies, worker processes, summaries, `tune(TuneRequest(...))`
- tables.py:    tuning/tables/<gpu>.yaml: atomic writes, nearest-bucket lookup, `tuned_config`,
                `table_hash`, `config_source` (the pass framework's ConfigSource)
- plots.py:     history, importance and latency-vs-context PNGs beside the table
- compare.py:   tuned vs default vs a typical @triton.autotune list vs a full grid, in one run
                (`python -m dsv4_compile bench --ops tuning`, bench/bench_tuning.py)

The command `python -m dsv4_compile tune --gpu H100 --context 8k,32k,128k` is dsv4_compile/tune.py: the
pipeline imports this package, never the reverse.

Importing this package does not import Triton kernels (that would fix TRITON_INTERPRET): the kernel
modules load when a space's config or kernel is first needed.
"""
from .spaces import SPACES, GpuSpec, KernelSpace, Param, Problem, canonical_gpu, get_space, gpu_spec
from .tables import config_source, lookup, pick, table_hash, tables_source, tuned_config


def __getattr__(name: str):
    # The sweep imports optuna's samplers and the objective: only when asked for.
    if name in ("TuneRequest", "TuneResult", "tune", "format_summary", "plan_studies"):
        from . import sweep

        return getattr(sweep, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["SPACES", "GpuSpec", "KernelSpace", "Param", "Problem", "TuneRequest", "TuneResult", "canonical_gpu",
           "config_source", "format_summary", "get_space", "gpu_spec", "lookup", "pick", "plan_studies", "table_hash",
           "tables_source", "tune", "tuned_config"]
