"""Search spaces: per kernel, the launch parameters Optuna may choose and the rules that prune invalid
or redundant combinations BEFORE anything runs.

Vocabulary
----------
- `GpuSpec`: the limits a config must respect on one GPU (shared memory per block, SM count, ...).
  `gpu_spec("H100")`; unknown names (and "cpu") get the conservative "generic" limits.
- `Problem`: one tuning case = kernel x phase x context bucket x batch, with the shapes it implies for
  a model config (`dims`). Its `bucket` ("8k", "8k-b4", "decode-32k-b64", "any") keys studies and
  tables.
- `Param`: one tuned field of the kernel's config dataclass (kernels/<pkg>/config.py) with its
  candidate values; the choices may depend on the problem (split factors only for decode, ...). The
  GPU's default value is always among the choices, so the default can be measured as the baseline.
- `KernelSpace`: a kernel's params, its rules and how its problems are shaped. Untuned fields keep
  the GPU's default (`default_config`), so a config = default.replace(**params).
- Rules: `hard` rules reject configs that cannot run or are illegal (shared memory over the GPU's
  per-block limit, accumulators that cannot fit in registers, dot tiles under 16, more threads than a
  block may hold); `redundant` rules reject configs that are duplicates or dominated on this problem
  (a tile larger than the problem: the launcher clamps it, or the extra lanes idle). Both prune the
  trial before it runs; the baseline trial (the GPU's default) is exempt from the redundant rules.
  Shared-memory and register figures are estimates (Triton's real usage shows only at compile time;
  a config that passes here and still fails is recorded as a failed trial, never a crash).

Kernels (`SPACES`, keyed by the `torch.ops.dsv4` op each one implements, which is also the table key):
fp8_quantize, fp4_quantize, newton_schulz, hc_pre, hc_sinkhorn, sparse_attention (prefill),
sparse_attention_cached (decode over the FP8 cache), compress_kv (the compressors of a CSA and an HCA
layer) and indexer_topk (the lightning indexer's selection). Each space names its kernel package; a package
that is not importable yet makes the space `unavailable()` (the sweep skips it with the reason).

Nothing here imports a kernel module at import time: importing Triton kernels fixes TRITON_INTERPRET
for the process (DESIGN.md, Traps), so config classes are imported on first use.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

KERNELS_DIR = Path(__file__).resolve().parent.parent / "kernels"
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


def canonical_gpu(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' / 'h100' -> 'H100'; 'cpu' and 'interpreter' stay; others: spaces -> '_'."""
    text = str(name).strip()
    upper = text.upper()
    for key in GPUS:
        if key != "generic" and key in upper:
            return key
    if text.lower() in ("cpu", "interpreter", "generic"):
        return text.lower()
    return text.replace(" ", "_").replace("/", "_")


def gpu_spec(name: str) -> GpuSpec:
    """The limits for a GPU name; unknown GPUs and 'cpu' get the 'generic' limits under their own name."""
    key = canonical_gpu(name)
    spec = GPUS.get(key)
    return spec if spec is not None else dataclasses.replace(GPUS["generic"], name=key)


# ================================================================================================
# Problems
# ================================================================================================


def format_tokens(n: int) -> str:
    """8192 -> '8k', 1048576 -> '1m', 1000 -> '1000' (the CLI's context spelling)."""
    for suffix, unit in (("m", 1 << 20), ("k", 1 << 10)):
        if n and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


def _ns_typical(bm: int, bn: int, bk: int, warps: int, stages: int) -> dict:
    # The sym kernel (A = X X^T, square tiles) gets the same shape as the GEMM, as one list would.
    return {"block_m": bm, "block_n": bn, "block_k": bk, "group_m": 8, "num_warps": warps, "num_stages": stages,
            "sym_block": min(bm, bn), "sym_block_k": bk, "sym_num_warps": warps, "sym_num_stages": stages}


