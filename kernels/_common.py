"""Shared plumbing for the Triton kernels: interpreter detection, typed configs, input checks, launch
and registration as torch ops in the `dsv4_triton` namespace.

Registration scheme (one op name per kernel, two backends chosen once at import):
- Compiled Triton (a CUDA machine, `TRITON_INTERPRET` unset): `torch.library.triton_op` whose body
  launches the kernels through `wrap_triton`. Inductor and AOTInductor trace into the body and see
  the Triton kernels themselves, so a .pt2 package carries them (no Python needed at run time).
- Interpreter (`TRITON_INTERPRET=1`, e.g. the CPU machine): `torch.library.custom_op` around the same
  body, launching the interpreted kernels directly. `triton_op` does not compile under the
  interpreter (wrap_triton only takes compiled `JITFunction`s); an opaque custom op compiles and
  exports on CPU. The body doubles as the fake (meta) implementation: under fake tensors `launch`
  launches nothing, so shapes and dtypes come from the very code that allocates the real outputs.

Every op keeps the argument order of its `torch.ops.dsv4.*` twin and adds a trailing `config: str = ""`
(a `KernelConfig.to_str()` string; "" = the default config for the device), so a compile pass can
substitute `dsv4.X(args)` -> `dsv4_triton.X(args, tuned_config)` node for node.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import sys
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch

from .gpus import canonical_gpu

NAMESPACE = "dsv4_triton"


def interpret_mode() -> bool:
    """True when Triton runs kernels in its interpreter (TRITON_INTERPRET set to a true value)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


# Fixed at import: kernels decorated with @triton.jit are interpreted or compiled from then on.
INTERPRET = interpret_mode()
USE_TRITON_OP = not INTERPRET


# ================================================================================================
# Device names and typed configs
# ================================================================================================

