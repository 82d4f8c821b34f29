"""One copy of the weights per format of a build, shared by its engines on disk and (AOTInductor) in memory.

A build exports three engines per context bucket (prefill, prefill-cache, decode), each a program over
the same weights. Packaged each with its own copy, mini's build held 3 x 5.6 GB of .pt2 and 3 x 11.2 GB
of ONNX data (issue 16 item 5). Instead:

    aoti/weights.safetensors   every AOTInductor engine's constants, each tensor once; the .pt2 files are
                               compiled with `aot_inductor.package_constants_in_so=False` (code only). Its
                               metadata "engines" maps each engine file to {constant FQN: tensor key}.
    onnx/weights.data          every ONNX model's external initializers, each tensor once; the models
                               point at offsets in it (onnx.external_data_helper's location/offset/length).

How a build gets there: every export task adds its engine's tensors to its format's `WeightStore`
(under the engine root: a parallel build's ranks each have their own) as soon as the program exists,
and writes ONLY the tensors that are not in it yet. Tensors are matched by name (an engine's FQN less
its wrapper's `model.` prefix) AND bytes: a tensor of the same name but other content (a buffer that
depends on the context bucket) gets a key of its own; the bytes are compared against the file, a
chunk at a time, so memory holds one tensor. Tasks run in parallel processes: one adds at a time
(an flock on `.<file>.lock`), and a hidden index beside the file (`.<file>.index.json`, replaced
atomically after each task's tensors are written and flushed) says what the file holds. After the
tasks, `finish_shared_weights` (the build process, once per engine root) completes each file and
removes the index and the lock, before the manifest lists the files.

    onnx/weights.data is raw bytes (tensors at ONNX_ALIGN offsets) and has its final name from the
    start: every model is written (atomically) after its tensors are in the file, and onnx.checker,
    which each export runs on the saved model, opens the file its tensors name.
    aoti/weights.safetensors starts with its header, which lists every tensor, so it is written as
    `.weights.safetensors.partial` with room for the header reserved in front (`aoti_header_reserve`:
    the header of the first engine's tensors as if every engine of the build added all of them anew,
    twice over) and renamed once the header is in (safetensors allows spaces after the header's JSON).
    A header larger than its room (engines with far more tensors than the first) is written into a
    new file followed by a copy of the data: correct, and the one case with two copies on disk.
    safetensors requires the tensors to fill the data without gaps: where an offset would not be a
    multiple of the next tensor's element size, a "__padding__.<offset>" U8 tensor fills the gap.
    Both are in the partial build folder until the build renames it into place; any exit removes it.

Disk written by the export of mini at one context (3 engines; AOTI bf16 5.6 GB of state, ONNX the
float32 twin, 11.2 GB; what differs between the engines is a few MB of buffers):
    before (sidecars merged after the tasks): 3 x 5.6 (.pt2.weights.safetensors) + 3 x 11.2
        (.onnx.data) = 50.4 GB of sidecars, then the merge writes 5.6 + 11.2 more beside them:
        peak ~67 GB, 16.8 GB left in the build.
    after: 5.6 GB (aoti) + 5.6 GB (onnx, bf16 initializers, below) + the few differing buffers:
        peak = what stays in the build, ~11.2 GB.
Measured on tiny (float32, context 512, CPU; weight files sampled every 20 ms during the build):
aoti 8.1 MB at the peak before, 2.9 MB after (2.7 MB of tensors + the header's reserved room); onnx
8.9 MB before, 2.2 MB after; the whole partial build 68.6 MB at the peak before, ~50.3 MB after
(its engine graphs, 44 MB of ONNX and 12.6 MB of .pt2 code, are most of it at tiny).

ONNX initializers in bf16. The ONNX engines compute in float32 (steps.ONNX_COMPUTE_DTYPE): onnxruntime's
CPU provider (1.32) has no bf16 kernel for MatMul, Gemm, Add or Mul (a session over them fails with
NOT_IMPLEMENTED), so a bf16 model is exported as its float32 twin and its initializers came out float32:
twice the bytes of values that are bf16 values. A float32 initializer whose every value is a bf16 value
(the low 16 bits of each float are zero: exact, whatever the model's dtype says) is stored as bf16 (its
high 16 bits) and the graph reads it through Cast(to=FLOAT): exact, so the engines compute the same
numbers (tiny in bf16, prefill at 128: 65 of 87 external initializers bf16, data 2.22 -> 1.40 MB,
onnxruntime's outputs bit for bit those of the float32 export). onnxruntime's CPU provider implements
Cast from bfloat16 and constant-folds Cast of an initializer when it creates the session, so the
session holds the float32 tensor (as before) and runs no Cast per call. Initializers of at most
ONNX_INLINE_BYTES stay in the model file, as onnx_ir's save leaves them.

Loading (`AotiWeights`): the file is read once onto the engine device and every package of the build
gets the same tensors through `load_constants(..., user_managed=True)`, so memory holds one copy.
A package compiled without its constants must get them before its first call (run without them, it
crashes the process: DESIGN.md trap).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import struct
import time
from collections.abc import Callable

import torch

from .files import publish, write_text_atomic
from .manifest import ArtifactError

SHARED_WEIGHTS = {"aoti": "aoti/weights.safetensors", "onnx": "onnx/weights.data"}
# Offsets of tensors in the shared ONNX data file are multiples of this (aligned loads / memory maps).
ONNX_ALIGN = 64
# ONNX initializers of at most this many bytes stay in the model (onnx_ir's save: size_threshold_bytes).
ONNX_INLINE_BYTES = 256
# Bytes compared (or copied) at a time: memory holds one tensor plus this.
CHUNK_BYTES = 64 << 20


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    """One tensor an engine needs: its name in the engine (FQN), dtype (the format's spelling), shape,
    element size and its bytes (little endian, row-major), made on demand."""
    fqn: str
    dtype: str
    shape: tuple[int, ...]
    itemsize: int
    data: Callable[[], bytes | memoryview]


# ---- build side: the store each export task adds to ---------------------------------------------------

class WeightStore:
    """The shared weights file of format `fmt` under the engine root `root` while a build exports
    (module docstring). `engines`: how many engines of this format the build makes (AOTInductor: the
    header's room is reserved for them)."""

    def __init__(self, root: str, fmt: str, engines: int = 1):
        if fmt not in SHARED_WEIGHTS:
            raise ValueError(f"no shared weights for format {fmt!r}; formats with them: {', '.join(SHARED_WEIGHTS)}")
        self.root, self.fmt, self.engines = root, fmt, engines
        self.path = os.path.join(root, SHARED_WEIGHTS[fmt])
        folder, name = os.path.split(self.path)
        self.data_path = os.path.join(folder, f".{name}.partial") if fmt == "aoti" else self.path
        self.index_path = os.path.join(folder, f".{name}.index.json")
        self.lock_path = os.path.join(folder, f".{name}.lock")

    @contextlib.contextmanager
    def _locked(self):
        import fcntl

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when the process dies
            yield

    def _index(self) -> dict | None:
        if not os.path.exists(self.index_path):
            return None
        with open(self.index_path) as f:
            return json.load(f)

    def add(self, engine: str, tensors: list[StoredTensor], prefix: str = "") -> dict[str, dict]:
        """Put the tensors of `engine` (its file relative to the root) in the file, writing those that
        are not there yet. `prefix`: the model's FQN prefix in that engine's module ("model." for
        engines.py's wrappers, "" for the model itself). Returns {fqn: {"offset", "length", ...}}
        (offsets in the file)."""
        with self._locked():
            index = self._index()
            if index is None:
                start = 8 + aoti_header_reserve(tensors, self.engines) if self.fmt == "aoti" else 0
                index = {"data_start": start, "end": start, "tensors": {}, "engines": {}}
            with open(self.data_path, "r+b" if os.path.exists(self.data_path) else "w+b") as f:
                f.truncate(index["end"])  # a task that died after writing, before the index: its bytes go
                mapping = index["engines"][engine] = {}
                placed = {}
                for tensor in tensors:
                    key = _place(f, index, tensor, tensor.fqn.removeprefix(prefix), self.fmt)
                    mapping[tensor.fqn] = key
                    placed[tensor.fqn] = index["tensors"][key]
                f.flush()
                os.fsync(f.fileno())
            write_text_atomic(self.index_path, json.dumps(index, sort_keys=True))
        return placed

    def add_onnx_model(self, model, model_path: str, engine: str, prefix: str = "") -> None:
        """Point the initializers of `model` (an onnx_ir Model to be saved at `model_path`) above
        ONNX_INLINE_BYTES at their bytes in this (ONNX) store, added as engine `engine`; float32 ones
        whose values are all bf16 values stored as bf16 and read through Cast(to=FLOAT) (module
        docstring)."""
        import onnx_ir as ir

        graph = model.graph
        planned = []
        for value in list(graph.initializers.values()):
            tensor = value.const_value
            if tensor is None or tensor.nbytes <= ONNX_INLINE_BYTES:
                continue
            as_bf16 = tensor.dtype == ir.DataType.FLOAT and _bf16_valued(tensor.numpy())
            dtype = ir.DataType.BFLOAT16 if as_bf16 else tensor.dtype
            planned.append((value, dtype, StoredTensor(value.name, dtype.name, tuple(tensor.shape.numpy()),
                                                       max(1, int(dtype.itemsize)),
                                                       functools.partial(_onnx_bytes, tensor, as_bf16))))
        placed = self.add(engine, [stored for *_, stored in planned], prefix)
        model_dir = os.path.dirname(os.path.abspath(model_path))
        location = os.path.relpath(self.path, model_dir)
        casts = []
        for value, dtype, stored in planned:
            where = placed[stored.fqn]
            external = ir.ExternalTensor(location, where["offset"], where["length"], dtype,
                                         shape=value.const_value.shape, name=value.name, base_dir=model_dir)
            if dtype == value.const_value.dtype:
                value.const_value = external
                continue
            # the bf16 initializer keeps the name; the float32 value the graph reads becomes Cast's output
            name = value.name
            graph.initializers.pop(name)
            value.const_value = None
            value.name = f"{name}.float32"
            stored_value = ir.Value(name=name, shape=external.shape, type=ir.TensorType(dtype), const_value=external)
            graph.register_initializer(stored_value)
            casts.append(ir.Node("", "Cast", [stored_value], [ir.AttrInt64("to", ir.DataType.FLOAT)], outputs=[value]))
        if casts:
            graph.insert_before(graph[0], casts)

    def finish(self) -> str:
        """Complete the file (AOTInductor: its header) and remove the index and the lock. Returns the
        file relative to the root."""
        with self._locked():
            index = self._index()
            if index is None:
                raise FileNotFoundError(f"{self.index_path}: no engine added weights to {self.path}")
            if self.fmt == "aoti":
                _finish_safetensors(self.data_path, self.path, index)
            else:
                with open(self.path, "rb+") as f:
                    os.fsync(f.fileno())
            os.unlink(self.index_path)
        os.unlink(self.lock_path)
        return SHARED_WEIGHTS[self.fmt]


def finish_shared_weights(root: str) -> dict[str, str]:
    """Every format's store under `root` completed: {format: shared file relative to root} for the
    formats whose engines added tensors."""
    stores = [WeightStore(root, fmt) for fmt in SHARED_WEIGHTS]
    return {store.fmt: store.finish() for store in stores if os.path.exists(store.index_path)}


def _place(f, index: dict, tensor: StoredTensor, name: str, fmt: str) -> str:
    """The key of `tensor` (called `name`) in the store: an existing one of that name and bytes, else a
    new one, its bytes appended."""
    data = memoryview(tensor.data()).cast("B")
    keys = [k for k, e in index["tensors"].items() if e["name"] == name]
    for key in keys:
        entry = index["tensors"][key]
        if ((entry["dtype"], tuple(entry["shape"]), entry["length"]) == (tensor.dtype, tensor.shape, len(data))
                and _equal_at(f, entry["offset"], data)):
            return key
    if fmt == "aoti":  # safetensors: no gaps; a padding tensor keeps the next offset a multiple of its itemsize
        gap = -(index["end"] - index["data_start"]) % tensor.itemsize
        if gap:
            index["tensors"][f"__padding__.{index['end']}"] = {"name": "__padding__", "dtype": "U8", "shape": [gap],
                                                               "offset": index["end"], "length": gap}
            f.seek(index["end"])
            f.write(bytes(gap))
            index["end"] += gap
        offset = index["end"]
    else:
        offset = -(-index["end"] // ONNX_ALIGN) * ONNX_ALIGN
    key = name if not keys else f"{name}#{len(keys)}"
    f.seek(offset)
    f.write(data)
    index["end"] = offset + len(data)
    index["tensors"][key] = {"name": name, "dtype": tensor.dtype, "shape": list(tensor.shape), "offset": offset,
                             "length": len(data)}
    return key


def _equal_at(f, offset: int, data: memoryview) -> bool:
    f.flush()  # what this task wrote so far is read back through the descriptor
    for start in range(0, len(data), CHUNK_BYTES):
        chunk = data[start:start + CHUNK_BYTES]
        if os.pread(f.fileno(), len(chunk), offset + start) != chunk:
            return False
    return True


# ---- AOTInductor: the program's constants, the safetensors header ------------------------------------------

def aoti_tensors(program: torch.export.ExportedProgram) -> list[StoredTensor]:
    """The constants an AOTInductor package compiled without them needs: the program's state_dict and
    lifted constants, by FQN."""
    return torch_tensors({fqn: value for fqn, value in {**program.state_dict, **program.constants}.items()
                          if isinstance(value, torch.Tensor)})


def torch_tensors(named: dict[str, torch.Tensor]) -> list[StoredTensor]:
    """{name: tensor} as StoredTensors with safetensors' dtype names (each copied to the CPU when stored)."""
    from safetensors.torch import _TYPES  # safetensors' dtype names, as its save_file writes them

    names = {dtype: name for name, dtype in _TYPES.items() if dtype is not None}
    tensors = []
    for fqn, value in named.items():
        if value.dtype not in names:
            raise ValueError(f"tensor {fqn} has dtype {value.dtype}, which safetensors does not store; it stores "
                             f"{', '.join(str(d) for d in names)}")
        tensors.append(StoredTensor(fqn, names[value.dtype], tuple(value.shape), value.element_size(),
                                    functools.partial(_tensor_bytes, value)))
    return tensors


def _tensor_bytes(value: torch.Tensor) -> memoryview:
    return memoryview(value.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())


def aoti_header_reserve(tensors: list[StoredTensor], engines: int) -> int:
    """Bytes reserved for the safetensors header when the first engine's `tensors` open the file:
    their header as if each of `engines` engines added every one of them anew (keys "#99", 13-digit
    offsets), twice over, plus 4 KiB; a multiple of 8."""
    entries = {f"{t.fqn}#99": {"dtype": t.dtype, "shape": list(t.shape), "offset": 10 ** 13, "length": 10 ** 13}
               for t in tensors}
    mapping = {"x" * 64: {t.fqn: f"{t.fqn}#99" for t in tensors}}
    size = len(_safetensors_header(entries, mapping, 0)) * engines * 2 + 4096
    return -(-size // 8) * 8


def _safetensors_header(tensors: dict, engines: dict, data_start: int) -> bytes:
    header = {"__metadata__": {"engines": json.dumps(engines, sort_keys=True)}}
    for key, e in tensors.items():
        header[key] = {"dtype": e["dtype"], "shape": e["shape"],
                       "data_offsets": [e["offset"] - data_start, e["offset"] + e["length"] - data_start]}
    return json.dumps(header, sort_keys=True).encode()


def _finish_safetensors(data_path: str, path: str, index: dict) -> None:
    """The header (8-byte length, JSON padded with spaces to the reserved room) in front of the data,
    and the file renamed to `path`; a header larger than its room: a new file, the data copied."""
    start = index["data_start"]
    header = _safetensors_header(index["tensors"], index["engines"], start)
    if len(header) <= start - 8:
        with open(data_path, "r+b") as f:
            f.write(struct.pack("<Q", start - 8) + header + b" " * (start - 8 - len(header)))
        publish(data_path, path)
        return
    room = -(-len(header) // 8) * 8
    tmp = f"{data_path}.grown"
    try:
        with open(data_path, "rb") as src, open(tmp, "wb") as out:
            out.write(struct.pack("<Q", room) + header + b" " * (room - len(header)))
            src.seek(start)
            while chunk := src.read(CHUNK_BYTES):
                out.write(chunk)
        publish(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    os.unlink(data_path)


# ---- ONNX: float32 initializers holding bf16 values ----------------------------------------------------------

def _bf16_valued(array) -> bool:
    """Every float32 of `array` is a bf16 value (its low 16 bits are zero); checked a chunk at a time."""
    import numpy as np

    bits = np.ascontiguousarray(array).reshape(-1).view(np.uint32)
    step = CHUNK_BYTES // 4
    return all(not (bits[i:i + step] & 0xFFFF).any() for i in range(0, bits.size, step))


def _onnx_bytes(tensor, as_bf16: bool):
    """The bytes an ONNX initializer stores: as is, or float32 -> bf16 (the high half of each float, little endian)."""
    import numpy as np

    if not as_bf16:
        return tensor.tobytes()
    halves = np.ascontiguousarray(tensor.numpy()).reshape(-1).view("<u2")
    return memoryview(np.ascontiguousarray(halves[1::2]))


# ---- load side -------------------------------------------------------------------------------------------------

class AotiWeights:
    """The shared AOTInductor weights of one build's engine root (`aoti/weights.safetensors`), read
    once onto `device` on first use; `load_into` hands every package the same tensors.
    `given`: {engine file: {FQN: tensor}} as passed to each package (what tests check for sharing);
    `read_s`: seconds the read took (None before it), part of the first package's load time."""

    def __init__(self, root: str, device: torch.device):
        self.root, self.device = root, device
        self.path = os.path.join(root, SHARED_WEIGHTS["aoti"])
        self._tensors: dict[str, torch.Tensor] | None = None
        self.read_s: float | None = None
        self._engines: dict[str, dict[str, str]] = {}
        self.given: dict[str, dict[str, torch.Tensor]] = {}

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        if self._tensors is None:
            from safetensors import safe_open
            from safetensors.torch import load_file

            t0 = time.perf_counter()
            try:
                with safe_open(self.path, "pt") as f:
                    self._engines = json.loads((f.metadata() or {})["engines"])
                self._tensors = load_file(self.path, device=str(self.device))
            except Exception as err:  # noqa: BLE001 (any unreadable file: one line naming it)
                raise ArtifactError(f"{self.path}: unreadable shared AOTInductor weights ({type(err).__name__}: "
                                    f"{(str(err).splitlines() or [''])[0][:200]}); rebuild") from None
            self.read_s = time.perf_counter() - t0
        return self._tensors

    def load_into(self, package, pt2_path: str) -> None:
        """package.load_constants with this build's tensors for the engine at `pt2_path` (no copy)."""
        tensors = self.tensors
        rel = os.path.relpath(pt2_path, self.root).replace(os.sep, "/")
        mapping = self._engines.get(rel)
        if mapping is None:
            raise ArtifactError(f"{self.path}: holds no weights for the engine {rel}; rebuild")
        by_fqn = {fqn: tensors[key] for fqn, key in mapping.items() if key in tensors}
        self.given[rel] = give_constants(package, by_fqn,
                                         lambda fqn: f"{self.path}: no tensor for constant {fqn!r} of {rel}; rebuild")


class ProgramConstants:
    """The constants of a code-only package taken from its exported program's own tensors (no file, no
    copy): for a package compiled and run in one process (a benchmark over weights that would not fit
    a second time on disk). `load_aoti_package(..., weights=ProgramConstants(program))`."""

    def __init__(self, program: torch.export.ExportedProgram):
        self.tensors = {**program.state_dict, **program.constants}

    def load_into(self, package, pt2_path: str) -> None:
        give_constants(package, self.tensors,
                       lambda fqn: f"{pt2_path}: constant {fqn!r} is not a tensor of the exported program")


def give_constants(package, tensors: dict[str, torch.Tensor], missing) -> dict[str, torch.Tensor]:
    """package.load_constants with `tensors` (by constant FQN) for every constant the package names, as
    they are (no copy); ArtifactError `missing(fqn)` for the first one `tensors` lacks. Returns what it gave."""
    fqns = package.get_constant_fqns()
    absent = [fqn for fqn in fqns if fqn not in tensors]
    if absent:
        raise ArtifactError(missing(absent[0]))
    constants = {fqn: tensors[fqn] for fqn in fqns}
    package.load_constants(constants, check_full_update=True, user_managed=True)
    return constants