# The configs people hand-write for @triton.autotune (the Triton tutorials' lists), per kernel: `tune`
# enqueues them after the default (warm start, so a tuned table is never worse than the list's best),
# and tuning/compare.py times them as the "@triton.autotune" baseline.
TYPICAL: dict[str, list[dict]] = {
    # The fused-attention tutorial's pattern: all 64 heads as BLOCK_M, BLOCK_N 32/64 x warps 4/8 x stages 2/3.
    "sparse_attention": [{"block_h": 64, "block_k": k, "num_warps": w, "num_stages": s}
                         for k in (32, 64) for w in (4, 8) for s in (2, 3)],
    # The matmul tutorial's CUDA list (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages), GROUP_M 8.
    "newton_schulz": [_ns_typical(*c) for c in ((128, 256, 64, 8, 3), (64, 256, 32, 4, 4), (128, 128, 32, 4, 4),
                                                (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (128, 32, 32, 4, 4),
                                                (64, 32, 32, 2, 5), (32, 64, 32, 2, 5))],
}


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
        ctx = format_tokens(self.context)
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


def _p2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def _dot_fit(block: int, dim: int) -> int:
    """What the Newton-Schulz launcher actually uses (kernels/newton_schulz `_fit`)."""
    return min(block, max(16, _p2(dim)))


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
                    f"(tuning/spaces.py)")
        return None

    def active_params(self) -> tuple[Param, ...]:
        """The params tuned now: optional ones only where the config class has the field."""
        fields = {f.name for f in dataclasses.fields(self.config_cls())}
        return tuple(p for p in self.params if not p.optional or p.name in fields)

    def config_cls(self) -> type:
        return getattr(importlib.import_module(self.config_module), self.config_class)

    def kernel_fn(self) -> Callable:
        module, _, attr = self.function.partition(":")
        return getattr(importlib.import_module(f"dsv4_compile.kernels.{module}"), attr)

    def default_config(self, gpu: str, phase: str = "prefill"):
        """The kernel's own default for this GPU (name as torch reports it or short) and phase."""
        fn_name = self.defaults.get(phase) or self.defaults.get("prefill") or next(iter(self.defaults.values()))
        return getattr(importlib.import_module(self.config_module), fn_name)(gpu)

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

    def warm_start_params(self, problem: Problem, gpu: GpuSpec) -> list[dict]:
        """TYPICAL's configs for this kernel as trial params: the default's values for the params a
        config leaves out; configs with a value outside this problem's choices are left out."""
        choices = self.choices(problem, gpu)
        default = self.default_params(problem, gpu)
        out = []
        for typical in TYPICAL.get(self.name, ()):
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
        for pkg in dict.fromkeys([self.package, self.config_package or self.package, self.function.split(".")[0]]):
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

def _threads(num_warps: int) -> int:
    return 32 * num_warps


def rule_threads(cfg, problem, gpu) -> str | None:
    warps = [getattr(cfg, n) for n in ("num_warps", "sym_num_warps", "sinkhorn_num_warps") if hasattr(cfg, n)]
    for w in warps:
        if _threads(w) > gpu.max_threads_per_block:
            return f"{w} warps = {_threads(w)} threads > {gpu.max_threads_per_block} per block"
    return None


# Live fp32 values a thread may hold in one tile before Triton spills (255 registers a thread; the
# rest hold addresses, masks and loop state). Estimates, in fp32 values per thread.
ACC_PER_THREAD = 128       # dot accumulators
ELEMS_PER_THREAD = 64      # element-wise tiles (each value has a few temporaries)


def _smem(need: int, gpu: GpuSpec, what: str) -> str | None:
    if need > gpu.smem_per_block:
        return f"shared memory ~{need // 1024} KB ({what}) > {gpu.smem_per_block // 1024} KB per block on {gpu.name}"
    return None


# ================================================================================================
# FP8 / FP4 blockwise quantization (kernels/fp8_quantize, kernels/fp4_quantize)
# ================================================================================================

