"""Lightning-indexer top-k over the packed indexer key cache (Triton, decode path) and its naive twin."""
from .config import DEFAULT_CONFIGS, default_config
from .indexer_topk_cached import indexer_topk_cached

__all__ = ["DEFAULT_CONFIGS", "default_config", "indexer_topk_cached"]
