"""`simulate_quantization=False`: the plain model without its FP8/FP4 activation rounding."""
from __future__ import annotations

import pytest
import torch

from dsv4_compile import ModelConfig, Transformer
from dsv4_compile.model.config import ConfigError
from helpers import rel_rms


def test_switch_changes_only_the_rounding():
    """Off, the logits move by about the FP8/FP4 rounding (not 0, not O(1)); every weight is the same."""
    tiny = ModelConfig.from_preset("tiny")
    on, off = Transformer(tiny, seed=0).eval(), Transformer(tiny.replace(simulate_quantization=False), seed=0).eval()
    assert all(torch.equal(a, b) for a, b in zip(on.state_dict().values(), off.state_dict().values()))
    tokens = torch.randint(0, tiny.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = rel_rms(on(tokens, all_logits=True), off(tokens, all_logits=True))
    assert 1e-4 < diff < 0.5, diff


def test_compress_kv_none_is_the_unrounded_entry():
    """quant="none" equals "fp8" up to FP8 rounding on the non-rope dims and BF16 on the rope dims."""
    g = torch.Generator().manual_seed(0)
    B, T, d, ratio, rope_pairs = 2, 16, 128, 4, 32
    kv, score = torch.randn(B, T, d, generator=g), torch.randn(B, T, d, generator=g)
    ape, w = torch.randn(ratio, d, generator=g), torch.rand(d, generator=g) + 0.5
    angles = torch.rand(T // ratio, rope_pairs, generator=g)
    args = (kv, score, ape, w, angles.cos(), angles.sin(), ratio, False, 1e-6)
    exact = torch.ops.dsv4.compress_kv(*args, "none")
    rounded = torch.ops.dsv4.compress_kv(*args, "fp8")
    assert not torch.equal(exact, rounded)
    nope = exact[..., :-2 * rope_pairs]
    assert ((rounded[..., :-2 * rope_pairs] - nope).abs() <= nope.abs() / 16 + 1e-6).all()  # e4m3: 3 mantissa bits
    assert torch.equal(rounded[..., -2 * rope_pairs:], exact[..., -2 * rope_pairs:].bfloat16().float())


def test_yaml_value_must_be_a_bool():
    with pytest.raises(ConfigError, match="simulate_quantization"):
        ModelConfig.from_dict({**ModelConfig.from_preset("tiny").to_dict(), "simulate_quantization": "no"})
