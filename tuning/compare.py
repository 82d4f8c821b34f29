"""The recorded tuning comparison: for each kernel and problem, in one run,
(a) the kernel's per-GPU default config, (b) the best of a typical @triton.autotune config list,
(c) the Optuna-tuned best after N configs, (d) a full grid over the tuned space; and how many configs
Optuna needed to come within 2% of the grid's best, against the grid's size.

    python -m dsv4_compile bench --gpu H100 --ops tuning --context 8k,32k     # on the GPU
    python bench/bench_tuning.py --cost standin --gpu H100 --out /tmp/cmp     # machinery only, any machine

(b) `TYPICAL`: the configs people hand-write for @triton.autotune (the Triton tutorials' lists). Each
    is gated and timed with the same runner as everything else and the fastest is kept: that is what
    @triton.autotune does (benchmark every config of its list, keep the best). The kernels' launchers
    pass num_warps / num_stages themselves, so wrapping them in triton.autotune would need kernel
    edits. Unlike triton.autotune, a config that the gate finds wrong cannot win here (reported).
(c) the sweep's own objective and sampler (`Objective`, `sweep.tpe_sampler`, the default enqueued
    as the first trial) over the grid's space, until N configs have run (default: a third of the grid).
    `tune` also enqueues (b)'s list after the default (warm start); (c) leaves it out, to measure the
    search alone.
(d) `GRIDS`: a few choices per param (the GPU's default value always among them); the grid is their
    product less what the space's rules prune, and Optuna searches exactly that space. Fields not in
    the grid keep the default. The full space's size is reported beside it.
Every distinct config runs once (gate, then timing) and its outcome is shared by (a)-(d); Optuna goes
before the rest of the grid, so the run costs one grid plus the autotune configs outside it.
"Configs run" counts every config that reached the GPU (measured, wrong or failed), never duplicates
or rule-pruned proposals (they cost nothing). Trials to 2%: configs run, in order, until the best so far
is within 2% of the grid's best; reported for the live Optuna run, as the median over `replays` more
Optuna seeds replayed on the measured grid, and as the median over random orders of the grid.
Time budget: every problem gets an equal share of the time left; the grid stops at its share (then
reported incomplete, measured/valid, and compared with the best measured) and nothing starts after the
whole budget.
"""
from __future__ import annotations

import dataclasses
import datetime
import itertools
import math
import platform
import random
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import optuna

from ..files import write_text_atomic
from .objective import (_STICKY, RUNNERS, STATUS_ERROR, STATUS_MEASURED, STATUS_WRONG, DeviceError, KernelFailure,
                        Objective, Runner, make_runner, one_line)
from .spaces import TYPICAL, GpuSpec, KernelSpace, Param, Problem, canonical_gpu, get_space, gpu_spec
from .tables import write_csv
from .sweep import tpe_sampler

WITHIN = 0.02
TARGET_SPEEDUP = 1.1          # tuned vs default: what makes tuning worth its time
TARGET_FRACTION = 1 / 3       # of the grid's configs
RAN = (STATUS_MEASURED, STATUS_WRONG, STATUS_ERROR)


# Sized so that 2 kernels x 2 contexts fit in about 8 minutes on an H100 (compiles dominate).
GRIDS: dict[str, dict[str, tuple]] = {
    "sparse_attention": {"block_h": (32, 64), "block_k": (16, 32, 64, 128), "num_warps": (4, 8),
                         "num_stages": (1, 2, 3), "num_splits": (1,)},
    "newton_schulz": {"block_m": (64, 128), "block_n": (64, 128, 256), "block_k": (32, 64), "num_warps": (4, 8),
                      "num_stages": (3, 4), "sym_block": (64, 128)},
}

# Fewer repeats than the sweep's default: every config of a grid is timed (median of CUDA events).
CUDA_OPTIONS = {"repeats": 15, "warmup": 2, "time_budget_s": 1.0}


