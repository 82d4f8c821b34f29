"""Tuned tables: the best config per (kernel, GPU, context bucket), as data in `tuning/tables/<gpu>.yaml`.

Layout (written by `python -m dsv4_compile tune`, merged entry by entry, never edited by hand):

    format: 1
    gpu: H100
    updated: '2026-11-23T18:00:00Z'
    kernels:
      fp8_quantize:
        8k:                                   # the bucket (spaces.Problem.bucket)
          phase: prefill                      # prefill | decode | any (context-free kernels)
          context: 8192
          batch: 1
          config: {block_rows: 8, block_cols: 512, num_warps: 4}   # the tuned fields only
          latency_ms: 0.0123                  # median of the best trial
          default_ms: 0.0150                  # the GPU's default config, same protocol (if measured)
          measured: 50                        # configs timed in the study
          study: dsv4:fp8_quantize:H100:8k:586c1129fb
          code_version: 586c1129fb            # kernel sources + space + shapes at tuning time
          model: flash
          dims: {rows: 2048, ...}
          device: NVIDIA H100 80GB HBM3
          versions: {torch: ..., triton: ..., optuna: ...}
          date: '2026-11-23T18:00:00Z'

Writing is atomic: the merged table goes to a temporary file in the same folder, then `os.replace`
(readers see the old or the new table, never half of one); an advisory lock (fcntl) serialises
concurrent writers on one machine.

Reading:
- `lookup(kernel, gpu, context, batch=1, phase="prefill")` -> the nearest entry: same phase (context-free
  entries match any), then the smallest |log2(context / bucket context)| + |log2(batch / bucket batch)|,
  ties to the larger context. None when the GPU has no table or the kernel no entry.
- `tuned_config(kernel, gpu, context, ...)` -> the kernel's config dataclass: the GPU's default with
  the entry's fields; the plain default when there is no entry, the entry's fields no longer exist,
  or the values are invalid (a warning says so). So it never fails for an unknown GPU or bucket.
- `table_hash(gpu)` -> sha256 of the table file (or of 'untuned'); `config_source(name, gpu)` is a
  `dsv4_compile.passes.ConfigSource` (dsv4_compile.compile's default): the substitution's kernel's
  table in the form the kernels' substitutions read ({"default": config string, "by_context":
  {context: config string}, "entries": ...}), which the pass manager folds into its uuid;
  `pick(table, context, batch, phase)` -> the nearest entry's fields (the same rule as `lookup`).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import math
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from ..files import now_utc, write_text_atomic
from ..model.context import ContextError, parse_context
from .spaces import SPACES, canonical_gpu

TABLES_DIR = Path(__file__).resolve().parent / "tables"
FORMAT = 1
UNTUNED = hashlib.sha256(b"untuned").hexdigest()


class TableError(ValueError):
    """A table file that cannot be read (bad YAML, wrong format). One line naming the file."""


def table_path(gpu: str, tables_dir: str | os.PathLike | None = None) -> Path:
    return Path(tables_dir or TABLES_DIR) / f"{canonical_gpu(gpu)}.yaml"


# ================================================================================================
# Reading
# ================================================================================================

_CACHE: dict[Path, tuple[tuple[int, int], dict]] = {}


def load_table(gpu: str, tables_dir: str | os.PathLike | None = None) -> dict:
    """The parsed table ({} when the GPU has none). Cached per file (mtime and size)."""
    path = table_path(gpu, tables_dir)
    try:
        st = path.stat()
    except FileNotFoundError:
        return {}
    stamp = (st.st_mtime_ns, st.st_size)
    hit = _CACHE.get(path)
    if hit and hit[0] == stamp:
        return copy.deepcopy(hit[1])
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise TableError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("kernels", {}), dict):
        raise TableError(f"{path}: not a tuned table of format {FORMAT}")
    data.setdefault("kernels", {})
    _CACHE[path] = (stamp, data)
    return copy.deepcopy(data)


def _distance(entry: Mapping, context: int, batch: int) -> float:
    if entry.get("phase") == "any":
        return 0.0
    c, b = max(1, int(entry.get("context", 1))), max(1, int(entry.get("batch", 1)))
    return abs(math.log2(max(1, context) / c)) + abs(math.log2(max(1, batch) / b))


def pick_entry(section: Mapping[str, Any] | None, context: int, batch: int = 1, phase: str = "prefill"):
    """(bucket, entry) nearest to (context, batch) among `section`'s entries of `phase`, or None."""
    if not section:
        return None
    candidates = [(k, e) for k, e in section.items()
                  if isinstance(e, Mapping) and e.get("phase") in (phase, "any") and isinstance(e.get("config"), Mapping)]
    if not candidates:
        return None
    return min(candidates, key=lambda kv: (_distance(kv[1], context, batch), -int(kv[1].get("context", 0))))


