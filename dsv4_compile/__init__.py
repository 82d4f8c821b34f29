"""dsv4_compile: compile, tune and deploy DeepSeek-V4-style models.

Importing this package registers the `torch.ops.dsv4.*` ops of the plain model.
"""
from .model import ConfigError, KVCache, ModelConfig, Transformer, ops, preset_names
from .compile import compile, resolve_gpu  # noqa: A004  (dsv4_compile.compile is the function)

__all__ = ["ConfigError", "KVCache", "ModelConfig", "Transformer", "compile", "ops", "preset_names", "resolve_gpu"]
from .loader import ArtifactError, load  # noqa: E402  (build loader: dsv4_compile/loader.py)

__all__ += ["ArtifactError", "load"]
