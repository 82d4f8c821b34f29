"""A released DeepSeek-V4 `config.json` -> `ModelConfig` field values, in either key vocabulary:

- Hugging Face (the release's own file and what transformers' `DeepseekV4Config` writes):
  `hidden_size`, `num_hidden_layers`, `compress_ratios` (one per layer, then zeros for the MTP
  blocks) or `layer_types` + `compress_rates`, `num_hash_layers` or `mlp_layer_types`,
  `rope_scaling` or `rope_parameters` {main, compress}, `qk_rope_head_dim` or
  `partial_rotary_factor`, `num_nextn_predict_layers`, `quantization_config`, `expert_dtype`, ...
- DeepSeek's inference `ModelArgs` (`dim`, `n_layers`, `compress_ratios`, `rope_factor`, ...).

Every key is either mapped to a field, checked against the one value our model implements (a
different value is an error naming it), or known to leave the math alone (ignored, and listed in
`ReleaseFields.ignored`). Any other key is an error: it might change the math.
`ModelConfig.from_pretrained` builds the config from these fields.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

LAYER_TYPE_NAMES = {"sliding_attention": "window", "compressed_sparse_attention": "csa",
                    "heavily_compressed_attention": "hca"}
DEFAULT_COMPRESS_RATES = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
MLP_LAYER_TYPES = ("hash_moe", "moe")

# key -> ModelConfig field, for keys whose value maps one to one (ints and floats).
_FIELDS = {
    # Hugging Face vocabulary
    "vocab_size": "vocab_size", "hidden_size": "dim", "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads", "head_dim": "head_dim", "q_lora_rank": "q_lora_rank",
    "o_groups": "o_groups", "o_lora_rank": "o_lora_rank", "rms_norm_eps": "norm_eps",
    "sliding_window": "window_size", "index_n_heads": "index_n_heads", "index_head_dim": "index_head_dim",
    "index_topk": "index_topk", "n_routed_experts": "n_routed_experts", "n_shared_experts": "n_shared_experts",
    "num_experts_per_tok": "n_activated_experts", "moe_intermediate_size": "moe_inter_dim",
    "routed_scaling_factor": "route_scale", "swiglu_limit": "swiglu_limit", "num_hash_layers": "n_hash_layers",
    "hc_mult": "hc_mult", "hc_sinkhorn_iters": "hc_sinkhorn_iters", "hc_eps": "hc_eps",
    "num_nextn_predict_layers": "n_mtp_layers", "max_position_embeddings": "max_seq_len",
    "rope_theta": "rope_theta", "compress_rope_theta": "compress_rope_theta", "qk_rope_head_dim": "rope_head_dim",
    # DeepSeek inference vocabulary (ModelArgs); most names are ours already
    "dim": "dim", "n_layers": "n_layers", "n_heads": "n_heads", "rope_head_dim": "rope_head_dim",
    "norm_eps": "norm_eps", "window_size": "window_size", "n_activated_experts": "n_activated_experts",
    "moe_inter_dim": "moe_inter_dim", "route_scale": "route_scale", "n_hash_layers": "n_hash_layers",
    "n_mtp_layers": "n_mtp_layers", "max_seq_len": "max_seq_len", "rope_factor": "rope_factor",
    "original_seq_len": "original_seq_len", "beta_fast": "beta_fast", "beta_slow": "beta_slow",
}
# Keys whose value must be the one our model implements (the math is fixed to it).
_REQUIRED = {
    "num_key_value_heads": (1,), "scoring_func": ("sqrtsoftplus",), "score_func": ("sqrtsoftplus",),
    "norm_topk_prob": (True,), "topk_method": ("noaux_tc",), "hidden_act": ("silu",),
    "tie_word_embeddings": (False,), "attention_bias": (False,), "mlp_bias": (False,),
    "attention_dropout": (0, 0.0), "router_jitter_noise": (0, 0.0), "model_type": ("deepseek_v4",),
}
# Keys that do not change the forward math (bookkeeping, training-only, tokens, serving extras).
_HARMLESS = {
    "architectures", "transformers_version", "use_cache", "bos_token_id", "eos_token_id", "pad_token_id",
    "initializer_range", "output_router_logits", "router_aux_loss_coef", "auto_map", "max_batch_size",
    "_name_or_path", "output_hidden_states", "output_attentions", "return_dict",
    # DSpark speculative-decoding stages some later releases add after the MTP block; not loaded here
    "dspark_block_size", "dspark_noise_token_id", "dspark_target_layer_ids", "dspark_markov_rank",
}
# Handled below: they need more than a one-to-one copy.
_SPECIAL = {"compress_ratios", "layer_types", "compress_rates", "mlp_layer_types", "rope_scaling", "rope_parameters",
            "partial_rotary_factor", "quantization_config", "expert_dtype", "torch_dtype", "dtype", "scale_fmt",
            "scale_dtype"}
_YARN_KEYS = {"type", "rope_type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
              "attention_factor", "rope_theta", "partial_rotary_factor"}


@dataclass(frozen=True)
class ReleaseFields:
    """What a released config.json says: the model's ModelConfig fields, and how its weights are stored.

    values: ModelConfig field -> value (not yet validated: ModelConfig.from_dict does that); weight_format: "fp8" (linears FP8 e4m3 with 128x128 tile scales) or "float" (not quantized);
    expert_format: "fp4" (routed experts MXFP4), "fp8" or "float";
    scale_format: "ue8m0" (e8m0 scales) or "float32"; ignored: keys read and known to be harmless.
    """
    values: dict
    weight_format: str
    expert_format: str
    scale_format: str
    ignored: tuple[str, ...]


def read_release_file(path: str | Path) -> tuple[dict, str]:
    """`path`: a checkpoint folder holding config.json, or the config.json itself -> (its mapping, a
    name for the config: the folder's). ConfigError (one line) when missing or not a JSON object."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"config.json: not found at {str(file)!r}")
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"config.json {str(file)!r}: not readable JSON ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config.json {str(file)!r}: expected a JSON object, got {type(data).__name__}")
    return data, (path if path.is_dir() else path.parent).resolve().name


