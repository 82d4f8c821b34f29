"""The sweep: Optuna studies per (kernel, GPU, context bucket), run by one or several worker processes
on one storage, summarised, written to the tuned table and plotted.

    from dsv4_compile.tuning import TuneRequest, tune
    result = tune(TuneRequest(gpu="H100", contexts=[8192, 32768, 131072], trials=50))
    print(format_summary(result.summaries)); result.table_path

Studies
-------
One study per `Plan` (kernel x problem). Its name encodes kernel, GPU, bucket and code version
(storage.study_name), so re-running the same request resumes the same studies (load_if_exists), and
an edited kernel starts new ones. The parent creates every study and enqueues the GPU's default
config as the first trial (the baseline, `skip_if_exists`), then the table's current entry for the
bucket and the typical autotune configs (warm start), then the workers run.

Budget: `trials` = configs MEASURED per study (timed after passing the gate). Trials pruned by the
rules, duplicates and failures do not count; a study stops at the target (counted across all
workers, so a resumed study with enough measured trials does nothing), when every valid config of a
small space has an outcome, or after `max_attempts` trials of one worker (TPE keeps proposing pruned
or duplicate configs in a nearly exhausted space).
Time budget: `timeout_s` (wall clock from the start of `tune`) stops starting new trials; the trial in
flight finishes and every finished trial stays in the storage, so re-running continues. Each study
gets an equal share of the time left when it starts (time a study does not use passes on), so every
bucket gets its baseline and some trials rather than the first ones taking it all.

Workers: `workers=1` runs in this process; `workers=N` starts N processes (multiprocessing, spawn)
that share each study through the storage and start together (a barrier). With the CUDA runner each
worker takes its own GPU (CUDA_VISIBLE_DEVICES = its index): timings of concurrent workers on one GPU
would disturb each other, so N may not exceed the visible GPUs. TPE uses `constant_liar` with several
workers so that they do not all try the same config. A worker SIGKILLed mid-trial leaves a RUNNING
trial whose heartbeat stops; the next trial started by any worker (or a resumed sweep, after the grace
period) fails it and enqueues a retry with the same params (storage.make_storage).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import sys
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import optuna

from .objective import (STATUS_CONSTRAINT, STATUS_DUPLICATE, STATUS_ERROR, STATUS_INVALID, STATUS_MEASURED,
                        STATUS_WRONG, DeviceError, KernelFailure, Objective, make_runner)
from ..model.context import format_context
from .spaces import SPACES, KernelSpace, Problem, canonical_gpu, get_space, gpu_spec
from .storage import DEFAULT_STORAGE, dispose, fail_stale_trials, make_storage, redact, study_name
from .tables import TableError, load_table, write_entries

TrialState = optuna.trial.TrialState


@dataclass
class TuneRequest:
    """What to tune. Plain data (picklable: it travels to worker processes)."""

    gpu: str                                   # target: 'H100', 'H200', 'cpu', ... (canonical_gpu)
    contexts: Sequence[int] = (8192, 32768, 131072)
    kernels: Sequence[str] | None = None       # None: every space whose kernel is available
    trials: int = 50                           # configs measured per study
    storage: str | None = None                 # SQLAlchemy URL; None: DEFAULT_STORAGE (SQLite)
    workers: int = 1
    batch: int = 1                             # prefill batch
    decode_batch: int = 64                     # decode batch (DESIGN.md: judge decode at batch 64)
    model: str = "flash"                       # model preset or YAML path: the shapes
    runner: str = "cuda"                       # 'cuda' | 'cpu' | 'standin' (objective.RUNNERS)
    runner_options: dict = field(default_factory=dict)
    seed: int = 0
    tables_dir: str | None = None              # None: tuning/tables
    study_prefix: str = "dsv4"
    heartbeat_interval: int = 10
    grace_period: int = 60
    max_retry: int = 3
    max_attempts: int | None = None            # per worker and study; None: 10 * trials + 50
    timeout_s: float | None = None             # no new trial after this many seconds of the sweep
    write_table: bool = True
    plots: bool = True
    progress: bool = False
    quiet_optuna: bool = True

    def storage_url(self) -> str:
        return self.storage or DEFAULT_STORAGE


@dataclass
class Plan:
    kernel: str
    problem: Problem
    gpu: str
    study: str
    code_version: str
    target: int
    max_attempts: int
    combos: int | None = None
    valid: int | None = None


@dataclass
class StudySummary:
    kernel: str
    bucket: str
    phase: str
    context: int
    batch: int
    study: str
    code_version: str
    trials: int = 0
    measured: int = 0
    duplicates: int = 0
    constraint: int = 0
    invalid: int = 0
    wrong: int = 0
    errors: int = 0
    killed: int = 0             # FAIL without an outcome: the worker died (heartbeat)
    retried: int = 0            # trials that re-ran a killed one
    unfinished: int = 0         # RUNNING / WAITING at the end
    best_ms: float | None = None
    best_trial: int | None = None
    best_params: dict | None = None
    best_config: str | None = None
    default_ms: float | None = None
    default_params: dict | None = None
    combos: int | None = None
    valid: int | None = None
    first_error: str | None = None
    first_wrong: str | None = None

    @property
    def speedup(self) -> float | None:
        if self.best_ms and self.default_ms:
            return self.default_ms / self.best_ms
        return None


@dataclass
class TuneResult:
    request: TuneRequest
    plans: list[Plan]
    summaries: list[StudySummary]
    notes: list[str]
    table_path: Path | None
    plots: list[Path]
    # {worker: {study: numbers of the trials it told}}; an enqueued trial two workers popped at once
    # (SQLite: see _optimize) can be under both
    worker_trials: dict[int, dict[str, list[int]]]
    worker_errors: dict[int, str]
    elapsed_s: float

    @property
    def ok(self) -> bool:
        return not self.worker_errors and all(s.best_ms is not None for s in self.summaries)


# ================================================================================================
# Planning
# ================================================================================================

def select_kernels(names: Sequence[str] | None) -> list[KernelSpace]:
    if not names:
        return list(SPACES.values())
    chosen = {}
    for name in names:
        space = get_space(name.strip())           # KeyError names the accepted kernels
        chosen[space.name] = space
    return list(chosen.values())


def plan_studies(request: TuneRequest) -> tuple[list[Plan], list[str]]:
    """The studies a request needs, and notes on kernels skipped (not available here)."""
    from dsv4_compile.model.config import ModelConfig

    model_config = ModelConfig.load(request.model)
    gpu = gpu_spec(request.gpu)
    plans, notes = [], []
    for space in select_kernels(request.kernels):
        reason = space.unavailable()
        if reason:
            notes.append(f"skipped {space.name}: {reason}")
            continue
        seen = set()
        for phase in space.phases:
            batch = request.decode_batch if phase == "decode" else request.batch
            for context in request.contexts:
                problem = space.make_problem(model_config, int(context), batch, phase)
                same = (phase, tuple(sorted(problem.dims.items())))
                if problem.bucket in seen or same in seen:
                    continue  # context-free kernels, and problems the context does not change (the MoE decode): one study
                seen.update((problem.bucket, same))
                version = space.code_version(problem, gpu)
                counted = space.count_valid(problem, gpu, limit=20000)
                combos, valid = counted if counted else (None, None)
                target = request.trials if valid is None else max(1, min(request.trials, valid))
                plans.append(Plan(space.name, problem, gpu.name, study_name(request.study_prefix, space.name, gpu.name,
                                                                            problem.bucket, version),
                                  version, target, request.max_attempts or 10 * request.trials + 50, combos, valid))
    return plans, notes


# ================================================================================================
# Studies
# ================================================================================================

def tpe_sampler(seed: int, target: int, constant_liar: bool = False) -> optuna.samplers.TPESampler:
    """The sweep's sampler (also what tuning/compare.py measures): multivariate TPE, a third of the
    target (3 to 10) as random startup trials."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(3, target // 3)),
                                          multivariate=True, constant_liar=constant_liar)


