"""Lightning-indexer top-k selection (Triton) and its naive twin."""
from .config import DEFAULT_CONFIGS, IndexerTopkConfig, default_config
from .indexer_topk import indexer_topk

__all__ = ["DEFAULT_CONFIGS", "IndexerTopkConfig", "default_config", "indexer_topk"]
