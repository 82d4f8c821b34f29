"""The build manifest (`manifest.json`) and the checks made on it before any engine code is loaded.

Format (schema_version 1), sorted-key JSON:

    {
      "schema_version": 1,
      "build_complete": true,          # false in the provisional manifest a build writes before its
                                       # verification step: load() refuses such a folder
      "created": "2026-11-23T18:00:00Z",
      "device": {"kind": "cpu", "name": "cpu", "isa": "AVX512", "machine": "x86_64"}
             or {"kind": "cuda", "name": "NVIDIA H100 80GB HBM3", "gpu": "H100", "compute_capability": "9.0"},
      "versions": {"torch": "2.13.0+cpu", "triton": "3.6.0" | null, "onnxruntime": ..., "onnx": ...,
                   "python": "3.11.7", "dsv4_compile": "0.1.0", "tensorrt": null},
      "config": {...ModelConfig.to_dict()...}, "config_hash": "<sha256 of its sorted-key JSON, name excluded>",
      "weights": {"source": "seed", "seed": 0} or {"source": "file", "path": "/abs/w.safetensors", "sha256": ...},
                                       # + "format": "bf16" | "as-shipped" (build --weights-format,
                                       # checkpoint.load.WEIGHT_MODES); absent in older builds: bf16
      "context_buckets": [512],
      "formats": ["aoti", "onnx"],
      "passes": "all", "pass_report": {...SubstitutionReport.to_dict()...},
      "compile_check": {"rel_rms": ..., "tolerance": ...},
      "engines": [{"format": "aoti", "bucket": 512, "files": ["aoti/prefill-512.pt2"],
                   "seq_range": [2, 512], "batch_range": [1, 2], "dynamic": true,
                   "compute_dtype": "float32",                 # ONNX: always float32 (steps.py)
                   "kernels": {"sparse_attention.triton": {"calls": 4, "configs": [{"config": "..."}]}},
                   "verified": {"ok": true, "status": "verified", "where": "fresh process on cpu (x86_64, AVX512)",
                                "rel_rms": 5e-7, "tolerance": 1e-5,          # short prompt (verify.py)
                                "max_rel_rms": 8e-4, "flip_bound": 5e-2,     # every token set
                                "cases": [...], "error": null,
                                "seconds": {"load": 3.1, "reference": 0.4, "engine": 1.2, "eager": 0.9}}}],
                  # + "kind": "prefill" (tokens -> logits; the default for older manifests), "prefill-cache" or
                  #   "decode" (engines.py: aoti/prefill-cache-512.pt2, ...), "cache_io": "in-place" | "returned"
                  #   | null, and for those two "verified.tokens": {tokens_matched, tokens_compared, ...,
                  #   full_batch, full_batch_max_rel_rms (the largest batch's check; null at max_batch <= 3)}
      "shared_weights": {"aoti": "aoti/weights.safetensors", "onnx": "onnx/weights.data"},
                                       # each format's one copy of the weights, which all its engines use
                                       # (shared_weights.py; relative to the engine root; listed once in
                                       # `files`, not in the engines' `files`); absent in older builds,
                                       # whose engines each hold their own copy
      "max_batch": 2,                  # the prefill-cache and decode engines' largest batch
      "kv_cache": {"512": {"tensors": [{"name": "layers.0.main", "shape": ["B", 8, 136], "dtype": "uint8"}, ...],
                           "bytes_per_sequence": 123456, "indexer_format": "fp4"}},
      "files": {"aoti/prefill-512.pt2": {"sha256": "...", "size": 123}, ...},
      "export_timings_s": {"512": {"torch.export[aoti]": 14.0, "aoti": 95.0, "onnx": 75.0}},
      "timings_s": {"validate": 0.1, ...},
      "digest": "<sha256 of the canonical JSON of every other key but versions>"
    }

A parallel build (`build --parallel tp=T,ep=E` under torchrun) adds one key, `mesh` (distributed.py):
    "mesh": {"layout": "tp=2,ep=1", "tp": 2, "ep": 1, "world_size": 2, "dims": ["ep", "tp"],
             "backend": "gloo", "device_kind": "cpu", "engine": "<what each rank's engine is>",
             "ranks": [{"rank": 0, "root": "rank0", "groups": {"0": [0, 1]},
                        "files": {"rank0/aoti/decode-128.pt2": "<sha256>", ...}}, ...]}
Its engine records' `files` are relative to each rank's `root` (every rank has the same engines);
`files` lists every rank's files. A single-process build has no `mesh` key.

`verified.status` is "pending" (the provisional manifest), "verified", "failed" (with `error`) or
"unverified" (TensorRT: "unverified by our tests"); every `verified` has all the keys above, null where
they do not apply. Every file of the build folder except manifest.json is listed in `files`; the loader
refuses a folder with a missing, extra or changed file.

In code the manifest is `Manifest` (frozen dataclasses: `Manifest.from_json` / `to_json`), assembled
by `new_manifest` only. A manifest of another schema_version, or one without it (none was written
before version 1), is refused in one line.

The manifest is a trust boundary: `digest` is the sha256 of its canonical JSON (sorted keys, no spaces)
without `digest` and `versions`, so an edit of any fact that guards execution (device and ISA, buckets
and input ranges, verification verdicts, files) is refused in one line by `load` and `verify` alike.
`versions` is left out because `allow_version_skew` already lets a caller run other versions: editing
them grants nothing the flag does not. A manifest without a digest (written before it existed) is
refused: rebuild it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from .files import now_utc, write_text_atomic

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
# The engine formats a build can hold, in the loader's order of preference.
FORMATS = ("aoti", "onnx", "tensorrt")
INTERFACE = {"input": "tokens [B, S] int64", "output": "last-position logits [B, V] float32",
             "prefill-cache": "tokens [B, S] int64 (right-padded), lengths [B] int64, *cache -> logits [B, V] float32 "
                              "of each last real token (+ the updated cache when cache_io is 'returned')",
             "decode": "tokens [B, 1] int64, positions [B] int64, *cache -> logits [B, V] float32 "
                       "(+ the updated cache when cache_io is 'returned')"}
# x86 vector ISAs as torch.backends.cpu.get_cpu_capability() names them, weakest first: AOTInductor
# compiles CPU code for the build host's ISA, so a package needs at least that ISA to run.
_X86_ISA_ORDER = ("DEFAULT", "AVX2", "AVX512")


class ArtifactError(Exception):
    """A build folder that must not be loaded: missing/tampered files, another device, other versions,
    no verified engine, or a process set-up that would crash. The message is one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


