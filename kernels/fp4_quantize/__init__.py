"""FP4 e2m1 blockwise quantization, two codes per byte (Triton) and its naive twins. This folder serves
two ops: `fp4_quantize` and its inverse `fp4_dequantize` (one config class)."""
from .config import DEFAULT_CONFIGS, Fp4QuantConfig, default_config
from .fp4_quantize import fp4_dequantize, fp4_quantize

__all__ = ["DEFAULT_CONFIGS", "Fp4QuantConfig", "default_config", "fp4_dequantize", "fp4_quantize"]
