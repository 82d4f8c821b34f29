"""FP8 e4m3 blockwise quantize / dequantize (Triton) and their naive twins."""
from .config import DEFAULT_CONFIGS, Fp8QuantConfig, default_config
from .fp8_quant import fp8_dequantize, fp8_quantize

__all__ = ["DEFAULT_CONFIGS", "Fp8QuantConfig", "default_config", "fp8_dequantize", "fp8_quantize"]
