"""Newton-Schulz orthogonalisation (Muon) as batched Triton matmul kernels, and its naive twin."""
from .config import DEFAULT_CONFIGS, NewtonSchulzConfig, default_config
from .newton_schulz import newton_schulz

__all__ = ["DEFAULT_CONFIGS", "NewtonSchulzConfig", "default_config", "newton_schulz"]
