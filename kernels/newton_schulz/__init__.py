"""Newton-Schulz orthogonalisation (Muon) as batched Triton matmul kernels, and its naive twin."""
from .config import DEFAULT_CONFIGS, NewtonSchulzConfig, default_config
from .newton_schulz import fused_muon_step, newton_schulz

__all__ = ["DEFAULT_CONFIGS", "NewtonSchulzConfig", "default_config", "fused_muon_step", "newton_schulz"]
