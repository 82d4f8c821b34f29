"""Block-scaled FP8 linear (W8A8, DeepSeek's semantics; Triton) and its naive twin."""
from .config import DEFAULT_CONFIGS, Fp8LinearConfig, default_config
from .fp8_linear import fp8_linear

__all__ = ["DEFAULT_CONFIGS", "Fp8LinearConfig", "default_config", "fp8_linear"]
