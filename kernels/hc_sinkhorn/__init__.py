"""mHC kernels (Triton) and their naive twins. This folder serves two ops: `hc_sinkhorn` (Sinkhorn-Knopp
on n x n matrices) and `hc_pre` (the fused pre-mix, which runs the same Sinkhorn code); one config
class, HcConfig, with fields for each."""
from .config import DEFAULT_CONFIGS, HcConfig, default_config
from .hc_sinkhorn import hc_pre, hc_sinkhorn

__all__ = ["DEFAULT_CONFIGS", "HcConfig", "default_config", "hc_pre", "hc_sinkhorn"]
