"""Sparse attention over the FP8 KV cache (Triton, decode path) and its naive twin."""
from .config import auto_config, auto_splits, entry_layout
from .sparse_attention_cached import cache_bytes_read, sparse_attention_cached

__all__ = ["auto_config", "auto_splits", "cache_bytes_read", "entry_layout", "sparse_attention_cached"]
