"""A checkpoint folder's files: which layout, which shards, each tensor's header entry, and lazy reads.

Layouts:
- "huggingface": `model.safetensors.index.json` (weight_map: tensor -> shard file) and its shards, or
  `*.safetensors` files without an index (one or more);
- "inference": DeepSeek's `inference/convert.py` output, `model{i}-mp{n}.safetensors` for ranks
  i = 0..n-1 (tensors split across ranks; see names.MP_SPLIT_DIM).

Headers are parsed here (8-byte little-endian length, then JSON) without reading any tensor data, so
`inspect` and the checks before loading cost a few KB per shard. Tensor data is read one tensor at a
time (`TensorReader`), or a slice of one (a rank's shard).
"""
from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

INDEX_FILE = "model.safetensors.index.json"
MP_SHARD = re.compile(r"model(\d+)-mp(\d+)\.safetensors")

# safetensors dtype codes -> torch dtypes (the ones a DeepSeek-V4 checkpoint can hold)
DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E8M0": torch.float8_e8m0fnu, "I64": torch.int64, "I32": torch.int32,
          "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
CODES = {v: k for k, v in DTYPES.items()}


class CheckpointError(ValueError):
    """The checkpoint cannot be loaded. The message names the file or tensors and what was expected
    (one line per problem when several are reported together)."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as a shard's header describes it."""
    file: Path
    name: str           # as stored in the file
    dtype: str          # safetensors code, e.g. "F8_E4M3"
    shape: tuple[int, ...]
    begin: int          # byte offsets into the file (header included)
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class CheckpointFiles:
    path: Path
    layout: str                                # "huggingface" | "inference"
    shards: tuple[Path, ...]
    tensors: dict[str, list[TensorEntry]]      # stored name -> its entries (one, or one per MP rank)
    mp: int                                    # model-parallel ranks (1 for the Hugging Face layout)


def read_header(file: Path) -> dict[str, TensorEntry]:
    """The tensors a safetensors file declares; CheckpointError naming the file when it is not a
    safetensors file or is shorter than its header says (a truncated download)."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{file}: truncated or not a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{file}: truncated (its header says {n} header bytes, the file holds {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise CheckpointError(f"{file}: not a safetensors file (its header is not JSON)") from None
    entries, data_start, last = {}, 8 + n, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            entry = TensorEntry(file, name, info["dtype"], tuple(info["shape"]), data_start + begin, data_start + end)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file}: tensor {name!r} has a malformed header entry {info!r}") from None
        entries[name] = entry
        last = max(last, entry.end)
    if last > size:
        raise CheckpointError(f"{file}: truncated (holds {size} bytes, its tensors need {last}); download it again")
    return entries


def discover(path: str | Path) -> CheckpointFiles:
    """Find the layout and read every shard's header. CheckpointError for a missing folder, no
    checkpoint, a missing or truncated shard, or an index naming tensors its shard does not hold."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory; pass a checkpoint folder (Hugging Face or inference layout)")
    mp_files = {}
    for file in path.iterdir():
        m = MP_SHARD.fullmatch(file.name)
        if m:
            mp_files[(int(m.group(1)), int(m.group(2)))] = file
    if mp_files:
        counts = sorted({n for _, n in mp_files})
        if len(counts) > 1:
            raise CheckpointError(f"{path}: model{{i}}-mp{{n}}.safetensors shards of several rank counts {counts}; keep one set")
        mp = counts[0]
        missing = [f"model{i}-mp{mp}.safetensors" for i in range(mp) if (i, mp) not in mp_files]
        if missing:
            raise CheckpointError(f"{path}: missing shard {', '.join(missing)} (inference layout, {mp} ranks)")
        shards = tuple(mp_files[(i, mp)] for i in range(mp))
        tensors: dict[str, list[TensorEntry]] = {}
        for file in shards:
            for name, entry in read_header(file).items():
                tensors.setdefault(name, []).append(entry)
        return CheckpointFiles(path, "inference", shards, tensors, mp)
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise CheckpointError(f"{index}: not a safetensors index (no weight_map)") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise CheckpointError(f"{path}: missing shard {', '.join(missing)} (listed in {INDEX_FILE})")
        headers = {f: read_header(path / f) for f in files}
        absent = [f"{n} (in {f})" for n, f in weight_map.items() if n not in headers[f]]
        if absent:
            raise CheckpointError(f"{index}: lists tensors their shard does not hold: {', '.join(absent[:5])}"
                                  f"{' ...' if len(absent) > 5 else ''}")
        tensors = {n: [headers[f][n]] for n, f in weight_map.items()}
        return CheckpointFiles(path, "huggingface", tuple(path / f for f in files), tensors, 1)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no checkpoint found; expected {INDEX_FILE} with its shards, *.safetensors, "
                              f"or model{{i}}-mp{{n}}.safetensors")
    tensors = {}
    for file in files:
        for name, entry in read_header(file).items():
            if name in tensors:
                raise CheckpointError(f"{path}: tensor {name!r} is in both {tensors[name][0].file.name} and {file.name}")
            tensors[name] = [entry]
    return CheckpointFiles(path, "huggingface", tuple(files), tensors, 1)


class TensorReader:
    """Reads tensors from the shards one at a time, each into a fresh host buffer (plain reads, not a
    memory map: mapped pages would stay in the process's resident set until the map is closed, so a
    map per shard would hold up to the whole checkpoint; read this way the host holds about the
    largest tensor being loaded, and the kernel's page cache, which it can drop, the rest)."""

    def __init__(self):
        self._files: dict[Path, object] = {}

    def read(self, entry: TensorEntry, part: tuple[int, int, int] | None = None) -> torch.Tensor:
        """-> a CPU tensor holding the entry's bytes in its dtype and shape; with part = (dim, start,
        stop) only that slice along dim, read alone: one contiguous run of bytes along dim 0, one run
        per index of the dimensions before dim otherwise."""
        if entry.dtype not in DTYPES:
            raise CheckpointError(f"{entry.file.name}: tensor {entry.name!r} has dtype {entry.dtype}, which we cannot "
                                  f"read; accepted: {', '.join(DTYPES)}")
        f = self._files.get(entry.file)
        if f is None:
            f = self._files[entry.file] = open(entry.file, "rb")
        dtype, shape = DTYPES[entry.dtype], list(entry.shape)
        runs, run_bytes, stride, first = 1, entry.nbytes, 0, entry.begin
        if part is not None:
            dim, start, stop = part
            if not (0 <= dim < len(shape) and 0 <= start <= stop <= shape[dim]):
                raise ValueError(f"{entry.name}: part {part} outside its shape {shape}")
            inner = math.prod(shape[dim + 1:]) * dtype.itemsize    # bytes per index along dim
            runs, run_bytes, stride = math.prod(shape[:dim]), (stop - start) * inner, shape[dim] * inner
            first, shape[dim] = entry.begin + start * inner, stop - start
        buffer = bytearray(runs * run_bytes)
        view = memoryview(buffer)
        for i in range(runs if run_bytes else 0):
            f.seek(first + i * stride)
            if f.readinto(view[i * run_bytes:(i + 1) * run_bytes]) != run_bytes:
                raise CheckpointError(f"{entry.file}: truncated while reading {entry.name!r}; download it again")
        if not buffer:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).reshape(shape)

    def close(self) -> None:
        files, self._files = self._files, {}
        for f in files.values():
            f.close()
