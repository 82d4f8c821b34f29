"""mHC kernels (Triton): Sinkhorn-Knopp on n x n matrices and the fused hc_pre step; naive twins."""
from .config import DEFAULT_CONFIGS, HcConfig, default_config
from .hc_sinkhorn import hc_pre, hc_sinkhorn

__all__ = ["DEFAULT_CONFIGS", "HcConfig", "default_config", "hc_pre", "hc_sinkhorn"]
