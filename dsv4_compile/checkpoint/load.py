"""`dsv4_compile.from_pretrained(path)`: a DeepSeek-V4 checkpoint folder -> a `Transformer`.

Order of work, so that nothing runs on a bad checkpoint:
1. config.json -> ModelConfig (`ModelConfig.from_pretrained`; or `config=` for an inference-layout
   folder, which DeepSeek's convert.py writes without one);
2. every shard's header read (no tensor data): layout, missing or truncated shards;
3. every tensor the model needs checked against the headers: names, shapes, dtypes, scales. All
   problems are reported together, one line each, in one CheckpointError;
4. the model built on the meta device, then given storage on the target device and filled tensor by
   tensor, each read into a host buffer and dropped after its copy (host memory beyond the model's own
   storage stays near the largest tensor, not the checkpoint).

weights="bf16" dequantizes every FP8 / MXFP4 weight once at load into the model's dtype (what the
plain model computes with). weights="as-shipped" keeps the linears DeepSeek's inference runs as FP8
GEMMs in FP8 with their 128x128 scales (`FP8Linear`, `torch.ops.dsv4.fp8_linear`), MXFP4 routed
experts in MXFP4 (`MXFP4Experts`: `torch.ops.dsv4.moe_experts_mxfp4_w4a8`, the activations quantized
as DeepSeek's inference does, or `moe_experts_mxfp4` with `simulate_quantization=False` or dims not
multiples of 128) and FP8 routed experts (base models) in FP8 (`FP8Experts`:
`torch.ops.dsv4.moe_experts_fp8_w8a8`, or `moe_experts_fp8` with `simulate_quantization=False`); `attn.wo_a`
(which DeepSeek multiplies in BF16) is dequantized, and so are FP8 linears and experts whose dims are
not multiples of the 128-wide activation block (small test models).

parallel="tp=T,ep=E" (model/parallel.py) loads this rank's shard in a process group of T * E ranks:
the meta model is sharded before it gets storage (only the rank's shards are allocated), the checks
of step 3 still cover the whole checkpoint (headers only), and each sharded tensor is read as its part
alone (`TensorReader.read(entry, part)`: the rows or columns the rank keeps, widened to whole 128x128
scale tiles for FP8 weights, which are dequantized and cut to the part). Of the routed experts, which
both layouts ship one tensor per expert, a rank reads only its own. With weights="as-shipped" a split
FP8Linear's part must fall on whole 128x128 tiles (its codes and scales are read as they are; a split
that does not is refused in one line), and MXFP4 and FP8 experts are split by whole experts.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
import torch.distributed as dist

from ..model import ModelConfig, Transformer
from ..model.layers import FP8Linear
from ..model.moe import FP8Experts, MXFP4Experts
from ..model.ops import FP8_LINEAR_BLOCK
from ..model.parallel import ParallelLayout, Part, local_parts, parallelize
from ..model.weight_formats import (FP8_WEIGHT_BLOCK, MXFP4_BLOCK, dequantize_fp8_weight, dequantize_mxfp4,
                                    fp8_weight_scale_shape, scale_as)
from . import names
from .files import CheckpointError, CheckpointFiles, TensorEntry, TensorReader, discover

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

WEIGHT_MODES = ("as-shipped", "bf16")
FLOAT_CODES = ("F32", "BF16", "F16")
SCALE_CODES = ("F8_E8M0", "U8", "F32", "BF16")
MAX_LISTED = 40  # problems listed one per line before "... and N more"


@dataclass
class CheckpointInfo:
    """What was loaded, attached to the model as `model.checkpoint`."""
    path: str
    layout: str
    weights: str
    fp8_linears: int = 0                     # linears kept FP8 (as-shipped)
    mxfp4_experts: int = 0                   # MoE layers whose routed experts stay MXFP4 (as-shipped)
    fp8_experts: int = 0                     # MoE layers whose routed experts stay FP8 (as-shipped)
    parallel: str | None = None              # the layout this rank's shard was loaded for, "tp=T,ep=E"
    notes: list[str] = field(default_factory=list)


@dataclass
class _Source:
    """Where one expected release tensor comes from: its entries (one per MP rank when split) and scale."""
    release: str
    entries: list[TensorEntry]
    split_dim: int | None
    scale: list[TensorEntry] | None = None

    @property
    def code(self) -> str:
        return self.entries[0].dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return _merged_shape(self.entries, self.split_dim)


def _merged_shape(entries: list[TensorEntry], dim: int | None) -> tuple[int, ...]:
    shape = list(entries[0].shape)
    if dim is not None and len(entries) > 1:
        shape[dim] = sum(e.shape[dim] for e in entries)
    return tuple(shape)


def load_config(path: Path, config: ModelConfig | str | Path | None) -> ModelConfig:
    if isinstance(config, ModelConfig):
        return config
    source = Path(config) if config is not None else path
    if config is None and not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json (DeepSeek's convert.py does not copy it); pass config= the "
                              f"release's config.json or a ModelConfig")
    return ModelConfig.from_pretrained(source)


def from_pretrained(path: str | Path, dtype: torch.dtype | str | None = None, device: torch.device | str | None = None,
                    weights: str = "as-shipped", config: ModelConfig | str | Path | None = None,
                    progress: Callable[[str], None] | None = None,
                    parallel: ParallelLayout | str | None = None, mesh: DeviceMesh | None = None) -> Transformer:
    """A checkpoint folder in the Hugging Face or the inference layout -> Transformer, in eval mode.

    dtype: the model's compute dtype (default: the config's, bfloat16 for the releases); device: where
    the weights go (default cpu); weights: "as-shipped" or "bf16" (module docstring); config: the
    ModelConfig or a config.json to use instead of the folder's. Without MTP tensors in the
    checkpoint the model is built with MTP off (n_mtp_layers 0) and a warning says so. parallel: a
    ParallelLayout or "tp=T,ep=E": this rank's shard (module docstring), in an initialised default
    process group of world size T * E (every rank calls this); mesh: the (ep, tp) DeviceMesh its
    collectives run over (default: `layout.device_mesh`, over the default group; a parallel build
    passes its engines' own, distributed.process_mesh).
    Raises CheckpointError (a bad checkpoint: every problem, one line each), ConfigError, or
    ValueError (a bad weights mode or parallel layout).
    """
    path = Path(path)
    if weights not in WEIGHT_MODES:
        raise ValueError(f"weights={weights!r}: accepted: {', '.join(WEIGHT_MODES)}")
    layout = ParallelLayout.parse(parallel) if isinstance(parallel, str) else parallel
    model, files, plan, notes = _checked(path, config, dtype)
    if layout is not None:
        layout.check_config(model.config)
        if not dist.is_initialized():
            raise ValueError(f"parallel={str(layout)!r}: needs an initialised torch.distributed process group of "
                             f"world size tp * ep = {layout.world_size} (init_process_group on every rank)")
        mesh = mesh or layout.device_mesh(torch.device(device or "cpu").type)
    info = CheckpointInfo(str(path), files.layout, weights, parallel=None if layout is None else str(layout), notes=notes)
    as_shipped = (_swap_fp8_linears(model, plan) | _swap_shipped_experts(model, plan)) if weights == "as-shipped" else set()
    info.fp8_linears = sum(1 for name in as_shipped if not names.is_stacked_experts(name))
    info.mxfp4_experts = sum(isinstance(m, MXFP4Experts) for m in model.modules())
    info.fp8_experts = sum(isinstance(m, FP8Experts) for m in model.modules())
    parts: dict[str, Part] = {}
    if layout is not None:  # on meta: only this rank's shards get storage below
        parts = local_parts(model, layout, mesh)
        parallelize(model, layout, mesh)
    model.materialize(device or "cpu")
    _fill(model, plan, as_shipped, parts, progress)
    model.eval()
    model.checkpoint = info
    return model


def check_checkpoint(path: str | Path, config: ModelConfig | str | Path | None = None,
                     dtype: torch.dtype | str | None = None) -> Transformer:
    """Steps 1-3 of the module docstring alone, reading headers and no tensor data: the model the
    checkpoint at `path` loads as, on the meta device (MTP off, with from_pretrained's warning, when it
    has no MTP tensors). Arguments and errors: from_pretrained's."""
    return _checked(Path(path), config, dtype)[0]


def _checked(path: Path, config, dtype) -> tuple[Transformer, CheckpointFiles, _Plan, list[str]]:
    """Steps 1-3: (the model on the meta device, the files, the plan, notes for CheckpointInfo)."""
    files = discover(path)
    cfg = load_config(path, config)
    if dtype is not None:
        name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
        cfg = cfg.replace(dtype=name)
    stored, notes = _canonical_names(files), []
    if cfg.n_mtp_layers and not any(n.startswith("mtp.") for n in stored):
        cfg = cfg.replace(n_mtp_layers=0)
        notes.append(f"{path}: the checkpoint has no MTP tensors (mtp.*; transformers' save_pretrained drops them): "
                     f"loaded with MTP off")
        warnings.warn(notes[-1], stacklevel=3)  # the caller of from_pretrained or check_checkpoint
    with torch.device("meta"):
        model = Transformer(cfg, seed=None)
    return model, files, _plan(model, files, stored), notes


def _canonical_names(files: CheckpointFiles) -> dict[str, list[TensorEntry]]:
    stored: dict[str, list[TensorEntry]] = {}
    for name, entries in files.tensors.items():
        canon = names.canonical(name)
        if canon in stored:
            raise CheckpointError(f"{files.path}: tensors {stored[canon][0].name!r} and {name!r} are the same tensor "
                                  f"({canon}); keep one")
        stored[canon] = entries
    return stored


# ---- the plan: every expected tensor checked against the headers --------------------------------

@dataclass
class _Plan:
    params: dict[str, list[_Source]]         # our state_dict name -> its sources (one, or one per expert)


def _plan(model: Transformer, files: CheckpointFiles, stored: dict[str, list[TensorEntry]]) -> _Plan:
    c = model.config
    problems: list[str] = []
    used: set[str] = set()
    params: dict[str, list[_Source]] = {}
    for ours, tensor in model.state_dict().items():
        if names.is_stacked_experts(ours):
            releases = names.expert_release_names(ours, c.n_routed_experts)
            want = tuple(tensor.shape[1:])
        else:
            releases, want = [names.release_name(ours)], tuple(tensor.shape)
        sources = []
        for rel in releases:
            src = _source(rel, stored, files, problems)
            if src is None:
                continue
            used.add(rel)
            if src.scale is not None:
                used.add(_scale_name(rel))
            _check(src, want, tensor.dtype, ours, problems)
            sources.append(src)
        params[ours] = sources
    for extra in sorted(set(stored) - used):
        entry = stored[extra][0]
        problems.append(f"unexpected tensor {entry.name} {entry.dtype} {list(entry.shape)} in {entry.file.name}: "
                        f"not part of this config's model")
    if problems:
        shown = problems[:MAX_LISTED] + ([f"... and {len(problems) - MAX_LISTED} more"] if len(problems) > MAX_LISTED else [])
        raise CheckpointError(f"{files.path}: {len(problems)} problem(s), nothing was loaded:\n" + "\n".join(shown))
    return _Plan(params)


def _scale_name(release_weight: str) -> str:
    return release_weight[: -len(".weight")] + ".scale"


def _source(rel: str, stored, files: CheckpointFiles, problems: list[str]) -> _Source | None:
    entries = stored.get(rel)
    if entries is None:
        problems.append(f"missing tensor {rel}")
        return None
    split = names.mp_split_dim(rel) if files.mp > 1 else None
    if files.mp > 1 and split is not None and len(entries) != files.mp:
        problems.append(f"tensor {rel}: split across ranks but found in {len(entries)} of {files.mp} shards")
        return None
    if split is None:
        entries = entries[:1]  # replicated across ranks (or one shard): any copy
    src = _Source(rel, entries, split)
    if rel.endswith(".weight") and _scale_name(rel) in stored:
        scale = stored[_scale_name(rel)]
        src.scale = scale if split is not None else scale[:1]
    return src


def _check(src: _Source, want: tuple[int, ...], param_dtype: torch.dtype, ours: str, problems: list[str]) -> None:
    """One line per problem: dtype, shape, scale presence and shape, for the shipped formats."""
    rel, code, shape = src.release, src.code, src.shape
    if param_dtype in (torch.int32, torch.int64):  # tid2eid
        if code not in ("I32", "I64"):
            problems.append(f"tensor {rel}: dtype {code}; expected I32 or I64 (expert ids)")
        elif shape != want:
            problems.append(f"tensor {rel}: shape {list(shape)}; the config needs {list(want)}")
        return
    expert = ".ffn.experts." in rel
    if code == "F8_E4M3":
        if names.linear_kind(rel) is None and not expert:
            problems.append(f"tensor {rel}: dtype F8_E4M3, but this tensor ships in {'/'.join(FLOAT_CODES)}")
            return
        want_scale = fp8_weight_scale_shape(*want)
    elif code in ("I8", "U8") and expert:
        want_scale = (want[0], want[1] // MXFP4_BLOCK)
        if shape != (want[0], want[1] // 2):
            problems.append(f"tensor {rel}: MXFP4 shape {list(shape)}; the config needs {[want[0], want[1] // 2]} "
                            f"(two e2m1 values per byte)")
            return
        shape = want
    elif code in FLOAT_CODES:
        want_scale = None
    else:
        accepted = FLOAT_CODES + (("F8_E4M3",) if names.linear_kind(rel) or expert else ()) + (("I8",) if expert else ())
        problems.append(f"tensor {rel}: dtype {code}; expected {' or '.join(accepted)}")
        return
    if shape != want:
        problems.append(f"tensor {rel}: shape {list(shape)}; the config needs {list(want)}")
        return
    if want_scale is None:
        if src.scale is not None:
            problems.append(f"tensor {_scale_name(rel)}: a scale beside the unquantized {code} weight {rel}")
        return
    if src.scale is None:
        problems.append(f"missing tensor {_scale_name(rel)} (the scales of the {code} weight {rel})")
        return
    scale_shape = _merged_shape(src.scale, src.split_dim)
    if src.scale[0].dtype not in SCALE_CODES:
        problems.append(f"tensor {_scale_name(rel)}: dtype {src.scale[0].dtype}; expected F8_E8M0 or F32")
    elif scale_shape != tuple(want_scale):
        problems.append(f"tensor {_scale_name(rel)}: shape {list(scale_shape)}; expected {list(want_scale)} for {rel}")


# ---- building and filling -----------------------------------------------------------------------

def _swap_fp8_linears(model: Transformer, plan: _Plan) -> set[str]:
    """as-shipped: nn.Linear -> FP8Linear (on meta) where the checkpoint ships the weight FP8 and
    DeepSeek runs it as an FP8 GEMM, with K a multiple of the 128-wide activation block (always so in
    the releases; smaller test models keep such linears dequantized). Returns the swapped weights' names."""
    swapped = set()
    for ours, sources in plan.params.items():
        if len(sources) != 1 or sources[0].code != "F8_E4M3" or names.linear_kind(sources[0].release) != "gemm":
            continue
        module_name = ours[: -len(".weight")]
        parent_name, _, child = module_name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        if old.in_features % FP8_LINEAR_BLOCK:
            continue
        setattr(parent, child, FP8Linear(old.in_features, old.out_features, device="meta",
                                         quantize_input=model.config.simulate_quantization))
        swapped.add(ours)
    return swapped


def _swap_shipped_experts(model: Transformer, plan: _Plan) -> set[str]:
    """as-shipped: RoutedExperts -> MXFP4Experts (on meta) where every expert weight ships MXFP4, and ->
    FP8Experts where every one ships FP8 with dim and inter multiples of the 128-wide activation block
    (as `_swap_fp8_linears`). Returns the kept weights' names (`...ffn.experts.w1`, ...)."""
    kept = set()
    for ours, sources in plan.params.items():
        if not ours.endswith("ffn.experts.w1"):
            continue
        prefix = ours[: -len(".w1")]
        group = [f"{prefix}.{w}" for w in names.EXPERT_WEIGHTS]
        if not all(plan.params[g] for g in group):
            continue
        codes = {src.code for g in group for src in plan.params[g]}
        parent_name, _, child = prefix.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        e, inter, dim = old.w1.shape
        if codes <= {"I8", "U8"}:
            setattr(parent, child, MXFP4Experts(e, dim, inter, old.limit, device="meta",
                                                quantize_input=model.config.simulate_quantization))
        elif codes == {"F8_E4M3"} and dim % FP8_LINEAR_BLOCK == 0 and inter % FP8_LINEAR_BLOCK == 0:
            setattr(parent, child, FP8Experts(e, dim, inter, old.limit, device="meta",
                                              quantize_input=model.config.simulate_quantization))
        else:
            continue
        kept.update(group)
    return kept


def _read(reader: TensorReader, entries: list[TensorEntry], dim: int | None, part: Part | None = None) -> torch.Tensor:
    """The tensor stored as `entries` (one, or one per MP rank cut along dim), or only its part
    (dim, start, stop) of the whole, reading no other bytes."""
    if part is None or len(entries) == 1 or part[0] != dim:
        pieces = [reader.read(e, part) for e in entries]
    else:  # a part along the MP cut: only the shards it overlaps, each for its overlap
        _, start, stop = part
        pieces, offset = [], 0
        for e in entries:
            lo, hi = max(start, offset), min(stop, offset + e.shape[dim])
            if lo < hi:
                pieces.append(reader.read(e, (dim, lo - offset, hi - offset)))
            offset += e.shape[dim]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)


@torch.no_grad()
def _fill(model: Transformer, plan: _Plan, as_shipped: set[str], parts: dict[str, Part], progress) -> None:
    """Copy every planned tensor into the materialized model: `as_shipped` weights (FP8Linear,
    MXFP4Experts, FP8Experts buffers) as codes + scales in their buffers' dtypes, the rest decoded into
    the parameter's dtype; of a tensor in `parts` (a sharded model) only its part."""
    state = model.state_dict(keep_vars=True)
    reader = TensorReader()
    try:
        for i, (ours, sources) in enumerate(plan.params.items()):
            target, part = state[ours], parts.get(ours)
            if part is not None and names.is_stacked_experts(ours):  # this rank's experts; the others are not read
                sources, part = sources[part[1]:part[2]], None
            if ours in as_shipped and names.is_stacked_experts(ours):  # MXFP4 / FP8 codes and scales, expert by expert
                for e, src in enumerate(sources):
                    target[e].copy_(_read(reader, src.entries, src.split_dim).view(target.dtype))
                    scale = state[ours + "_scale"]
                    scale[e].copy_(scale_as(_read(reader, src.scale, src.split_dim), scale.dtype))
                continue
            if ours in as_shipped:  # FP8 codes and scales, of a split linear its part's (whole tiles)
                src, scale = sources[0], ours[: -len(".weight")] + ".scale"
                target.copy_(_read(reader, src.entries, src.split_dim, part))
                scales = _read(reader, src.scale, src.split_dim, parts.get(scale))
                state[scale].copy_(scale_as(scales, state[scale].dtype))
                continue
            for e, src in enumerate(sources):
                value = _decoded(reader, src, target.dtype, target.device, part)
                (target[e] if names.is_stacked_experts(ours) else target).copy_(value)
            if progress is not None and (i + 1) % 200 == 0:
                progress(f"loaded {i + 1}/{len(plan.params)} tensors")
    finally:
        reader.close()


def _decoded(reader: TensorReader, src: _Source, dtype: torch.dtype, device, part: Part | None = None) -> torch.Tensor:
    """The source tensor, or its part (dim, start, stop), in the model's dtype on `device`: FP8 and
    MXFP4 dequantized there. (A part is never of an MXFP4 tensor: only routed experts ship MXFP4, and a
    rank takes or leaves each whole.)"""
    if src.code == "F8_E4M3":  # the whole B x B tiles around the part, [lo, hi) (scales [lo/B, hi/B)), cut to the part
        B, (dim, start, stop) = FP8_WEIGHT_BLOCK, part or (0, 0, src.shape[0])
        lo, hi = start // B * B, min(-(-stop // B) * B, src.shape[dim])
        raw = _read(reader, src.entries, src.split_dim, (dim, lo, hi)).to(device)
        scale = _read(reader, src.scale, src.split_dim, (dim, lo // B, -(-hi // B))).to(device)
        return dequantize_fp8_weight(raw, scale, dtype=dtype).narrow(dim, start - lo, stop - start)
    raw = _read(reader, src.entries, src.split_dim, part).to(device)
    if src.code in ("I8", "U8"):
        scale = _read(reader, src.scale, src.split_dim).to(device)
        return dequantize_mxfp4(raw, scale, dtype=dtype)
    return raw.to(dtype)


