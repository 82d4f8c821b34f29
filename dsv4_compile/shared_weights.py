"""One copy of the weights per format of a build, shared by its engines on disk and (AOTInductor) in memory.

A build exports three engines per context bucket (prefill, prefill-cache, decode), each a program over
the same weights. Packaged each with its own copy, mini's build held 3 x 5.6 GB of .pt2 and 3 x 11.2 GB
of ONNX data (issue 16 item 5). Instead:

    aoti/weights.safetensors   every AOTInductor engine's constants, each tensor once; the .pt2 files are
                               compiled with `aot_inductor.package_constants_in_so=False` (code only). Its
                               metadata "engines" maps each engine file to {constant FQN: tensor key}.
    onnx/weights.data          every ONNX model's external initializers, each tensor once; the models
                               point at offsets in it (onnx.external_data_helper's location/offset/length).

How a build gets there: each export task writes its engine's constants beside it (a `.weights`
sidecar: `<engine>.pt2.weights.safetensors`, the ONNX exporter's `<model>.onnx.data`), then the build
process merges every sidecar of one format into the shared file (`share_weights`, once per engine
root: a parallel build's ranks each merge their own shard) and removes the sidecars, before the
manifest lists the files. Tensors are merged by name (an engine's FQN less its wrapper's `model.`
prefix) AND bytes: a tensor of the same name but other content (a buffer that depends on the
context bucket) gets a key of its own.

Loading (`AotiWeights`): the file is read once onto the engine device and every package of the build
gets the same tensors through `load_constants(..., user_managed=True)`, so memory holds one copy.
A package compiled without its constants must get them before its first call (run without them, it
crashes the process: DESIGN.md trap).
"""
from __future__ import annotations

import json
import os

import torch

from .files import written_atomically
from .manifest import ArtifactError

SHARED_WEIGHTS = {"aoti": "aoti/weights.safetensors", "onnx": "onnx/weights.data"}
AOTI_SIDECAR = ".weights.safetensors"  # appended to an engine's .pt2 path
# Offsets of tensors in the shared ONNX data file are multiples of this (aligned loads / memory maps).
ONNX_ALIGN = 64


# ---- build side: per-engine sidecars ----------------------------------------------------------------------

def aoti_sidecar(pt2_path: str) -> str:
    return pt2_path + AOTI_SIDECAR


def write_aoti_sidecar(program: torch.export.ExportedProgram, pt2_path: str) -> str:
    """The constants an AOTInductor package compiled without them needs (the program's state_dict and
    lifted constants, by FQN), into its sidecar."""
    from safetensors.torch import save_file

    tensors, seen = {}, set()
    for fqn, value in {**program.state_dict, **program.constants}.items():
        if not isinstance(value, torch.Tensor):
            continue
        value = value.detach().contiguous()
        if value.data_ptr() in seen and value.numel():  # tied tensors: safetensors stores no shared memory
            value = value.clone()
        seen.add(value.data_ptr())
        tensors[fqn] = value.cpu()
    path = aoti_sidecar(pt2_path)
    save_file(tensors, path)
    return path


# ---- build side: the merge -------------------------------------------------------------------------------------

def share_weights(root: str, engine_files: dict[str, dict[str, str]]) -> dict[str, str]:
    """Merge the sidecars of `engine_files` ({format: {engine path relative to root: the FQN prefix of
    the model in that engine's module}}, in manifest order) into each format's shared file under
    `root`, written atomically; the sidecars are removed. Returns {format: shared file relative to
    root} for the formats that had sidecars. The prefix ("model." for engines.py's wrappers, "" for
    the model itself) makes one tensor's names in the engines one name."""
    shared = {}
    for fmt, files in engine_files.items():
        merge = {"aoti": _merge_aoti, "onnx": _merge_onnx}.get(fmt)
        if merge is not None and files and merge(root, dict(files)):
            shared[fmt] = SHARED_WEIGHTS[fmt]
    return shared


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                      b.reshape(-1).view(torch.uint8))


def _merge_aoti(root: str, files: dict[str, str]) -> bool:
    from safetensors import safe_open
    from safetensors.torch import save_file

    sidecars = [(rel, aoti_sidecar(os.path.join(root, rel))) for rel in files]
    if not all(os.path.exists(path) for _, path in sidecars):
        return False  # packages with their constants inside
    merged: dict[str, torch.Tensor] = {}
    keys_by_name: dict[str, list[str]] = {}
    engines: dict[str, dict[str, str]] = {}
    for rel, path in sidecars:
        with safe_open(path, "pt") as f:
            mapping = engines[rel] = {}
            for fqn in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                tensor = f.get_tensor(fqn)
                name = fqn.removeprefix(files[rel])
                keys = keys_by_name.setdefault(name, [])
                key = next((k for k in keys if _same_bytes(merged[k], tensor)), None)
                if key is None:
                    key = name if not keys else f"{name}#{len(keys)}"
                    keys.append(key)
                    merged[key] = tensor
                mapping[fqn] = key
    target = os.path.join(root, SHARED_WEIGHTS["aoti"])
    with written_atomically(target) as tmp:
        save_file(merged, tmp, metadata={"engines": json.dumps(engines, sort_keys=True)})
    for _, path in sidecars:
        os.remove(path)
    return True