def device_name(device: torch.device | str | None = None) -> str:
    """'interpreter' under TRITON_INTERPRET, else the CUDA device name ('NVIDIA H100 80GB HBM3')."""
    if INTERPRET:
        return "interpreter"
    device = torch.device("cuda" if device is None else device)
    if device.type != "cuda":
        return device.type
    return _cuda_name(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def sm_count(device: torch.device | str) -> int:
    """Streaming multiprocessors of a CUDA device (for persistent or split-K grids)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Base of the per-kernel config dataclasses (block sizes, warps, stages: all ints or strs).

    `to_str()` / `from_str()` give the compact 'field=value,...' form that the torch ops take, so a
    tuned config can travel through a graph as a plain string argument.
    """

    # Fields that must be powers of two (Triton block shapes).
    POW2_FIELDS: ClassVar[tuple[str, ...]] = ()
    # Allowed values of str fields.
    CHOICES: ClassVar[Mapping[str, tuple[str, ...]]] = {}

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, str)):
                raise ValueError(f"{type(self).__name__}.{f.name} = {v!r}: must be an int or a str")
            if isinstance(v, int) and v <= 0:
                raise ValueError(f"{type(self).__name__}.{f.name} = {v}: must be positive")
            if f.name in self.POW2_FIELDS and v & (v - 1):
                raise ValueError(f"{type(self).__name__}.{f.name} = {v}: must be a power of two")
            if f.name in self.CHOICES and v not in self.CHOICES[f.name]:
                raise ValueError(f"{type(self).__name__}.{f.name} = {v!r}: choose one of {self.CHOICES[f.name]}")

    def to_str(self) -> str:
        return ",".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))

    @classmethod
    def from_str(cls, text: str, base: "KernelConfig | None" = None):
        """Parse 'field=value,...'; fields not named keep `base`'s values (or the class defaults)."""
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        values = dataclasses.asdict(base) if base is not None else {}
        for item in filter(None, (s.strip() for s in text.split(","))):
            key, sep, val = item.partition("=")
            if not sep or key.strip() not in types:
                raise ValueError(f"{cls.__name__}: cannot parse {item!r}; fields are {', '.join(types)}")
            key = key.strip()
            default = getattr(base, key) if base is not None else next(
                f.default for f in dataclasses.fields(cls) if f.name == key)
            values[key] = int(val) if isinstance(default, int) else val.strip()
        return cls(**values)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1): triton.next_power_of_2 without importing triton,
    for the configs' tile arithmetic that the tuning spaces share."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def fit_block(block: int, dim: int) -> int:
    """A tl.dot tile along a dimension: no larger than the dimension needs (>= 16 for tl.dot), so
    small matrices get small tiles (the tuning spaces prune larger blocks as clamped)."""
    return min(block, max(16, next_pow2(dim)))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def split_for(split_k: int, units):
    """The parts a launch runs for a split count given at one unit (a token, a row block) over `units`
    of them: split_k // units, at least 1, so the programs stay about as many as one unit's; for a
    symbolic `units` (an engine's batch) an expression the launch evaluates at run time (no guard)."""
    return torch.sym_max(1, split_k // units) if split_k > 1 else 1


def split_to_fill(tiles: int, k_steps: int, programs: int, max_split: int) -> int:
    """The power-of-two count of K parts that brings `tiles` output tiles to about `programs` programs
    (tiles x parts >= programs), at most `max_split` parts and each part at least one of the `k_steps`
    steps: a few-rows GEMM's split-K, where reading the weight at full bandwidth needs many programs."""
    split = 1
    while split < max_split and tiles * split < programs and 2 * split <= k_steps:
        split *= 2
    return split


# torch's own "no upper bound" for a size (besides int_oo): a dynamic size under torch.compile can be
# given [2, sys.maxsize - 1], and a product of such sizes bounds far above it.
UNBOUNDED = sys.maxsize - 1


def largest_value(n) -> int | None:
    """n for an int; a symbolic size's upper bound (an export Dim's max), None when unbounded."""
    if isinstance(n, int):
        return n
    bound = n.node.shape_env.bound_sympy(n.node.expr).upper
    # is_Integer, not is_finite: int_oo counts as finite
    return int(bound) if bound.is_Integer and int(bound) < UNBOUNDED else None


def split_chunks(total, chunk: int | None) -> tuple:
    """(items per chunk, number of chunks) to go through `total` items (an int or a symbolic size) at
    most `chunk` at a time (None: no bound): one chunk of all of them where they fit (the unchunked
    launches), else chunks of `chunk`. A symbolic total (export) takes the count its upper bound needs,
    so the launches are static (chunks past the actual total find nothing to do); an unbounded one,
    one chunk."""
    largest = largest_value(total)
    if chunk is None or largest is None or largest <= chunk:
        return total, 1
    return chunk, cdiv(largest, chunk)


def gpu_key(gpu_name: str | None) -> str:
    """The defaults tables' key of `gpu_name` (gpus.canonical_gpu: 'NVIDIA H100 80GB HBM3' -> 'H100');
    None means the current device ('interpreter' under TRITON_INTERPRET)."""
    return canonical_gpu(device_name() if gpu_name is None else gpu_name)


def pick_default(table: Mapping[str, KernelConfig], gpu_name: str | None) -> KernelConfig:
    """The entry of `table` for `gpu_name` (gpu_key), else 'generic'."""
    return table.get(gpu_key(gpu_name), table["generic"])


def resolve_config(cls, config, default_config: Callable[[str | None], KernelConfig], device) -> KernelConfig:
    """config None / '' -> the device's default; a str -> parsed over that default; a dict -> fields
    over that default; a `cls` instance -> itself."""
    if isinstance(config, cls):
        return config
    base = default_config(device_name(device))
    if config is None or config == "":
        return base
    if isinstance(config, str):
        return cls.from_str(config, base)
    if isinstance(config, Mapping):
        return dataclasses.replace(base, **config)
    raise TypeError(f"config must be None, a str, a dict or a {cls.__name__}; got {type(config).__name__}")


# ================================================================================================
# Input checks (one-line errors)
# ================================================================================================

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def check_tensor(op: str, name: str, t: torch.Tensor, dtypes: Sequence[torch.dtype] | None = None,
                 ndim: int | None = None, min_ndim: int | None = None, shape: Sequence[int] | None = None,
                 device: torch.device | None = None, rows: bool = False) -> None:
    """dtype, rank, shape, contiguity and device of one input, each with a one-line error. rows: only
    the last dimension need be contiguous (unit stride; the rows may be strided)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{op}: {name} is {t.dtype}; accepted: {', '.join(str(d) for d in dtypes)}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}; need {ndim} dims")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}; need at least {min_ndim} dims")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}; need {tuple(shape)}")
    if rows and t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{op}: {name} has strides {t.stride()}; need unit stride in the last dimension")
    if not rows and not t.is_contiguous():
        raise ValueError(f"{op}: {name} is not contiguous (strides {t.stride()}); call .contiguous() first")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device}, the other inputs on {device}")
    if t.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"{op}: {name} is on {t.device}; Triton kernels need a CUDA tensor "
                         f"(or TRITON_INTERPRET=1 set before import for the CPU interpreter)")


# ================================================================================================
# Launch and registration
# ================================================================================================

def _is_fake(args) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor
    return any(isinstance(a, FakeTensor) for a in args)


def is_traced(args) -> bool:
    """True while something traces the launch: torch.compile, a dispatch mode (make_fx, export,
    functionalization), or a tensor subclass among the arguments (fake or functional tensors)."""
    from torch.utils._python_dispatch import is_in_torch_dispatch_mode

    return (torch.compiler.is_compiling() or is_in_torch_dispatch_mode()
            or any(isinstance(a, torch.Tensor) and type(a) is not torch.Tensor for a in args))


def placeholder(device, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """A fresh one-element tensor for a pointer argument whose value the launch never uses (allocated,
    not filled: no kernel launch on the hot path). Never another operand in its place: torch's Triton
    mutation analysis may count an argument as written, and export then clones it where it cannot be
    written in place (an operand passed twice, a graph input), and torch 2.11 fails to clone a [1, s]
    view of a dynamic size (pytorch issue 181735: AOTInductor's decompose_triton_kernel_wrapper_functional
    asserts; seen on the mini prefill engine)."""
    return torch.empty((1,), dtype=dtype, device=device)


def launch(kernel, grid, *args, **kwargs) -> None:
    """Launch `kernel[grid](*args, **kwargs)`: through `wrap_triton` when ops are triton_ops and
    something traces the call (so that the trace records the kernel), else straight: wrap_triton's
    eager HOP dispatch costs Python time per launch, comparable to a sub-millisecond kernel (a direct
    eager call, as the benchmarks make; the op's own eager backend already bypasses it). Fake tensors
    under the interpreter launch nothing. Where a trace may record the call (and always under the
    interpreter, so that CPU tests see it), a non-tensor argument other than a plain scalar
    (LAUNCH_SCALARS) is refused: the kernel itself may take it (a `tl.constexpr`), but Inductor writes a
    recorded launch's constants by repr, and `constexpr[2]` failed the compile of every engine that
    held the kernel."""
    traced = USE_TRITON_OP and is_traced((*args, *kwargs.values()))
    if traced or INTERPRET:
        _refuse_unwritable_constants(kernel, args, kwargs)
    if traced:
        from torch.library import wrap_triton
        wrap_triton(kernel)[grid](*args, **kwargs)
    elif not _is_fake(args):
        try:
            kernel[grid](*args, **kwargs)
        except Exception as err:
            named = _launch_error(kernel, kwargs, err)
            if named is err:
                raise
            raise named from err


# What a launch's non-tensor arguments may be: Inductor writes a recorded launch's constants into
# generated Python by repr, which only these survive.
LAUNCH_SCALARS = (bool, int, float, str, type(None), torch.SymInt, torch.SymFloat, torch.SymBool)


def _refuse_unwritable_constants(kernel, args: tuple, kwargs: Mapping[str, Any]) -> None:
    named = [f"{name} ({type(a).__module__}.{type(a).__qualname__})"
             for name, a in (*((f"argument {i}", a) for i, a in enumerate(args)), *kwargs.items())
             if not isinstance(a, (torch.Tensor, *LAUNCH_SCALARS))]
    if named:
        raise TypeError(f"{getattr(kernel, '__name__', kernel)}: {', '.join(named)} not a plain value; pass an "
                        "int, float, bool or str (e.g. a tl.constexpr's .value)")


def _launch_error(kernel, kwargs: Mapping[str, Any], err: Exception) -> Exception:
    """A launch's failure: Triton's OutOfResources (a config whose tiles do not fit this GPU) as a
    one-line ValueError naming the kernel, its tile sizes and stages; anything else unchanged."""
    from triton.runtime.errors import OutOfResources

    if not isinstance(err, OutOfResources):
        return err
    tiles = ", ".join(f"{k}={v}" for k, v in kwargs.items() if k.startswith("BLOCK_") or k in ("num_warps", "num_stages"))
    need, have = (f"{n / 1024:.0f} KB" if err.name == "shared memory" else str(n) for n in (err.required, err.limit))
    return ValueError(f"{getattr(kernel, '__name__', kernel)}: {tiles} need {need} of {err.name}, this GPU has {have}; "
                      f"accepted: smaller tiles or fewer stages (the config's block sizes, num_stages)")


_REGISTERED: dict[str, Any] = {}


def kernel_op(name: str) -> Callable:
    """Register the decorated function as `torch.ops.dsv4_triton.<name>` (see the module docstring)."""

    def wrap(fn):
        qualname = f"{NAMESPACE}::{name}"
        if USE_TRITON_OP:
            op = torch.library.triton_op(qualname, fn, mutates_args=())
        else:
            op = torch.library.custom_op(qualname, fn, mutates_args=())
            op.register_fake(fn)
        _REGISTERED[name] = op
        return op

    return wrap


def registered_ops() -> dict[str, Any]:
    """name -> the registered op object, for every kernel module imported so far."""
    return dict(_REGISTERED)