def grid_space(kernel: str) -> KernelSpace:
    """The kernel's space restricted to GRIDS[kernel] (same rules, problems and defaults)."""
    space = get_space(kernel)
    if kernel not in GRIDS or kernel not in TYPICAL:
        raise KeyError(f"no comparison set up for {kernel!r}; accepted: {', '.join(sorted(set(GRIDS) & set(TYPICAL)))}")
    return dataclasses.replace(space, params=tuple(Param(n, c) for n, c in GRIDS[kernel].items()))


# ================================================================================================
# Measurements: each distinct config once
# ================================================================================================

@dataclass
class Measurement:
    config: str                       # the whole config (to_str)
    params: dict                      # its values of the grid's params
    status: str                       # measured | wrong | error
    ms: float | None
    reason: str
    seconds: float                    # wall time of gate + timing (compiles included)
    sources: list[str] = field(default_factory=list)


class Bench:
    """Runs configs of one problem through `runner` (gate, then timing), each distinct config once."""

    def __init__(self, space: KernelSpace, problem: Problem, gpu: GpuSpec, runner: Runner):
        self.space, self.problem, self.gpu, self.runner = space, problem, gpu, runner
        self.phase = "prefill" if problem.phase == "any" else problem.phase
        self.done: dict[str, Measurement] = {}

    def config(self, params: dict):
        return self.space.make_config(params, self.gpu.name, self.phase)

    def measure(self, config, source: str) -> Measurement:
        key = config.to_str()
        m = self.done.get(key)
        if m is None:
            start = time.monotonic()
            ms, reason = None, ""
            try:
                reason = self.runner.check(config) or ""
                if not reason:
                    ms = float(self.runner.measure(config))
                status = STATUS_WRONG if reason else STATUS_MEASURED
            except Exception as err:  # noqa: BLE001 (a config that fails is an outcome, as in the sweep)
                if any(s in str(err).lower() for s in _STICKY):
                    raise DeviceError(one_line(err)) from err
                status, reason = STATUS_ERROR, one_line(err)
            params = {p.name: getattr(config, p.name) for p in self.space.active_params()}
            m = Measurement(key, params, status, ms, reason, time.monotonic() - start)
            self.done[key] = m
        if source not in m.sources:
            m.sources.append(source)
        return m

    def lookup(self, config) -> Measurement | None:
        return self.done.get(config.to_str())


class _BenchRunner(Runner):
    """The objective's runner over a Bench: `measure_new` False = replay (measured configs only)."""

    def __init__(self, bench: Bench, source: str, measure_new: bool = True):
        self.bench, self.source, self.measure_new = bench, source, measure_new

    def _get(self, config) -> Measurement:
        m = self.bench.measure(config, self.source) if self.measure_new else self.bench.lookup(config)
        if m is None:
            raise RuntimeError("not measured in this run")
        return m

    def check(self, config) -> str | None:
        m = self._get(config)
        if m.status == STATUS_ERROR:
            raise RuntimeError(m.reason)
        return m.reason or None

    def measure(self, config) -> float:
        return self._get(config).ms


def run_optuna(bench: Bench, n_run: int, seed: int, *, source: str, measure_new: bool = True,
               stop_at: float | None = None, timeout: float | None = None) -> list[tuple[float | None, dict]]:
    """The sweep's objective and sampler, the default first, until n_run configs ran (or the best is
    <= stop_at, or timeout). Returns (ms or None when wrong/failed, params) per config run, in order."""
    study = optuna.create_study(direction="minimize", sampler=tpe_sampler(seed, n_run))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study.enqueue_trial(bench.space.default_params(bench.problem, bench.gpu), user_attrs={"baseline": True})
    ran: list[tuple[float | None, dict]] = []

    def callback(study, trial):
        status = trial.user_attrs.get("status")
        if status in RAN and "duplicate_of" not in trial.user_attrs:
            ran.append((trial.value if status == STATUS_MEASURED else None, dict(trial.params)))
        best = min((v for v, _ in ran if v is not None), default=math.inf)
        if len(ran) >= n_run or (stop_at is not None and best <= stop_at):
            study.stop()

    objective = Objective(bench.space, bench.problem, bench.gpu, _BenchRunner(bench, source, measure_new))
    study.optimize(objective, n_trials=10 * n_run + 50, timeout=timeout, catch=(KernelFailure,), callbacks=[callback])
    return ran


