"""`dsv4_compile.load(path)`: a build folder -> a runnable prefill engine, after checks.

    engine = dsv4_compile.load("artifacts/tiny-cpu-1a2b3c4d")
    logits = engine(tokens)          # tokens [B, S] int64 -> last-position logits [B, V] float32

Before any engine code is loaded (no .pt2 opened, no ONNX session made) `load` checks, and refuses
with `ArtifactError` (one-line message):
- the manifest: present, readable, our schema_version, its config valid and equal to its config_hash;
- every file: listed, present, same size and sha256; no unlisted file;
- the device: same CUDA name and compute capability, or a CPU of the same architecture with at least
  the build's vector ISA (AOTInductor compiles CPU code for the build host's ISA);
- the versions: torch and triton exactly the build's (`allow_version_skew=True` relaxes only this);
- the engine: the requested (or best) format was built and passed verification;
- for AOTInductor packages, the process's libstdc++: refused when an older libstdc++ than the
  system's is mapped, and for CUDA packages unless the system libstdc++ is in LD_PRELOAD (on the lent
  GPU image a CUDA .pt2 load without it never returns, although the mapped file is the system's);
  the error names the LD_PRELOAD to set.

Format choice: `format=None` takes the best verified one, aoti > onnx (> tensorrt, which our tests
never verify: it is loaded only when asked for by name). Each call runs the smallest context bucket
whose sequence range holds S; buckets load lazily, once.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from .libstdcxx import aoti_load_problem, load_aoti_package
from .manifest import FORMATS, ArtifactError, EngineRecord, Manifest, check_manifest, describe_device

PREFERENCE = ("aoti", "onnx")  # what format=None may pick, best first


# ---- runners -------------------------------------------------------------------------------------

class _AotiRunner:
    def __init__(self, path: str, cuda: bool = False, weights=None):
        self.package = load_aoti_package(path, cuda, weights=weights)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        out = self.package(tokens)
        return out[0] if isinstance(out, (list, tuple)) else out


def onnx_providers(device: dict) -> list[str]:
    """onnxruntime's execution providers for an engine of a build made for `device`, best first: CUDA where
    the build is a GPU build and this onnxruntime has it, else the CPU."""
    import onnxruntime as ort

    if device.get("kind") == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class _OnnxRunner:
    def __init__(self, path: str, device: dict):
        import onnxruntime as ort

        self.session = ort.InferenceSession(path, providers=onnx_providers(device))
        self.input = self.session.get_inputs()[0].name

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        (out,) = self.session.run(None, {self.input: tokens.detach().cpu().numpy()})
        return torch.from_numpy(out)


class _TensorRTRunner:  # pragma: no cover (no TensorRT on our machines; "unverified by our tests")
    def __init__(self, path: str):
        import tensorrt as trt

        self.trt = trt
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        with open(path, "rb") as f:
            self.engine = self.runtime.deserialize_cuda_engine(f.read())
        self.context = self.engine.create_execution_context()
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        trt = self.trt
        tokens = tokens.cuda().contiguous()
        inp = next(n for n in self.names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        outp = next(n for n in self.names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self.context.set_input_shape(inp, tuple(tokens.shape))
        out = torch.empty(tuple(self.context.get_tensor_shape(outp)), dtype=torch.float32, device="cuda")
        self.context.set_tensor_address(inp, tokens.data_ptr())
        self.context.set_tensor_address(outp, out.data_ptr())
        self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream)
        torch.cuda.current_stream().synchronize()
        return out


# ---- the engine ------------------------------------------------------------------------------------

class Engine:
    """A checked build folder, one format: tokens [B, S] int64 -> last-position logits [B, V] float32.

    Attributes: path, format, manifest (`Manifest`), config (ModelConfig), buckets (sorted context
    lengths), engines (the manifest's `EngineRecord`s of this format), rank (this process's rank of a
    parallel build, else None), root (the folder its engine files are in) and weights (AOTInductor:
    the build's one copy of the weights that every package gets, shared_weights.AotiWeights; None for
    other formats and older builds). `bucket_for(batch, seq)` says which bucket runs.
    """

    def __init__(self, path: str, manifest: Manifest, fmt: str, engines: list[EngineRecord], rank: int | None = None):
        from .manifest import check_config
        from .runtime import EngineSteps

        self.path, self.manifest, self.format, self.rank = path, manifest, fmt, rank
        self.root = os.path.join(path, manifest.engine_root(rank))
        self.config = check_config(manifest)
        self.engines = sorted((e for e in engines if e.kind == "prefill"), key=lambda e: e.bucket)
        self.buckets = [e.bucket for e in self.engines]
        self._runners: dict[int, Any] = {}
        cuda = manifest.device.get("kind") == "cuda"
        self.weights = None
        if fmt == "aoti" and (manifest.shared_weights or {}).get("aoti"):
            from .shared_weights import AotiWeights

            self.weights = AotiWeights(self.root, torch.device("cuda" if cuda else "cpu"))
        stateful = [e for e in engines if e.kind != "prefill"]
        # the prefill-cache + decode engines (runtime.py); None for a build without them
        self.steps = EngineSteps(self.root, manifest, fmt, self.config, stateful, self.weights) if stateful else None

    def __repr__(self) -> str:
        return f"Engine({self.path!r}, format={self.format!r}, buckets={self.buckets}, device={describe_device(self.manifest.device)!r})"

    def bucket_for(self, batch: int, seq: int) -> EngineRecord:
        for entry in self.engines:
            if entry.fits(batch, seq):
                return entry
        accepted = ", ".join(e.bounds() for e in self.engines)
        raise ValueError(f"tokens [B={batch}, S={seq}] fit no context bucket of this build; accepted: {accepted}")

    def _entry(self, bucket: int) -> EngineRecord:
        entry = next((e for e in self.engines if e.bucket == bucket), None)
        if entry is None:
            raise ValueError(f"bucket {bucket}: not in this engine's buckets {self.buckets}")
        return entry

    def open(self, bucket: int) -> None:
        """Load the runner of context `bucket` now (a package into memory, an onnxruntime session);
        otherwise the first call for that bucket does."""
        self._runner(self._entry(bucket))

    def _runner(self, entry: EngineRecord):
        bucket = entry.bucket
        if bucket not in self._runners:
            path = os.path.join(self.root, entry.files[0])
            if self.format == "aoti":
                self._runners[bucket] = _AotiRunner(path, cuda=self.manifest.device.get("kind") == "cuda",
                                                    weights=self.weights)
            elif self.format == "onnx":
                self._runners[bucket] = _OnnxRunner(path, self.manifest.device)
            else:
                self._runners[bucket] = _TensorRTRunner(path)
        return self._runners[bucket]

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, S] int64 -> last-position logits [B, V] float32, on the smallest bucket that fits."""
        return self.run(tokens)

    def run(self, tokens: torch.Tensor, bucket: int | None = None) -> torch.Tensor:
        """As calling the engine; `bucket` forces one context bucket (it must hold the shape)."""
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
            raise ValueError(f"tokens: expected a [B, S] integer tensor, got {getattr(tokens, 'shape', type(tokens).__name__)}")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens: expected int64 token ids, got {tokens.dtype}")
        tokens = tokens.to(torch.int64)
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.config.vocab_size):
            raise ValueError(f"tokens: ids must be in [0, {self.config.vocab_size}), got [{int(tokens.min())}, {int(tokens.max())}]")
        if self.manifest.device.get("kind") == "cuda" and self.format == "aoti":
            tokens = tokens.cuda()
        if bucket is None:
            entry = self.bucket_for(*tokens.shape)
        else:
            entry = self._entry(bucket)
            if not entry.fits(*tokens.shape):
                raise ValueError(f"tokens {list(tokens.shape)} do not fit bucket {bucket} ({entry.bounds()})")
        with torch.no_grad():
            return self._runner(entry)(tokens.contiguous()).float()


    # ---- generation (runtime.py): the prefill-cache and decode engines --------------------------------
    def generation_steps(self):
        """The prefill-cache and decode engines of this format (runtime.EngineSteps); ArtifactError if none."""
        if self.steps is None:
            raise ArtifactError(f"{self.path}: this build has no {self.format} prefill-cache/decode engines "
                                f"(built before they existed, or a format without them); rebuild it")
        return self.steps

    def new_cache(self, batch: int, bucket: int | None = None):
        """An empty KV cache for `batch` sequences in context `bucket` (default: the largest)."""
        return self.generation_steps().new_cache(batch, bucket)

    def prefill(self, tokens: torch.Tensor, lengths: torch.Tensor, cache) -> torch.Tensor:
        """tokens [B, S] right-padded, lengths [B] -> logits [B, V] of each last real token; fills `cache`."""
        return self.generation_steps().prefill(tokens, lengths, cache)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """tokens [B, 1] at positions [B] -> logits [B, V]; writes them into `cache`."""
        return self.generation_steps().decode(tokens, positions, cache)

    def generate(self, prompts, max_new_tokens, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int | None = None, stop_tokens=()) -> list[list[int]]:
        """New tokens for each prompt (ragged, one batch; greedy at temperature 0; a sequence stops after
        a stop token or max_new_tokens): see dsv4_compile.runtime. A parallel build's ranks sample each
        for itself, so sampling there needs one `seed`, the same on every rank."""
        if self.rank is not None and temperature > 0 and seed is None:
            raise ValueError(f"temperature {temperature} on rank {self.rank} of a parallel build: pass seed= (the "
                             f"same on every rank), or the ranks sample different tokens")
        return self.generation_steps().generate(prompts, max_new_tokens, temperature=temperature, top_k=top_k,
                                                top_p=top_p, seed=seed, stop_tokens=stop_tokens)


