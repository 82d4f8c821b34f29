"""Write a model as a DeepSeek-V4 release checkpoint, in the shipped dtypes (synthetic checkpoints for
tests and load benchmarks; any model of ours can be written).

Shipped dtypes (V4-Flash instruct): the FP8 linears (names.FP8_GEMM_LINEARS + FP8_DEQUANTIZED_LINEARS)
FP8 e4m3 + e8m0 scales per 128 x 128 tile; routed experts MXFP4 (int8 pairs + e8m0 scales per 1 x 32)
or FP8; tid2eid int64; mHC maps, attention sinks, compressor positional biases and router biases
float32; everything else bfloat16.

Layouts: "huggingface" (`model-0000i-of-0000n.safetensors` + `model.safetensors.index.json` +
config.json) or "inference" (`model{i}-mp{n}.safetensors` as DeepSeek's convert.py writes them, with
tensors split across ranks per names.MP_SPLIT_DIM and experts dealt out whole; config.json beside them
unless `with_config=False`). Every file is written to a temporary name and renamed when complete.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..model import Transformer
from ..model.layers import FP8Linear
from ..model.moe import FP8Experts, MXFP4Experts
from ..model.release_config import release_config_dict
from ..model.weight_formats import MXFP4_BLOCK, fp8_weight_scale_shape, quantize_fp8_weight, quantize_mxfp4
from . import names
from .files import INDEX_FILE

LAYOUTS = ("huggingface", "inference")
# The modules that hold weights as a release ships them (codes and scales), not as values.
AS_SHIPPED_MODULES = (FP8Linear, FP8Experts, MXFP4Experts)
FLOAT32_LEAVES = ("attn_sink", "ape", "bias")


def shipped_tensors(model: Transformer, expert_format: str = "fp4") -> dict[str, torch.Tensor]:
    """Our model's weights -> {release name: tensor in the shipped dtype} (CPU), scales included. The
    model is a plain one (its weights in a float dtype, quantized here); one holding weights as shipped
    is a ValueError."""
    for name, module in model.named_modules():
        if isinstance(module, AS_SHIPPED_MODULES):
            raise ValueError(f"write_checkpoint: {name} is {type(module).__name__}, weights as shipped; accepted: a plain "
                             f"model (from_pretrained(..., weights='bf16'), or a Transformer before quantize_as_shipped)")
    out: dict[str, torch.Tensor] = {}
    for ours, t in model.state_dict().items():
        out.update(_shipped(ours, t.detach().cpu(), model.config.n_routed_experts, expert_format))
    return out


def _shipped(ours: str, t: torch.Tensor, n_experts: int, expert_format: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    if names.is_stacked_experts(ours):
        for rel, w in zip(names.expert_release_names(ours, n_experts), t):
            out.update(_quantized(rel, w, "mxfp4" if expert_format == "fp4" else expert_format))
        return out
    rel = names.release_name(ours)
    if names.linear_kind(rel) is not None:
        out.update(_quantized(rel, t, "fp8"))
    elif ours.endswith("tid2eid"):
        out[rel] = t.to(torch.int64)
    elif rel.split(".")[-1] in FLOAT32_LEAVES or "hc_" in rel:
        out[rel] = t.float()
    else:
        out[rel] = t.to(torch.bfloat16)
    return out


def write_random_checkpoint(config, path: str | Path, shard_bytes: int = 4 << 30, seed: int = 0) -> Path:
    """A checkpoint of `config`'s shapes in the shipped formats with random codes, written without
    building the model or quantizing anything (for load benchmarks at real sizes): Hugging Face layout,
    shards of about `shard_bytes`, one shard in host memory at a time. FP8 / MXFP4 codes are slices of
    one random byte pool (FP8 NaN codes cleared), scales 2^-8 (FP8) / 2^-2 (MXFP4); other tensors as
    `shipped_tensors` writes them, from N(0, 1/fan_in) values."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        shapes = Transformer(config, seed=None).state_dict()
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randint(-128, 128, (1 << 26,), generator=gen, dtype=torch.int8)
    pool_fp8 = torch.where((pool & 0x7F) == 0x7F, torch.zeros_like(pool), pool).view(torch.float8_e4m3fn)
    cursor = [0]

    def codes(shape, fp8: bool) -> torch.Tensor:
        n = math.prod(shape)
        src = pool_fp8 if fp8 else pool
        start = cursor[0] = (cursor[0] + 4099) % (len(pool) - 1)
        reps = -(-(start + n) // len(src))
        return src.repeat(reps)[start:start + n].reshape(shape) if reps > 1 else src[start:start + n].reshape(shape).clone()

    def scales(shape, exponent: int) -> torch.Tensor:
        return torch.full(shape, exponent + 127, dtype=torch.uint8).view(torch.float8_e8m0fnu)

    weight_map, shard, shard_size, files, total = {}, {}, 0, [], 0

    def flush():
        nonlocal shard, shard_size
        if shard:
            file = f"model-{len(files) + 1:05d}.safetensors"
            _save(path / file, shard)
            files.append(file)
            weight_map.update({k: file for k in shard})
            shard, shard_size = {}, 0

    for ours, meta in shapes.items():
        out: dict[str, torch.Tensor] = {}
        if names.is_stacked_experts(ours):
            n, k = meta.shape[1:]
            for rel in names.expert_release_names(ours, config.n_routed_experts):
                out[rel] = codes((n, k // 2), fp8=False)
                out[rel[: -len(".weight")] + ".scale"] = scales((n, k // MXFP4_BLOCK), -2)
        elif names.linear_kind(names.release_name(ours)) is not None:
            rel = names.release_name(ours)
            out[rel] = codes(tuple(meta.shape), fp8=True)
            out[rel[: -len(".weight")] + ".scale"] = scales(fp8_weight_scale_shape(*meta.shape), -8)
        elif ours.endswith("tid2eid"):
            t = torch.rand(config.vocab_size, config.n_routed_experts, generator=gen).argsort(-1)
            out = _shipped(ours, t[:, :config.n_activated_experts].contiguous(), config.n_routed_experts, "fp4")
        else:
            t = torch.randn(meta.shape, generator=gen) * (meta.shape[-1] ** -0.5 if meta.dim() > 1 else 0.1)
            out = _shipped(ours, t, config.n_routed_experts, "fp4")
        for rel, value in out.items():
            shard[rel] = value
            shard_size += value.numel() * value.element_size()
            total += value.numel() * value.element_size()
        if shard_size >= shard_bytes:
            flush()
    flush()
    n = len(files)
    renamed = {f: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, f in enumerate(files)}
    for old, new in renamed.items():
        os.replace(path / old, path / new)
    weight_map = {k: renamed[f] for k, f in weight_map.items()}
    _write_text(path / INDEX_FILE, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    _write_text(path / "config.json", json.dumps(release_config_dict(config, "fp8", "fp4"), indent=2))
    return path


def _quantized(rel: str, w: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
    scale_name = rel[: -len(".weight")] + ".scale"
    if fmt == "fp8":
        codes, scale = quantize_fp8_weight(w)
    elif fmt == "mxfp4":
        codes, scale = quantize_mxfp4(w)
    elif fmt == "bf16":
        return {rel: w.to(torch.bfloat16)}
    else:
        raise ValueError(f"expert_format {fmt!r}: accepted: fp4, fp8, bf16")
    return {rel: codes, scale_name: scale}


def write_checkpoint(model: Transformer, path: str | Path, layout: str = "huggingface", shards: int = 2, mp: int = 1,
                     expert_format: str = "fp4", with_config: bool = True) -> Path:
    """Write `model` at `path` (created; must not hold a checkpoint already) -> path.

    shards: files of the Hugging Face layout (tensors dealt out in name order, at least one each);
    mp: ranks of the inference layout (split dims must divide by mp, into whole 128-row/column tiles
    for FP8 tensors; n_routed_experts must divide by mp).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}: accepted: {', '.join(LAYOUTS)}")
    path = Path(path)
    if any(path.glob("*.safetensors")):
        raise ValueError(f"{path}: already holds a checkpoint; write into an empty folder")
    # everything that can refuse the model before anything is written: a model refused leaves no folder
    tensors = shipped_tensors(model, expert_format)
    ranks = _mp_split(tensors, mp, model.config.n_routed_experts) if layout == "inference" else []
    path.mkdir(parents=True, exist_ok=True)
    if layout == "huggingface":
        names_sorted = sorted(tensors)
        n = max(1, min(shards, len(names_sorted)))
        files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        per_file = -(-len(names_sorted) // n)
        for i, file in enumerate(files):
            part = names_sorted[i * per_file:(i + 1) * per_file]
            _save(path / file, {k: tensors[k] for k in part})
            weight_map.update({k: file for k in part})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        _write_text(path / INDEX_FILE, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    else:
        for rank, part in enumerate(ranks):
            _save(path / f"model{rank}-mp{mp}.safetensors", part)
    if with_config:
        data = release_config_dict(model.config, "fp8", expert_format)
        _write_text(path / "config.json", json.dumps(data, indent=2))
    return path


def _mp_split(tensors: dict[str, torch.Tensor], mp: int, n_experts: int) -> list[dict[str, torch.Tensor]]:
    if n_experts % mp:
        raise ValueError(f"mp {mp}: must divide n_routed_experts ({n_experts})")
    per_rank = n_experts // mp
    ranks: list[dict[str, torch.Tensor]] = [{} for _ in range(mp)]
    for rel, t in tensors.items():
        expert = _expert_index(rel)
        if expert is not None:
            ranks[expert // per_rank][rel] = t
            continue
        dim = names.mp_split_dim(rel)
        if dim is None or mp == 1:
            for r in ranks:
                r[rel] = t
            continue
        if t.shape[dim] % mp:
            raise ValueError(f"mp {mp}: {rel} dim {dim} of size {t.shape[dim]} does not split into {mp} ranks")
        if rel.endswith(".weight") and t.dtype == torch.float8_e4m3fn and (t.shape[dim] // mp) % 128:
            raise ValueError(f"mp {mp}: {rel} (FP8) would split inside its 128-wide scale tiles")
        for r, piece in zip(ranks, t.chunk(mp, dim=dim)):
            r[rel] = piece.contiguous()
    return ranks


def _expert_index(rel: str) -> int | None:
    parts = rel.split(".")
    if len(parts) > 4 and parts[2] == "ffn" and parts[3] == "experts":
        return int(parts[4])
    return None


def _save(file: Path, tensors: dict[str, torch.Tensor]) -> None:
    tmp = file.with_name(file.name + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, file)


def _write_text(file: Path, text: str) -> None:
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, file)