def _merge_onnx(root: str, files: dict[str, str]) -> bool:
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    target = os.path.join(root, SHARED_WEIGHTS["onnx"])
    folder = os.path.dirname(target)
    models = {rel: onnx.load(os.path.join(root, rel), load_external_data=False) for rel in files}
    if not any(uses_external_data(t) for m in models.values() for t in _get_all_tensors(m)):
        return False
    sources: set[str] = set()
    offsets_by_name: dict[str, list[tuple[int, int]]] = {}  # name -> [(offset, length)] in the shared file
    with written_atomically(target) as tmp, open(tmp, "w+b") as out:
        for rel, model in models.items():
            model_dir = os.path.dirname(os.path.join(root, rel))
            for tensor in _get_all_tensors(model):
                if not uses_external_data(tensor):
                    continue
                info = ExternalDataInfo(tensor)
                source = os.path.join(model_dir, info.location)
                sources.add(os.path.abspath(source))
                with open(source, "rb") as f:
                    f.seek(info.offset or 0)
                    data = f.read(info.length) if info.length is not None else f.read()
                name, place = tensor.name.removeprefix(files[rel]), None
                for offset, length in offsets_by_name.get(name, []):
                    if length == len(data):
                        out.seek(offset)
                        if out.read(length) == data:
                            place = offset
                            break
                if place is None:
                    out.seek(0, os.SEEK_END)
                    place = -(-out.tell() // ONNX_ALIGN) * ONNX_ALIGN
                    out.seek(place)
                    out.write(data)
                    offsets_by_name.setdefault(name, []).append((place, len(data)))
                _point_at(tensor, os.path.relpath(target, model_dir), place, len(data))
    for rel, model in models.items():
        with written_atomically(os.path.join(root, rel)) as tmp:
            onnx.save(model, tmp)
    for source in sources - {os.path.abspath(target)}:
        os.remove(source)
    return True


def _point_at(tensor, location: str, offset: int, length: int) -> None:
    """An external ONNX tensor's data at `offset` in `location` (onnx's set_external_data wants the
    tensor's raw data loaded; these are not)."""
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


# ---- load side -------------------------------------------------------------------------------------------------

class AotiWeights:
    """The shared AOTInductor weights of one build's engine root (`aoti/weights.safetensors`), read
    once onto `device` on first use; `load_into` hands every package the same tensors.
    `given`: {engine file: {FQN: tensor}} as passed to each package (what tests check for sharing)."""

    def __init__(self, root: str, device: torch.device):
        self.root, self.device = root, device
        self.path = os.path.join(root, SHARED_WEIGHTS["aoti"])
        self._tensors: dict[str, torch.Tensor] | None = None
        self._engines: dict[str, dict[str, str]] = {}
        self.given: dict[str, dict[str, torch.Tensor]] = {}

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        if self._tensors is None:
            from safetensors import safe_open
            from safetensors.torch import load_file

            try:
                with safe_open(self.path, "pt") as f:
                    self._engines = json.loads((f.metadata() or {})["engines"])
                self._tensors = load_file(self.path, device=str(self.device))
            except Exception as err:  # noqa: BLE001 (any unreadable file: one line naming it)
                raise ArtifactError(f"{self.path}: unreadable shared AOTInductor weights ({type(err).__name__}: "
                                    f"{(str(err).splitlines() or [''])[0][:200]}); rebuild") from None
        return self._tensors

    def load_into(self, package, pt2_path: str) -> None:
        """package.load_constants with this build's tensors for the engine at `pt2_path` (no copy)."""
        tensors = self.tensors
        rel = os.path.relpath(pt2_path, self.root).replace(os.sep, "/")
        mapping = self._engines.get(rel)
        if mapping is None:
            raise ArtifactError(f"{self.path}: holds no weights for the engine {rel}; rebuild")
        missing = [fqn for fqn in package.get_constant_fqns() if mapping.get(fqn) not in tensors]
        if missing:
            raise ArtifactError(f"{self.path}: no tensor for constant {missing[0]!r} of {rel}; rebuild")
        constants = {fqn: tensors[mapping[fqn]] for fqn in package.get_constant_fqns()}
        package.load_constants(constants, check_full_update=True, user_managed=True)
        self.given[rel] = constants
