"""`python -m dsv4_compile build`: validate -> model -> compile + check -> export per bucket -> verify -> manifest.

    python -m dsv4_compile build                          # CPU machine: tiny preset, CPU, context 512, aoti+onnx
    python -m dsv4_compile build --gpu H100 --config mini --context 8k,32k --format aoti,onnx,tensorrt

Defaults: --config tiny without a GPU, mini with one (`--gpu auto` sees a CUDA device, or --gpu names
one); --context the config's max_seq_len (tiny: 512); --format aoti,onnx; --passes all; --out
artifacts/<config>-<device>-<8 hex of the build's identity>.

Every user mistake is found before anything is written (exit 2, one line): bad YAML, unknown preset,
unknown or absent GPU, unsupported context (must be a multiple of 128, at most 1m, and valid for
the config), unknown format, TensorRT requested where it cannot build, unknown pass, a --weights file
with a missing, extra or misshapen tensor, a --weights checkpoint folder that `from_pretrained`
refuses (every bad tensor named), an output folder that cannot be written or that holds
something other than a build.

The build is written into a hidden temporary folder beside --out (`.<name>.partial-<pid>`) and renamed
into place only when complete: a killed build leaves at most that folder, whose manifest (if any)
says `build_complete: false`, which `load` refuses. A previous build at --out is replaced.

Exit codes: 0 built and every engine verified; 1 a check failed (compile or an export vs eager) or
an internal error (the folder is still written, with the failure in the manifest, when the export
itself succeeded); 2 user mistake, nothing written.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

from .cli import UsageError, context_lengths_arg, format_context

CONTEXT_MULTIPLE = 128
CONTEXT_MAX = 1 << 20
FORMATS = ("aoti", "onnx", "tensorrt")
DEFAULT_FORMATS = "aoti,onnx"
STEPS = ("validate", "model", "compile", "export", "verify", "manifest")
# The dtype ONNX engines compute in: onnxruntime's CPU provider (the one every machine has) has no
# bf16 GEMM, so a bf16 model is exported as its float32 twin (the same weight values, `float32_twin`).
ONNX_COMPUTE_DTYPE = "float32"

# Relative RMS error of the torch.compile'd model against eager, fp32 (see verify.TOLERANCES).
COMPILE_TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .model.config import preset_names

    parser.add_argument("--config", default=None, metavar="NAME|PATH",
                        help=f"preset ({', '.join(preset_names())}) or YAML file (default: tiny without a GPU, mini with one)")
    parser.add_argument("--gpu", default="auto", metavar="auto|cpu|H100|H200",
                        help="target device; auto detects; a named GPU that is not present is an error (default: auto)")
    parser.add_argument("--context", type=context_lengths_arg, default=None, metavar="LIST",
                        help="context buckets, e.g. 512 or 8k,32k (multiples of 128, at most 1m; default: the config's max_seq_len)")
    parser.add_argument("--format", default=DEFAULT_FORMATS, metavar="LIST",
                        help=f"comma-separated engine formats among {', '.join(FORMATS)} (default: {DEFAULT_FORMATS})")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="output folder (default: artifacts/<config>-<device>-<short hash>)")
    parser.add_argument("--weights", default=None, metavar="FILE|DIR",
                        help="a released checkpoint folder (Hugging Face or DeepSeek inference layout; its config.json "
                             "is the config unless --config is given; FP8/MXFP4 weights dequantized to the config's "
                             "dtype), or a safetensors file with the model's own state_dict names (default: seeded weights)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the deterministic weights (default: 0)")
    parser.add_argument("--passes", default="all", metavar="LIST",
                        help="substitution passes: all, none, or comma-separated names/families (default: all)")
    parser.add_argument("--json", action="store_true", help="print the build summary as JSON on stdout (progress on stderr)")


# ---- validation (nothing written) ------------------------------------------------------------------

def parse_formats(text: str) -> list[str]:
    items = [t.strip().lower() for t in text.split(",")]
    if not text.strip() or any(not t for t in items):
        raise UsageError(f"bad --format {text!r}: expected a comma-separated list among {', '.join(FORMATS)}")
    for item in items:
        if item not in FORMATS:
            raise UsageError(f"unknown format {item!r} in --format {text!r}; accepted: {', '.join(FORMATS)}")
    return [f for f in FORMATS if f in items]  # canonical order, duplicates dropped


def check_contexts(contexts: list[int], config) -> list[int]:
    from .model.config import ConfigError

    accepted = f"multiples of {CONTEXT_MULTIPLE} from {CONTEXT_MULTIPLE} to 1m ({CONTEXT_MAX}), e.g. 512,8k,32k"
    for c in contexts:
        if c % CONTEXT_MULTIPLE or c > CONTEXT_MAX:
            raise UsageError(f"unsupported context {format_context(c)} ({c} tokens); accepted: {accepted}")
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


def checkpoint_state(path: str, config, strict_mtp: bool = True) -> tuple[dict, Any]:
    """A released checkpoint folder -> (the state_dict of `config`'s model, FP8 / MXFP4 dequantized to
    its dtype, on the CPU; the config loaded: MTP off when the checkpoint has no MTP tensors, an error
    instead with `strict_mtp`). CheckpointError (every bad tensor, one line each) as a UsageError."""
    import warnings

    from .checkpoint import CheckpointError, from_pretrained

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the MTP note: handled below
            model = from_pretrained(path, config=config, weights="bf16", device="cpu")
    except CheckpointError as err:
        raise UsageError(f"--weights {path!r}: {err}") from None
    if strict_mtp and model.config.n_mtp_layers != config.n_mtp_layers:
        raise UsageError(f"--weights {path!r}: no MTP tensors, but config {config.name!r} has {config.n_mtp_layers} "
                         f"MTP layer(s); pass a config with n_mtp_layers: 0")
    return model.state_dict(), model.config


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
        self.formats = parse_formats(args.format)
        if "tensorrt" in self.formats:
            from .export import tensorrt_unavailable

            why = tensorrt_unavailable()
            if why:
                raise UsageError(why)
        self.passes = args.passes
        from .passes import select
        try:
            select(self.passes)
        except Exception as err:  # PassSelectionError (one line)
            raise UsageError(str(err)) from None
        self.seed = args.seed
        self.weights_path = os.path.abspath(args.weights) if args.weights else None
        if checkpoint:
            self.state, self.config = checkpoint_state(self.weights_path, self.config, strict_mtp=bool(args.config))
            self.weights = {"source": "checkpoint", "path": self.weights_path, "sha256": checkpoint_identity(self.weights_path)}
        else:
            self.state = load_weights(self.weights_path, self.config) if self.weights_path else None
            self.weights = ({"source": "file", "path": self.weights_path, "sha256": _sha256(self.weights_path)}
                            if self.weights_path else {"source": "seed", "seed": self.seed})
        identity = {"config": self.config.config_hash(), "buckets": self.buckets, "formats": self.formats,
                    "passes": self.passes, "weights": self.weights, "target": self.target}
        self.out = args.out or default_out(self.config, self.target, identity)
        check_out_dir(self.out)

    def model(self, bucket: int):
        return eager_model(self.config.replace(max_seq_len=bucket), seed=self.seed, state=self.state,
                           cuda=self.target != "cpu")


def eager_model(config, *, seed: int, state: dict | None, cuda: bool):
    """The reference model of a build: loaded weights (`state`), else seeded ones. A GPU build creates
    its weights on the GPU (seconds instead of minutes for mini); seeded weights therefore depend on
    the device, and build and verify both create them on the build's device."""
    import torch

    from .model import Transformer

    device = "cuda" if cuda else "cpu"
    with torch.device(device):
        model = Transformer(config, seed=None if state is not None else seed)
    if state is not None:
        model.load_state_dict(state, strict=True, assign=True)  # keeps the state's tensors (and devices)
        model = model.to(device)
    return model.eval().requires_grad_(False)


