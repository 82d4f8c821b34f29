"""What `build` will do, decided and checked before anything is written (every user mistake: exit 2).

Bad YAML, unknown preset, unknown or absent GPU, unsupported context (model/context.py's rule, and
valid for the config), unknown format, TensorRT requested where it cannot build or with
--weights-format as-shipped, unknown pass, a --weights file with a missing, extra or misshapen
tensor, a --weights checkpoint folder that `from_pretrained` refuses (every bad tensor named), an
output folder that cannot be written or that holds something other than a build; with --parallel: a
bad layout, one the config cannot split, a format other than aoti (ONNX has no collectives), or a
world that is not T * E torchrun processes (the line gives the torchrun command).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile

from .arguments import UsageError
from .manifest import FORMATS, sha256_file
from .model.context import format_context
from .reference import DEFAULT_WEIGHTS_FORMAT, WEIGHT_MODES, checkpoint_config, checkpoint_shard, checkpoint_state, eager_model

DEFAULT_FORMATS = "aoti,onnx"
# A parallel build's only format: AOTInductor packages the functional collectives, ONNX has none.
PARALLEL_FORMATS = "aoti"
# --max-batch defaults: the batch of the prefill-cache and decode engines is dynamic up to it.
DEFAULT_MAX_BATCH = {"gpu": 8, "cpu": 2}
# The engine kinds exported per context bucket, each its own program (one export task each).
EXPORT_KINDS = ("prefill", "prefill-cache", "decode")


# A GPU build's export process holds its own model on the GPU plus torch.export's and Inductor's working
# memory: counted as twice the weights and this margin. An AOTInductor task keeps about
# CPUS_PER_GPU_EXPORT cores busy (its C++ compile, Triton's kernel compiles); an ONNX task, single-
# threaded Python, one.
GPU_EXPORT_MARGIN = 4 << 30
CPUS_PER_GPU_EXPORT = 4


def export_jobs(tasks: int, cpus: int, model_bytes: int | None = None, gpu_free_bytes: int | None = None,
                one_core_tasks: int = 0) -> int:
    """Export processes when --jobs is not given: one per task up to the CPU count; on a GPU build (model
    and free GPU bytes given) also no more than the free GPU memory holds (each process its own model:
    2 x weights + GPU_EXPORT_MARGIN) and the cores: one each for the `one_core_tasks` (ONNX), the rest
    one per CPUS_PER_GPU_EXPORT."""
    jobs = min(tasks, cpus)
    if model_bytes is not None:
        one_core = min(one_core_tasks, cpus - 1)
        by_cores = one_core + max(1, (cpus - one_core) // CPUS_PER_GPU_EXPORT)
        jobs = min(jobs, by_cores, gpu_free_bytes // (2 * model_bytes + GPU_EXPORT_MARGIN))
    return max(1, jobs)


def task_threads(tasks: list[tuple[int, str, tuple[str, ...]]], jobs: int, cpus: int) -> dict[bool, int]:
    """Cores for ATen and Inductor's compile pool of a running task, keyed by whether it makes an
    AOTInductor package: a task without one (ONNX beside it on a GPU build: single-threaded Python)
    takes one; the AOTInductor tasks, which the processes take first, share the rest. Left at their
    defaults, every worker would spin up all cores' worth of both."""
    compiling = min(jobs, sum("aoti" in formats for _, _, formats in tasks))
    return {True: max(1, (cpus - (jobs - compiling)) // max(1, compiling)), False: 1}


def format_groups(formats: list[str], cuda: bool) -> list[tuple[str, ...]]:
    """The formats that one export task makes together. On the CPU all of them: one program per engine
    serves every format. On a GPU AOTInductor's program (the model's dtype, the Triton kernels) and
    ONNX's (the float32 plain code, on the CPU) share no work, so each is a task of its own and they run
    side by side; TensorRT goes with ONNX, from whose file it is built."""
    if not cuda:
        return [tuple(formats)]
    rest = tuple(f for f in formats if f != "aoti")
    return [group for group in (("aoti",) if "aoti" in formats else (), rest) if group]


# Formats whose files hold a copy of the weights (ONNX's as stored: bf16 values in bf16, FP8/MXFP4 codes
# as they are; TensorRT's engine its own besides its ONNX source).
WEIGHT_COPIES = {"aoti": 1, "onnx": 1, "tensorrt": 2}
# The weights a format's files must hold, at least, as a share of the model's held bytes: what the
# export may leave out (unused buffers) stays well under a tenth.
DISK_LOWER_BOUND = 0.9


def weights_bytes(config, weights_format: str = "bf16") -> int:
    """Bytes of `config`'s parameters and buffers as held in `weights_format` ("bf16": the config's
    dtype; as-shipped: FP8 linears, MXFP4 experts), from a model on the meta device (nothing allocated)."""
    import torch

    from .checkpoint.shipped import quantize_as_shipped, weight_sizes
    from .model import Transformer

    with torch.device("meta"):
        model = Transformer(config, seed=0)
    if weights_format == "as-shipped":
        quantize_as_shipped(model)
    return weight_sizes(model)[1]


def check_disk(out: str, formats: list[str], weights: int, weights_format: str) -> None:
    """UsageError when the disk of `out` cannot hold even the weights the formats' files must hold (a
    lower bound: a build that fits is never refused), before anything is written."""
    import shutil

    where = _writable_ancestor(out)
    need = int(DISK_LOWER_BOUND * weights * sum(WEIGHT_COPIES[f] for f in formats))
    free = shutil.disk_usage(where).free
    if need > free:
        cheaper = ["free space", "fewer formats (--format aoti)"]
        if weights_format != "as-shipped":
            cheaper.append("--weights-format as-shipped")
        raise UsageError(f"--out {out!r}: its disk has {free / 1e9:.1f} GB free; the engines' weights need at least "
                         f"{need / 1e9:.1f} GB ({', '.join(formats)} x {weights / 1e9:.1f} GB {weights_format}); "
                         f"accepted: {', '.join(cheaper)}")


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask: a container's share, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def parse_formats(text: str) -> list[str]:
    items = [t.strip().lower() for t in text.split(",")]
    if not text.strip() or any(not t for t in items):
        raise UsageError(f"bad --format {text!r}: expected a comma-separated list among {', '.join(FORMATS)}")
    for item in items:
        if item not in FORMATS:
            raise UsageError(f"unknown format {item!r} in --format {text!r}; accepted: {', '.join(FORMATS)}")
    return [f for f in FORMATS if f in items]  # canonical order, duplicates dropped


def check_contexts(contexts: list[int], config) -> list[int]:
    """The buckets (already valid context lengths, model/context.py) that `config` can take, sorted."""
    from .model.config import ConfigError

    for c in contexts:
        try:
            config.replace(max_seq_len=c)
        except ConfigError as err:
            raise UsageError(f"unsupported context {format_context(c)} for config {config.name!r}: {err}") from None
    return sorted(set(contexts))


def load_weights(path: str, config) -> dict:
    """The safetensors file as a state_dict, checked name by name and shape by shape against the model."""
    import torch
    from safetensors.torch import load_file

    from .model import Transformer

    if not os.path.isfile(path):
        raise UsageError(f"--weights {path!r}: no such file")
    try:
        state = load_file(path)
    except Exception as err:  # noqa: BLE001 (safetensors raises its own error types)
        raise UsageError(f"--weights {path!r}: not a readable safetensors file ({str(err).splitlines()[0]})") from None
    with torch.device("meta"):
        expected = {k: v for k, v in Transformer(config, seed=None).state_dict().items()}
    missing = sorted(set(expected) - set(state))
    if missing:
        raise UsageError(f"--weights {path!r}: missing tensor {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    extra = sorted(set(state) - set(expected))
    if extra:
        raise UsageError(f"--weights {path!r}: unexpected tensor {extra[0]!r}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                         + "; expected the model's own state_dict names")
    for name in sorted(expected):
        if tuple(state[name].shape) != tuple(expected[name].shape):
            raise UsageError(f"--weights {path!r}: tensor {name!r} has shape {list(state[name].shape)}, "
                             f"the model needs {list(expected[name].shape)}")
        if state[name].dtype != expected[name].dtype:
            raise UsageError(f"--weights {path!r}: tensor {name!r} is {state[name].dtype}, the model needs {expected[name].dtype}")
    return state


def checkpoint_identity(path: str) -> str:
    """sha256 over config.json and every shard's name, size and header (not the tensor bytes: a
    multi-GB checkpoint is identified without reading it)."""
    from pathlib import Path

    digest = hashlib.sha256()
    for file in sorted(Path(path).iterdir()):
        if file.suffix == ".safetensors" or file.name in ("config.json", "model.safetensors.index.json"):
            with open(file, "rb") as f:
                head = f.read(8)
                body = f.read(int.from_bytes(head, "little")) if file.suffix == ".safetensors" and len(head) == 8 else f.read()
            digest.update(f"{file.name}:{file.stat().st_size}:".encode() + head + body)
    return digest.hexdigest()


def _writable_ancestor(path: str) -> str:
    """The nearest existing ancestor of `path`; UsageError if it is not a writable directory."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise UsageError(f"--out {path!r}: cannot create it: {probe!r} is not a directory")
    try:  # os.access says yes to root everywhere: try for real (leaves nothing behind)
        tempfile.TemporaryDirectory(dir=probe, prefix=".dsv4-probe-").cleanup()
    except OSError as err:
        raise UsageError(f"--out {path!r}: not writable ({probe!r}: {err.strerror or err})") from None
    return probe


def check_out_dir(out: str) -> None:
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise UsageError(f"--out {out!r}: exists and is not a directory")
        if os.listdir(out) and not os.path.isfile(os.path.join(out, "manifest.json")):
            raise UsageError(f"--out {out!r}: exists and is not a build folder (no manifest.json); "
                             f"choose another --out or remove it")
        try:
            tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(out)), prefix=".dsv4-probe-").cleanup()
        except OSError as err:
            raise UsageError(f"--out {out!r}: its folder is not writable ({err.strerror or err})") from None
    else:
        _writable_ancestor(out)


def default_out(config, target: str, identity: dict) -> str:
    short = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
    return os.path.join("artifacts", f"{config.name}-{target.lower()}-{short}")


class Plan:
    """Everything `build` will do, decided and checked before anything is written."""

    def __init__(self, args: argparse.Namespace):
        from .compile import GpuError, resolve_gpu
        from .model.config import ModelConfig
        from .passes import select

        try:
            self.target = resolve_gpu(args.gpu)
        except GpuError as err:
            raise UsageError(str(err)) from None
        checkpoint = args.weights if args.weights and os.path.isdir(args.weights) else None
        if checkpoint and not args.config:
            self.config = ModelConfig.from_pretrained(checkpoint)
        else:
            self.config = ModelConfig.load(args.config or ("tiny" if self.target == "cpu" else "mini"))
        self.buckets = check_contexts(args.context or [self.config.max_seq_len], self.config)
        self.layout = self._layout(getattr(args, "parallel", None))
        self.formats = parse_formats(args.format or (PARALLEL_FORMATS if self.layout else DEFAULT_FORMATS))
        if self.layout and self.formats != [PARALLEL_FORMATS]:
            raise UsageError(f"--format {args.format} with --parallel {self.layout}: a parallel build exports "
                             f"{PARALLEL_FORMATS} only (one AOTInductor package per rank; ONNX has no collectives)")
        self.weights_format = getattr(args, "weights_format", None) or DEFAULT_WEIGHTS_FORMAT
        if self.weights_format not in WEIGHT_MODES:
            raise UsageError(f"--weights-format {self.weights_format!r}: accepted: {', '.join(WEIGHT_MODES)}")
        if "tensorrt" in self.formats and self.weights_format == "as-shipped":
            raise UsageError("--format tensorrt with --weights-format as-shipped: not supported (TensorRT takes FP8 "
                             "weights only in explicit Q/DQ quantization; its parse of these engines' FP8/int8 "
                             "initializers is unchecked); accepted: tensorrt with --weights-format bf16, as-shipped "
                             "with aoti,onnx")
        if "tensorrt" in self.formats:
            from .export import tensorrt_unavailable

            why = tensorrt_unavailable()
            if why:
                raise UsageError(why)
        self.passes = args.passes
        try:
            select(self.passes)
        except Exception as err:  # PassSelectionError (one line)
            raise UsageError(str(err)) from None
        self.seed = args.seed
        self.thorough = getattr(args, "thorough", False)
        self.max_batch = getattr(args, "max_batch", None) or DEFAULT_MAX_BATCH["cpu" if self.target == "cpu" else "gpu"]
        self.weights_path = os.path.abspath(args.weights) if args.weights else None
        if checkpoint:
            if self.layout:  # headers checked here; each rank reads its own shard in model()
                self.state, self.config = None, checkpoint_config(self.weights_path, self.config, strict_mtp=bool(args.config))
            else:
                self.state, self.config = checkpoint_state(self.weights_path, self.config, strict_mtp=bool(args.config),
                                                           weights=self.weights_format)
            self.weights = {"source": "checkpoint", "path": self.weights_path,
                            "sha256": checkpoint_identity(self.weights_path)}
        else:
            self.state = load_weights(self.weights_path, self.config) if self.weights_path else None
            self.weights = ({"source": "file", "path": self.weights_path, "sha256": sha256_file(self.weights_path)}
                            if self.weights_path else {"source": "seed", "seed": self.seed})
        self.weights["format"] = self.weights_format
        identity = {"config": self.config.config_hash(), "buckets": self.buckets, "formats": self.formats,
                    "passes": self.passes, "weights": self.weights, "target": self.target, "max_batch": self.max_batch}
        if self.layout:
            identity["parallel"] = str(self.layout)
        self.out = args.out or default_out(self.config, self.target, identity)
        check_out_dir(self.out)
        if not self.layout:  # a parallel build's ranks each hold their shard (not estimated)
            check_disk(self.out, self.formats, weights_bytes(self.config, self.weights_format), self.weights_format)
        # a parallel build's ranks are its processes: each exports its own engines in itself
        self.jobs = 1 if self.layout else getattr(args, "jobs", None) or self.default_jobs()
        self.rank = None
        if self.layout:  # last: every check above refuses the same way on every rank, before any collective
            from .distributed import join_world

            self.rank = join_world(self.layout, self.cuda, getattr(args, "command_line", None) or ["build"])

    def _layout(self, text: str | None):
        """--parallel's ParallelLayout (None without it), checked against the config."""
        if text is None:
            return None
        from .model.parallel import ParallelLayout

        try:
            layout = ParallelLayout.parse(text)
            layout.check_config(self.config)
        except ValueError as err:
            raise UsageError(f"--parallel: {err}") from None
        return layout

    def export_tasks(self) -> list[tuple[int, str, tuple[str, ...]]]:
        """(context bucket, engine kind, formats) of every export task (format_groups), in manifest order.
        TensorRT makes prefill engines only: a group of it alone has no other kind."""
        return [(bucket, kind, group) for bucket in self.buckets for kind in EXPORT_KINDS
                for group in format_groups(self.formats, self.cuda) if kind == "prefill" or group != ("tensorrt",)]

    def default_jobs(self) -> int:
        """Export processes when --jobs is not given (`export_jobs`): by tasks and CPUs, on a GPU build
        by its free memory too; one with weights from a file (each process would get its own copy of
        the loaded weights)."""
        if self.state is not None:
            return 1
        if not self.cuda:
            return export_jobs(len(self.export_tasks()), usable_cpus())
        import torch

        free, _ = torch.cuda.mem_get_info()
        # each export process builds the model in the config's dtype (then quantizes it, as-shipped); the
        # build's own model and its compile check hold one copy beside them (steps.ExportRun)
        tasks, model_bytes = self.export_tasks(), weights_bytes(self.config)
        return export_jobs(len(tasks), usable_cpus(), model_bytes, max(0, free - model_bytes - GPU_EXPORT_MARGIN),
                           one_core_tasks=sum("aoti" not in formats for _, _, formats in tasks))

    @property
    def cuda(self) -> bool:
        return self.target != "cpu"

    def model(self, bucket: int):
        """The reference model at context `bucket`, its weights in --weights-format; with --parallel,
        this rank's shard of it over the engines' process groups (seeded weights or a weights file:
        every rank builds the whole model, then keeps its shard; a checkpoint folder: every rank reads
        its shard alone)."""
        checkpoint = self.weights["source"] == "checkpoint"
        if self.layout and checkpoint:
            return checkpoint_shard(self.weights_path, self.config.replace(max_seq_len=bucket), self.layout, self.cuda,
                                    weights=self.weights_format)
        model = eager_model(self.config.replace(max_seq_len=bucket), seed=self.seed, state=self.state, cuda=self.cuda,
                            as_shipped=self.weights_format == "as-shipped" and not checkpoint)
        if self.layout:
            from .distributed import sharded_model

            model = sharded_model(model, self.layout, "cuda" if self.cuda else "cpu")
        return model