# ---- the manifest as data --------------------------------------------------------------------------

@dataclass(frozen=True)
class Verification:
    """How an engine fared against eager (verify.py): `status` pending | verified | failed | unverified."""

    status: str
    ok: bool | None = None
    where: str | None = None
    rel_rms: float | None = None       # the short prompt's error
    tolerance: float | None = None     # ... and its bound
    max_rel_rms: float | None = None   # the largest error of every token set
    flip_bound: float | None = None    # ... and its bound
    max_abs: float | None = None
    cases: list | None = None          # [{kind, batch, seq, rel_rms, max_abs}, ...]
    error: str | None = None
    seconds: dict | None = None        # {load, reference, engine, eager}
    tokens: dict | None = None         # prefill-cache + decode, by tokens (token_check.py): matched, ...

    @classmethod
    def from_worker(cls, result: dict | None, where: str, worker_error: str | None = None) -> "Verification":
        """The verdict of one engine from a verify worker's result row (None: the worker gave none)."""
        if result is None:
            return cls("failed", ok=False, where=where, error=worker_error or "not verified (no result)")
        fields = {f.name for f in dataclasses.fields(cls)} - {"status", "ok", "where"}
        return cls("verified" if result["ok"] else "failed", ok=bool(result["ok"]), where=where,
                   **{k: v for k, v in result.items() if k in fields})