def float32_twin(model, cuda: bool):
    """`model` computing in float32 with exactly its weight values (bf16 upcast), on the GPU (`cuda`)
    or the CPU; `model` itself when it already is float32 on that device."""
    device = "cuda" if cuda else "cpu"
    if model.config.dtype == "float32":
        return model.to(device)
    # load_state_dict(assign=True) keeps these tensors: they must already sit on the twin's device
    state = {k: (v.float() if v.is_floating_point() else v).to(device) for k, v in model.state_dict().items()}
    return eager_model(model.config.replace(dtype="float32"), seed=0, state=state, cuda=cuda)


def _sha256(path: str) -> str:
    from .manifest import sha256_file

    return sha256_file(path)


# ---- progress ----------------------------------------------------------------------------------------

class Progress:
    def __init__(self, stream):
        self.stream = stream
        self.timings: dict[str, float] = {}
        self._t0 = 0.0
        self._step = ""

    def start(self, step: str, detail: str = "") -> None:
        self._step, self._t0 = step, time.perf_counter()
        n = STEPS.index(step) + 1
        print(f"[{n}/{len(STEPS)}] {step}{': ' + detail if detail else ''} ...", file=self.stream, flush=True)

    def note(self, text: str) -> None:
        print(f"      {text}", file=self.stream, flush=True)

    def done(self, detail: str = "") -> None:
        elapsed = time.perf_counter() - self._t0
        self.timings[self._step] = round(self.timings.get(self._step, 0.0) + elapsed, 2)
        print(f"      {self._step} done in {elapsed:.1f} s{' (' + detail + ')' if detail else ''}", file=self.stream, flush=True)