def pick(table: Mapping[str, Any] | None, context: int, batch: int = 1, phase: str = "prefill") -> dict | None:
    """The nearest entry's tuned fields, for a substitution's config function: `table` is what
    config_source gives (`target.table`) or a kernel's section of the YAML file."""
    if table and "entries" in table:
        table = table["entries"]
    hit = pick_entry(table, context, batch, phase)
    return dict(hit[1]["config"]) if hit else None


def _default_phase(kernel: str) -> str:
    space = SPACES.get(kernel)
    return space.phases[0] if space else "prefill"


def context_tokens(context: int | str) -> int:
    """A sequence length in tokens (any positive int), or a context bucket written as the CLI takes it
    ('8k'; model/context.py's rule). ContextError (one line) otherwise."""
    if isinstance(context, str):
        return parse_context(context)
    if isinstance(context, bool) or not isinstance(context, int) or context <= 0:
        raise ContextError(f"bad context {context!r}: expected a positive number of tokens or a context like '8k'")
    return context


def lookup(kernel: str, gpu: str, context: int | str, batch: int = 1, phase: str | None = None,
           tables_dir: str | os.PathLike | None = None) -> dict | None:
    """The nearest tuned entry (with 'bucket' added), or None. See the module docstring."""
    context = context_tokens(context)
    try:
        table = load_table(gpu, tables_dir)
    except TableError as err:
        warnings.warn(f"{err}; using default configs", stacklevel=2)
        return None
    hit = pick_entry(table.get("kernels", {}).get(kernel), context, batch, phase or _default_phase(kernel))
    return {**hit[1], "bucket": hit[0]} if hit else None


def tuned_config(kernel: str, gpu: str, context: int | str, batch: int = 1, phase: str | None = None,
                 tables_dir: str | os.PathLike | None = None):
    """The config dataclass to launch `kernel` with on `gpu` at `context` (tokens, or '8k' as the CLI
    takes it: `context_tokens`) and decode `batch`.

    The GPU's default with the nearest tuned entry's fields; the default alone when there is no usable
    entry. Never raises for an unknown GPU, kernel bucket or a stale table (it warns instead)."""
    space = SPACES.get(kernel)
    if space is None:
        raise KeyError(f"unknown kernel {kernel!r}; accepted: {', '.join(SPACES)}")
    context = context_tokens(context)
    phase = phase or space.phases[0]
    default = space.default_config(gpu, phase)
    entry = lookup(kernel, gpu, context, batch, phase, tables_dir)
    if entry is None:
        return default
    fields = {f.name for f in dataclasses.fields(default)}
    values = dict(entry["config"])
    unknown = set(values) - fields
    if unknown:
        warnings.warn(f"tuned table for {canonical_gpu(gpu)}: {kernel} {entry['bucket']} names fields "
                      f"{', '.join(sorted(unknown))} that {type(default).__name__} no longer has; using the default",
                      stacklevel=2)
        return default
    try:
        return dataclasses.replace(default, **values)
    except (TypeError, ValueError) as err:
        warnings.warn(f"tuned table for {canonical_gpu(gpu)}: {kernel} {entry['bucket']}: {err}; using the default",
                      stacklevel=2)
        return default


def table_hash(gpu: str, tables_dir: str | os.PathLike | None = None) -> str:
    """sha256 of the GPU's table file; UNTUNED when there is none."""
    path = table_path(gpu, tables_dir)
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return UNTUNED


def kernel_for(name: str) -> str | None:
    """The tuned-table kernel a substitution name refers to: 'fp8_quantize.triton' -> 'fp8_quantize'."""
    for candidate in (name, name.split(".", 1)[0]):      # the full name, then the family
        if candidate in SPACES:
            return candidate
    return None