def _pick(manifest: Manifest, fmt: str | None, require_verified: bool) -> tuple[str, list[EngineRecord]]:
    engines = manifest.engines
    built = sorted({e.format for e in engines}, key=FORMATS.index)
    if fmt is not None:
        if fmt not in FORMATS:
            raise ValueError(f"format {fmt!r}: accepted: {', '.join(FORMATS)}")
        chosen = [e for e in engines if e.format == fmt]
        if not chosen:
            raise ArtifactError(f"no {fmt} engine in this build; built formats: {', '.join(built) or 'none'}")
        if require_verified:
            failed = [e for e in chosen if e.verified.status not in ("verified", "unverified")]
            if failed:
                v = failed[0].verified
                raise ArtifactError(f"the {fmt} engine for context {failed[0].bucket} failed verification at build "
                                    f"time ({v.error or v.status}); refusing to load it")
        return fmt, chosen
    for candidate in PREFERENCE:
        chosen = [e for e in engines if e.format == candidate]
        if chosen and (not require_verified or all(e.verified.status == "verified" for e in chosen)):
            return candidate, chosen
    raise ArtifactError(f"no verified engine in this build (built formats: {', '.join(built) or 'none'}); "
                        f"run `python -m dsv4_compile verify` for details, or pass format= explicitly")