def trials_to_within(values: Sequence[float | None], best: float, within: float = WITHIN) -> int | None:
    """1-based count of configs run until the best so far is <= best * (1 + within); None if never."""
    current = math.inf
    for i, v in enumerate(values, 1):
        if v is not None:
            current = min(current, v)
        if current <= best * (1 + within):
            return i
    return None


def best_so_far(values: Sequence[float | None]) -> list[float]:
    out, current = [], math.inf
    for v in values:
        if v is not None:
            current = min(current, v)
        out.append(current)
    return out


# ================================================================================================
# One problem
# ================================================================================================

@dataclass
class ProblemResult:
    kernel: str
    bucket: str
    context: int
    dims: dict
    grid_choices: dict
    full_space: int | None
    grid_raw: int
    grid_valid: int
    grid_measured: int = 0
    default: Measurement | None = None
    autotune: list[Measurement] = field(default_factory=list)
    optuna: list[tuple[float | None, dict]] = field(default_factory=list)
    optuna_n: int = 0
    grid_order: list[Measurement] = field(default_factory=list)     # every valid grid config run, in order
    replays: list[int | None] = field(default_factory=list)
    random_to_2pct: list[int] = field(default_factory=list)
    random_curve: list[float] = field(default_factory=list)         # median best so far over random orders
    measurements: list[Measurement] = field(default_factory=list)
    elapsed_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def grid_complete(self) -> bool:
        return self.grid_measured == self.grid_valid

    def _best(self, ms: Sequence[float | None]) -> float | None:
        values = [v for v in ms if v is not None]
        return min(values) if values else None

    @property
    def grid_best(self) -> Measurement | None:
        done = [m for m in self.grid_order if m.ms is not None]
        return min(done, key=lambda m: m.ms) if done else None

    @property
    def autotune_best(self) -> Measurement | None:
        done = [m for m in self.autotune if m.ms is not None]
        return min(done, key=lambda m: m.ms) if done else None

    @property
    def optuna_best_ms(self) -> float | None:
        return self._best([v for v, _ in self.optuna])

    @property
    def optuna_best_params(self) -> dict | None:
        done = [(v, p) for v, p in self.optuna if v is not None]
        return min(done, key=lambda t: t[0])[1] if done else None

    def row(self) -> dict:
        gb, ab, d = self.grid_best, self.autotune_best, self.default
        ob = self.optuna_best_ms
        live = trials_to_within([v for v, _ in self.optuna], gb.ms) if gb else None
        replayed = [r for r in self.replays if r is not None]
        med = statistics.median(replayed) if replayed and len(replayed) == len(self.replays) else None
        rnd = statistics.median(self.random_to_2pct) if self.random_to_2pct else None
        tuned_vs_default = d.ms / ob if d and d.ms and ob else None
        met = None
        if tuned_vs_default is not None and self.grid_valid:
            to2 = med if med is not None else live
            met = bool(tuned_vs_default >= TARGET_SPEEDUP and to2 is not None and to2 <= TARGET_FRACTION * self.grid_valid)
        return {
            "kernel": self.kernel, "bucket": self.bucket, "context": self.context,
            "default_ms": _r(d.ms if d else None), "default_config": _compact(d.params) if d else "",
            "autotune_best_ms": _r(ab.ms if ab else None), "autotune_best_config": ab.config if ab else "",
            "autotune_ok": f"{sum(m.ms is not None for m in self.autotune)}/{len(self.autotune)}",
            "optuna_configs_run": len(self.optuna), "optuna_n": self.optuna_n, "optuna_best_ms": _r(ob),
            "optuna_best_config": _compact(self.optuna_best_params or {}),
            "grid_best_ms": _r(gb.ms if gb else None), "grid_best_config": _compact(gb.params) if gb else "",
            "grid_raw": self.grid_raw, "grid_valid": self.grid_valid, "grid_measured": self.grid_measured,
            "grid_complete": self.grid_complete, "full_space": self.full_space if self.full_space is not None else "",
            "tuned_vs_default": _r(tuned_vs_default, 3),
            "tuned_vs_autotune": _r(ab.ms / ob if ab and ob else None, 3),
            "grid_vs_default": _r(d.ms / gb.ms if d and d.ms and gb else None, 3),
            "optuna_to_2pct_live": live if live is not None else "",
            "optuna_to_2pct_median": med if med is not None else "",
            "optuna_replays": f"{len(replayed)}/{len(self.replays)} reached",
            "random_to_2pct_median": rnd if rnd is not None else "",
            "target_met": "" if met is None else met,
            "elapsed_s": round(self.elapsed_s, 1),
        }