def config_source(name: str, gpu: str, tables_dir: str | os.PathLike | None = None) -> dict | None:
    """A `dsv4_compile.passes.ConfigSource`: the tuned table of the kernel behind substitution `name`
    ('fp8_quantize.triton' -> fp8_quantize) on `gpu`, in the form the kernels' substitutions read
    (dsv4_compile/passes/kernel_substitutions/_common.py), or None when untuned:

        {"default": "<full config string>",              # the entry of the longest context (decode:
                                                         #   of the longest context, batch nearest 64)
         "by_context": {"8192": "<config string>", ...}, # prefill entries (batch 1 where there is one)
         "entries": {bucket: {phase, context, batch, config, dims}}}  # everything, for pick() (dims: the
                                                         #   tuned problem's sizes, where recorded)

    Config strings are the GPU's default config with the tuned fields (KernelConfig.to_str()).
    JSON-serialisable; the pass manager hashes it into its uuid, so a new table invalidates exactly
    the FX graph cache entries it can change."""
    kernel = kernel_for(name)
    if kernel is None:
        return None
    try:
        section = load_table(gpu, tables_dir).get("kernels", {}).get(kernel)
    except TableError as err:
        warnings.warn(f"{err}; using default configs", stacklevel=2)
        return None
    if not section:
        return None
    space = SPACES[kernel]
    strings, entries = {}, {}
    for bucket, e in section.items():
        if not isinstance(e, Mapping) or not isinstance(e.get("config"), Mapping):
            continue
        phase = e.get("phase", "prefill")
        cfg = _merged(space, gpu, "decode" if phase == "decode" else "prefill", e["config"])
        if cfg is None:
            continue
        strings[bucket] = cfg.to_str()
        entries[bucket] = {"phase": phase, "context": int(e.get("context", 0)), "batch": int(e.get("batch", 1)),
                           "config": dict(e["config"]), "dims": dict(e.get("dims") or {})}
    if not entries:
        return None
    prefill = {b: e for b, e in entries.items() if e["phase"] == "prefill"}
    ones = {b: e for b, e in prefill.items() if e["batch"] == 1} or prefill
    by_context = {str(e["context"]): strings[b] for b, e in sorted(ones.items(), key=lambda kv: kv[1]["context"])}
    def weight(bucket):  # the longest context; among equals, batch 1 for prefill, nearest 64 for decode
        e = entries[bucket]
        return e["context"], -abs(math.log2(max(1, e["batch"]) / (64 if e["phase"] == "decode" else 1)))

    main = max(entries, key=weight)
    table = {"default": strings[main], "entries": entries}
    if by_context:
        table["by_context"] = by_context
    return table


def _merged(space, gpu: str, phase: str, values: Mapping):
    try:
        default = space.default_config(gpu, phase)
        return dataclasses.replace(default, **dict(values))
    except (TypeError, ValueError):
        return None


def tables_source(tables_dir: str | os.PathLike | None = None):
    """A ConfigSource reading tables from `tables_dir` (default: tuning/tables)."""
    def source(name: str, gpu: str):
        return config_source(name, gpu, tables_dir)
    return source


# ================================================================================================
# Writing
# ================================================================================================

@contextlib.contextmanager
def _locked(path: Path):
    lock = path.with_name(path.name + ".lock")
    with open(lock, "a") as handle:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_csv(path, rows: list[dict]) -> Path:
    """`rows` as CSV (columns: every key, in order of first appearance), written atomically."""
    import csv
    import io

    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(Path(path), text.getvalue())
    return Path(path)


def dump_table(table: Mapping) -> str:
    header = ("# Tuned kernel configs for one GPU: written by `python -m dsv4_compile tune`; do not edit.\n"
              "# Read with dsv4_compile.tuning.tuned_config(kernel, gpu, context).\n")
    return header + yaml.safe_dump(_plain(table), sort_keys=False, default_flow_style=None, width=120)


def _plain(value):
    """YAML-safe copy: tuples -> lists, numpy/torch scalars -> Python numbers."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, str):
        return str(value)                     # str subclasses (torch's TorchVersion) -> str
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def write_entries(gpu: str, entries: Iterable[tuple[str, str, Mapping]], tables_dir: str | os.PathLike | None = None) -> Path:
    """Merge (kernel, bucket, entry) triples into the GPU's table and write it atomically. Returns the path."""
    path = table_path(gpu, tables_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        try:
            table = load_table(gpu, tables_dir)
        except TableError:
            table = {}
        table = {"format": FORMAT, "gpu": canonical_gpu(gpu), "updated": now_utc(),
                 "kernels": dict(table.get("kernels", {}))}
        for kernel, bucket, entry in entries:
            section = dict(table["kernels"].get(kernel, {}))
            section[bucket] = dict(entry)
            table["kernels"][kernel] = dict(sorted(section.items(), key=lambda kv: _bucket_order(kv[1])))
        table["kernels"] = dict(sorted(table["kernels"].items()))
        write_text_atomic(path, dump_table(table))
    return path


def _bucket_order(entry: Mapping) -> tuple:
    return ({"any": 0, "prefill": 1, "decode": 2}.get(entry.get("phase"), 3), int(entry.get("context", 0)),
            int(entry.get("batch", 1)))
