"""Lightning-indexer top-k selection (Triton), the radix select over score rows, and their naive twins."""
from .config import DEFAULT_CONFIGS, IndexerTopkConfig, RadixTopkConfig, default_config
from .indexer_topk import indexer_topk
from .radix_topk import radix_topk

__all__ = ["DEFAULT_CONFIGS", "IndexerTopkConfig", "RadixTopkConfig", "default_config", "indexer_topk", "radix_topk"]