# ---- the steps -----------------------------------------------------------------------------------

def compile_check(plan: Plan, model, progress: Progress) -> dict:
    """dsv4_compile.compile with the passes, on a sample prompt, against eager."""
    import torch

    from .compile import compile as dsv4_compile
    from .export import INDUCTOR_CONFIGS, example_tokens
    from .metrics import rel_rms
    from .verify import SHORT_ATTEMPTS, SHORT_SEQ

    compiled = dsv4_compile(model, gpu=plan.target, passes=plan.passes, options=dict(INDUCTOR_CONFIGS))
    # Short prompts, best of a few: a reordered sum flips an FP8/FP4 code now and then, and one flip
    # moves the logits by up to 1e-2 (verify.py); a real error fails every attempt.
    seq = min(model.config.max_seq_len, SHORT_SEQ)
    tol = COMPILE_TOLERANCE[plan.config.dtype]
    device = next(model.parameters()).device
    errors = []
    with torch.no_grad():
        for attempt in range(SHORT_ATTEMPTS):
            tokens = example_tokens(model.config, 1, seq, seed=plan.seed + 1 + attempt).to(device)
            errors.append(rel_rms(model(tokens), compiled(tokens)))
            if errors[-1] <= tol:
                break
    err = min(errors)
    report = compiled.dsv4_report.to_dict()
    replaced = sum(op.get("replaced", 0) for op in report.get("ops", {}).values())
    left = sum(op.get("left_alone", 0) for op in report.get("ops", {}).values())
    progress.note(f"passes={plan.passes}: {replaced} dsv4 nodes substituted, {left} left; compiled vs eager "
                  f"rel RMS {err:.2e} (tolerance {tol:.0e}; best of {len(errors)} prompts of [1, {seq}])")
    return {"rel_rms": err, "tolerance": tol, "ok": err <= tol, "tokens": [1, seq], "report": report}


