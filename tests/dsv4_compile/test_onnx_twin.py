"""ONNX engines compute in float32 (onnxruntime's CPU provider has no bf16 GEMM): a bf16 model is
exported as its float32 twin, which must hold exactly the bf16 weight values."""
from __future__ import annotations

import torch

from dsv4_compile import ModelConfig
from dsv4_compile.reference import eager_model, float32_twin
from dsv4_compile.export import example_tokens
from dsv4_compile.verify import FLIP_BOUND
from helpers import assert_close


def test_float32_twin_holds_the_bf16_weights_and_tracks_the_bf16_model():
    config = ModelConfig.load("tiny").replace(dtype="bfloat16", max_seq_len=128)
    model = eager_model(config, seed=0, state=None, cuda=False)
    twin = float32_twin(model, cuda=False)
    assert twin.config.dtype == "float32"
    state, twin_state = model.state_dict(), twin.state_dict()
    assert state.keys() == twin_state.keys()
    for name, value in state.items():
        expected = value.float() if value.is_floating_point() else value
        assert torch.equal(twin_state[name], expected), name
        assert twin_state[name].dtype == expected.dtype, name
    tokens = example_tokens(config, 1, 16, seed=1)
    with torch.no_grad():
        # The twin differs from the bf16 model by the bf16 rounding of every activation, which also
        # moves FP8/FP4 codes across rounding boundaries: end to end that is a few 1e-2 (3.3e-2 here),
        # the size verify allows for code flips in bf16 (FLIP_BOUND). A wrong weight would be O(1).
        assert_close("float32 twin vs bf16 model", model(tokens).float(), twin(tokens), FLIP_BOUND["bfloat16"])


def test_float32_model_is_its_own_twin():
    model = eager_model(ModelConfig.load("tiny").replace(max_seq_len=128), seed=0, state=None, cuda=False)
    assert float32_twin(model, cuda=False) is model
