"""Launch parameters of the cached indexer top-k: indexer_topk's config class (IndexerTopkConfig,
kernels/indexer_topk/config.py; the cached op runs that launcher) with defaults of its own, for decode
(one query a sequence, up to N = 32K keys at 128K context)."""
from __future__ import annotations

from .._common import pick_default
from ..indexer_topk.config import IndexerTopkConfig

# Decode has B blocks of one query: the fused "threshold" kernel runs B programs, each over all N keys
# (at B = 1 one SM scans 32K keys). selection="radix" splits each query's key tiles over enough programs
# to fill the GPU (the score kernel's key splits, kernels/indexer_topk/DESIGN.md) and then selects from
# the [B, N] fp32 scores (8 MB at B 64, N 32K, beside the 142 MB of FP4 keys read). block_s 1: a second
# query slot would be padding. score_mma stays bf16: the FP8 MMA needs row-scaled e4m3 operands that
# the launcher would have to write from the cache (refused for the cached op). block_n 64: compiled
# offline for sm_90a (Triton 3.9) at B 64, N 32K, the radix score kernel over FP4 keys takes 110
# registers a thread at 8 warps (2 CTAs a SM, no spills) against 248 at block_n 128 (1 CTA); FP8 keys
# 222 (no spills). Untimed: the GPU's bench and tuner (tuning/spaces/indexer_topk_cached.py) decide.
DEFAULT_CONFIGS: dict[str, IndexerTopkConfig] = {
    "interpreter": IndexerTopkConfig(block_s=1, block_n=16, buffer_factor=2, selection="radix", num_warps=4,
                                     num_stages=1),
    "H100": IndexerTopkConfig(block_s=1, block_n=64, buffer_factor=4, selection="radix", num_warps=8, num_stages=2),
    "H200": IndexerTopkConfig(block_s=1, block_n=64, buffer_factor=4, selection="radix", num_warps=8, num_stages=2),
    "generic": IndexerTopkConfig(block_s=1, block_n=64, buffer_factor=2, selection="radix", num_warps=4, num_stages=2),
}


def default_config(gpu_name: str | None = None) -> IndexerTopkConfig:
    """The default for a GPU name (e.g. 'NVIDIA H100 80GB HBM3'); None = the current device."""
    return pick_default(DEFAULT_CONFIGS, gpu_name)