def _sampler(request: TuneRequest, plan: Plan, worker: int) -> optuna.samplers.BaseSampler:
    seed = (request.seed + zlib.crc32(plan.study.encode()) + 7919 * worker) % (2 ** 31)
    return tpe_sampler(seed, plan.target, constant_liar=request.workers > 1)


def _storage(request: TuneRequest, heartbeat: bool = True):
    return make_storage(request.storage_url(), heartbeat_interval=request.heartbeat_interval if heartbeat else None,
                        grace_period=request.grace_period, max_retry=request.max_retry)


def prepare_studies(request: TuneRequest, plans: Sequence[Plan], storage=None) -> None:
    """Create (or load) every study; enqueue the GPU's default config as the baseline trial, then as a
    warm start the config of the table's current entry for the study's bucket (a re-tune, e.g. after a
    kernel changed, measures the config it would replace) and the kernel's typical @triton.autotune
    configs (KernelSpace.typical)."""
    storage = storage or _storage(request)
    try:
        current = load_table(request.gpu, request.tables_dir).get("kernels", {})
    except TableError:  # an unreadable table holds no entry to start from (writing replaces it, write_entries)
        current = {}
    for plan in plans:
        space = get_space(plan.kernel)
        study = optuna.create_study(study_name=plan.study, storage=storage, direction="minimize", load_if_exists=True)
        attrs = {"kernel": plan.kernel, "gpu": plan.gpu, "bucket": plan.problem.bucket, "phase": plan.problem.phase,
                 "context": plan.problem.context, "batch": plan.problem.batch, "code_version": plan.code_version,
                 "model": plan.problem.model, "dims": dict(plan.problem.dims)}
        if study.user_attrs.get("kernel") != plan.kernel:
            for key, value in attrs.items():
                study.set_user_attr(key, value)
        default = space.default_params(plan.problem, gpu_spec(plan.gpu))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            study.enqueue_trial(default, user_attrs={"baseline": True}, skip_if_exists=True)
            entry = current.get(plan.kernel, {}).get(plan.problem.bucket) or {}
            first = [entry["config"]] if isinstance(entry.get("config"), dict) else []
            for params in space.warm_start_params(plan.problem, gpu_spec(plan.gpu), first):
                study.enqueue_trial(params, user_attrs={"warm_start": True}, skip_if_exists=True)