def _r(v: float | None, digits: int = 5) -> float | str:
    return "" if v is None else round(float(v), digits)


def _compact(params: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in params.items())


def _grid(space: KernelSpace, problem: Problem, gpu: GpuSpec) -> tuple[int, list]:
    """(raw product size, the configs that pass the rules), the default first where it is valid."""
    choices = space.choices(problem, gpu)
    names = list(choices)
    raw = math.prod(len(v) for v in choices.values())
    default = space.default_params(problem, gpu)
    valid = []
    for combo in itertools.product(*(choices[n] for n in names)):
        params = dict(zip(names, combo))
        try:
            cfg = space.make_config(params, gpu.name, "prefill" if problem.phase == "any" else problem.phase)
        except ValueError:
            continue
        if space.check(cfg, problem, gpu, baseline=params == default) is None:
            valid.append(cfg)
    return raw, valid


def compare_problem(kernel: str, problem: Problem, gpu: GpuSpec, runner: Runner, *, n_run: int | None, seed: int,
                    replays: int, share_deadline: float, deadline: float, log: Callable[[str], None]) -> ProblemResult:
    start = time.monotonic()
    space = grid_space(kernel)
    raw, valid = _grid(space, problem, gpu)
    full = get_space(kernel).count_valid(problem, gpu, limit=200000)
    res = ProblemResult(kernel, problem.bucket, problem.context, dict(problem.dims), dict(space.choices(problem, gpu)),
                        full[1] if full else None, raw, len(valid))
    bench = Bench(space, problem, gpu, runner)
    label = f"{kernel} {problem.bucket}"

    res.default = bench.measure(bench.config(space.default_params(problem, gpu)), "default")
    log(f"{label}: default {_ms(res.default)} ({res.default.config})")
    for params in TYPICAL[kernel]:
        res.autotune.append(bench.measure(bench.config(params), "autotune"))
    log(f"{label}: autotune list best {_ms(res.autotune_best)} of {len(res.autotune)}")

    res.optuna_n = max(1, min(len(valid), n_run or math.ceil(len(valid) * TARGET_FRACTION)))
    res.optuna = run_optuna(bench, res.optuna_n, seed, source="optuna",
                            timeout=max(0.0, min(share_deadline, deadline) - time.time()))
    log(f"{label}: optuna best {res.optuna_best_ms or math.nan:.4g} ms after {len(res.optuna)} configs")

    order = list(valid)
    random.Random(seed).shuffle(order)
    for cfg in order:
        if bench.lookup(cfg) is None and time.time() >= min(share_deadline, deadline):
            continue                                     # out of time: only what already ran
        res.grid_order.append(bench.measure(cfg, "grid"))
    res.grid_measured = len(res.grid_order)
    gb = res.grid_best
    spent = [m.seconds for m in bench.done.values()]
    log(f"{label}: grid {res.grid_measured}/{res.grid_valid} configs, best {_ms(gb)}; {len(spent)} configs ran in "
        f"{sum(spent):.0f} s (slowest {max(spent):.1f} s, compiles included)")
    if not res.grid_complete:
        res.notes.append(f"{label}: grid incomplete ({res.grid_measured} of {res.grid_valid} valid configs measured "
                         f"within the time share); ratios use the best measured")

    if gb is not None:
        values = [m.ms for m in res.grid_order]
        rng = random.Random(seed + 1)
        curves = []
        for _ in range(500):
            perm = values[:]
            rng.shuffle(perm)
            curves.append(best_so_far(perm))
            res.random_to_2pct.append(trials_to_within(perm, gb.ms))
        res.random_curve = [statistics.median(c[i] for c in curves) for i in range(len(values))]
        if res.grid_complete:
            for r in range(replays):
                if time.time() >= deadline:
                    res.notes.append(f"{label}: {r} of {replays} Optuna replays before the time budget")
                    break
                ran = run_optuna(bench, len(valid), seed + 1 + r, source="replay", measure_new=False,
                                 stop_at=gb.ms * (1 + WITHIN))
                res.replays.append(trials_to_within([v for v, _ in ran], gb.ms))
    res.measurements = list(bench.done.values())
    res.elapsed_s = time.monotonic() - start
    return res


