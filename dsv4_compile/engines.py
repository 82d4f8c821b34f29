"""The exportable engines that generate: prefill into the KV cache and one decode step, with the cache
as explicit state (the model's `KVCache` buffers, in `KVCache.named_tensors` order).

    prefill:  tokens [B, S] int64 (right-padded), lengths [B] int64, *cache -> logits [B, V] float32
              of each sequence's last real token; the cache holds the prompts (decode continues at
              lengths[b])
    decode:   tokens [B, 1] int64, positions [B] int64, *cache -> logits [B, V] float32; the token
              is written into the cache at its sequence's position

AOTInductor takes the cache buffers as inputs it updates in place (torch.export records the
mutation, the package writes into the caller's buffers); ONNX has no in-place update, so its engines
return the updated cache tensors after the logits (`functional=True`). B is dynamic in
[1, max_batch], S in [2, bucket]; the cache is sized for the bucket (the model is built with
max_seq_len = bucket).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .export import MIN_SEQ, ExportResult, example_tokens, export_program
from .model import KVCache

KINDS = ("prefill-cache", "decode")
# The FQN prefix of the model's tensors in the engine modules below (their `model` attribute).
MODEL_PREFIX = "model."


def cache_layout(config, batch: int = 1, bucket: int | None = None, device="meta") -> KVCache:
    """The cache of `batch` sequences of a bucket (meta: the layout only, nothing allocated)."""
    return KVCache(config, batch, bucket or config.max_seq_len, device=device)


def cache_manifest(config, bucket: int) -> dict:
    """The cache layout as the manifest records it: per tensor its name, shape with B first ("B"),
    dtype; and the bytes one sequence needs."""
    tensors = [{"name": name, "shape": ["B", *t.shape[1:]], "dtype": str(t.dtype).removeprefix("torch.")}
               for name, t in cache_layout(config, 1, bucket).named_tensors()]
    per_sequence = sum(t.numel() * t.element_size() for _, t in cache_layout(config, 1, bucket).named_tensors())
    return {"tensors": tensors, "bytes_per_sequence": per_sequence,
            "indexer_format": config.indexer_cache_format}


class PrefillIntoCache(nn.Module):
    """model.prefill over a right-padded batch, filling the cache given as tensors."""

    def __init__(self, model, functional: bool = False):
        super().__init__()
        self.model, self.functional = model, functional
        self.layout = cache_layout(model.config)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor, *cache: torch.Tensor):
        if self.functional:
            cache = tuple(t.clone() for t in cache)
        logits = self.model.prefill(tokens, self.layout.with_tensors(cache), lengths=lengths)
        return (logits, *cache) if self.functional else logits


class DecodeStep(nn.Module):
    """model.decode of one token per sequence at its own position, updating the cache tensors."""

    def __init__(self, model, functional: bool = False):
        super().__init__()
        self.model, self.functional = model, functional
        self.layout = cache_layout(model.config)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, *cache: torch.Tensor):
        if self.functional:
            cache = tuple(t.clone() for t in cache)
        logits = self.model.decode(tokens, positions, self.layout.with_tensors(cache))
        return (logits, *cache) if self.functional else logits


@dataclass
class EngineExport:
    kind: str                # "prefill-cache" or "decode"
    result: ExportResult
    example: tuple           # the example inputs (ONNX export traces them again)
    input_names: list[str]
    output_names: list[str]


def example_inputs(kind: str, config, batch: int, seq: int, device) -> tuple:
    """Inputs of an engine: a ragged prefill (lengths seq, seq-1, ...) or a decode step at mixed
    positions; a fresh cache."""
    cache = tuple(t for _, t in cache_layout(config, batch, device=device).named_tensors())
    if kind == "prefill-cache":
        tokens = example_tokens(config, batch, seq, device=device)
        lengths = torch.tensor([max(1, seq - i) for i in range(batch)], dtype=torch.int64, device=device)
        return (tokens, lengths, *cache)
    tokens = example_tokens(config, batch, 1, device=device)
    positions = torch.tensor([(7 * i + 3) % config.max_seq_len for i in range(batch)], dtype=torch.int64, device=device)
    return (tokens, positions, *cache)


def export_engine(model, kind: str, max_batch: int, functional: bool, gpu: str = "cpu", passes="all") -> EngineExport:
    """torch.export of the prefill or decode engine of `model` (built with max_seq_len = its bucket),
    dsv4 ops routed as export.export_table says. B dynamic in [1, max_batch] (static 1 when
    max_batch is 1), prefill S dynamic in [2, bucket]; the examples use B = 2 and S = bucket // 2
    so that neither is specialised."""
    from torch.export import Dim

    config = model.config
    bucket = config.max_seq_len
    device = next(iter(model.parameters())).device
    batch = min(2, max_batch)
    seq = max(MIN_SEQ + 1, bucket // 2) if kind == "prefill-cache" else 1
    example = example_inputs(kind, config, batch, seq, device)
    n_cache = len(example) - 2
    b = Dim("B", min=1, max=max_batch) if max_batch > 1 else None
    per_b = {0: b} if b is not None else None
    if kind == "prefill-cache":
        module = PrefillIntoCache(model, functional)
        first = {0: b, 1: Dim("S", min=MIN_SEQ, max=bucket)} if b is not None else {1: Dim("S", min=MIN_SEQ, max=bucket)}
        seq_range = (MIN_SEQ, bucket)
        names = ["tokens", "lengths"]
    elif kind == "decode":
        module = DecodeStep(model, functional)
        first = per_b
        seq_range = (1, 1)
        names = ["tokens", "positions"]
    else:
        raise ValueError(f"engine kind {kind!r}: accepted: {', '.join(KINDS)}")
    shapes = (first, per_b, (per_b,) * n_cache)  # the varargs *cache: one tuple
    program, kernels = export_program(module, example, shapes, gpu, passes)
    cache_names = [name for name, _ in cache_layout(config).named_tensors()]
    outputs = ["logits", *[f"new.{n}" for n in cache_names]] if functional else ["logits"]
    result = ExportResult(program, seq_range, (1 if max_batch > 1 else batch, max_batch), True, kernels)
    return EngineExport(kind, result, example, [*names, *cache_names], outputs)