def _outcome_trials(study) -> list:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))


def measured_count(study) -> int:
    return sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
               if t.user_attrs.get("status") == STATUS_MEASURED)


class _Budget:
    """Stops the study at the measured target, or once every valid config has an outcome."""

    def __init__(self, plan: Plan, on_trial: Callable[[Any], None] | None = None):
        self.plan, self.on_trial = plan, on_trial
        self.numbers: list[int] = []

    def done(self, study) -> bool:
        trials = _outcome_trials(study)
        measured = sum(1 for t in trials if t.user_attrs.get("status") == STATUS_MEASURED)
        if measured >= self.plan.target:
            return True
        if self.plan.valid is not None:
            tried = {tuple(sorted(t.params.items())) for t in trials
                     if t.user_attrs.get("status") in (STATUS_MEASURED, STATUS_WRONG, STATUS_ERROR)}
            return len(tried) >= self.plan.valid
        return False

    def __call__(self, study, trial) -> None:
        self.numbers.append(trial.number)
        if self.on_trial:
            self.on_trial(trial)
        if self.done(study):
            study.stop()


def run_worker(request: TuneRequest, plans: Sequence[Plan], worker: int = 0, barrier=None,
               on_trial: Callable[[Plan, Any], None] | None = None, deadline: float | None = None) -> dict[str, list[int]]:
    """Run every plan's study to its budget in this process. Returns {study: trial numbers run here}.
    `deadline` (time.time() seconds): no trial starts after it (see the module docstring).
    Raises DeviceError when the device became unusable (the studies stay resumable)."""
    storage = _storage(request)
    ran: dict[str, list[int]] = {}
    if barrier is not None:
        with contextlib.suppress(Exception):
            barrier.wait(timeout=600)
    try:
        for i, plan in enumerate(plans):
            space = get_space(plan.kernel)
            gpu = gpu_spec(plan.gpu)
            study = optuna.load_study(study_name=plan.study, storage=storage, sampler=_sampler(request, plan, worker))
            fail_stale_trials(study, storage)
            budget = _Budget(plan, (lambda t, p=plan: on_trial(p, t)) if on_trial else None)
            if budget.done(study):
                ran[plan.study] = []
                continue
            timeout = None
            if deadline is not None:
                left = deadline - time.time()
                if left <= 0:
                    ran[plan.study] = []
                    continue
                timeout = left / (len(plans) - i)
            options = dict(request.runner_options)
            objective = Objective(space, plan.problem, gpu,
                                  lambda: make_runner(request.runner, space, plan.problem, gpu, **options))
            try:
                _optimize(study, objective, plan.max_attempts, timeout, budget)
            finally:
                objective.close()
                ran[plan.study] = budget.numbers
    finally:
        dispose(storage)
    return ran