def export_bucket(plan: Plan, bucket: int, tmp: str, progress: Progress) -> list[dict]:
    from . import export as E

    model = plan.model(bucket)
    # One torch.export per routing: the .pt2 of a GPU build takes the Triton kernels the passes pick
    # (AOTInductor compiles them in); ONNX is always the plain code (standard ONNX ops only). On the
    # CPU both routings are the plain code and one export serves every format.
    # ONNX computes in float32 (ONNX_COMPUTE_DTYPE): a bf16 model is exported as its float32 twin.
    routing = {"aoti": (plan.target, model.config.dtype), "onnx": ("cpu", ONNX_COMPUTE_DTYPE)}
    programs: dict[tuple, E.ExportResult] = {}

    def program(fmt: str) -> E.ExportResult:
        gpu, dtype = key = routing[fmt]
        if key not in programs:
            t0 = time.perf_counter()
            source = model if dtype == model.config.dtype else float32_twin(model, cuda=False)
            result = programs[key] = E.export_prefill(source, gpu=gpu, passes=plan.passes)
            took = round(time.perf_counter() - t0, 2)
            kernels = ", ".join(f"{k} x{v['calls']}" for k, v in result.kernels.items()) or "plain code"
            progress.note(f"context {format_context(bucket)}: torch.export for {fmt} {took:.1f} s "
                          f"(S in {list(result.seq_range)}, B in {list(result.batch_range)}; {dtype}; {kernels}"
                          + (f"; {result.note}" if result.note else "") + ")")
            plan.export_timings.setdefault(bucket, {})[f"torch.export[{fmt}]"] = took
        return programs[key]

    engines: list[dict] = []
    onnx_rel = onnx_result = None
    for fmt in plan.formats if "tensorrt" not in plan.formats or "onnx" in plan.formats else [*plan.formats, "onnx"]:
        if fmt == "tensorrt":
            continue
        result = program(fmt)
        t0 = time.perf_counter()
        os.makedirs(os.path.join(tmp, fmt), exist_ok=True)
        if fmt == "aoti":
            rel = f"aoti/prefill-{bucket}.pt2"
            E.export_aoti(result, os.path.join(tmp, rel))
            files = [rel]
        else:
            rel = f"onnx/prefill-{bucket}.onnx"
            example = E.example_tokens(model.config, result.batch_range[1], max(result.seq_range[0], min(64, result.seq_range[1])))
            written = E.export_onnx(result, os.path.join(tmp, rel), example)
            files = sorted(os.path.relpath(p, tmp).replace(os.sep, "/") for p in written)
            onnx_rel, onnx_result = rel, result
        took = time.perf_counter() - t0
        plan.export_timings[bucket][fmt] = round(took, 2)
        progress.note(f"context {format_context(bucket)}: {fmt} -> {files[0]} ({took:.1f} s)")
        engines.append({"bucket": bucket, "seq_range": list(result.seq_range), "batch_range": list(result.batch_range),
                        "dynamic": result.dynamic, "format": fmt, "files": files, "kernels": result.kernels,
                        "compute_dtype": routing[fmt][1],
                        "verified": {"status": "pending"}})
    if "tensorrt" in plan.formats:
        t0 = time.perf_counter()
        os.makedirs(os.path.join(tmp, "tensorrt"), exist_ok=True)
        rel = f"tensorrt/prefill-{bucket}.engine"
        E.export_tensorrt(os.path.join(tmp, onnx_rel), os.path.join(tmp, rel), onnx_result.seq_range,
                          onnx_result.batch_range)
        plan.export_timings[bucket]["tensorrt"] = round(time.perf_counter() - t0, 2)
        progress.note(f"context {format_context(bucket)}: tensorrt -> {rel} ({time.perf_counter() - t0:.1f} s)")
        engines.append({"bucket": bucket, "seq_range": list(onnx_result.seq_range),
                        "batch_range": list(onnx_result.batch_range), "dynamic": onnx_result.dynamic,
                        "format": "tensorrt", "files": [rel], "kernels": {}, "compute_dtype": ONNX_COMPUTE_DTYPE,
                        "verified": {"status": "unverified", "ok": None,
                                     "error": "unverified by our tests (no TensorRT on the project's machines)"}})
    return engines


def base_manifest(plan: Plan, engines: list[dict], compile_result: dict | None, timings: dict) -> dict:
    from .manifest import SCHEMA_VERSION, device_info, now_utc, versions

    config = plan.config
    return {
        "schema_version": SCHEMA_VERSION,
        "build_complete": False,
        "created": now_utc(),
        "device": device_info(plan.target),
        "versions": versions(),
        "config": config.to_dict(),
        "config_hash": config.config_hash(),
        "weights": plan.weights,
        "context_buckets": plan.buckets,
        "formats": plan.formats,
        "interface": {"input": "tokens [B, S] int64", "output": "last-position logits [B, V] float32"},
        "passes": plan.passes,
        "pass_report": (compile_result or {}).get("report"),
        "compile_check": {k: v for k, v in (compile_result or {}).items() if k != "report"},
        "engines": engines,
        "export_timings_s": {str(k): v for k, v in plan.export_timings.items()},
        "timings_s": timings,
        "files": {},
    }