def load(path: str, format: str | None = None, allow_version_skew: bool = False, *,  # noqa: A002
         _require_verified: bool = True, _checked: Manifest | None = None) -> Engine:
    """Check the build folder at `path` (see the module docstring), then return its runnable Engine.

    format: None (best verified: aoti > onnx), "aoti", "onnx" or "tensorrt". Raises ArtifactError
    (one line) when the folder must not be loaded; ValueError for a bad `format` argument.

    A parallel build (its manifest has a `mesh`) loads on every rank of a process group of its world
    size (torchrun), each rank its own engines; another world size, no process group, or (GPU) too few
    visible GPUs is refused (distributed.join_build_mesh).
    """
    from .distributed import join_build_mesh, process_rank

    path = os.fspath(path)
    # _checked: the manifest this process has just checked (verify loads every format of one build)
    manifest = _checked or check_manifest(path, allow_version_skew=allow_version_skew, rank=process_rank())
    if _require_verified and manifest.build_complete is not True:
        raise ArtifactError(f"{path}: incomplete build (build_complete is not true): an interrupted or failed build")
    fmt, engines = _pick(manifest, format, _require_verified)
    if fmt == "aoti":
        problem = aoti_load_problem(cuda=manifest.device.get("kind") == "cuda")
        if problem:
            raise ArtifactError(problem)
    rank = None
    if manifest.mesh is not None:
        rank = join_build_mesh(path, manifest.mesh)
    return Engine(path, manifest, fmt, engines, rank)
