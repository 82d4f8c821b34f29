"""Typed model configuration with validation, loaded from YAML presets.

Field names follow DeepSeek's `ModelArgs` where one exists, so that a released config maps one to
one. Every check raises `ConfigError` with one line naming the key, the bad value and what is
accepted.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import ConfigError
from .release_config import read_release_file, release_fields

PRESET_DIR = Path(__file__).parent / "presets"
COMPRESS_RATIOS = (0, 4, 128)  # 0 = sliding window only, 4 = CSA, 128 = HCA
DTYPES = ("float32", "bfloat16")
INDEXER_CACHE_FORMATS = ("fp4", "fp8")


@dataclass(frozen=True)
class ModelConfig:
    # sizes
    vocab_size: int = 512
    dim: int = 64
    n_layers: int = 4
    n_heads: int = 4
    head_dim: int = 64
    rope_head_dim: int = 16
    q_lora_rank: int = 32
    o_groups: int = 2
    o_lora_rank: int = 32
    norm_eps: float = 1e-6
    # attention: one entry per main layer, the MTP block is window-only (its ratio 0 is implied)
    window_size: int = 8
    compress_ratios: tuple[int, ...] = (0, 4, 128, 4)
    # RoPE: window-only layers use rope_theta without YaRN; compressed layers compress_rope_theta + YaRN
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_factor: float = 16.0
    original_seq_len: int = 65536
    beta_fast: int = 32
    beta_slow: int = 1
    # lightning indexer (CSA layers)
    index_n_heads: int = 4
    index_head_dim: int = 32
    index_topk: int = 4
    indexer_cache_format: str = "fp4"
    # MoE
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    n_activated_experts: int = 2
    moe_inter_dim: int = 32
    route_scale: float = 1.5
    swiglu_limit: float = 10.0
    n_hash_layers: int = 3
    # mHC
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    # MTP
    n_mtp_layers: int = 1
    # runtime
    max_seq_len: int = 512
    max_batch_size: int = 2
    dtype: str = "float32"
    # False: the plain model skips its FP8/FP4 activation simulation (KV entries, indexer keys and
    # queries, the window rows' FP8/BF16 rounding): a diagnostic switch for comparisons that must be
    # exact up to fp32 rounding (compiled vs eager, parity with unquantized references). The KV cache's
    # byte layout stays FP8, so decoding from a cache is quantized either way.
    simulate_quantization: bool = True
    name: str = field(default="custom", compare=False)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict, name: str = "custom") -> "ModelConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"config: expected a mapping of keys to values, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in known:
                raise ConfigError(f"config key {key!r}: unknown key; accepted keys: {', '.join(sorted(known))}")
        hints = typing.get_type_hints(cls)
        values = {}
        for key, value in data.items():
            values[key] = _coerce(key, value, hints[key])
        values.setdefault("name", name)
        config = cls(**values)
        config.validate()
        return config

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r}: not found")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(path)!r}: not valid YAML ({str(err).splitlines()[0]})") from None
        return cls.from_dict(data or {}, name=path.stem)

    @classmethod
    def from_preset(cls, name: str) -> "ModelConfig":
        path = PRESET_DIR / f"{name}.yaml"
        if not path.is_file():
            raise ConfigError(f"preset {name!r}: unknown; accepted presets: {', '.join(preset_names())}")
        return cls.from_yaml(path)

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides) -> "ModelConfig":
        """The config of a released checkpoint: `path` is its folder (or its config.json), in the Hugging
        Face or DeepSeek inference key vocabulary (see `release_config`); `overrides` set fields after
        reading (runtime ones such as max_seq_len, or shapes for a test)."""
        data, name = read_release_file(path)
        return cls.from_dict({**release_fields(data).values, **overrides}, name=name)

    @classmethod
    def load(cls, preset_or_path: str) -> "ModelConfig":
        """A preset name (`tiny`) or a path to a YAML file."""
        if preset_or_path in preset_names():
            return cls.from_preset(preset_or_path)
        if preset_or_path.endswith((".yaml", ".yml")) or Path(preset_or_path).exists():
            return cls.from_yaml(preset_or_path)
        raise ConfigError(f"config {preset_or_path!r}: neither a preset ({', '.join(preset_names())}) nor a YAML file")

    def replace(self, **changes) -> "ModelConfig":
        config = dataclasses.replace(self, **changes)
        config.validate()
        return config

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["compress_ratios"] = list(self.compress_ratios)
        return data

    def config_hash(self) -> str:
        """sha256 of the sorted-key JSON of every field but the name."""
        data = self.to_dict()
        data.pop("name")
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    # ---- derived --------------------------------------------------------------------------
    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.rope_head_dim

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    @property
    def layer_ratios(self) -> tuple[int, ...]:
        """Compress ratio of every block, MTP blocks (window-only) last."""
        return tuple(self.compress_ratios) + (0,) * self.n_mtp_layers

    # ---- validation -----------------------------------------------------------------------
    def validate(self) -> None:
        def need(ok: bool, key: str, value, accepted: str) -> None:
            if not ok:
                raise ConfigError(f"config key {key!r}: value {value!r} is invalid; {accepted}")

        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and f.name not in ("n_hash_layers", "n_mtp_layers"):
                need(value > 0, f.name, value, "must be > 0")
        need(self.n_hash_layers >= 0, "n_hash_layers", self.n_hash_layers, "must be >= 0")
        need(self.n_mtp_layers >= 0, "n_mtp_layers", self.n_mtp_layers, "must be >= 0")
        need(len(self.compress_ratios) == self.n_layers, "compress_ratios", list(self.compress_ratios),
             f"needs one ratio per layer (n_layers = {self.n_layers})")
        for r in self.compress_ratios:
            need(r in COMPRESS_RATIOS, "compress_ratios", list(self.compress_ratios), f"each ratio must be one of {COMPRESS_RATIOS}")
        need(self.rope_head_dim % 2 == 0 and self.rope_head_dim < self.head_dim, "rope_head_dim", self.rope_head_dim,
             f"must be even and < head_dim ({self.head_dim})")
        need(self.nope_head_dim % 64 == 0, "head_dim", self.head_dim,
             f"head_dim - rope_head_dim must be a multiple of the FP8 block 64 (is {self.nope_head_dim})")
        need(self.rope_head_dim <= self.index_head_dim, "index_head_dim", self.index_head_dim,
             f"must be >= rope_head_dim ({self.rope_head_dim})")
        need(self.index_head_dim % 32 == 0 and _is_pow2(self.index_head_dim), "index_head_dim", self.index_head_dim,
             "must be a power of two (Hadamard rotation) and a multiple of the FP4 block 32")
        need(self.n_heads % self.o_groups == 0, "o_groups", self.o_groups, f"must divide n_heads ({self.n_heads})")
        need(self.n_activated_experts <= self.n_routed_experts, "n_activated_experts", self.n_activated_experts,
             f"must be <= n_routed_experts ({self.n_routed_experts})")
        need(self.n_shared_experts == 1, "n_shared_experts", self.n_shared_experts, "DeepSeek-V4 has exactly 1 shared expert")
        need(self.n_hash_layers <= self.n_layers, "n_hash_layers", self.n_hash_layers, f"must be <= n_layers ({self.n_layers})")
        need(self.dtype in DTYPES, "dtype", self.dtype, f"accepted: {', '.join(DTYPES)}")
        need(self.indexer_cache_format in INDEXER_CACHE_FORMATS, "indexer_cache_format", self.indexer_cache_format,
             f"accepted: {', '.join(INDEXER_CACHE_FORMATS)}")
        for r in set(self.compress_ratios) - {0}:
            need(self.max_seq_len % r == 0, "max_seq_len", self.max_seq_len, f"must be a multiple of every compress ratio ({r})")
        need(self.max_seq_len >= self.window_size, "max_seq_len", self.max_seq_len, f"must be >= window_size ({self.window_size})")


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _coerce(key: str, value, hint):
    """Check a YAML value against the dataclass type; ints are accepted where floats are."""
    origin = typing.get_origin(hint)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"config key {key!r}: value {value!r} has the wrong type; expected a list of integers")
        return tuple(value)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str) and isinstance(value, hint) and not isinstance(value, bool):
        return value
    if hint is bool and isinstance(value, bool):
        return value
    raise ConfigError(f"config key {key!r}: value {value!r} has the wrong type; expected {hint.__name__}")
