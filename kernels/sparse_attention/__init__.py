"""Sparse attention over one shared K=V head with an attention sink (Triton) and its naive twin. Its
config class and per-GPU defaults also serve `sparse_attention_cached` (the decode kernel, which
reuses this launcher)."""
from .config import (DECODE_DEFAULT_CONFIGS, DEFAULT_CONFIGS, SMALL_HEAD_DEFAULT_CONFIGS, SparseAttentionConfig,
                     decode_default_config, default_config)
from .sparse_attention import flops, sparse_attention

__all__ = ["DECODE_DEFAULT_CONFIGS", "DEFAULT_CONFIGS", "SMALL_HEAD_DEFAULT_CONFIGS", "SparseAttentionConfig", "decode_default_config",
           "default_config", "flops", "sparse_attention"]
