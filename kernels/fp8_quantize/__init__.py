"""FP8 e4m3 blockwise quantization (Triton) and its naive twins. This folder serves two ops:
`fp8_quantize` and its inverse `fp8_dequantize` (one config class, one tuned table entry: fp8_quantize),
and `fp8_round`, the two in one pass (a launcher, no op)."""
from .config import DEFAULT_CONFIGS, Fp8QuantConfig, default_config
from .fp8_quantize import fp8_dequantize, fp8_quantize, fp8_round

__all__ = ["DEFAULT_CONFIGS", "Fp8QuantConfig", "default_config", "fp8_dequantize", "fp8_quantize", "fp8_round"]