def run_verify_worker(path: str, formats: list[str], seed: int | None = None, cuda: bool = False,
                      progress: Callable[[str], None] | None = None) -> dict:
    """`python -m dsv4_compile.verify --worker PATH` in a fresh process (libstdc++ preload where needed).
    The worker's progress lines (stderr) go to `progress` as they come."""
    from .loader import libstdcxx_preload

    env = dict(os.environ)
    preload = libstdcxx_preload(cuda=cuda)
    if preload:
        env["LD_PRELOAD"] = " ".join(p for p in (preload, env.get("LD_PRELOAD", "")) if p)
    with tempfile.TemporaryDirectory(prefix="dsv4-verify-") as scratch:
        result_path = os.path.join(scratch, "result.json")
        cmd = [sys.executable, "-m", "dsv4_compile.verify", "--worker", path, "--result", result_path,
               "--formats", ",".join(formats)]
        if seed is not None:
            cmd += ["--seed", str(seed)]
        tail: collections.deque[str] = collections.deque(maxlen=3)
        with subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as proc:
            for line in proc.stderr:
                line = line.rstrip()
                if line.startswith(WORKER_PROGRESS):
                    if progress is not None:
                        progress(line[len(WORKER_PROGRESS):])
                elif line:
                    tail.append(line)
        if proc.returncode != 0 or not os.path.isfile(result_path):
            return {"worker_error": f"verification process exited with {proc.returncode}: "
                                    f"{' | '.join(tail) or 'no output'}", "preload": preload, "results": []}
        with open(result_path) as f:
            data = json.load(f)
    data["preload"] = preload
    return data


# The prefix of the verify worker's progress lines on its stderr.
WORKER_PROGRESS = "dsv4-verify-progress: "