@dataclass(frozen=True)
class EngineRecord:
    """One engine file of the build: a format at a context bucket, its input bounds and its verdict."""

    format: str
    bucket: int
    files: tuple[str, ...]            # relative paths; the first is the engine
    seq_range: tuple[int, int]        # S in [lo, hi]
    batch_range: tuple[int, int]      # B in [lo, hi]
    dynamic: bool
    compute_dtype: str                # ONNX: always float32 (steps.ONNX_COMPUTE_DTYPE)
    kernels: dict                     # kernel -> {calls, configs}: what the engine runs
    verified: Verification
    kind: str = "prefill"             # "prefill" (tokens -> logits), "prefill-cache" or "decode" (engines.py)
    cache_io: str | None = None       # prefill-cache/decode: "in-place" (AOTI on a GPU) or "returned"

    def fits(self, batch: int, seq: int) -> bool:
        return self.seq_range[0] <= seq <= self.seq_range[1] and self.batch_range[0] <= batch <= self.batch_range[1]

    def bounds(self) -> str:
        return f"S in [{self.seq_range[0]}, {self.seq_range[1]}], B in [{self.batch_range[0]}, {self.batch_range[1]}]"


@dataclass(frozen=True)
class Manifest:
    """manifest.json (see the module docstring for each field)."""

    build_complete: bool
    created: str
    device: dict
    versions: dict
    config: dict
    config_hash: str
    weights: dict
    context_buckets: tuple[int, ...]
    formats: tuple[str, ...]
    passes: str
    pass_report: dict | None
    compile_check: dict
    engines: tuple[EngineRecord, ...]
    export_timings_s: dict
    timings_s: dict
    files: dict
    interface: dict = field(default_factory=lambda: dict(INTERFACE))
    max_batch: int | None = None      # the prefill-cache and decode engines' largest batch
    kv_cache: dict | None = None      # bucket -> the cache layout (engines.cache_manifest)
    schema_version: int = SCHEMA_VERSION
    mesh: dict | None = None          # a parallel build's ranks (distributed.mesh_record); absent otherwise
    shared_weights: dict | None = None  # format -> its shared weights file (shared_weights.py); absent in older builds

    def to_json(self) -> dict:
        """The JSON object of manifest.json (tuples as lists), with its `digest`. A single-process build
        has no `mesh` key: its manifest is what it was before parallel builds existed."""
        data = json.loads(json.dumps(dataclasses.asdict(self)))
        for optional in ("mesh", "shared_weights"):
            if data[optional] is None:
                del data[optional]
        return {**data, "digest": manifest_digest(data)}

    def files_checked_by(self, rank: int | None) -> list[str]:
        """The files whose contents process `rank` of a parallel build reads to check them: all but the
        other ranks' engine folders (each rank checks its own, which it loads: V4-Flash's 8 ranks would
        otherwise each read all 8 shards). A single-process build, rank None or a rank the build does not
        have (join_build_mesh refuses it): every file."""
        ranks = (self.mesh or {}).get("ranks", [])
        if rank is None or not 0 <= rank < len(ranks):
            return sorted(self.files)
        others = tuple(r["root"] + "/" for i, r in enumerate(ranks) if i != rank)
        return sorted(rel for rel in self.files if not rel.startswith(others))

    def engine_root(self, rank: int | None) -> str:
        """The folder, relative to the build's, that engine records' `files` are in: the build's own, or
        rank `rank`'s of a parallel build."""
        return "" if self.mesh is None else self.mesh["ranks"][rank or 0]["root"]

    @classmethod
    def from_json(cls, data: Any, where: str = MANIFEST) -> "Manifest":
        """Parse manifest.json's object; ArtifactError (one line) for another schema or a malformed one."""
        if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
            got = data.get("schema_version") if isinstance(data, dict) else None
            raise ArtifactError(f"{where}: schema_version {got!r}, this loader reads {SCHEMA_VERSION}"
                                + (" (a manifest from before versioned manifests: rebuild it)" if got is None else ""))
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in data and n not in ("interface", "max_batch", "kv_cache", "mesh", "shared_weights")]
        if missing:
            raise ArtifactError(f"{where}: missing key {missing[0]!r}")
        try:
            engines = tuple(_engine_from_json(e) for e in data["engines"])
        except (TypeError, KeyError, ValueError) as err:
            raise ArtifactError(f"{where}: malformed engine entry ({type(err).__name__}: {err})") from None
        values = {n: data[n] for n in names if n in data}
        values.update(engines=engines, context_buckets=tuple(data["context_buckets"]), formats=tuple(data["formats"]))
        return cls(**values)


