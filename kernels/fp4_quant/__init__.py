"""FP4 e2m1 blockwise quantize (two codes per byte) / dequantize (Triton) and their naive twins."""
from .config import DEFAULT_CONFIGS, Fp4QuantConfig, default_config
from .fp4_quant import fp4_dequantize, fp4_quantize

__all__ = ["DEFAULT_CONFIGS", "Fp4QuantConfig", "default_config", "fp4_dequantize", "fp4_quantize"]