def summary_table(manifest: dict) -> str:
    rows = [("format", "context", "S range", "B range", "file", "MB", "verified", "short rel RMS", "tolerance", "max rel RMS")]
    for e in manifest["engines"]:
        v = e.get("verified", {})
        size = sum(manifest["files"].get(f, {}).get("size", 0) for f in e["files"]) / 1e6
        rows.append((e["format"], format_context(e["bucket"]), f"{e['seq_range'][0]}-{e['seq_range'][1]}",
                     f"{e['batch_range'][0]}-{e['batch_range'][1]}", e["files"][0], f"{size:.1f}",
                     v.get("status", "?"), "-" if v.get("rel_rms") is None else f"{v['rel_rms']:.1e}",
                     "-" if v.get("tolerance") is None else f"{v['tolerance']:.0e}",
                     "-" if v.get("max_rel_rms") is None else f"{v['max_rel_rms']:.1e}"))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _place(tmp: str, out: str) -> None:
    """Rename the finished temporary folder to `out`, replacing a previous build there."""
    old = None
    if os.path.exists(out):
        old = f"{os.path.join(os.path.dirname(os.path.abspath(out)), '.' + os.path.basename(os.path.abspath(out)))}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def run(args: argparse.Namespace) -> int:
    from .manifest import file_table, write_json_atomic

    stream = sys.stderr if args.json else sys.stdout
    progress = Progress(stream)
    progress.start("validate")
    plan = Plan(args)  # UsageError / ConfigError -> exit 2, nothing written
    plan.export_timings = {}
    progress.done(f"config {plan.config.name} ({plan.config.config_hash()[:12]}), target {plan.target}, contexts "
                  f"{','.join(format_context(b) for b in plan.buckets)}, formats {','.join(plan.formats)}, out {plan.out}")

    import torch

    out_abs = os.path.abspath(plan.out)
    os.makedirs(os.path.dirname(out_abs), exist_ok=True)
    tmp = f"{os.path.join(os.path.dirname(out_abs), '.' + os.path.basename(out_abs))}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        progress.start("model", "seeded weights" if plan.state is None else f"weights {plan.weights_path}")
        model = plan.model(plan.buckets[0])
        n_params = sum(p.numel() for p in model.parameters())
        progress.done(f"{n_params / 1e6:.2f} M parameters, {plan.config.dtype}")

        progress.start("compile", f"dsv4_compile.compile(passes={plan.passes!r}, gpu={plan.target!r}) vs eager")
        compile_result = compile_check(plan, model, progress)
        progress.done("ok" if compile_result["ok"] else "FAILED")
        del model
        torch._dynamo.reset()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the verify process loads the engines and its own eager reference

        progress.start("export", f"{', '.join(plan.formats)} x {len(plan.buckets)} context bucket(s)")
        engines: list[dict] = []
        for bucket in plan.buckets:
            engines += export_bucket(plan, bucket, tmp, progress)
        progress.done()

        progress.start("verify", "every engine against eager, in a fresh process")
        manifest = base_manifest(plan, engines, compile_result, progress.timings)
        manifest["files"] = file_table(tmp)
        write_json_atomic(os.path.join(tmp, "manifest.json"), manifest)
        to_verify = sorted({e["format"] for e in engines if e["verified"]["status"] == "pending"})
        outcome = run_verify_worker(tmp, to_verify, seed=plan.seed + 1000, cuda=plan.target != "cpu",
                                    progress=progress.note)
        where = outcome.get("where", "fresh process")
        by_key = {(r["format"], r["bucket"]): r for r in outcome.get("results", [])}
        for e in engines:
            if e["verified"]["status"] != "pending":
                continue
            r = by_key.get((e["format"], e["bucket"]))
            if r is None:
                e["verified"] = {"status": "failed", "ok": False, "where": where,
                                 "error": outcome.get("worker_error") or "not verified (no result)"}
            else:
                e["verified"] = {"status": "verified" if r["ok"] else "failed", "ok": r["ok"], "where": where,
                                 "rel_rms": r["rel_rms"], "tolerance": r["tolerance"], "max_rel_rms": r.get("max_rel_rms"),
                                 "flip_bound": r.get("flip_bound"), "max_abs": r.get("max_abs"),
                                 "cases": r.get("cases"), "error": r.get("error"), "seconds": r.get("seconds")}
            v = e["verified"]
            progress.note(f"{e['format']} context {format_context(e['bucket'])}: {v['status']}"
                          + (f", short prompt rel RMS {v['rel_rms']:.2e} (tolerance {v['tolerance']:.0e}), all token "
                             f"sets <= {v['max_rel_rms']:.2e} (flip bound {v['flip_bound']:.0e})"
                             if v.get("rel_rms") is not None else "")
                          + (f" ({e['verified']['error']})" if e["verified"].get("error") else ""))
        progress.done(f"in {where}" + (f", LD_PRELOAD={outcome['preload']}" if outcome.get("preload") else ""))

        progress.start("manifest")
        manifest = base_manifest(plan, engines, compile_result, progress.timings)
        manifest["build_complete"] = True
        manifest["files"] = file_table(tmp)
        write_json_atomic(os.path.join(tmp, "manifest.json"), manifest)
        _place(tmp, plan.out)
        progress.done(plan.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    failed = [e for e in engines if e["verified"]["status"] == "failed"]
    ok = compile_result["ok"] and not failed
    print(summary_table(manifest), file=stream)
    print("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in progress.timings.items()), file=stream)
    if args.json:
        print(json.dumps({"ok": ok, "out": plan.out, "manifest": manifest}, indent=2, sort_keys=True))
    if not ok:
        what = [f"{e['format']} {format_context(e['bucket'])}" for e in failed]
        if not compile_result["ok"]:
            what.insert(0, "compile check")
        print(f"dsv4_compile build: error: verification failed ({', '.join(what)}); the build at {plan.out} "
              f"records it and load() refuses those engines", file=sys.stderr)
        return 1
    print(f"built {plan.out}: load with dsv4_compile.load({plan.out!r}), check with "
          f"python -m dsv4_compile verify {plan.out}", file=stream)
    return 0
