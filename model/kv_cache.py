"""The KV cache in the production layout: real uint8 buffers (see kv_layout for the bytes).

Per attention layer (main layers, then MTP blocks):
- `main` [B, window + max_seq_len // ratio, main_entry_bytes]: slots [0, window) are a ring of the
  last `window` raw tokens (slot = position % window); slot window + i holds compressed entry i.
- `index` [B, max_seq_len // 4, indexer_entry_bytes]: CSA layers' indexer keys.
- compressor state, float32: the projections (kv and gate score + positional bias) of the tokens the
  next entries still need: the last 2*ratio tokens for CSA (overlapping blocks), the last ratio for
  HCA; row = position % rows. The indexer's compressor has its own.
Built on the meta device it allocates nothing and serves the accounting (`nbytes_by_kind`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch

from .config import ModelConfig
from .kv_layout import indexer_entry_bytes, main_entry_bytes


@dataclass
class CompressorState:
    kv: torch.Tensor     # [B, rows, C] float32
    score: torch.Tensor  # [B, rows, C] float32, -inf where no token was written yet


@dataclass
class LayerKVCache:
    ratio: int
    main: torch.Tensor
    index: torch.Tensor | None = None
    index_format: str = "fp4"
    compressor: CompressorState | None = None
    index_compressor: CompressorState | None = None


def _compressor_state(batch: int, ratio: int, width: int, device) -> CompressorState:
    overlap = ratio == 4
    rows, channels = (2 * ratio, 2 * width) if overlap else (ratio, width)
    return CompressorState(
        kv=torch.zeros(batch, rows, channels, dtype=torch.float32, device=device),
        score=torch.full((batch, rows, channels), float("-inf"), dtype=torch.float32, device=device),
    )


class KVCache:
    """All layers' caches for `batch_size` sequences of up to `max_seq_len` tokens."""

    def __init__(self, config: ModelConfig, batch_size: int, max_seq_len: int | None = None,
                 device: torch.device | str = "cpu", indexer_format: str | None = None):
        self.config = config
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len or config.max_seq_len
        self.indexer_format = indexer_format or config.indexer_cache_format
        for r in set(config.compress_ratios) - {0}:
            if self.max_seq_len % r:
                raise ValueError(f"KVCache: max_seq_len {self.max_seq_len} must be a multiple of compress ratio {r}")
        main_bytes = main_entry_bytes(config.head_dim, config.rope_head_dim)
        index_bytes = indexer_entry_bytes(config.index_head_dim, self.indexer_format)
        self.layers: list[LayerKVCache] = []
        for ratio in config.layer_ratios:
            slots = config.window_size + (self.max_seq_len // ratio if ratio else 0)
            layer = LayerKVCache(ratio, torch.zeros(batch_size, slots, main_bytes, dtype=torch.uint8, device=device))
            if ratio:
                layer.compressor = _compressor_state(batch_size, ratio, config.head_dim, device)
            if ratio == 4:
                layer.index_format = self.indexer_format
                layer.index = torch.zeros(batch_size, self.max_seq_len // 4, index_bytes, dtype=torch.uint8, device=device)
                layer.index_compressor = _compressor_state(batch_size, ratio, config.index_head_dim, device)
            self.layers.append(layer)

    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """Every buffer, named, in a fixed order (layer by layer: main, compressor kv/score, index,
        index compressor kv/score): the explicit state of the exported engines."""
        out = []
        for i, layer in enumerate(self.layers):
            out.append((f"layers.{i}.main", layer.main))
            for part, state in (("compressor", layer.compressor), ("index_compressor", layer.index_compressor)):
                if part == "index_compressor" and layer.index is not None:
                    out.append((f"layers.{i}.index", layer.index))
                if state is not None:
                    out += [(f"layers.{i}.{part}.kv", state.kv), (f"layers.{i}.{part}.score", state.score)]
        return out

    def with_tensors(self, tensors: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> "KVCache":
        """A cache of this one's layout holding `tensors` (in `named_tensors` order; not copied)."""
        names = [name for name, _ in self.named_tensors()]
        if len(tensors) != len(names):
            raise ValueError(f"KVCache.with_tensors: {len(tensors)} tensors, the layout has {len(names)}")
        by_name = dict(zip(names, tensors))
        cache = copy.copy(self)
        cache.batch_size = tensors[0].shape[0]
        cache.layers = []
        for i, layer in enumerate(self.layers):
            def state(part: str, old: CompressorState | None) -> CompressorState | None:
                return None if old is None else CompressorState(by_name[f"layers.{i}.{part}.kv"],
                                                                by_name[f"layers.{i}.{part}.score"])

            cache.layers.append(replace(layer, main=by_name[f"layers.{i}.main"], index=by_name.get(f"layers.{i}.index"),
                                        compressor=state("compressor", layer.compressor),
                                        index_compressor=state("index_compressor", layer.index_compressor)))
        return cache

    def nbytes_by_kind(self) -> dict[str, int]:
        """Bytes of every buffer, split by what it holds and the layer type."""
        kinds = {0: "window", 4: "csa", 128: "hca"}
        out: dict[str, int] = {}

        def add(key: str, t: torch.Tensor | None) -> None:
            if t is not None:
                out[key] = out.get(key, 0) + t.numel() * t.element_size()

        window = self.config.window_size
        for layer in self.layers:
            kind = kinds[layer.ratio]
            entry = layer.main.shape[-1] * layer.main.shape[0]
            out[f"{kind}.window"] = out.get(f"{kind}.window", 0) + window * entry
            out[f"{kind}.compressed"] = out.get(f"{kind}.compressed", 0) + (layer.main.shape[1] - window) * entry
            add(f"{kind}.indexer", layer.index)
            for state in (layer.compressor, layer.index_compressor):
                if state is not None:
                    add(f"{kind}.compressor_state", state.kv)
                    add(f"{kind}.compressor_state", state.score)
        return out