def _ms(m: Measurement | None) -> str:
    if m is None:
        return "none"
    return f"{m.ms:.4g} ms" if m.ms is not None else f"{m.status} ({m.reason})"


# ================================================================================================
# The run
# ================================================================================================

@dataclass
class CompareResult:
    gpu: str
    device: str
    runner: str                       # 'cuda' | 'standin'
    runner_description: str
    budget_s: float
    problems: list[ProblemResult]
    notes: list[str]
    elapsed_s: float
    versions: dict


def compare(kernels: Sequence[str], contexts: Sequence[int], *, gpu: str, runner: str = "cuda", model: str = "flash",
            n_run: int | None = None, budget_s: float = 450.0, replays: int = 10, seed: int = 0,
            runner_options: dict | None = None, log: Callable[[str], None] = print) -> CompareResult:
    """See the module docstring. runner: 'cuda' (the GPU) or 'standin' (the machinery, no kernel runs)."""
    from dsv4_compile.model.config import ModelConfig

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    start, deadline = time.monotonic(), time.time() + budget_s
    spec = gpu_spec(gpu)
    mc = ModelConfig.load(model)
    problems: list[tuple[str, Problem]] = []
    for kernel in kernels:
        grid_space(kernel)                                   # unknown kernels fail before anything runs
        seen = set()
        for context in contexts:
            problem = get_space(kernel).make_problem(mc, int(context))
            if problem.bucket not in seen:                   # context-free kernels: one problem
                seen.add(problem.bucket)
                problems.append((kernel, problem))
    options = dict(CUDA_OPTIONS if runner == "cuda" else {}, **(runner_options or {}))
    results, notes = [], []
    for i, (kernel, problem) in enumerate(problems):
        left = deadline - time.time()
        if left <= 0:
            notes.append(f"{kernel} {problem.bucket}: skipped, the time budget ({budget_s:g} s) was spent")
            continue
        share_deadline = time.time() + left / (len(problems) - i)
        run = make_runner(runner, grid_space(kernel), problem, spec, **options)
        try:
            res = compare_problem(kernel, problem, spec, run, n_run=n_run, seed=seed, replays=replays,
                                  share_deadline=share_deadline, deadline=deadline, log=log)
        except DeviceError as err:
            notes.append(f"{kernel} {problem.bucket}: stopped, the device is unusable: {err}")
            break
        finally:
            run.close()
        results.append(res)
        notes += res.notes
    return CompareResult(canonical_gpu(gpu), _device(runner, gpu), runner, RUNNERS[runner].description, budget_s,
                         results, notes, time.monotonic() - start, _versions())


def _device(runner: str, gpu: str) -> str:
    if runner == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    return f"{gpu} ({runner} runner: costs are stand-ins, not measurements)"


