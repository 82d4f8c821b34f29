"""Routed MoE experts as two grouped GEMM launches over tokens sorted by expert (float, FP8 and MXFP4
expert weights), and its naive twin. One kernel serves the five ops moe_experts, moe_experts_fp8,
moe_experts_fp8_w8a8, moe_experts_mxfp4 and moe_experts_mxfp4_w4a8 (the weight format and FP8 activations are
launch constants)."""
from .config import DEFAULT_CONFIGS, MoeExpertsConfig, default_config
from .moe_experts import WEIGHT_FORMATS, moe_experts

__all__ = ["DEFAULT_CONFIGS", "MoeExpertsConfig", "WEIGHT_FORMATS", "default_config", "moe_experts"]