def _optimize(study, objective, n_trials: int, timeout: float | None, budget: _Budget) -> None:
    """study.optimize, going on where another worker finished this worker's trial first: two workers
    popped the same WAITING trial (the baseline, a retry; Optuna's pop reads then writes, which SQLite
    does not make atomic), or a trial outlived its heartbeat's grace period. The slower worker then fails
    with 'Cannot tell a COMPLETE trial' or UpdateFinishedTrialError; the trial is the other worker's."""
    start, lost = time.monotonic(), 0
    while True:
        left = None if timeout is None else max(0.0, timeout - (time.monotonic() - start))
        attempts = n_trials - len(budget.numbers) - lost
        if attempts <= 0:
            return
        try:
            study.optimize(objective, n_trials=attempts, timeout=left, catch=(KernelFailure,), callbacks=[budget])
            return
        except (ValueError, optuna.exceptions.UpdateFinishedTrialError) as err:
            if isinstance(err, ValueError) and not str(err).startswith("Cannot tell a"):
                raise
            lost += 1


def _worker_entry(request_dict: dict, plans: list[Plan], worker: int, barrier, queue, cuda_device: str | None,
                  deadline: float | None) -> None:
    if cuda_device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = cuda_device
    request = TuneRequest(**request_dict)
    _quiet(request)
    try:
        ran = run_worker(request, plans, worker, barrier, deadline=deadline)
        queue.put((worker, ran, None))
    except BaseException as err:  # noqa: BLE001 (reported to the parent, which decides)
        queue.put((worker, {}, f"{type(err).__name__}: {' '.join(str(err).split())}"))


def _quiet(request: TuneRequest) -> None:
    if request.quiet_optuna:
        optuna.logging.set_verbosity(optuna.logging.ERROR)


# ================================================================================================
# Summaries
# ================================================================================================

def summarize(storage, plan: Plan) -> StudySummary:
    study = optuna.load_study(study_name=plan.study, storage=storage)
    s = StudySummary(plan.kernel, plan.problem.bucket, plan.problem.phase, plan.problem.context, plan.problem.batch,
                     plan.study, plan.code_version, combos=plan.combos, valid=plan.valid)
    best = None
    for t in study.get_trials(deepcopy=False):
        s.trials += 1
        status = t.user_attrs.get("status")
        if "failed_trial" in t.system_attrs:
            s.retried += 1
        if t.state in (TrialState.RUNNING, TrialState.WAITING):
            s.unfinished += 1
        elif t.state == TrialState.FAIL and status != STATUS_ERROR:
            s.killed += 1
        elif status == STATUS_MEASURED:
            s.measured += 1
            if best is None or t.value < best.value:
                best = t
        elif status == STATUS_DUPLICATE:
            s.duplicates += 1
        elif status == STATUS_CONSTRAINT:
            s.constraint += 1
        elif status == STATUS_INVALID:
            s.invalid += 1
        elif status == STATUS_WRONG:
            s.wrong += 1
            s.first_wrong = s.first_wrong or t.user_attrs.get("reason")
        elif status == STATUS_ERROR:
            s.errors += 1
            s.first_error = s.first_error or t.user_attrs.get("reason")
        if t.user_attrs.get("baseline") and status == STATUS_MEASURED and t.state == TrialState.COMPLETE:
            s.default_ms = t.value if s.default_ms is None else min(s.default_ms, t.value)
        if t.user_attrs.get("baseline"):
            s.default_params = dict(t.params)
    if best is not None:
        s.best_ms, s.best_trial, s.best_params = float(best.value), best.number, dict(best.params)
        s.best_config = best.user_attrs.get("config")
    return s


