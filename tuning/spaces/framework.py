"""The search-space framework: what a kernel's space is made of, and the rules shared by several.

Vocabulary
----------
- `GpuSpec`: the limits a config must respect on one GPU (shared memory per block, SM count, ...).
  `gpu_spec("H100")`; unknown names (and "cpu") get the conservative "generic" limits.
- `Problem`: one tuning case = kernel x phase x context bucket x batch, with the shapes it implies for
  a model config (`dims`). Its `bucket` ("8k", "8k-b4", "decode-32k-b64", "any") keys studies and
  tables.
- `Param`: one tuned field of the kernel's config dataclass (kernels/<op>/config.py) with its
  candidate values; the choices may depend on the problem (split factors only for decode, ...). The
  GPU's default value is always among the choices, so the default can be measured as the baseline.
- `KernelSpace`: a kernel's params, its rules, how its problems are shaped, and the configs people
  hand-write for @triton.autotune (`typical`). Untuned fields keep the GPU's default
  (`default_config`), so a config = default.replace(**params).
- Rules: `hard` rules reject configs that cannot run or are illegal (shared memory over the GPU's
  per-block limit, accumulators that cannot fit in registers, dot tiles under 16, more threads than a
  block may hold); `redundant` rules reject configs that are duplicates or dominated on this problem
  (a tile larger than the problem: the launcher clamps it, or the extra lanes idle). Both prune the
  trial before it runs; the baseline trial (the GPU's default) is exempt from the redundant rules.
  Tile sizes come from the kernel's own arithmetic (kernels/<op>/config.py), never a copy of it.
  Shared-memory and register figures are estimates (Triton's real usage shows only at compile time;
  a config that passes here and still fails is recorded as a failed trial, never a crash).

Nothing here imports a kernel module at import time: importing one fixes TRITON_INTERPRET for the
process (DESIGN.md, Traps), so config modules are imported on first use (`KernelSpace.kernel_config`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ... import kernels
from ...kernels.gpus import canonical_gpu
from ...model.context import format_context

KERNELS_DIR = Path(kernels.__file__).resolve().parent   # its __init__ is empty: nothing is registered
PHASES = ("prefill", "decode")
CSA_RATIO = 4

# ================================================================================================
# GPUs
# ================================================================================================


@dataclass(frozen=True)
class GpuSpec:
    """Per-GPU limits the rules check, and the rough speeds the stand-in cost uses."""

    name: str
    smem_per_block: int        # bytes: the opt-in maximum one block may use (what Triton may ask for)
    n_sms: int
    l2_bytes: int
    hbm_gbs: float             # GB/s, for the stand-in cost
    regs_per_thread: int = 255
    max_threads_per_block: int = 1024


GPUS: dict[str, GpuSpec] = {
    # Hopper: 228 KB shared memory per SM, 227 KB (232448 B) per block opt-in; 132 SMs (SXM); 50 MB L2.
    "H100": GpuSpec("H100", smem_per_block=232448, n_sms=132, l2_bytes=50 << 20, hbm_gbs=3350.0),
    "H200": GpuSpec("H200", smem_per_block=232448, n_sms=132, l2_bytes=50 << 20, hbm_gbs=4800.0),
    # Anything else (and the CPU interpreter): the smallest opt-in limit of recent parts (sm_86/89, 99 KB).
    "generic": GpuSpec("generic", smem_per_block=101376, n_sms=80, l2_bytes=6 << 20, hbm_gbs=900.0),
}


def gpu_spec(name: str) -> GpuSpec:
    """The limits for a GPU name; unknown GPUs and 'cpu' get the 'generic' limits under their own name."""
    key = canonical_gpu(name)
    spec = GPUS.get(key)
    return spec if spec is not None else dataclasses.replace(GPUS["generic"], name=key)


# ================================================================================================
# Problems
# ================================================================================================


@dataclass(frozen=True)
class Problem:
    """One tuning case. `dims`: the shapes it implies (name -> int/str/float), see each space's docs.
    `work_bytes`: bytes the op must move at least (for the stand-in cost and for reports)."""

    kernel: str
    phase: str                 # "prefill" | "decode" | "any" (context-free kernels)
    context: int               # tokens; 0 for context-free kernels
    batch: int
    dims: Mapping[str, Any] = field(default_factory=dict)
    work_bytes: int = 0
    model: str = "flash"

    @property
    def bucket(self) -> str:
        if self.phase == "any":
            return "any"
        ctx = format_context(self.context)
        if self.phase == "decode":
            return f"decode-{ctx}-b{self.batch}"
        return ctx if self.batch == 1 else f"{ctx}-b{self.batch}"

    def dim(self, name: str) -> Any:
        return self.dims[name]

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.dims.items())


# ================================================================================================
# Params and rules
# ================================================================================================

Choices = Sequence[Any] | Callable[[Problem, GpuSpec], Sequence[Any]]


@dataclass(frozen=True)
class Param:
    name: str                  # a field of the kernel's config dataclass
    choices: Choices
    optional: bool = False     # tuned only where the config class has the field (kernels still landing)

    def values(self, problem: Problem, gpu: GpuSpec) -> tuple:
        c = self.choices(problem, gpu) if callable(self.choices) else self.choices
        return tuple(c)


# A rule: (config, problem, gpu) -> None when fine, else a one-line reason.
Rule = Callable[[Any, Problem, GpuSpec], "str | None"]


def next_pow2(n: int) -> int:
    """kernels/_common.next_pow2, imported on first use (see the module docstring)."""
    from ...kernels._common import next_pow2 as kernels_next_pow2

    return kernels_next_pow2(n)


# ================================================================================================
# The space
# ================================================================================================


@dataclass(frozen=True)
class KernelSpace:
    """A kernel's search space. See the module docstring.

    name:          the dsv4 op the kernel implements ('fp8_quantize'): study and table key.
    package:       the kernel folder under kernels/ (its sources are hashed into the study name).
    config_class:  the config dataclass's name in kernels/<config_package or package>/config.py.
    function:      'module:attr' of the public kernel function, relative to dsv4_compile.kernels.
    defaults:      phase -> name of the per-GPU default function in that config module.
    problem:       (model config, context, batch, phase) -> (dims, work_bytes).
    baseline:      optional (default params, problem, gpu) -> params: what "the default" means when
                   the kernel adjusts its default at run time (decode's automatic split count).
    typical:       the configs people hand-write for @triton.autotune (the Triton tutorials' lists):
                   `tune` enqueues them after the default (warm start, so a tuned table is never worse
                   than the list's best), and tuning/compare.py times them as the "@triton.autotune"
                   baseline.
    uses:          other kernel folders whose kernels this one launches (their sources are hashed into
                   the study name too): indexer_topk_cached runs indexer_topk's kernels.
    """

    name: str
    package: str
    config_class: str
    function: str
    params: tuple[Param, ...]
    problem: Callable[[Any, int, int, str], tuple[dict, int]]
    hard: tuple[Rule, ...] = ()
    redundant: tuple[Rule, ...] = ()
    phases: tuple[str, ...] = ("prefill",)
    context_free: bool = False
    config_package: str | None = None
    defaults: Mapping[str, str] = field(default_factory=lambda: {"prefill": "default_config"})
    baseline: Callable[[dict, Problem, GpuSpec], dict] | None = None
    typical: tuple[Mapping[str, Any], ...] = ()
    uses: tuple[str, ...] = ()
    version: str = "1"
    doc: str = ""

    # ---- the kernel's own code (imported lazily) ----------------------------------------------
    @property
    def config_module(self) -> str:
        return f"dsv4_compile.kernels.{self.config_package or self.package}.config"

    def unavailable(self) -> str | None:
        """None when the kernel package and its config class import and have every non-optional
        param as a field; else the reason (one line)."""
        try:
            cls = self.config_cls()
            self.kernel_fn()
        except Exception as err:  # noqa: BLE001 (any import failure means "not usable here")
            return f"kernel {self.name} not available: {type(err).__name__}: {err}"
        fields = {f.name for f in dataclasses.fields(cls)}
        missing = [p.name for p in self.params if not p.optional and p.name not in fields]
        if missing:
            return (f"search space of {self.name} out of date: {cls.__name__} has no field(s) {', '.join(missing)} "
                    f"(tuning/spaces/{self.name}.py)")
        return None

    def active_params(self) -> tuple[Param, ...]:
        """The params tuned now: optional ones only where the config class has the field."""
        fields = {f.name for f in dataclasses.fields(self.config_cls())}
        return tuple(p for p in self.params if not p.optional or p.name in fields)

    def kernel_config(self):
        """The kernel's config module (kernels/<op>/config.py): its dataclass, defaults and tile arithmetic."""
        return importlib.import_module(self.config_module)

    def config_cls(self) -> type:
        return getattr(self.kernel_config(), self.config_class)

    def kernel_fn(self) -> Callable:
        module, _, attr = self.function.partition(":")
        return getattr(importlib.import_module(f"dsv4_compile.kernels.{module}"), attr)

    def default_config(self, gpu: str, phase: str = "prefill"):
        """The kernel's own default for this GPU (name as torch reports it or short) and phase."""
        fn_name = self.defaults.get(phase) or self.defaults.get("prefill") or next(iter(self.defaults.values()))
        return getattr(self.kernel_config(), fn_name)(gpu)

    # ---- problems -------------------------------------------------------------------------------
    def make_problem(self, model_config, context: int, batch: int = 1, phase: str = "prefill") -> Problem:
        if phase not in self.phases:
            raise ValueError(f"{self.name}: phase {phase!r}; this kernel is tuned for {', '.join(self.phases)}")
        if self.context_free:
            context, batch, phase_key = 0, 1, "any"
        else:
            phase_key = phase
        dims, work = self.problem(model_config, context, batch, phase)
        return Problem(self.name, phase_key, context, batch, dims, work, getattr(model_config, "name", "custom"))

    # ---- params and configs ---------------------------------------------------------------------
    def choices(self, problem: Problem, gpu: GpuSpec) -> dict[str, tuple]:
        """name -> candidate values for this problem and GPU, the GPU's default value included."""
        default = self.default_params(problem, gpu)
        out = {}
        for p in self.active_params():
            values = list(p.values(problem, gpu))
            if default.get(p.name) is not None and default[p.name] not in values:
                values.append(default[p.name])
            out[p.name] = tuple(sorted(values, key=lambda v: (isinstance(v, str), v)))
        return out

    def default_params(self, problem: Problem, gpu: GpuSpec) -> dict:
        """The GPU's default config, restricted to the tuned params (the baseline trial)."""
        cfg = self.default_config(gpu.name, _phase(problem))
        params = {p.name: getattr(cfg, p.name) for p in self.active_params()}
        return self.baseline(params, problem, gpu) if self.baseline else params

    def warm_start_params(self, problem: Problem, gpu: GpuSpec, first: Sequence[Mapping] = ()) -> list[dict]:
        """The configs of `first` (e.g. the table's current entry for this bucket), then `typical`'s,
        as trial params: the default's values for the params a config leaves out; configs with a value
        outside this problem's choices are left out."""
        choices = self.choices(problem, gpu)
        default = self.default_params(problem, gpu)
        out = []
        for typical in (*first, *self.typical):
            params = {**default, **{k: v for k, v in typical.items() if k in choices}}
            if all(params[k] in values for k, values in choices.items()) and params not in out:
                out.append(params)
        return out

    def suggest(self, trial, problem: Problem, gpu: GpuSpec) -> dict:
        """Ask an Optuna trial for one value per param (categorical: block sizes are few and discrete)."""
        return {name: trial.suggest_categorical(name, list(values))
                for name, values in self.choices(problem, gpu).items()}

    def make_config(self, params: Mapping[str, Any], gpu: str, phase: str = "prefill"):
        """The GPU's default config with `params` replaced; the dataclass validates (ValueError)."""
        base = self.default_config(gpu, phase)
        unknown = set(params) - {f.name for f in dataclasses.fields(base)}
        if unknown:
            raise ValueError(f"{self.name}: {type(base).__name__} has no field(s) {', '.join(sorted(unknown))}")
        return dataclasses.replace(base, **params)

    def check(self, config, problem: Problem, gpu: GpuSpec, baseline: bool = False) -> tuple[str, str] | None:
        """None if `config` may run; else (kind, reason) with kind 'hard' or 'redundant'."""
        for rule in self.hard:
            reason = rule(config, problem, gpu)
            if reason:
                return "hard", reason
        if not baseline:
            for rule in self.redundant:
                reason = rule(config, problem, gpu)
                if reason:
                    return "redundant", reason
        return None

    def count_valid(self, problem: Problem, gpu: GpuSpec, limit: int = 60000) -> tuple[int, int] | None:
        """(combinations, valid ones) when the product of choices is at most `limit`, else None."""
        return _count_valid(self, problem, gpu, limit)

    # ---- identity -------------------------------------------------------------------------------
    def source_files(self) -> list[Path]:
        files = [KERNELS_DIR / "_common.py", KERNELS_DIR / "_jit_utils.py"]
        for pkg in dict.fromkeys([self.package, self.config_package or self.package, self.function.split(".")[0],
                                  *self.uses]):
            files += sorted((KERNELS_DIR / pkg).glob("*.py"))
        return [f for f in files if f.is_file()]

    def code_version(self, problem: Problem, gpu: GpuSpec) -> str:
        """Hash of the kernel's source files, this space's choices and version, and the problem's shapes:
        a study name carries it, so a kernel edit starts fresh studies (old ones stay in the storage)."""
        h = hashlib.sha256()
        for path in self.source_files():
            h.update(path.name.encode())
            h.update(hashlib.sha256(path.read_bytes()).digest())
        h.update(repr(sorted(self.choices(problem, gpu).items())).encode())
        h.update(f"|{self.version}|{problem.phase}|{sorted(problem.dims.items())}".encode())
        return h.hexdigest()[:10]


def _phase(problem: Problem) -> str:
    return "prefill" if problem.phase == "any" else problem.phase


_COUNTS: dict[tuple, "tuple[int, int] | None"] = {}


def _count_valid(space: KernelSpace, problem: Problem, gpu: GpuSpec, limit: int):
    key = (space.name, problem.bucket, tuple(sorted(problem.dims.items())), gpu, limit)
    if key in _COUNTS:
        return _COUNTS[key]
    choices = space.choices(problem, gpu)
    total = math.prod(len(v) for v in choices.values())
    result = None
    if total <= limit:
        base = space.default_config(gpu.name, _phase(problem))
        names = list(choices)
        valid = 0
        for combo in itertools.product(*(choices[n] for n in names)):
            try:
                cfg = dataclasses.replace(base, **dict(zip(names, combo)))
            except ValueError:
                continue
            if space.check(cfg, problem, gpu) is None:
                valid += 1
        result = (total, valid)
    _COUNTS[key] = result
    return result


# ================================================================================================
# Rules shared by several kernels
# ================================================================================================

def threads(num_warps: int) -> int:
    return 32 * num_warps


def rule_threads(cfg, problem, gpu) -> str | None:
    warps = [getattr(cfg, n) for n in ("num_warps", "sym_num_warps", "sinkhorn_num_warps") if hasattr(cfg, n)]
    for w in warps:
        if threads(w) > gpu.max_threads_per_block:
            return f"{w} warps = {threads(w)} threads > {gpu.max_threads_per_block} per block"
    return None


# Live fp32 values a thread may hold in one tile before Triton spills (255 registers a thread; the
# rest hold addresses, masks and loop state). Estimates, in fp32 values per thread.
ACC_PER_THREAD = 128       # dot accumulators
ELEMS_PER_THREAD = 64      # element-wise tiles (each value has a few temporaries)


def smem_reason(need: int, gpu: GpuSpec, what: str) -> str | None:
    """The reason when `need` bytes of shared memory exceed the GPU's per-block limit, else None."""
    if need > gpu.smem_per_block:
        return f"shared memory ~{need // 1024} KB ({what}) > {gpu.smem_per_block // 1024} KB per block on {gpu.name}"
    return None
