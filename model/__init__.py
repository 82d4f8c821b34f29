"""The plain eager DeepSeek-V4 reference: configs, layers, the op boundary, the KV cache and Muon.

Knows nothing of Triton or compilation. Importing it registers the `torch.ops.dsv4.*` ops.
"""
from . import moe_ops, ops  # noqa: F401  (register torch.ops.dsv4.*)
from .config import ConfigError, ModelConfig, preset_names
from .kv_cache import KVCache
from .muon import DSV4_NS_COEFFICIENTS, HybridOptimizer, Muon, deepseek_v4_optimizer, split_params
from .transformer import Transformer
