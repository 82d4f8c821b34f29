"""Compressor: gated softmax pooling -> RMSNorm -> RoPE -> FP8 / Hadamard+FP4 simulation (Triton) and
its naive twin."""
from .compress_kv import compress_kv
from .config import DEFAULT_CONFIGS, CompressKVConfig, default_config

__all__ = ["DEFAULT_CONFIGS", "CompressKVConfig", "compress_kv", "default_config"]