def release_fields(data: dict) -> ReleaseFields:
    """The config.json mapping -> ReleaseFields (see the module docstring); ConfigError for keys or
    values our model cannot run."""
    unknown = sorted(k for k in data if k not in _FIELDS and k not in _REQUIRED and k not in _HARMLESS
                     and k not in _SPECIAL)
    if unknown:
        raise ConfigError(f"config.json keys {', '.join(unknown)}: not understood, and they may change the math; "
                          f"nothing was built (known keys are mapped, checked, or listed as harmless)")
    for key, accepted in _REQUIRED.items():
        if key in data and not any(_same(data[key], a) for a in accepted):
            raise ConfigError(f"config.json key {key!r}: value {data[key]!r} is not supported; accepted: "
                              f"{', '.join(repr(a) for a in accepted)}")
    values: dict = {}

    def put(field: str, value, key: str) -> None:
        if field in values and values[field] != value:
            raise ConfigError(f"config.json key {key!r}: value {value!r} contradicts {values[field]!r} given for "
                              f"the same setting by another key")
        values[field] = value

    for key, field in _FIELDS.items():
        if key in data:
            put(field, data[key], key)
    n_layers = values.get("n_layers")
    if n_layers is None:
        raise ConfigError("config.json: no layer count (num_hidden_layers or n_layers)")
    _layer_ratios(data, n_layers, put)
    _hash_layers(data, n_layers, put)
    _rope(data, values, put)
    weight_format, expert_format, scale_format = _formats(data)
    if "torch_dtype" in data or "dtype" in data and data["dtype"] in ("bfloat16", "float32"):
        dtype = data.get("torch_dtype", data.get("dtype"))
        if dtype not in ("bfloat16", "float32"):
            raise ConfigError(f"config.json key 'torch_dtype': value {dtype!r} is not supported; accepted: bfloat16, float32")
        put("dtype", dtype, "torch_dtype")
    values.setdefault("dtype", "bfloat16")
    values.setdefault("max_batch_size", 1)
    ignored = tuple(sorted(k for k in data if k in _HARMLESS))
    return ReleaseFields(values, weight_format, expert_format, scale_format, ignored)


def _same(value, accepted) -> bool:
    """Equal as JSON values: True is not 1, 0 is 0.0."""
    if isinstance(accepted, bool) or isinstance(value, bool):
        return value is accepted
    return value == accepted


