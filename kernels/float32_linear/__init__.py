"""float32 linear of a bf16 input and a float32 weight on bf16 tensor cores (the weight split into three
exact bf16 pieces; Triton) and its naive twin."""
from .config import DEFAULT_CONFIGS, Float32LinearConfig, default_config
from .float32_linear import float32_linear

__all__ = ["DEFAULT_CONFIGS", "Float32LinearConfig", "default_config", "float32_linear"]
