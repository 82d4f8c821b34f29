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


def _key(default, doc: str):
    """A config key: its default and its meaning (`keys_reference` prints them; docs/CONFIG.md)."""
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class ModelConfig:
    """The model's shape and runtime limits. Every key of a YAML config is a field here; the defaults
    make a small valid model (an empty YAML file loads). See `keys_reference()` for each key's meaning."""

    # sizes
    vocab_size: int = _key(512, "vocabulary size: token ids are 0 .. vocab_size - 1")
    dim: int = _key(64, "hidden size of the residual streams")
    n_layers: int = _key(4, "main transformer blocks (the MTP blocks come on top)")
    n_heads: int = _key(4, "query heads of the attention")
    head_dim: int = _key(80, "width of each query head and of the shared key/value head: FP8 dims + rope dims; "
                             "head_dim - rope_head_dim must be a multiple of 64")
    rope_head_dim: int = _key(16, "the last dims of each head that get RoPE (even, < head_dim)")
    q_lora_rank: int = _key(32, "rank of the low-rank query projection (wq_a -> norm -> wq_b)")
    o_groups: int = _key(2, "groups of the grouped low-rank output projection (divides n_heads)")
    o_lora_rank: int = _key(32, "rank of each output-projection group")
    norm_eps: float = _key(1e-6, "RMSNorm epsilon")
    # attention: one entry per main layer, the MTP block is window-only (its ratio 0 is implied)
    window_size: int = _key(8, "tokens of each layer's causal sliding window (V4: 128)")
    compress_ratios: tuple[int, ...] = _key((0, 4, 128, 4), "per main layer: 0 window only, 4 CSA (indexer "
                                            "top-k of 4x-compressed entries), 128 HCA (all 128x-compressed entries)")
    # RoPE: window-only layers use rope_theta without YaRN; compressed layers compress_rope_theta + YaRN
    rope_theta: float = _key(10000.0, "RoPE base of window-only layers (no YaRN)")
    compress_rope_theta: float = _key(160000.0, "RoPE base of compressed layers (with YaRN)")
    rope_factor: float = _key(16.0, "YaRN scaling factor")
    original_seq_len: int = _key(65536, "YaRN's original context length")
    beta_fast: int = _key(32, "YaRN beta_fast")
    beta_slow: int = _key(1, "YaRN beta_slow")
    # lightning indexer (CSA layers)
    index_n_heads: int = _key(4, "heads of the lightning indexer (CSA layers)")
    index_head_dim: int = _key(32, "indexer head width: a power of two, a multiple of 32, >= rope_head_dim")
    index_topk: int = _key(4, "compressed entries each query attends to in CSA layers")
    indexer_cache_format: str = _key("fp4", "indexer keys in the KV cache: fp4 or fp8")
    # MoE
    n_routed_experts: int = _key(8, "routed experts per MoE layer")
    n_shared_experts: int = _key(1, "shared experts per MoE layer (DeepSeek-V4: exactly 1)")
    n_activated_experts: int = _key(2, "routed experts each token uses (top-k)")
    moe_inter_dim: int = _key(32, "hidden size of each expert's SwiGLU")
    route_scale: float = _key(1.5, "routed scaling of the expert weights")
    swiglu_limit: float = _key(10.0, "SwiGLU clamp (up to +-limit, gate to <= limit)")
    n_hash_layers: int = _key(3, "first layers that route by a fixed token-id hash table instead of scores")
    # mHC
    hc_mult: int = _key(4, "residual streams of the hyper-connections (mHC)")
    hc_sinkhorn_iters: int = _key(20, "Sinkhorn-Knopp rounds of the mHC mixing matrix")
    hc_eps: float = _key(1e-6, "epsilon added to mHC's pre weights")
    # MTP
    n_mtp_layers: int = _key(1, "multi-token-prediction blocks (window-only), 0 for none")
    # runtime
    max_seq_len: int = _key(512, "longest sequence: a multiple of every compress ratio (the context bucket of a build)")
    max_batch_size: int = _key(2, "largest batch a model, its KV cache and its engines take")
    dtype: str = _key("float32", "parameter and activation dtype: float32 or bfloat16")
    simulate_quantization: bool = _key(True, "False skips the plain model's FP8/FP4 activation simulation (a diagnostic for "
                                            "comparisons exact up to fp32 rounding); the KV cache's byte layout stays FP8")
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
    def from_yaml(cls, path: str | Path, _chain: tuple[Path, ...] = ()) -> "ModelConfig":
        """A YAML file of config keys (`keys_reference()`); `base: <preset or YAML file>` starts from that
        config (a relative path is relative to this file's folder) and the file's other keys override it."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r}: not found")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(path)!r}: not valid YAML ({str(err).splitlines()[0]})") from None
        data = {} if data is None else data
        if isinstance(data, dict) and "base" in data:
            data = {**cls._base_values(data.pop("base"), path, _chain), **data}
        return cls.from_dict(data, name=path.stem)

    @classmethod
    def _base_values(cls, base, path: Path, chain: tuple[Path, ...]) -> dict:
        """The keys of config `base` named in the YAML file `path` (preset name or YAML path)."""
        chain = (*chain, path.resolve())
        if not isinstance(base, str) or not base.strip():
            raise ConfigError(f"config key 'base' in {str(path)!r}: {base!r} is not a preset name or a YAML file")
        if base in preset_names():
            target = PRESET_DIR / f"{base}.yaml"
        else:
            target = Path(base) if Path(base).is_absolute() else path.parent / base
            if not target.is_file():
                raise ConfigError(f"config key 'base' in {str(path)!r}: {base!r} is neither a preset "
                                  f"({', '.join(preset_names())}) nor a YAML file")
        if target.resolve() in chain:
            raise ConfigError(f"config key 'base' in {str(path)!r}: {base!r} is part of a cycle of bases")
        values = cls.from_yaml(target, chain).to_dict()
        values.pop("name")
        return values

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


def keys_reference() -> str:
    """Every key of a YAML config, from the dataclass: name, type, default and meaning (docs/CONFIG.md)."""
    hints = typing.get_type_hints(ModelConfig)
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |",
            "| base | str | - | a preset or a YAML file to start from; the file's other keys override it |"]
    for f in dataclasses.fields(ModelConfig):
        if "doc" in f.metadata:
            kind = "list of int" if typing.get_origin(hints[f.name]) is tuple else hints[f.name].__name__
            default = list(f.default) if isinstance(f.default, tuple) else f.default
            rows.append(f"| {f.name} | {kind} | {default} | {f.metadata['doc']} |")
    return "\n".join(rows) + "\n"


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