def _layer_ratios(data: dict, n_layers: int, put) -> None:
    if "compress_ratios" in data:
        ratios = data["compress_ratios"]
        if not isinstance(ratios, list) or len(ratios) < n_layers:
            raise ConfigError(f"config.json key 'compress_ratios': value {ratios!r} needs at least one ratio per layer "
                              f"({n_layers})")
        tail = ratios[n_layers:]
        if any(r != 0 for r in tail):
            raise ConfigError(f"config.json key 'compress_ratios': entries after the {n_layers} layers belong to the "
                              f"window-only MTP blocks and must be 0, got {tail}")
        put("compress_ratios", list(ratios[:n_layers]), "compress_ratios")
    if "layer_types" in data:
        rates = dict(DEFAULT_COMPRESS_RATES, **(data.get("compress_rates") or {}))
        types = data["layer_types"]
        bad = [t for t in types if t not in LAYER_TYPE_NAMES] if isinstance(types, list) else types
        if not isinstance(types, list) or bad or len(types) != n_layers:
            raise ConfigError(f"config.json key 'layer_types': {bad or types!r} is invalid; need {n_layers} entries "
                              f"from {', '.join(LAYER_TYPE_NAMES)}")
        put("compress_ratios", [0 if t == "sliding_attention" else rates[t] for t in types], "layer_types")


def _hash_layers(data: dict, n_layers: int, put) -> None:
    types = data.get("mlp_layer_types")
    if types is None:
        return
    if not isinstance(types, list) or len(types) != n_layers or any(t not in MLP_LAYER_TYPES for t in types):
        raise ConfigError(f"config.json key 'mlp_layer_types': {types!r} is invalid; need {n_layers} entries from "
                          f"{', '.join(MLP_LAYER_TYPES)}")
    n_hash = types.count("hash_moe")
    if types[:n_hash] != ["hash_moe"] * n_hash:
        raise ConfigError(f"config.json key 'mlp_layer_types': hash-routed layers must come first (our model routes "
                          f"the first n_hash_layers by hash), got {types}")
    put("n_hash_layers", n_hash, "mlp_layer_types")


def _rope(data: dict, values: dict, put) -> None:
    """rope_scaling (release) or rope_parameters {main, compress} (transformers) -> theta / YaRN fields."""
    params = data.get("rope_parameters")
    yarn = data.get("rope_scaling")
    if isinstance(params, dict) and ("main" in params or "compress" in params):
        main, compress = params.get("main") or {}, params.get("compress") or {}
        if main.get("rope_type", "default") != "default":
            raise ConfigError(f"config.json key 'rope_parameters.main.rope_type': value {main['rope_type']!r} is not "
                              f"supported; window-only layers use plain RoPE ('default')")
        if "rope_theta" in main:
            put("rope_theta", main["rope_theta"], "rope_parameters.main.rope_theta")
        if "rope_theta" in compress:
            put("compress_rope_theta", compress["rope_theta"], "rope_parameters.compress.rope_theta")
        for sub, key in ((main, "main"), (compress, "compress")):
            if "partial_rotary_factor" in sub:
                _rotary_factor(sub["partial_rotary_factor"], values, put, f"rope_parameters.{key}.partial_rotary_factor")
        yarn = compress
    elif params is not None:
        yarn = params
    if "partial_rotary_factor" in data and data["partial_rotary_factor"] is not None:
        _rotary_factor(data["partial_rotary_factor"], values, put, "partial_rotary_factor")
    if yarn is None:
        return
    extra = sorted(set(yarn) - _YARN_KEYS)
    kind = yarn.get("rope_type", yarn.get("type", "default"))
    if extra or kind != "yarn":
        raise ConfigError(f"config.json rope scaling {yarn!r}: not supported; compressed layers use YaRN with keys "
                          f"{', '.join(sorted(_YARN_KEYS))}")
    if yarn.get("attention_factor", 1.0) != 1.0:
        raise ConfigError(f"config.json rope scaling 'attention_factor': value {yarn['attention_factor']!r} is not "
                          f"supported; DeepSeek-V4 applies no YaRN mscale (1.0)")
    for key, field in (("factor", "rope_factor"), ("original_max_position_embeddings", "original_seq_len"),
                       ("beta_fast", "beta_fast"), ("beta_slow", "beta_slow")):
        if key in yarn:
            value = yarn[key]
            if field != "rope_factor" and isinstance(value, float) and value.is_integer():
                value = int(value)
            put(field, value, f"rope scaling {key!r}")


def _rotary_factor(factor, values: dict, put, key: str) -> None:
    head_dim = values.get("head_dim")
    if head_dim is None:
        raise ConfigError(f"config.json key {key!r}: needs head_dim to turn into a rope dimension")
    rope = head_dim * factor
    if not math.isclose(rope, round(rope)):
        raise ConfigError(f"config.json key {key!r}: value {factor!r} times head_dim {head_dim} is not a whole dimension")
    put("rope_head_dim", int(round(rope)), key)


