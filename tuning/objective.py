"""The Optuna objective: one trial = one config of one kernel on one problem.

Per trial, in order (each step records `status` and `reason` in the trial's user attributes):
1. suggest a value per param (spaces.KernelSpace.suggest) and build the config dataclass; a value the
   dataclass refuses -> pruned, status "invalid";
2. the space's rules -> pruned before anything runs, status "constraint" (the baseline trial, the
   GPU's default, skips the `redundant` rules);
3. the same params already finished in this study -> the same outcome without running again
   (status "duplicate" with the earlier value, or pruned again); a trial whose worker was killed (FAIL
   without a recorded error) does not count: its retry runs;
4. the correctness gate: the kernel's output under this config against the plain op
   (`torch.ops.dsv4.*`) on the problem's shape -> a wrong config is pruned (status "wrong"), so it can
   never be the best trial;
5. timing -> the trial's value in milliseconds (status "measured").
While steps 4 and 5 run, user attribute `stage` says which ("gate" / "timing"): a trial left RUNNING
by a killed worker shows where it was.
A config that fails to compile or run (Triton's OutOfResources, a compile error, CUDA out of memory,
a launcher's ValueError) raises `KernelFailure`: the sweep passes `catch=(KernelFailure,)`, so Optuna
records a FAILED trial (status "error", the message in `reason`) and goes on. A CUDA error that
poisons the context (illegal address, device-side assert) raises `DeviceError` instead, which stops
the worker: a fresh process resumes the study, and the bad config stays recorded.

Runners (what steps 4 and 5 run):
- `CudaRunner`: the real gate on the full shape and CUDA-event timing: warm-up calls (the first
  compiles), then `repeats` timed calls, each on a fresh input set (a pool of copies, as memory
  allows) after an L2 flush (a 256 MB buffer zeroed between calls); the value is the median.
- `CpuRunner`: a CPU machine: the gate runs the real kernels in the Triton interpreter on a small
  version of the shape (TRITON_INTERPRET=1 must be set before kernels are imported); the "time" is
  the stand-in cost (the interpreter's wall clock says nothing about a GPU).
- `StandInRunner`: no kernel at all: a cheap deterministic cost, an optional delay (to stand for the
  time a trial takes), and optional injected wrong or failing configs. For tests of the machinery.
"""
from __future__ import annotations

import hashlib
import math
import statistics
import time
from typing import Any, Mapping

import optuna

from .spaces import GpuSpec, KernelSpace, Problem

STATUS_MEASURED = "measured"
STATUS_DUPLICATE = "duplicate"
STATUS_CONSTRAINT = "constraint"
STATUS_INVALID = "invalid"
STATUS_WRONG = "wrong"
STATUS_ERROR = "error"


class KernelFailure(RuntimeError):
    """A config failed to compile or run; recorded as a failed trial (the sweep catches it)."""


class DeviceError(RuntimeError):
    """The device is unusable after this trial (sticky CUDA error): the worker stops; resume later."""


_STICKY = ("illegal memory access", "device-side assert", "unspecified launch failure",
           "misaligned address", "illegal instruction", "an illegal")


def one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ================================================================================================
# Stand-in cost
# ================================================================================================