def manifest_digest(data: dict) -> str:
    """sha256 of the canonical JSON of a manifest object without its `digest` and `versions` keys."""
    covered = {k: v for k, v in data.items() if k not in ("digest", "versions")}
    return hashlib.sha256(json.dumps(covered, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def check_digest(root: str, data: dict) -> None:
    """ArtifactError (one line) unless manifest.json's `digest` is that of its content."""
    if "digest" not in data:
        raise ArtifactError(f"{root}: {MANIFEST} has no digest (written before manifests carried one); rebuild it")
    if data["digest"] != manifest_digest(data):
        raise ArtifactError(f"{root}: {MANIFEST} was edited after the build (its digest does not match its content); "
                            f"rebuild instead of editing it")


def _engine_from_json(entry: dict) -> EngineRecord:
    verified = Verification(**entry["verified"])
    values = {f.name: entry[f.name] for f in dataclasses.fields(EngineRecord)
              if f.name != "verified" and (f.name in entry or f.default is dataclasses.MISSING)}
    lo_s, hi_s = (int(v) for v in values["seq_range"])
    lo_b, hi_b = (int(v) for v in values["batch_range"])
    return EngineRecord(**{**values, "files": tuple(values["files"]), "seq_range": (lo_s, hi_s),
                           "batch_range": (lo_b, hi_b), "bucket": int(values["bucket"])}, verified=verified)


def new_manifest(*, target: str, config, weights: dict, buckets: list[int], formats: list[str], passes: str,
                 compile_check: dict | None, engines: list[EngineRecord], export_timings: dict, timings: dict,
                 root: str, complete: bool, max_batch: int | None = None, mesh: dict | None = None,
                 shared_weights: dict | None = None, files: FolderDigests | None = None) -> Manifest:
    """The manifest of the build folder `root` as it is now: this machine's device and versions, the
    build's facts, and every file of `root` with its size and sha256 (`files`: the digests kept of
    `root` between calls). The one place a manifest is made."""
    from .engines import cache_manifest

    check = dict(compile_check or {})
    return Manifest(
        build_complete=complete, created=now_utc(), device=device_info(target), versions=versions(),
        config=config.to_dict(), config_hash=config.config_hash(), weights=dict(weights),
        context_buckets=tuple(buckets), formats=tuple(formats), passes=passes, pass_report=check.pop("report", None),
        compile_check=check, engines=tuple(engines),
        export_timings_s={str(k): v for k, v in export_timings.items()}, timings_s=dict(timings),
        files=(files or FolderDigests(root)).table(), max_batch=max_batch,
        kv_cache={str(b): cache_manifest(config, b) for b in buckets} if max_batch else None, mesh=mesh,
        shared_weights=dict(shared_weights) if shared_weights else None)


def write_manifest(root: str, manifest: Manifest) -> None:
    """manifest.json of `root`, written atomically (sorted keys)."""
    write_text_atomic(os.path.join(root, MANIFEST), json.dumps(manifest.to_json(), indent=2, sort_keys=True) + "\n")


# ---- facts about this machine --------------------------------------------------------------------

def device_info(target: str = "cpu") -> dict[str, Any]:
    """The device an engine is built for / runs on: target 'cpu' or a GPU name ('H100')."""
    if target == "cpu":
        return {"kind": "cpu", "name": "cpu", "isa": torch.backends.cpu.get_cpu_capability(),
                "machine": platform.machine()}
    major, minor = torch.cuda.get_device_capability(0)
    return {"kind": "cuda", "name": torch.cuda.get_device_name(0), "gpu": target,
            "compute_capability": f"{major}.{minor}"}


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:  # noqa: BLE001 (absent, or broken: either way not usable)
        return None
    return getattr(mod, "__version__", None)


def versions() -> dict[str, str | None]:
    from importlib import metadata

    try:
        ours = metadata.version("dsv4_compile")
    except metadata.PackageNotFoundError:
        ours = None
    return {"torch": torch.__version__, "triton": _version("triton"), "onnxruntime": _version("onnxruntime"),
            "onnx": _version("onnx"), "python": platform.python_version(), "dsv4_compile": ours,
            "tensorrt": _tensorrt_version()}


def _tensorrt_version() -> str | None:
    from importlib import util

    if util.find_spec("tensorrt") is None:
        return None
    return _version("tensorrt")


def describe_device(device: dict) -> str:
    if device.get("kind") == "cuda":
        return f"{device.get('name')} (compute capability {device.get('compute_capability')})"
    return f"cpu ({device.get('machine')}, {device.get('isa')})"


def current_device_for(built: dict) -> dict:
    """This machine's description in the same terms as the manifest's device."""
    if built.get("kind") == "cuda":
        if not torch.cuda.is_available():
            return {"kind": "cpu", "name": "cpu", "isa": torch.backends.cpu.get_cpu_capability(),
                    "machine": platform.machine()}
        return device_info(built.get("gpu") or "cuda")
    return device_info("cpu")


def device_mismatch(built: dict, here: dict | None = None) -> str | None:
    """None when engines built for `built` can run here, else a one-line reason."""
    here = here or current_device_for(built)
    if built.get("kind") != here.get("kind"):
        return f"built for {describe_device(built)}, this machine has {describe_device(here)}"
    if built["kind"] == "cuda":
        if built.get("name") != here.get("name") or built.get("compute_capability") != here.get("compute_capability"):
            return f"built for {describe_device(built)}, this machine has {describe_device(here)}"
        return None
    if built.get("machine") != here.get("machine") or built.get("name") != "cpu":
        return f"built for {describe_device(built)}, this machine has {describe_device(here)}"
    isa_b, isa_h = built.get("isa"), here.get("isa")
    if isa_b != isa_h:
        if isa_b in _X86_ISA_ORDER and isa_h in _X86_ISA_ORDER and _X86_ISA_ORDER.index(isa_h) > _X86_ISA_ORDER.index(isa_b):
            return None  # a stronger ISA runs code compiled for a weaker one
        return f"built for {describe_device(built)}, this machine has {describe_device(here)} (AOTInductor code is compiled for the build host's vector ISA)"
    return None


def version_mismatch(built: dict, here: dict | None = None) -> str | None:
    """torch and triton must be exactly the build's versions."""
    here = here or versions()
    diffs = [f"{name} {built.get(name)} at build, {here.get(name)} here"
             for name in ("torch", "triton") if built.get(name) != here.get(name)]
    return "; ".join(diffs) or None


# ---- files ------------------------------------------------------------------------------------------

HASH_THREADS = 8  # files hashed side by side (hashlib lets go of the GIL on large blocks)


def sha256_file(path: str, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def sha256_files(root: str, rels: list[str]) -> dict[str, str]:
    """{rel: sha256} of files under root, hashed in threads: a build's weights files (one per format,
    gigabytes each) take the time of the largest rather than of their sum."""
    with ThreadPoolExecutor(max_workers=max(1, min(HASH_THREADS, len(rels)))) as pool:
        return dict(zip(rels, pool.map(lambda rel: sha256_file(os.path.join(root, rel)), rels)))


def list_files(root: str) -> list[str]:
    """Every regular file under root, relative, '/'-separated, sorted; manifest.json excluded."""
    out = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


class FolderDigests:
    """The manifest's `files` of one folder, kept between calls: a file is hashed again only when its
    size, mtime or inode changed since the last call (a build writes its manifest before and after
    verifying, and verifying writes nothing there: the second table costs a stat per file, not
    another read of gigabytes of weights)."""

    def __init__(self, root: str):
        self.root = root
        self._known: dict[str, tuple[tuple, str]] = {}  # rel -> ((size, mtime_ns, inode), sha256)

    def table(self) -> dict[str, dict]:
        stamps = {}
        for rel in list_files(self.root):
            st = os.stat(os.path.join(self.root, rel))
            stamps[rel] = (st.st_size, st.st_mtime_ns, st.st_ino)
        stale = [rel for rel, stamp in stamps.items() if self._known.get(rel, (None,))[0] != stamp]
        fresh = sha256_files(self.root, stale)
        self._known = {rel: (stamp, fresh[rel] if rel in fresh else self._known[rel][1]) for rel, stamp in stamps.items()}
        return {rel: {"sha256": digest, "size": stamp[0]} for rel, (stamp, digest) in self._known.items()}


# ---- reading and checking -----------------------------------------------------------------------

def read_manifest(root: str) -> Manifest:
    return Manifest.from_json(_read_json(root), where=os.path.join(root, MANIFEST))


def _read_json(root: str) -> Any:
    path = os.path.join(root, MANIFEST)
    if not os.path.isdir(root):
        raise ArtifactError(f"{root}: not a build folder (no such directory)")
    if not os.path.isfile(path):
        raise ArtifactError(f"{root}: no {MANIFEST}; not a complete build (an interrupted build leaves none)")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as err:
        raise ArtifactError(f"{path}: unreadable manifest ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    return data


def check_files(root: str, manifest: Manifest, checksums: bool = True, rank: int | None = None) -> None:
    """Every listed file present with its size, and no unlisted file; the sha256 of the files rank
    `rank` checks (Manifest.files_checked_by: all but the other ranks' of a parallel build) unless
    checksums is False."""
    listed = manifest.files
    present = set(list_files(root))
    missing = sorted(set(listed) - present)
    if missing:
        raise ArtifactError(f"{root}: file {missing[0]} is listed in the manifest but missing")
    extra = sorted(present - set(listed))
    if extra:
        raise ArtifactError(f"{root}: file {extra[0]} is not listed in the manifest")
    for rel, entry in sorted(listed.items()):
        size = os.path.getsize(os.path.join(root, rel))
        if size != entry.get("size"):
            raise ArtifactError(f"{root}: {rel} has {size} bytes, the manifest says {entry.get('size')}; the file was changed")
    if not checksums:
        return
    digests = sha256_files(root, manifest.files_checked_by(rank))
    for rel, digest in sorted(digests.items()):
        entry = listed[rel]
        if digest != entry.get("sha256"):
            raise ArtifactError(f"{root}: checksum mismatch for {rel} (sha256 {digest[:12]}..., manifest {str(entry.get('sha256'))[:12]}...); the file was changed")


def check_config(manifest: Manifest) -> Any:
    """The build's ModelConfig, checked against its config_hash."""
    from .model.config import ConfigError, ModelConfig

    try:
        config = ModelConfig.from_dict({k: v for k, v in manifest.config.items() if k != "name"},
                                       name=manifest.config.get("name", "custom"))
    except ConfigError as err:
        raise ArtifactError(f"manifest config is invalid: {err}") from None
    if config.config_hash() != manifest.config_hash:
        raise ArtifactError(f"manifest config_hash {manifest.config_hash[:12]}... does not match its config "
                            f"({config.config_hash()[:12]}...); the manifest was edited")
    return config


def check_manifest(root: str, allow_version_skew: bool = False, checksums: bool = True,
                   rank: int | None = None) -> Manifest:
    """All checks that need no engine code: manifest, files, config, device, versions, and last the
    digest (so that a mismatch of device or versions is named as such). Returns the manifest.
    checksums=False leaves out reading the files' contents (gigabytes at real sizes): for a caller
    whose worker process checks them anyway (`verify`); rank: this process's rank of a parallel
    build's process group, which reads the contents of its own engine folder and the shared files only."""
    data = _read_json(root)
    manifest = Manifest.from_json(data, where=os.path.join(root, MANIFEST))
    check_files(root, manifest, checksums, rank)
    check_config(manifest)
    reason = device_mismatch(manifest.device)
    if reason:
        raise ArtifactError(f"{root}: device mismatch: {reason}")
    if not allow_version_skew:
        reason = version_mismatch(manifest.versions)
        if reason:
            raise ArtifactError(f"{root}: version mismatch: {reason} (pass allow_version_skew=True to load anyway)")
    check_digest(root, data)
    return manifest