def _formats(data: dict) -> tuple[str, str, str]:
    """(weight_format, expert_format, scale_format) from quantization_config / expert_dtype / dtype."""
    quant = data.get("quantization_config")
    weight_format, scale_format = "float", "float32"
    if quant is not None:
        fmt = quant.get("fmt", "e4m3")
        block = quant.get("weight_block_size", [128, 128])
        method = quant.get("quant_method", "fp8")
        if method != "fp8" or fmt != "e4m3" or list(block) != [128, 128]:
            raise ConfigError(f"config.json key 'quantization_config': {quant!r} is not supported; accepted: "
                              f"quant_method fp8, fmt e4m3, weight_block_size [128, 128]")
        if quant.get("activation_scheme", "dynamic") != "dynamic":
            raise ConfigError(f"config.json key 'quantization_config.activation_scheme': value "
                              f"{quant['activation_scheme']!r} is not supported; accepted: dynamic")
        weight_format = "fp8"
        scale_format = _scale_format(quant.get("scale_fmt"))
    elif data.get("dtype") == "fp8":  # DeepSeek inference vocabulary
        weight_format = "fp8"
        scale_format = _scale_format(data.get("scale_fmt") or ("ue8m0" if data.get("scale_dtype") == "fp8" else None))
    elif data.get("dtype") not in (None, "bf16", "bfloat16", "float32"):
        raise ConfigError(f"config.json key 'dtype': value {data['dtype']!r} is not supported; accepted: fp8, bf16")
    expert = data.get("expert_dtype", (quant or {}).get("expert_dtype"))
    if expert not in (None, "fp4", "fp8"):
        raise ConfigError(f"config.json key 'expert_dtype': value {expert!r} is not supported; accepted: fp4, fp8")
    expert_format = expert or weight_format
    return weight_format, expert_format, scale_format


def _scale_format(value) -> str:
    if value in (None, "float32", "fp32"):
        return "float32"
    if value == "ue8m0":
        return "ue8m0"
    raise ConfigError(f"config.json key 'scale_fmt': value {value!r} is not supported; accepted: ue8m0 (or absent: float32)")


def release_config_dict(config, weight_format: str = "fp8", expert_format: str = "fp4") -> dict:
    """A ModelConfig -> the release's config.json mapping (Hugging Face vocabulary, as V4-Flash ships it),
    for writing checkpoints; `release_fields` of it gives the same fields back (max_batch_size aside)."""
    data = {
        "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4",
        "vocab_size": config.vocab_size, "hidden_size": config.dim, "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads, "num_key_value_heads": 1, "head_dim": config.head_dim,
        "qk_rope_head_dim": config.rope_head_dim, "q_lora_rank": config.q_lora_rank, "o_groups": config.o_groups,
        "o_lora_rank": config.o_lora_rank, "rms_norm_eps": config.norm_eps, "sliding_window": config.window_size,
        "compress_ratios": list(config.compress_ratios) + [0] * config.n_mtp_layers,
        "rope_theta": config.rope_theta, "compress_rope_theta": config.compress_rope_theta,
        "rope_scaling": {"type": "yarn", "factor": config.rope_factor,
                         "original_max_position_embeddings": config.original_seq_len,
                         "beta_fast": config.beta_fast, "beta_slow": config.beta_slow},
        "index_n_heads": config.index_n_heads, "index_head_dim": config.index_head_dim,
        "index_topk": config.index_topk, "n_routed_experts": config.n_routed_experts,
        "n_shared_experts": config.n_shared_experts, "num_experts_per_tok": config.n_activated_experts,
        "moe_intermediate_size": config.moe_inter_dim, "routed_scaling_factor": config.route_scale,
        "swiglu_limit": config.swiglu_limit, "num_hash_layers": config.n_hash_layers, "scoring_func": "sqrtsoftplus",
        "norm_topk_prob": True, "topk_method": "noaux_tc", "hc_mult": config.hc_mult,
        "hc_sinkhorn_iters": config.hc_sinkhorn_iters, "hc_eps": config.hc_eps,
        "num_nextn_predict_layers": config.n_mtp_layers, "max_position_embeddings": config.max_seq_len,
        "torch_dtype": config.dtype, "hidden_act": "silu", "tie_word_embeddings": False,
    }
    if weight_format == "fp8":
        data["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                       "scale_fmt": "ue8m0", "weight_block_size": [128, 128]}
    if expert_format == "fp4":
        data["expert_dtype"] = "fp4"
    return data