def table_entry(summary: StudySummary, plan: Plan, device: str) -> dict:
    import torch

    versions = {"torch": torch.__version__, "optuna": optuna.__version__}
    with contextlib.suppress(Exception):
        import triton

        versions["triton"] = triton.__version__
    from ..files import now_utc

    return {"phase": summary.phase, "context": summary.context, "batch": summary.batch,
            "config": dict(summary.best_params or {}), "latency_ms": round(summary.best_ms, 6),
            "default_ms": None if summary.default_ms is None else round(summary.default_ms, 6),
            "measured": summary.measured, "study": summary.study, "code_version": summary.code_version,
            "model": plan.problem.model, "dims": dict(plan.problem.dims), "device": device,
            "versions": versions, "date": now_utc()}


def format_summary(summaries: Sequence[StudySummary]) -> str:
    """The end-of-sweep table (plain text)."""
    head = ("kernel", "bucket", "measured", "pruned rules/wrong", "failed", "killed", "best ms", "default ms",
            "speedup", "best config")
    rows = []
    for s in summaries:
        rows.append((s.kernel, s.bucket, str(s.measured), f"{s.constraint + s.invalid}/{s.wrong}", str(s.errors),
                     f"{s.killed}" + (f" ({s.retried} retried)" if s.retried else ""),
                     _ms(s.best_ms), _ms(s.default_ms), f"{s.speedup:.2f}x" if s.speedup else "-",
                     _compact(s.best_params) if s.best_params else "no valid config"))
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i in (0, 1, 9) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in (head, *rows)]
    return "\n".join(lines)


def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}"


def _compact(params: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in params.items())


# ================================================================================================
# The whole sweep
# ================================================================================================