def _versions() -> dict:
    import torch

    versions = {"torch": torch.__version__, "optuna": optuna.__version__, "python": platform.python_version()}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.version.cuda:
        versions["cuda"] = torch.version.cuda
    return versions


# ================================================================================================
# Outputs: CSV, markdown, PNG
# ================================================================================================

def write_outputs(result: CompareResult, out_dir: str | Path, stem: str = "tuning_compare") -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [p.row() for p in result.problems]
    paths = [write_csv(out / f"{stem}.csv", rows)]
    configs = [{"kernel": p.kernel, "bucket": p.bucket, "config": m.config, "status": m.status, "ms": _r(m.ms),
                "seconds": round(m.seconds, 2), "sources": "+".join(m.sources), "reason": m.reason}
               for p in result.problems for m in p.measurements]
    paths.append(write_csv(out / f"{stem}_configs.csv", configs))
    paths.append(_write_markdown(out / f"{stem}.md", result, rows, stem))
    if result.problems:
        paths.append(_plot(out / f"{stem}.png", result))
    return paths


def summary_lines(result: CompareResult) -> list[str]:
    lines = []
    for r in (p.row() for p in result.problems):
        lines.append(
            f"{r['kernel']} {r['bucket']}: default {r['default_ms']} ms, autotune best {r['autotune_best_ms']} ms, "
            f"optuna best {r['optuna_best_ms']} ms after {r['optuna_configs_run']} configs, grid best "
            f"{r['grid_best_ms']} ms ({r['grid_measured']}/{r['grid_valid']} valid of {r['grid_raw']}); tuned/default "
            f"{r['tuned_vs_default']}x, tuned/autotune {r['tuned_vs_autotune']}x; to 2%: optuna live "
            f"{r['optuna_to_2pct_live'] or '-'}, median {r['optuna_to_2pct_median'] or '-'}, random median "
            f"{r['random_to_2pct_median'] or '-'} of {r['grid_valid']}; target met: {r['target_met']}")
    return lines


def _write_markdown(path: Path, result: CompareResult, rows: list[dict], stem: str) -> Path:
    v = result.versions
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [f"# Tuning comparison: {result.device}", "",
           f"{', '.join(f'{k} {val}' for k, val in v.items())}, {date}; one run ({result.elapsed_s:.0f} s of a "
           f"{result.budget_s:g} s budget). Produced by `tuning/compare.py` (`python -m dsv4_compile bench --ops tuning`).",
           f"Runner: {result.runner_description}.", "",
           "- **default**: the kernel's per-GPU default config.",
           "- **autotune**: the best of a typical @triton.autotune list (below), each config gated and timed with the "
           "same runner and the fastest kept, which is what @triton.autotune does (implemented that way, not by "
           "wrapping the kernels, whose launchers set warps and stages themselves); a wrong config cannot win.",
           "- **optuna**: the sweep's objective and TPE sampler (default first) over the grid's space, N configs run "
           "(default N = a third of the grid).",
           "- **grid**: every config of the reduced grid (the product of the choices below) that the space's rules "
           "allow; 'full space' = the valid configs of the whole tuned space, for scale.",
           f"- **to 2%**: configs run until the best so far is within {WITHIN:.0%} of the grid's best (live run; "
           "median over Optuna seeds replayed on the measured grid; median over random orders of the grid).",
           f"- target: tuned/default >= {TARGET_SPEEDUP}x and Optuna within 2% in <= 1/3 of the grid's configs.",
           "", "| kernel | bucket | default ms | autotune best ms | optuna best ms (N) | grid best ms | grid valid/raw "
           "(full space) | tuned/default | tuned/autotune | grid/default | to 2%: optuna live / median / random median "
           "| target met |", "|" + "---|" * 12]
    for r in rows:
        grid = f"{r['grid_measured']}/{r['grid_valid']}" if not r["grid_complete"] else f"{r['grid_valid']}"
        out.append(f"| {r['kernel']} | {r['bucket']} | {r['default_ms']} | {r['autotune_best_ms']} | "
                   f"{r['optuna_best_ms']} ({r['optuna_configs_run']}) | {r['grid_best_ms']} | {grid}/{r['grid_raw']} "
                   f"({r['full_space'] or '-'}) | {r['tuned_vs_default']} | {r['tuned_vs_autotune']} | "
                   f"{r['grid_vs_default']} | {r['optuna_to_2pct_live'] or '-'} / {r['optuna_to_2pct_median'] or '-'} / "
                   f"{r['random_to_2pct_median'] or '-'} | {r['target_met']} |")
    out += ["", "## Configs", ""]
    for p, r in zip(result.problems, rows):
        out.append(f"- {p.kernel} {p.bucket}: default `{r['default_config']}`; autotune best `{r['autotune_best_config']}` "
                   f"({r['autotune_ok']} ran correctly); optuna best `{r['optuna_best_config']}`; grid best "
                   f"`{r['grid_best_config']}`; shapes {_compact(p.dims)}")
    out += ["", "## Lists and grids", ""]
    for kernel in dict.fromkeys(p.kernel for p in result.problems):
        p = next(q for q in result.problems if q.kernel == kernel)
        out.append(f"- {kernel} grid: " + ", ".join(f"{k} {list(c)}" for k, c in p.grid_choices.items())
                   + "; other fields: the default")
        out.append(f"- {kernel} autotune list ({len(TYPICAL[kernel])}): "
                   + "; ".join(f"`{_compact(c)}`" for c in TYPICAL[kernel]))
    if result.notes:
        out += ["", "## Notes", ""] + [f"- {n}" for n in result.notes]
    out += ["", f"Every config run: `{stem}_configs.csv`. Plot: `{stem}.png`.", ""]
    return write_text_atomic(path, "\n".join(out))