def _quant_tile(cfg, problem) -> tuple[int, int]:
    """(quantization blocks per program, elements per program): the launcher reads the tensor as
    [Q, block_size] blocks and gives each program max(1, block_elems // next_pow2(block_size)) of them."""
    block_s = _p2(problem.dim("block_size"))
    nb = max(1, cfg.block_elems // block_s)
    return nb, nb * block_s


def quant_hard(cfg, problem, gpu) -> str | None:
    nb, elems = _quant_tile(cfg, problem)
    per_thread = elems / _threads(cfg.num_warps)
    if per_thread > ELEMS_PER_THREAD:
        return f"tile {nb}x{_p2(problem.dim('block_size'))} over {cfg.num_warps} warps = {per_thread:g} values a thread > {ELEMS_PER_THREAD}"
    # The [blocks, block] tile may go through shared memory for the per-block reductions.
    return _smem(elems * 4, gpu, "tile layout conversion")


def quant_redundant(cfg, problem, gpu) -> str | None:
    block_s = _p2(problem.dim("block_size"))
    n_blocks = problem.dim("rows") * problem.dim("cols") // problem.dim("block_size")
    nb, elems = _quant_tile(cfg, problem)
    if cfg.block_elems < block_s:
        return f"block_elems {cfg.block_elems} < one quantization block ({block_s}): same program as block_elems={block_s}"
    if nb > _p2(n_blocks):
        return f"{nb} blocks a program but the tensor has {n_blocks}"
    if elems < _threads(cfg.num_warps):
        return f"{elems} elements for {_threads(cfg.num_warps)} threads: threads idle"
    return None


def _quant_problem(cols_of: Callable[[Any], int], block: int):
    def problem(mc, context, batch, phase):
        # One CSA layer's compressed entries (context / 4 per sequence), quantized in one call.
        rows = batch * math.ceil(context / CSA_RATIO)
        cols = cols_of(mc)
        dims = {"rows": rows, "cols": cols, "block_size": block, "pow2_scale": True, "dtype": "float32"}
        out_bytes = rows * cols if block == 64 else rows * cols // 2
        return dims, rows * cols * 4 + out_bytes + rows * (cols // block) * 4
    return problem


_WARPS = Param("num_warps", (1, 2, 4, 8, 16))

FP8_QUANTIZE = KernelSpace(
    name="fp8_quantize", package="fp8_quantize", config_class="Fp8QuantConfig", function="fp8_quantize:fp8_quantize",
    params=(Param("block_elems", tuple(1 << i for i in range(6, 16))), _WARPS,
            Param("cast", ("bits", "native"), optional=True)),
    problem=_quant_problem(lambda mc: mc.head_dim - mc.rope_head_dim, 64),
    hard=(rule_threads, quant_hard), redundant=(quant_redundant,),
    doc="x [rows = batch * context/4, head_dim - rope_dim] fp32, block 64, pow2 scales: the non-rope dims "
        "of one CSA layer's compressed entries (kv_layout.pack_main_entries). num_stages is not tuned "
        "(no loop in the kernel). cast (bits / native e4m3 conversion) is tuned where the config has it: "
        "the gate requires a bit-exact match, so 'native' wins only where it is exact.")

FP4_QUANTIZE = KernelSpace(
    name="fp4_quantize", package="fp4_quantize", config_class="Fp4QuantConfig", function="fp4_quantize:fp4_quantize",
    params=(Param("block_elems", tuple(1 << i for i in range(5, 15))), _WARPS),
    problem=_quant_problem(lambda mc: mc.index_head_dim, 32),
    hard=(rule_threads, quant_hard), redundant=(quant_redundant,),
    doc="keys [rows = batch * context/4, index_head_dim] fp32, block 32, pow2 scales: one CSA layer's "
        "indexer keys (kv_layout.pack_indexer_keys, fp4 format).")


# ================================================================================================
# Newton-Schulz (kernels/newton_schulz)
# ================================================================================================

def ns_hard(cfg, problem, gpu) -> str | None:
    m, n = problem.dim("m"), problem.dim("n")
    bm, bn, bk = _dot_fit(cfg.block_m, m), _dot_fit(cfg.block_n, n), _dot_fit(cfg.block_k, m)
    sb, sbk = _dot_fit(cfg.sym_block, m), _dot_fit(cfg.sym_block_k, n)
    acc = bm * bn / _threads(cfg.num_warps)
    if acc > ACC_PER_THREAD:
        return f"gemm accumulator {bm}x{bn} over {cfg.num_warps} warps = {acc:g} fp32 a thread > {ACC_PER_THREAD}"
    sym_acc = sb * sb / _threads(cfg.sym_num_warps)
    if sym_acc > ACC_PER_THREAD:
        return f"sym accumulator {sb}x{sb} over {cfg.sym_num_warps} warps = {sym_acc:g} fp32 a thread > {ACC_PER_THREAD}"
    # bf16 operands, one [bm, bk] and one [bk, bn] tile per pipeline stage.
    reason = _smem(cfg.num_stages * (bm * bk + bk * bn) * 2, gpu, f"gemm {cfg.num_stages} stages")
    if reason:
        return reason
    return _smem(cfg.sym_num_stages * 2 * sb * sbk * 2, gpu, f"sym {cfg.sym_num_stages} stages")


def ns_redundant(cfg, problem, gpu) -> str | None:
    m, n = problem.dim("m"), problem.dim("n")
    for name, dim in (("block_m", m), ("block_n", n), ("block_k", m), ("sym_block", m), ("sym_block_k", n)):
        if getattr(cfg, name) > _dot_fit(getattr(cfg, name), dim):
            return f"{name} {getattr(cfg, name)} > the matrix needs ({_dot_fit(getattr(cfg, name), dim)}): clamped by the launcher"
    return None


def _ns_problem(mc, context, batch, phase):
    # Muon over a stack of expert matrices (moe_inter_dim x dim), fp32 parameters, DeepSeek-V4's 10
    # steps; X is [m, n] with m <= n after the transpose of tall matrices.
    rows, cols = mc.moe_inter_dim, mc.dim
    mats = 8
    m, n = min(rows, cols), max(rows, cols)
    dims = {"mats": mats, "rows": rows, "cols": cols, "m": m, "n": n, "steps": 10, "dtype": "float32"}
    per_step = (m * n * 2) * 3 + m * m * 2 * 4                       # X read twice, written; A, B
    return dims, mats * (rows * cols * 8 + 10 * per_step)


NEWTON_SCHULZ = KernelSpace(
    name="newton_schulz", package="newton_schulz", config_class="NewtonSchulzConfig",
    function="newton_schulz:newton_schulz",
    params=(Param("block_m", (32, 64, 128, 256)), Param("block_n", (32, 64, 128, 256)), Param("block_k", (32, 64, 128)),
            Param("group_m", (1, 4, 8, 16)), Param("num_warps", (4, 8)), Param("num_stages", (2, 3, 4, 5)),
            Param("sym_block", (32, 64, 128)), Param("sym_block_k", (32, 64, 128)),
            Param("sym_num_warps", (4, 8)), Param("sym_num_stages", (2, 3, 4))),
    problem=_ns_problem, context_free=True,
    hard=(rule_threads, ns_hard), redundant=(ns_redundant,),
    doc="G [8, moe_inter_dim, dim] fp32 (Muon on a stack of expert matrices), DeepSeek-V4's 10 steps. "
        "Context-free: one study per GPU (bucket 'any'). norm_block / norm_tile keep the defaults (the "
        "norm kernels are a small fraction of a step).")


# ================================================================================================
# mHC (kernels/hc_sinkhorn): fused hc_pre and Sinkhorn alone
# ================================================================================================

def hc_pre_hard(cfg, problem, gpu) -> str | None:
    n = problem.dim("n")
    np_ = max(2, _p2(n))
    nw = max(2 * np_ * np_, 16)
    threads = _threads(cfg.num_warps)
    x_bytes = 2 if problem.dim("dtype") in ("bfloat16", "float16") else 4
    if cfg.block_t * cfg.block_k / threads > ELEMS_PER_THREAD * 2:
        return f"x tile {cfg.block_t}x{cfg.block_k} = {cfg.block_t * cfg.block_k / threads:g} fp32 a thread > {2 * ELEMS_PER_THREAD}"
    if cfg.block_k * nw / threads > ELEMS_PER_THREAD * 2:
        return f"fn tile {cfg.block_k}x{nw} = {cfg.block_k * nw / threads:g} fp32 a thread > {2 * ELEMS_PER_THREAD}"
    if cfg.block_t * np_ * cfg.block_d / threads > ACC_PER_THREAD:
        return f"stream tile {cfg.block_t}x{np_}x{cfg.block_d} = {cfg.block_t * np_ * cfg.block_d / threads:g} fp32 a thread > {ACC_PER_THREAD}"
    return _smem(cfg.num_stages * (cfg.block_t * cfg.block_k * x_bytes + cfg.block_k * nw * 4), gpu,
                 f"mixes GEMV, {cfg.num_stages} stages")


def hc_pre_redundant(cfg, problem, gpu) -> str | None:
    T, n, D = problem.dim("tokens"), problem.dim("n"), problem.dim("D")
    if cfg.block_t > max(16, _p2(T)):
        return f"block_t {cfg.block_t} > tokens {T}"
    if cfg.block_k > _p2(n * D):
        return f"block_k {cfg.block_k} > n*D = {n * D}"
    if cfg.block_d > _p2(D):
        return f"block_d {cfg.block_d} > D = {D}"
    return None


def _hc_pre_problem(mc, context, batch, phase):
    T, n, D = batch * context, mc.hc_mult, mc.dim
    dims = {"tokens": T, "n": n, "D": D, "iters": mc.hc_sinkhorn_iters, "dtype": mc.dtype}
    elt = 2 if mc.dtype == "bfloat16" else 4
    return dims, T * n * D * elt + T * D * elt + (2 + n) * n * n * D * 4


HC_PRE = KernelSpace(
    name="hc_pre", package="hc_sinkhorn", config_class="HcConfig", function="hc_sinkhorn:hc_pre",
    params=(Param("block_t", (16, 32, 64, 128)), Param("block_k", (32, 64, 128, 256, 512, 1024)),
            Param("block_d", (64, 128, 256, 512, 1024)), Param("num_warps", (2, 4, 8)),
            Param("num_stages", (1, 2, 3, 4)), Param("dot_precision", ("ieee", "tf32x3", "tf32"))),
    problem=_hc_pre_problem, hard=(rule_threads, hc_pre_hard), redundant=(hc_pre_redundant,),
    doc="x [batch * context, hc_mult, dim] in the model dtype, fn [(2+n) n, n dim] fp32: the mHC pre-mix "
        "of one layer. dot_precision is tuned too: the correctness gate decides whether tf32 is "
        "accurate enough (it prunes the configs that are not).")


def sinkhorn_hard(cfg, problem, gpu) -> str | None:
    np_ = max(2, _p2(problem.dim("n")))
    per = cfg.sinkhorn_block_t * np_ * np_ / _threads(cfg.sinkhorn_num_warps)
    if per > ELEMS_PER_THREAD:
        return f"tile {cfg.sinkhorn_block_t}x{np_}x{np_} = {per:g} fp32 a thread > {ELEMS_PER_THREAD}"
    return None


def sinkhorn_redundant(cfg, problem, gpu) -> str | None:
    np_ = max(2, _p2(problem.dim("n")))
    if cfg.sinkhorn_block_t > _p2(problem.dim("matrices")):
        return f"sinkhorn_block_t {cfg.sinkhorn_block_t} > matrices {problem.dim('matrices')}"
    if cfg.sinkhorn_block_t * np_ * np_ < _threads(cfg.sinkhorn_num_warps):
        return "fewer elements than threads: threads idle"
    return None


def _sinkhorn_problem(mc, context, batch, phase):
    T, n = batch * context, mc.hc_mult
    return {"matrices": T, "n": n, "iters": mc.hc_sinkhorn_iters, "dtype": "float32"}, T * n * n * 8


HC_SINKHORN = KernelSpace(
    name="hc_sinkhorn", package="hc_sinkhorn", config_class="HcConfig", function="hc_sinkhorn:hc_sinkhorn",
    params=(Param("sinkhorn_block_t", (16, 32, 64, 128, 256, 512, 1024)), Param("sinkhorn_num_warps", (1, 2, 4, 8))),
    problem=_sinkhorn_problem, hard=(rule_threads, sinkhorn_hard), redundant=(sinkhorn_redundant,),
    doc="logits [batch * context, hc_mult, hc_mult] fp32, hc_sinkhorn_iters rounds.")


# ================================================================================================
# Sparse attention (kernels/sparse_attention, kernels/sparse_attention_cached)
# ================================================================================================

def attn_hard(cfg, problem, gpu) -> str | None:
    H, D = problem.dim("H"), problem.dim("D")
    block_h = max(16, min(cfg.block_h, _p2(H)))
    block_d = max(16, _p2(D))
    acc = block_h * block_d / _threads(cfg.num_warps)
    if acc > ACC_PER_THREAD:
        return f"accumulator [{block_h}, {block_d}] over {cfg.num_warps} warps = {acc:g} fp32 a thread > {ACC_PER_THREAD}"
    elt = 4 if problem.dim("dtype") == "float32" else 2
    # Pipelined gathered kv tiles [block_k, D] (the FP8 cache is dequantised into the same dtype),
    # plus the probabilities [block_h, block_k] staged for the second dot.
    need = cfg.num_stages * cfg.block_k * block_d * elt + block_h * cfg.block_k * elt
    return _smem(need, gpu, f"{cfg.num_stages} stages of [{cfg.block_k}, {block_d}] kv tiles")


def attn_redundant(cfg, problem, gpu) -> str | None:
    H, K = problem.dim("H"), problem.dim("K")
    if cfg.block_h > max(16, _p2(H)):
        return f"block_h {cfg.block_h} > heads {H}: clamped by the launcher"
    steps = -(-K // cfg.block_k)
    if cfg.num_splits > steps:
        return f"num_splits {cfg.num_splits} > {steps} steps of block_k over K = {K}: clamped by the launcher"
    if cfg.block_k > _p2(K):
        return f"block_k {cfg.block_k} > K = {K}"
    return None


def _attn_problem(mc, context, batch, phase):
    H, D, R = mc.n_heads, mc.head_dim, mc.rope_head_dim
    K = mc.window_size + mc.index_topk                       # a CSA layer: window + top-k compressed entries
    n_entries = math.ceil(context / CSA_RATIO)
    if phase == "decode":
        # One new token per sequence over the FP8 cache: window ring + compressed entries.
        nope = D - R
        entry = (nope + 2 * R + nope // 64 + 7) // 8 * 8
        N = mc.window_size + n_entries
        dims = {"B": batch, "S": 1, "H": H, "D": D, "rope_dim": R, "K": K, "N": N, "entry_bytes": entry,
                "window": mc.window_size, "dtype": mc.dtype}
        return dims, batch * (K * entry + 2 * H * D * 2)
    # Prefill: S queries over S raw tokens + S/4 compressed entries.
    S = context
    dims = {"B": batch, "S": S, "H": H, "D": D, "rope_dim": R, "K": K, "N": S + n_entries,
            "window": mc.window_size, "dtype": mc.dtype}
    elt = 2 if mc.dtype == "bfloat16" else 4
    return dims, batch * (2 * S * H * D * elt + (S + n_entries) * D * elt + S * K * 4)


def _decode_baseline(params: dict, problem: Problem, gpu: GpuSpec) -> dict:
    """The decode kernel's default picks num_splits from the grid size at run time (auto_splits)."""
    block_h = max(16, min(params["block_h"], _p2(problem.dim("H"))))
    programs = problem.dim("B") * problem.dim("S") * -(-problem.dim("H") // block_h)
    K = problem.dim("K")
    if programs >= gpu.n_sms:
        splits = 1
    else:
        splits = max(1, min(-(-2 * gpu.n_sms // max(programs, 1)), K // (2 * params["block_k"])))
    return {**params, "num_splits": splits}


_ATTN_PARAMS = (Param("block_h", (16, 32, 64)), Param("block_k", (16, 32, 64, 128)),
                Param("num_warps", (4, 8, 16)), Param("num_stages", (1, 2, 3, 4)))

SPARSE_ATTENTION = KernelSpace(
    name="sparse_attention", package="sparse_attention", config_class="SparseAttentionConfig",
    function="sparse_attention:sparse_attention",
    params=_ATTN_PARAMS + (Param("num_splits", (1,)),),
    problem=_attn_problem, hard=(rule_threads, attn_hard), redundant=(attn_redundant,),
    doc="Prefill of one CSA layer: q [batch, context, n_heads, head_dim], kv [batch, context + context/4, "
        "head_dim] (raw tokens then compressed entries), K = window + index_topk indices per query "
        "(the causal window, then random visible compressed entries). num_splits stays 1 (enough programs).")

SPARSE_ATTENTION_CACHED = KernelSpace(
    name="sparse_attention_cached", package="sparse_attention_cached", config_package="sparse_attention",
    config_class="SparseAttentionConfig", function="sparse_attention_cached:sparse_attention_cached",
    params=_ATTN_PARAMS + (Param("num_splits", (1, 2, 4, 8, 16)),),
    problem=_attn_problem, phases=("decode",), hard=(rule_threads, attn_hard), redundant=(attn_redundant,),
    defaults={"decode": "decode_default_config"}, baseline=_decode_baseline,
    doc="Decode of one CSA layer over the FP8 cache: q [batch, 1, n_heads, head_dim], cache [batch, window "
        "+ context/4, 584 B], K = window + index_topk. The split factor (flash-decoding) is tuned; the "
        "baseline is the kernel's default with its automatic split count.")


# ================================================================================================
# Compressor (kernels/compress_kv)
# ================================================================================================

def _compress_tiles(cfg, d: int, ratio: int, n: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_R, BLOCK_C) of the pooling kernel as the launcher picks them
    (kernels/compress_kv `tiles`): block_r rows a step split into entries, block_c channels."""
    rows = min(cfg.block_r, _p2(ratio))
    return min(max(cfg.block_r // rows, 1), _p2(max(n, 1))), rows, min(cfg.block_c, _p2(d))


def _compress_variants(problem) -> list[tuple[str, int, int, str, bool]]:
    """(name, d, ratio, quant, overlap) of each compressor call the problem times (see COMPRESS_KV)."""
    d, di, hca = problem.dim("d"), problem.dim("index_d"), problem.dim("hca_ratio")
    calls = [("csa", d, CSA_RATIO, "fp8", True), ("indexer", di, CSA_RATIO, "hadamard_fp4", True)]
    return calls + ([("hca", d, hca, "fp8", False)] if hca else [])


def compress_hard(cfg, problem, gpu) -> str | None:
    threads = _threads(cfg.num_warps)
    for name, d, ratio, quant, _ in _compress_variants(problem):
        bn, br, bc = _compress_tiles(cfg, d, ratio, math.ceil(problem.dim("T") / ratio))
        # Live [bn, br, bc] fp32 tiles of score, kv and probabilities: each counted once (element-wise).
        per = bn * br * bc / threads
        if per > ELEMS_PER_THREAD:
            return (f"{name}: tile {bn}x{br}x{bc} (entries x rows x channels) over {cfg.num_warps} warps "
                    f"= {per:g} fp32 a thread > {ELEMS_PER_THREAD}")
        elt = 2 if problem.dim("dtype") in ("bfloat16", "float16") else 4
        reason = _smem(cfg.num_stages * bn * br * bc * 2 * elt, gpu, f"{name}: {cfg.num_stages} stages of kv and score tiles")
        if reason:
            return reason
    return None


def compress_redundant(cfg, problem, gpu) -> str | None:
    variants = _compress_variants(problem)
    widest = max(d for _, d, _, _, _ in variants)
    if cfg.block_c > _p2(widest):
        return f"block_c {cfg.block_c} > the widest row ({widest} channels): clamped by the launcher"
    longest = max(ratio for _, _, ratio, _, _ in variants)
    if cfg.num_stages > 1 and cfg.block_r >= longest:
        return f"num_stages {cfg.num_stages} but block_r {cfg.block_r} covers every block in one step: nothing to pipeline"
    return None


def _compress_problem(mc, context, batch, phase):
    # The compressors of one CSA layer (main entries: fp8, overlap; indexer keys: Hadamard + fp4,
    # overlap) and one HCA layer (fp8, the model's other ratio): one config serves every call, so the
    # objective is their sum. Inputs are the fp32 projections (Compressor.project); N = ceil(T / ratio).
    hca = max((r for r in mc.compress_ratios if r > CSA_RATIO), default=0)
    dims = {"B": batch, "T": context, "d": mc.head_dim, "index_d": mc.index_head_dim, "rope_dim": mc.rope_head_dim,
            "hca_ratio": hca, "dtype": "float32"}
    work = 0
    for width, ratio, overlap in ((mc.head_dim, CSA_RATIO, True), (mc.index_head_dim, CSA_RATIO, True),
                                  (mc.head_dim, hca, False)):
        if ratio:
            channels = width * (2 if overlap else 1)
            work += batch * (2 * context * channels * 4 + math.ceil(context / ratio) * width * 4)
    return dims, work


COMPRESS_KV = KernelSpace(
    name="compress_kv", package="compress_kv", config_class="CompressKVConfig", function="compress_kv:compress_kv",
    params=(Param("block_r", tuple(1 << i for i in range(8))), Param("block_c", tuple(1 << i for i in range(4, 10))),
            Param("num_warps", (1, 2, 4, 8, 16)), Param("num_stages", (1, 2, 3, 4))),
    problem=_compress_problem, hard=(rule_threads, compress_hard), redundant=(compress_redundant,),
    doc="The compressors of one CSA and one HCA layer, timed together (one config serves all three calls): "
        "kv, score [batch, context, 2 head_dim] -> context/4 fp8 entries (overlap), [batch, context, 2 "
        "index_head_dim] -> context/4 Hadamard+fp4 indexer keys (overlap), [batch, context, head_dim] -> "
        "context/128 fp8 entries. Pooling programs own (block_r // ratio entries or one entry's block_r-row "
        "steps, block_c channels): block_c sets the parallelism of the HCA call (context/128 entries), "
        "block_r the entries a program of the CSA calls holds.")


# ================================================================================================
# Lightning-indexer top-k (kernels/indexer_topk)
# ================================================================================================

def _indexer_tiles(cfg, problem) -> tuple[int, int, int, int]:
    """(BLOCK_S, BLOCK_H, BLOCK_D, C) as the launcher picks them (block_s only on the 16-bit paths;
    C = buffer_factor x KB candidate slots a query, KB = max(next_pow2(topk), block_n))."""
    return (cfg.block_s if _indexer_mma16(problem) else 1, max(16, _p2(problem.dim("H"))),
            max(16, _p2(problem.dim("d"))), cfg.buffer_factor * max(_p2(problem.dim("topk")), cfg.block_n))


def _indexer_mma16(problem) -> bool:
    """The kernel's 16-bit MMA paths (kernels/indexer_topk `_plan`): q bf16 (keys of any dtype, fp32
    keys rounded to bf16 by the launcher) or q and keys fp16. Otherwise (fp32 q, as in fp32 models)
    the exact path: fp32 copies, IEEE dots, one query a program."""
    q, k = problem.dim("q_dtype"), problem.dim("k_dtype")
    return q == "bfloat16" or (q == "float16" and k == "float16")


def indexer_hard(cfg, problem, gpu) -> str | None:
    bs, bh, bd, c = _indexer_tiles(cfg, problem)
    # the kernel refuses these (wrong results measured): its own rule, imported with the config class
    refusal = importlib.import_module(INDEXER_TOPK.config_module).key_rows_refusal(dataclasses.replace(cfg, block_s=bs), bh)
    if refusal:
        return refusal
    mma16 = _indexer_mma16(problem)
    threads = _threads(cfg.num_warps)
    m = bs * bh                                                # queries x heads: the dot's M
    acc = m * cfg.block_n / threads
    if acc > ACC_PER_THREAD:
        return f"score accumulator [{m}, {cfg.block_n}] over {cfg.num_warps} warps = {acc:g} fp32 a thread > {ACC_PER_THREAD}"
    sort_regs = 2 * 2 * c * bs / threads                       # compaction: [bs, C] int64 rows and their swap partners
    if sort_regs > ACC_PER_THREAD:
        return (f"compaction sort [{bs}, {c}] int64 over {cfg.num_warps} warps = {sort_regs:g} registers a thread "
                f"> {ACC_PER_THREAD}")
    q_regs = m * bd * (0.5 if mma16 else 1.0) / threads        # q stays resident for the whole loop
    key_regs = 2 * bs * cfg.block_n / threads                  # the tile's int64 keys, live across a compaction
    # The candidates live in global memory: the accumulator and the sort are never live together.
    total = q_regs + max(acc, sort_regs) + key_regs
    if total > 2 * ACC_PER_THREAD:
        return (f"resident q tile + max(accumulator, compaction sort) + tile keys = {total:g} registers a thread "
                f"> {2 * ACC_PER_THREAD}")
    k_elt = 4 if not mma16 and problem.dim("k_dtype") == "float32" else 2
    # Pipelined key tiles [block_n, BLOCK_D] (bf16 on the 16-bit paths: the launcher rounds fp32 keys),
    # the q tile where the MMA reads it from shared memory, and the compaction sort's layout conversion.
    need = cfg.num_stages * cfg.block_n * bd * k_elt + (m * bd * 2 if mma16 else 0) + c * 8 * bs
    return _smem(need, gpu, f"{cfg.num_stages} stages of [{cfg.block_n}, {bd}] key tiles + q [{m}, {bd}]")


def indexer_redundant(cfg, problem, gpu) -> str | None:
    if cfg.block_n > max(16, _p2(problem.dim("N"))):
        return f"block_n {cfg.block_n} > the {problem.dim('N')} keys"
    if cfg.block_s > 1 and not _indexer_mma16(problem):
        return f"block_s {cfg.block_s} is ignored on the exact (fp32) path: one query a program"
    if cfg.block_s > _p2(problem.dim("S")):
        return f"block_s {cfg.block_s} > the {problem.dim('S')} queries"
    kb = max(_p2(problem.dim("topk")), cfg.block_n)
    if cfg.buffer_factor > 2 and problem.dim("N") <= 2 * kb:
        return (f"buffer_factor {cfg.buffer_factor}: the {problem.dim('N')} keys fit in {2 * kb} slots (buffer_factor 2) "
                f"without a compaction; a larger buffer only makes the final sort longer")
    return None


def _indexer_problem(mc, context, batch, phase):
    # Prefill of one CSA layer: `context` queries at positions 0..context-1 over context/4 keys; query t
    # sees the first (t+1)//4. Dtypes as in the model: q and weights in the model dtype, keys fp32
    # (the compressor's output).
    S, H, d = context, mc.index_n_heads, mc.index_head_dim
    N = math.ceil(context / CSA_RATIO)
    dims = {"B": batch, "S": S, "H": H, "d": d, "N": N, "ratio": CSA_RATIO, "topk": mc.index_topk,
            "q_dtype": mc.dtype, "k_dtype": "float32"}
    q_elt = 2 if mc.dtype in ("bfloat16", "float16") else 4
    return dims, batch * (S * H * (d + 1) * q_elt + N * d * 4 + S * mc.index_topk * 4)


INDEXER_TOPK = KernelSpace(
    name="indexer_topk", package="indexer_topk", config_class="IndexerTopkConfig", function="indexer_topk:indexer_topk",
    params=(Param("block_s", (1, 2, 4, 8)), Param("block_n", (16, 32, 64, 128, 256)), Param("buffer_factor", (2, 4)),
            Param("score_rows", ("keys", "heads")), Param("num_warps", (2, 4, 8, 16)), Param("num_stages", (1, 2, 3, 4))),
    problem=_indexer_problem, hard=(rule_threads, indexer_hard), redundant=(indexer_redundant,),
    doc="Prefill selection of one CSA layer: q [batch, context, index_n_heads, index_head_dim] (model dtype), "
        "weights [batch, context, index_n_heads], keys [batch, context/4, index_head_dim] fp32, positions "
        "0..context-1, top index_topk. Compute-bound: each query scores its visible keys (bf16 MMA of "
        "block_s queries x heads by block_n keys for bf16 models) and appends those above its running "
        "threshold to a candidate row of buffer_factor x KB slots, sorted back to top-k when it could overflow.")


SPACES: dict[str, KernelSpace] = {s.name: s for s in (
    FP8_QUANTIZE, FP4_QUANTIZE, NEWTON_SCHULZ, HC_PRE, HC_SINKHORN, SPARSE_ATTENTION, SPARSE_ATTENTION_CACHED,
    COMPRESS_KV, INDEXER_TOPK)}


def get_space(name: str) -> KernelSpace:
    try:
        return SPACES[name]
    except KeyError:
        raise KeyError(f"unknown kernel {name!r}; accepted: {', '.join(SPACES)}") from None


def rule_sources() -> str:
    """The source of every rule (for reports: what pruned what)."""
    seen = {r for s in SPACES.values() for r in (*s.hard, *s.redundant)}
    return "\n\n".join(inspect.getsource(r) for r in sorted(seen, key=lambda r: r.__name__))
