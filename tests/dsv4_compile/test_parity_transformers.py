"""Parity with transformers' DeepseekV4ForCausalLM (pinned in the test extra): a tiny random model
saved with save_pretrained, loaded by dsv4_compile.from_pretrained, gives the same logits.

The model covers a window-only layer, two CSA layers (indexer top-k) and an HCA layer, hash-routed
and scored MoE layers, mHC, and a 160-token prompt: longer than the 8-token window and than the
HCA ratio 128, so every kind of attention entry is used. All weights random (transformers initialises
some to 0 or 1; the hash table to all zeros), so that no term hides.

Tolerances (relative RMS of all positions' logits):
- our FP8/FP4 activation simulation off: 1e-5, float32 summation order only (measured 1.2e-6). The
  indexer has 32 heads so that no index score is exactly 0 (all heads' ReLU at 0): such ties at the
  k-th place are broken differently (our indexer_topk: lowest index first, its documented contract;
  transformers and DeepSeek: torch.topk's unspecified order), which with 4 heads moved picks from
  position ~74 on and gave 6e-2.
- on: transformers simulates nothing, so the difference is the simulation itself: FP8 e4m3 rounding
  (relative 2^-4 per element) of the KV non-rope dims and FP4 e2m1 (2^-2) of the indexer's queries and
  keys, and the expert and top-k picks those roundings flip in a random 4-layer model (a flipped
  scored-MoE pick changes a token's FFN output entirely). Measured 0.28 relative RMS over the 160
  positions (0.11 over the first 16); bounded by 0.4 here, and required to exceed 1e-3 (the simulation
  is on). DESIGN.md's 1.2e-4 needs DeepSeek's quantization on both sides, which transformers lacks.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import dsv4_compile as d
from helpers import assert_close, rel_rms

import transformers  # noqa: E402,F401  (pinned in the test extra; its absence is a failure, not a skip)

S = 160
LAYER_TYPES = ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
               "compressed_sparse_attention"]


def tiny_transformers_model():
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    cfg = DeepseekV4Config(
        vocab_size=256, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=4, num_attention_heads=4,
        head_dim=96, q_lora_rank=32, partial_rotary_factor=32 / 96, num_experts_per_tok=2, n_routed_experts=8,
        routed_scaling_factor=1.5, max_position_embeddings=512, layer_types=LAYER_TYPES,
        mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe"], sliding_window=8, o_groups=2, o_lora_rank=32,
        index_n_heads=32, index_head_dim=32, index_topk=4, num_nextn_predict_layers=1,
        rope_parameters={"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 65536,
                         "beta_fast": 32, "beta_slow": 1})
    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".fn") or name.endswith("hc_fn"):  # mHC maps small, as trained ones (our init too)
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 * p.shape[-1] ** -0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (p.shape[-1] ** -0.5 if p.dim() > 1 else 0.5))
        for name, b in model.named_buffers():
            if name.endswith("tid2eid"):
                b.copy_(torch.rand(cfg.vocab_size, cfg.n_routed_experts, generator=g).argsort(-1)[:, :2])
            elif name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = tiny_transformers_model()
    path = tmp_path_factory.mktemp("hf_tiny")
    model.save_pretrained(path)
    tokens = torch.randint(0, 256, (2, S), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(tokens).logits.float()
    return path, tokens, logits


def ours(path, **overrides):
    config = d.ModelConfig.from_pretrained(path, **overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no MTP tensors in a transformers checkpoint: MTP off (tested elsewhere)
        return d.from_pretrained(path, config=config, dtype="float32")


def test_config_and_layer_kinds_come_through(saved):
    path, _, _ = saved
    model = ours(path)
    assert model.config.compress_ratios == (0, 4, 128, 4) and model.config.n_hash_layers == 2
    assert model.config.n_mtp_layers == 0 and model.checkpoint.notes  # transformers drops MTP: said so
    assert model.config.window_size == 8 and model.config.rope_head_dim == 32


def test_logits_match_with_simulation_off(saved):
    path, tokens, ref = saved
    model = ours(path, simulate_quantization=False)
    with torch.no_grad():
        out = model(tokens, all_logits=True)
    assert_close("logits vs transformers (simulation off)", ref, out, 1e-5)


def test_logits_close_with_simulation_on(saved):
    path, tokens, ref = saved
    model = ours(path)
    with torch.no_grad():
        out = model(tokens, all_logits=True)
    err = rel_rms(ref, out)
    assert 1e-3 < err < 0.4, f"relative RMS {err:.3e}"