def _unit(*parts: Any) -> float:
    """A deterministic number in [0, 1) from the parts."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def standin_cost(space: KernelSpace, params: Mapping[str, Any], problem: Problem, gpu: GpuSpec) -> float:
    """A cheap deterministic 'latency' in ms: the problem's bytes at the GPU's bandwidth plus a launch,
    times (1 + a bowl-shaped penalty around a per-(kernel, GPU, bucket) sweet spot of each param) plus
    a little per-config jitter. Smooth enough for TPE to find the bottom, with one known minimum."""
    choices = space.choices(problem, gpu)
    penalty = 0.0
    for name, values in choices.items():
        if len(values) < 2 or name not in params:
            continue
        sweet = int(_unit(space.name, gpu.name, problem.bucket, name) * len(values))
        idx = values.index(params[name]) if params[name] in values else 0
        penalty += 0.6 * ((idx - sweet) / (len(values) - 1)) ** 2
    jitter = 0.02 * _unit(space.name, gpu.name, problem.bucket, sorted(params.items()))
    base = problem.work_bytes / (gpu.hbm_gbs * 1e6) + 0.004
    return base * (1.0 + penalty + jitter)


# ================================================================================================
# Runners
# ================================================================================================

class Runner:
    """check(config) -> None or the reason the output is wrong; measure(config) -> ms; close()."""

    description = "runner"

    def check(self, config) -> str | None:  # pragma: no cover - interface
        raise NotImplementedError

    def measure(self, config) -> float:  # pragma: no cover - interface
        raise NotImplementedError

    def measure_stats(self) -> dict:
        return {}

    def close(self) -> None:
        pass


class StandInRunner(Runner):
    """No kernel: `wrong` / `fail` are lists of param subsets (dicts); a config matching one of them is
    wrong (the gate prunes it) or fails (KernelFailure). `delay` seconds of sleep per timed trial."""

    description = "stand-in cost (no kernel runs)"

    def __init__(self, space: KernelSpace, problem: Problem, gpu: GpuSpec, *, delay: float = 0.0,
                 wrong: list[dict] | None = None, fail: list[dict] | None = None):
        self.space, self.problem, self.gpu = space, problem, gpu
        self.delay = float(delay)
        self.wrong = list(wrong or [])
        self.fail = list(fail or [])

    def _params(self, config) -> dict:
        return {p.name: getattr(config, p.name) for p in self.space.active_params()}

    @staticmethod
    def _matches(params: dict, subsets: list[dict]) -> bool:
        return any(all(params.get(k) == v for k, v in s.items()) for s in subsets)

    def check(self, config) -> str | None:
        params = self._params(config)
        if self._matches(params, self.fail):
            raise RuntimeError("stand-in failure (injected): out of resources")
        if self._matches(params, self.wrong):
            return "out: relative RMS error 1.000e+00 > 1e-02 (injected wrong config)"
        return None

    def measure(self, config) -> float:
        if self.delay:
            time.sleep(self.delay)
        return standin_cost(self.space, self._params(config), self.problem, self.gpu)


class CpuRunner(StandInRunner):
    """The real gate in the Triton interpreter on a small shape; the stand-in cost as the time."""

    description = "gate: Triton interpreter on a small shape; time: stand-in cost"

    def __init__(self, space: KernelSpace, problem: Problem, gpu: GpuSpec, *, seed: int = 0, **kwargs):
        super().__init__(space, problem, gpu, **kwargs)
        from .tasks import TASKS

        self.task = TASKS[space.name]
        self.args = self.task.inputs(problem, "cpu", seed, small=True)
        self.ref = self.task.reference(self.args)

    def check(self, config) -> str | None:
        injected = super().check(config)
        if injected:
            return injected
        return self.task.compare(self.ref, self.task.run(self.space, self.args, config))


class CudaRunner(Runner):
    """The real gate on the full shape and CUDA-event timing (see the module docstring)."""

    description = "gate: full shape on the GPU; time: CUDA events, median, L2 flushed, fresh inputs"

    def __init__(self, space: KernelSpace, problem: Problem, gpu: GpuSpec, *, seed: int = 0, repeats: int = 20,
                 warmup: int = 3, max_input_sets: int = 4, time_budget_s: float = 2.0, flush_bytes: int = 256 << 20,
                 device: str = "cuda"):
        import torch

        from .tasks import TASKS, tensors_nbytes

        self.torch = torch
        self.space, self.problem, self.gpu = space, problem, gpu
        self.task = TASKS[space.name]
        self.device = torch.device(device)
        self.repeats, self.warmup, self.time_budget_s = repeats, warmup, time_budget_s
        first = self.task.inputs(problem, self.device, seed)
        self.ref = self.task.reference(first)
        # Fresh inputs for each timed call: as many copies as fit in a quarter of the free memory.
        free, _ = torch.cuda.mem_get_info(self.device)
        per_set = max(1, tensors_nbytes(first))
        n_sets = max(1, min(max_input_sets, int(free * 0.25 // per_set)))
        self.pool = [first] + [self.task.inputs(problem, self.device, seed + 1000 * i) for i in range(1, n_sets)]
        self.flush = torch.empty(flush_bytes, dtype=torch.int8, device=self.device)
        self.stats: dict = {}

    def _call(self, args, config):
        return self.task.run(self.space, args, config)

    def check(self, config) -> str | None:
        out = self._call(self.pool[0], config)
        self.torch.cuda.synchronize(self.device)
        return self.task.compare(self.ref, out)

    def measure(self, config) -> float:
        torch = self.torch
        self._call(self.pool[0], config)                    # compiled by the gate already; one more to be sure
        torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        for i in range(self.warmup):
            self._call(self.pool[i % len(self.pool)], config)
        torch.cuda.synchronize(self.device)
        per_call = (time.perf_counter() - t0) / max(1, self.warmup)   # sets the number of repeats
        repeats = max(5, min(self.repeats, int(self.time_budget_s / max(per_call, 1e-6))))
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        for r in range(repeats):
            args = self.pool[r % len(self.pool)]
            self.flush.zero_()                                   # evict the previous call's data from L2
            starts[r].record()
            self._call(args, config)
            ends[r].record()
        torch.cuda.synchronize(self.device)
        times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
        self.stats = {"repeats": repeats, "min_ms": times[0], "max_ms": times[-1],
                      "p20_ms": times[int(0.2 * (len(times) - 1))], "p80_ms": times[int(0.8 * (len(times) - 1))],
                      "input_sets": len(self.pool)}
        return float(statistics.median(times))

    def measure_stats(self) -> dict:
        return dict(self.stats)

    def close(self) -> None:
        self.pool = []
        self.ref = None
        self.flush = None
        self.torch.cuda.empty_cache()


RUNNERS = {"cuda": CudaRunner, "cpu": CpuRunner, "standin": StandInRunner}


def make_runner(kind: str, space: KernelSpace, problem: Problem, gpu: GpuSpec, **options) -> Runner:
    try:
        cls = RUNNERS[kind]
    except KeyError:
        raise ValueError(f"unknown runner {kind!r}; accepted: {', '.join(RUNNERS)}") from None
    return cls(space, problem, gpu, **options)


# ================================================================================================
# The objective
# ================================================================================================

class Objective:
    """Callable for `study.optimize`: see the module docstring. `runner` is built lazily (the first
    trial that gets past the rules), so a study whose remaining trials are all pruned allocates nothing."""

    def __init__(self, space: KernelSpace, problem: Problem, gpu: GpuSpec, runner: Runner | Any, dedupe: bool = True):
        self.space, self.problem, self.gpu = space, problem, gpu
        self._runner = runner
        self.dedupe = dedupe
        self.phase = "prefill" if problem.phase == "any" else problem.phase

    @property
    def runner(self) -> Runner:
        if callable(self._runner) and not isinstance(self._runner, Runner):
            self._runner = self._runner()
        return self._runner

    def close(self) -> None:
        if isinstance(self._runner, Runner):
            self._runner.close()

    def __call__(self, trial: optuna.Trial) -> float:
        params = self.space.suggest(trial, self.problem, self.gpu)
        baseline = bool(trial.user_attrs.get("baseline"))
        try:
            config = self.space.make_config(params, self.gpu.name, self.phase)
        except (ValueError, TypeError) as err:
            self._prune(trial, STATUS_INVALID, one_line(err))
        trial.set_user_attr("config", config.to_str() if hasattr(config, "to_str") else repr(config))
        verdict = self.space.check(config, self.problem, self.gpu, baseline=baseline)
        if verdict is not None:
            kind, reason = verdict
            self._prune(trial, STATUS_CONSTRAINT, f"{kind}: {reason}")
        if self.dedupe:
            earlier = self._finished_twin(trial, params)
            if earlier is not None:
                return self._repeat(trial, earlier)

        trial.set_user_attr("stage", "gate")           # what a killed trial was doing
        try:
            wrong = self.runner.check(config)
        except Exception as err:  # noqa: BLE001 (any failure of the config is a failed trial)
            self._fail(trial, err, "gate")
        if wrong:
            self._prune(trial, STATUS_WRONG, wrong)
        trial.set_user_attr("stage", "timing")
        try:
            ms = float(self.runner.measure(config))
        except Exception as err:  # noqa: BLE001
            self._fail(trial, err, "timing")
        if not math.isfinite(ms) or ms <= 0:
            self._fail(trial, RuntimeError(f"timing gave {ms!r}"), "timing")
        trial.set_user_attr("status", STATUS_MEASURED)
        for key, value in self.runner.measure_stats().items():
            trial.set_user_attr(key, value)
        return ms

    # ---- outcomes -------------------------------------------------------------------------------
    @staticmethod
    def _prune(trial, status: str, reason: str):
        trial.set_user_attr("status", status)
        trial.set_user_attr("reason", reason)
        raise optuna.TrialPruned(f"{status}: {reason}")

    @staticmethod
    def _fail(trial, err: BaseException, stage: str):
        message = one_line(err)
        trial.set_user_attr("status", STATUS_ERROR)
        trial.set_user_attr("reason", f"{stage}: {message}")
        if any(s in str(err).lower() for s in _STICKY):
            raise DeviceError(f"{stage}: {message}") from err
        raise KernelFailure(f"{stage}: {message}") from err

    def _finished_twin(self, trial, params: dict):
        """The first finished trial of this study with the same params and a recorded outcome."""
        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
        for t in trial.study.get_trials(deepcopy=False, states=states):
            if t.number == trial.number or t.params != params:
                continue
            status = t.user_attrs.get("status")
            if t.state == optuna.trial.TrialState.FAIL and status != STATUS_ERROR:
                continue                          # killed mid-trial (heartbeat): not an outcome
            if t.state == optuna.trial.TrialState.COMPLETE and t.values is None:
                continue
            return t
        return None

    def _repeat(self, trial, earlier) -> float:
        trial.set_user_attr("duplicate_of", earlier.number)
        if earlier.state == optuna.trial.TrialState.COMPLETE:
            trial.set_user_attr("status", STATUS_DUPLICATE)
            return float(earlier.value)
        reason = earlier.user_attrs.get("reason", "")
        if earlier.state == optuna.trial.TrialState.PRUNED:
            self._prune(trial, earlier.user_attrs.get("status", STATUS_WRONG),
                        f"same as trial {earlier.number}: {reason}")
        trial.set_user_attr("status", STATUS_ERROR)
        trial.set_user_attr("reason", f"same as trial {earlier.number}: {reason}")
        raise KernelFailure(f"same as trial {earlier.number}: {reason}")
