"""Released config.json files -> ModelConfig, in both key vocabularies.

release_configs/V4-Flash.config.json is the V4-Flash release's config.json as publicly transcribed
(keys and values of the Hugging Face file); V4-Pro.config.json is the same file with the shapes the
V4-Pro release publishes (hidden 7168, 61 layers, 128 heads, q_lora 1536, 16 output groups, 384
experts of 3072, routed scaling 2.5, index_topk 1024, ratios 128,128 then (4,128) x 29, then 4, then
the MTP block's 0).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsv4_compile.model import ConfigError, ModelConfig
from dsv4_compile.model.release_config import read_release_file, release_fields

HERE = Path(__file__).parent / "release_configs"


def release(name: str) -> dict:
    return json.loads((HERE / f"{name}.config.json").read_text())


@pytest.mark.parametrize("name,preset", [("V4-Flash", "flash"), ("V4-Pro", "pro")])
def test_presets_equal_the_released_configs(name, preset, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(release(name)))
    data, folder = read_release_file(tmp_path)
    assert folder == tmp_path.name
    got = release_fields(data)
    assert ModelConfig.from_pretrained(tmp_path) == ModelConfig.from_preset(preset)
    assert (got.weight_format, got.expert_format, got.scale_format) == ("fp8", "fp4", "ue8m0")
    assert "transformers_version" in got.ignored and "architectures" in got.ignored


def test_inference_vocabulary_gives_the_same_config():
    """DeepSeek's inference config (ModelArgs names) for V4-Flash."""
    flash = ModelConfig.from_preset("flash")
    args = {"vocab_size": 129280, "dim": 4096, "moe_inter_dim": 2048, "n_layers": 43, "n_hash_layers": 3,
            "n_mtp_layers": 1, "n_heads": 64, "n_routed_experts": 256, "n_shared_experts": 1, "n_activated_experts": 6,
            "score_func": "sqrtsoftplus", "route_scale": 1.5, "swiglu_limit": 10.0, "q_lora_rank": 1024,
            "head_dim": 512, "rope_head_dim": 64, "norm_eps": 1e-6, "o_groups": 8, "o_lora_rank": 1024,
            "window_size": 128, "compress_ratios": list(flash.compress_ratios) + [0], "compress_rope_theta": 160000.0,
            "original_seq_len": 65536, "rope_theta": 10000.0, "rope_factor": 16, "beta_fast": 32, "beta_slow": 1,
            "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512, "hc_mult": 4, "hc_sinkhorn_iters": 20,
            "hc_eps": 1e-6, "dtype": "fp8", "scale_fmt": "ue8m0", "expert_dtype": "fp4", "scale_dtype": "fp8",
            "max_batch_size": 4, "max_seq_len": 1048576}
    got = release_fields(args)
    assert ModelConfig.from_dict(got.values) == flash
    assert (got.weight_format, got.expert_format, got.scale_format) == ("fp8", "fp4", "ue8m0")


def test_transformers_vocabulary_gives_the_same_config():
    """The keys transformers' DeepseekV4Config writes: layer_types, mlp_layer_types, rope_parameters."""
    flash = ModelConfig.from_preset("flash")
    data = release("V4-Flash")
    for key in ("compress_ratios", "num_hash_layers", "rope_scaling", "rope_theta", "compress_rope_theta",
                "qk_rope_head_dim", "torch_dtype"):
        data.pop(key)
    names = {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}
    data.update(
        layer_types=[names[r] for r in flash.compress_ratios],
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 128},
        mlp_layer_types=["hash_moe"] * 3 + ["moe"] * 40, partial_rotary_factor=0.125, dtype="bfloat16",
        rope_parameters={"main": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.125},
                         "compress": {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 65536,
                                      "beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": 1.0,
                                      "rope_theta": 160000.0, "partial_rotary_factor": 0.125}})
    assert ModelConfig.from_dict(release_fields(data).values) == flash


def test_overrides_apply_after_reading(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(release("V4-Flash")))
    assert ModelConfig.from_pretrained(tmp_path, max_seq_len=8192).max_seq_len == 8192


@pytest.mark.parametrize("change,match", [
    ({"some_new_gate": 2}, r"keys some_new_gate: not understood, and they may change the math"),
    ({"scoring_func": "softmax"}, r"'scoring_func': value 'softmax' is not supported; accepted: 'sqrtsoftplus'"),
    ({"num_key_value_heads": 8}, r"'num_key_value_heads': value 8 is not supported"),
    ({"tie_word_embeddings": True}, r"'tie_word_embeddings': value True"),
    ({"compress_ratios": [0, 0] + [4, 128] * 20 + [4, 4]}, r"belong to the window-only MTP blocks and must be 0"),
    ({"compress_ratios": [0, 4]}, r"at least one ratio per layer \(43\)"),
    ({"rope_scaling": {"type": "yarn", "factor": 16, "mscale": 1.0}}, r"rope scaling .* not supported"),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [64, 64]}}, r"'quantization_config'"),
    ({"expert_dtype": "int4"}, r"'expert_dtype': value 'int4'"),
    ({"num_attention_heads": 60}, r"'o_groups': value 8 is invalid; must divide n_heads \(60\)"),
    ({"mlp_layer_types": ["moe", "hash_moe"] + ["moe"] * 41}, r"hash-routed layers must come first"),
])
def test_bad_configs_are_one_line_errors(change, match):
    data = dict(release("V4-Flash"), **change)
    with pytest.raises(ConfigError, match=match) as err:
        ModelConfig.from_dict(release_fields(data).values)
    assert "\n" not in str(err.value)


def test_missing_or_unreadable_file(tmp_path):
    with pytest.raises(ConfigError, match="config.json: not found"):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not readable JSON"):
        ModelConfig.from_pretrained(tmp_path)
