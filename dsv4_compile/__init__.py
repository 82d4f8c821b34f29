"""dsv4_compile: compile, tune and deploy DeepSeek-V4-style models.

Importing this package registers the `torch.ops.dsv4.*` ops of the plain model.
"""
import os as _os

# An install puts model/, kernels/ and tuning/ inside this package (setup.py); in a source checkout they
# sit beside it. Found that way, e.g. by `python -m dsv4_compile` in the checkout's root, the checkout
# runs as it is.
_CHECKOUT = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "model")) and _os.path.isfile(_os.path.join(_CHECKOUT, "setup.py")):
    __path__.append(_CHECKOUT)

from .model import (DSV4_NS_COEFFICIENTS, ConfigError, HybridOptimizer, KVCache, ModelConfig, Transformer, ops,
                    preset_names, split_params)
from .compile import compile, resolve_gpu  # noqa: A004  (dsv4_compile.compile is the function)
from .optim import Muon, deepseek_v4_optimizer
from .checkpoint import CheckpointError, from_pretrained
from .loader import ArtifactError, load

__all__ = ["DSV4_NS_COEFFICIENTS", "ArtifactError", "CheckpointError", "ConfigError", "HybridOptimizer", "KVCache", "ModelConfig", "Muon",
           "Transformer", "compile", "deepseek_v4_optimizer", "from_pretrained", "load", "ops", "preset_names", "resolve_gpu",
           "split_params"]