def _plot(path: Path, result: CompareResult) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = len(result.problems)
    fig, axes = plt.subplots(1, n, figsize=(5.0 * n, 4.0), squeeze=False)
    for ax, p in zip(axes[0], result.problems):
        gb = p.grid_best
        if p.random_curve:
            xs = range(1, len(p.random_curve) + 1)
            ax.plot(xs, p.random_curve, color="0.5", label="grid in random order (median of 500)")
        if p.optuna:
            curve = best_so_far([v for v, _ in p.optuna])
            ax.step(range(1, len(curve) + 1), curve, where="post", color="C0", lw=2, label="Optuna (live)")
        for m, style, color, label in ((p.default, "--", "C3", "default"), (p.autotune_best, "-.", "C1", "autotune best"),
                                       (gb, ":", "C2", "grid best")):
            if m is not None and m.ms is not None:
                ax.axhline(m.ms, ls=style, color=color, label=f"{label} {m.ms:.4g} ms")
        if gb is not None:
            ax.axhspan(gb.ms, gb.ms * (1 + WITHIN), color="C2", alpha=0.12, label="within 2% of grid best")
        if p.grid_valid:
            ax.axvline(p.grid_valid * TARGET_FRACTION, color="0.3", lw=0.8, ls=(0, (1, 3)), label="1/3 of the grid")
        finite = [m.ms for m in p.measurements if m.ms is not None]
        if finite:
            top = min(max(finite), 3 * min(finite))           # keep the interesting part readable
            ax.set_ylim(min(finite) * 0.97, top * 1.03)
        ax.set_xlabel("configs run")
        ax.set_ylabel("best latency so far (ms)")
        grid = f"{p.grid_valid}" if p.grid_complete else f"{p.grid_measured}/{p.grid_valid}"
        ax.set_title(f"{p.kernel} {p.bucket}: grid {grid} of {p.grid_raw}", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    note = "" if result.runner == "cuda" else " [stand-in costs, not measurements]"
    fig.suptitle(f"Tuning vs default vs autotune list vs grid on {result.gpu}{note}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