class _Progress:
    """A tqdm bar over measured configs of all studies (stderr), or nothing."""

    def __init__(self, enabled: bool, plans: Sequence[Plan]):
        self.bar = None
        self.plans = plans
        if enabled and plans:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=sum(p.target for p in plans), unit="config", file=sys.stderr,
                            dynamic_ncols=True, desc="tuning")
        self.done: dict[str, int] = {}
        self.label = ""

    def set(self, plan: Plan, measured: int) -> None:
        if self.bar is None:
            return
        self.done[plan.study] = min(measured, plan.target)
        label = f"{plan.kernel} {plan.problem.bucket}"
        if label != self.label:
            self.label = label
            self.bar.set_description(label, refresh=False)
        n = sum(self.done.values())
        if n != self.bar.n:
            self.bar.update(n - self.bar.n)

    def trial(self, plan: Plan, trial) -> None:
        if self.bar is not None and trial.user_attrs.get("status") == STATUS_MEASURED:
            self.set(plan, self.done.get(plan.study, 0) + 1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def tune(request: TuneRequest) -> TuneResult:
    """Plan, prepare, run (in-process or in worker processes), summarise, write the table, plot."""
    start = time.monotonic()
    deadline = None if request.timeout_s is None else time.time() + request.timeout_s
    _quiet(request)
    request.gpu = canonical_gpu(request.gpu)
    if request.workers < 1:
        raise ValueError(f"workers = {request.workers}: need >= 1")
    devices = _cuda_devices(request)
    plans, notes = plan_studies(request)
    storage = _storage(request)
    worker_trials: dict[int, dict[str, list[int]]] = {}
    worker_errors: dict[int, str] = {}
    progress = _Progress(request.progress, plans)
    try:
        prepare_studies(request, plans, storage)
        for plan in plans:  # resumed studies start where they are
            progress.set(plan, measured_count(optuna.load_study(study_name=plan.study, storage=storage)))
        if request.workers == 1:
            try:
                worker_trials[0] = run_worker(request, plans, 0, on_trial=progress.trial, deadline=deadline)
            except DeviceError as err:
                worker_errors[0] = f"DeviceError: {err}"
        else:
            worker_trials, worker_errors = _run_processes(request, plans, devices, storage, progress, deadline)
    finally:
        progress.close()
    summaries = [summarize(storage, plan) for plan in plans]
    if deadline is not None and time.time() >= deadline:
        short = [f"{p.kernel} {s.bucket} {s.measured}/{p.target}" for p, s in zip(plans, summaries) if s.measured < p.target]
        if short:
            notes.append(f"--timeout {request.timeout_s:g} s reached; measured/target: {', '.join(short)} "
                         f"(re-run the same command with the same storage to continue)")
    dispose(storage)

    table_path = None
    if request.write_table:
        device = _device_name(request)
        entries = [(p.kernel, s.bucket, table_entry(s, p, device)) for p, s in zip(plans, summaries) if s.best_ms is not None]
        if entries:
            table_path = write_entries(request.gpu, entries, request.tables_dir)
    plots: list[Path] = []
    if request.plots and summaries:
        from .plots import plot_sweep

        try:
            plots = plot_sweep(request, plans, summaries, _storage(request, heartbeat=False))
        except Exception as err:  # noqa: BLE001 (plots are a by-product: say so, keep the results)
            notes.append(f"plots failed: {type(err).__name__}: {err}")
    return TuneResult(request, plans, summaries, notes, table_path, plots, worker_trials, worker_errors,
                      time.monotonic() - start)


def _cuda_devices(request: TuneRequest) -> list[str] | None:
    if request.runner != "cuda":
        return None
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("the CUDA runner needs a CUDA GPU; use runner='cpu' or 'standin' on this machine")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in visible.split(",") if d.strip()] if visible else [str(i) for i in range(torch.cuda.device_count())]
    if request.workers > len(ids):
        raise ValueError(f"workers = {request.workers} but {len(ids)} GPU(s) visible: concurrent timings on one GPU "
                         f"disturb each other; use at most {len(ids)} workers per machine")
    return ids


def _device_name(request: TuneRequest) -> str:
    if request.runner == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    return f"{request.gpu} ({request.runner} runner: costs are stand-ins, not measurements)"


def _run_processes(request: TuneRequest, plans: list[Plan], devices: list[str] | None, storage, progress: _Progress,
                   deadline: float | None):
    import multiprocessing as mp
    import queue as queue_mod

    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(request.workers)
    results = ctx.Queue()
    request_dict = dataclasses.asdict(request)
    request_dict["progress"] = False
    procs = []
    for i in range(request.workers):
        device = devices[i] if devices else None
        proc = ctx.Process(target=_worker_entry, args=(request_dict, plans, i, barrier, results, device, deadline),
                           name=f"dsv4-tune-worker-{i}", daemon=False)
        proc.start()
        procs.append(proc)
    trials: dict[int, dict[str, list[int]]] = {}
    errors: dict[int, str] = {}
    reported: set[int] = set()

    def receive(block: bool) -> None:
        worker, ran, error = results.get(timeout=1.0) if block else results.get_nowait()
        reported.add(worker)
        trials[worker] = ran
        if error:
            errors[worker] = error

    while len(reported) < len(procs):
        with contextlib.suppress(queue_mod.Empty):
            receive(block=True)
        if progress.bar is not None:
            for plan in plans:
                with contextlib.suppress(Exception):
                    progress.set(plan, measured_count(optuna.load_study(study_name=plan.study, storage=storage)))
        for i, proc in enumerate(procs):
            if i not in reported and not proc.is_alive():
                # Exited: its report may still be in the pipe; otherwise it died without one (killed).
                deadline = time.monotonic() + 2.0
                while i not in reported and time.monotonic() < deadline:
                    with contextlib.suppress(queue_mod.Empty):
                        receive(block=True)
                if i not in reported:
                    reported.add(i)
                    errors[i] = f"worker {i} exited with code {proc.exitcode} without a report"
    for proc in procs:
        proc.join()
    return trials, errors
