"""Tensor names: the release's (DeepSeek's inference names, which the Hugging Face release and
`inference/convert.py` ship) <-> our model's state_dict, and the variants we accept on input.

Release names (one home of them):
    embed.weight, head.weight, norm.weight, hc_head_{fn,base,scale}
    layers.N.{attn_norm,ffn_norm}.weight, layers.N.hc_{attn,ffn}_{fn,base,scale}
    layers.N.attn.{wq_a,q_norm,wq_b,wkv,kv_norm,wo_a,wo_b}.weight, layers.N.attn.attn_sink
    layers.N.attn.compressor.{wkv,wgate,norm}.weight, layers.N.attn.compressor.ape
    layers.N.attn.indexer.{wq_b,weights_proj}.weight, layers.N.attn.indexer.compressor.*
    layers.N.ffn.gate.{weight,bias,tid2eid}, layers.N.ffn.shared_experts.{w1,w2,w3}.weight,
    layers.N.ffn.experts.E.{w1,w2,w3}.weight
    mtp.M.{e_proj,h_proj,enorm,hnorm,norm}.weight, mtp.M.hc_head_{fn,base,scale}, and mtp.M.<block
    tensor as in layers.N>
A quantized weight `X.weight` ships beside its scales `X.scale`.

Accepted on input as the same tensors: a leading `model.` (transformers' save_pretrained),
`embed_tokens.weight` for `embed.weight`, `hc_head.hc_{fn,base,scale}` for `hc_head_{...}`, and
`attn.norm.weight` for `attn.kv_norm.weight` (transformers' save_pretrained writes both these ways).
"""
from __future__ import annotations

import re

# Linears the release ships as FP8 (block 128x128 scales) that DeepSeek's inference runs as FP8 GEMMs;
# relative to a block (layers.N. / mtp.M.) or the MTP block's own projections.
FP8_GEMM_LINEARS = ("attn.wq_a", "attn.wq_b", "attn.wkv", "attn.wo_b", "attn.indexer.wq_b",
                    "ffn.shared_experts.w1", "ffn.shared_experts.w2", "ffn.shared_experts.w3", "e_proj", "h_proj")
# Shipped FP8 too, but DeepSeek's inference multiplies with it in BF16 (a grouped einsum): dequantized.
FP8_DEQUANTIZED_LINEARS = ("attn.wo_a",)
EXPERT_WEIGHTS = ("w1", "w2", "w3")

# Model-parallel shards of `inference/convert.py` (model{i}-mp{n}.safetensors): the dimension each
# split tensor is cut along (its .scale the same way); routed experts are dealt out whole to ranks;
# every other tensor is replicated.
MP_SPLIT_DIM = {"embed.weight": 0, "head.weight": 0, "attn.wq_b": 0, "attn.attn_sink": 0, "attn.wo_a": 0,
                "attn.indexer.wq_b": 0, "attn.indexer.weights_proj": 0, "attn.wo_b": 1}

_HC = re.compile(r"^hc_(attn|ffn|head)\.(fn|base|scale)$")
_BLOCK = re.compile(r"^(layers\.\d+|mtp\.\d+)\.(.+)$")
_MTP_OWN = ("e_proj.", "h_proj.", "enorm.", "hnorm.", "norm.", "hc_head.")


def canonical(name: str) -> str:
    """A checkpoint's tensor name -> the release name (see the module docstring for the variants)."""
    if name.startswith("model."):
        name = name[len("model."):]
    if name == "embed_tokens.weight":
        return "embed.weight"
    m = re.fullmatch(r"((?:mtp\.\d+\.)?)hc_head\.hc_(fn|base|scale)", name)
    if m:
        return f"{m.group(1)}hc_head_{m.group(2)}"
    m = re.fullmatch(r"((?:layers|mtp)\.\d+\.attn)\.norm\.weight", name)
    if m:
        return f"{m.group(1)}.kv_norm.weight"
    return name


def release_name(ours: str) -> str:
    """Our state_dict name -> the release name (routed experts: see `expert_release_names`)."""
    m = re.fullmatch(r"mtp\.(\d+)\.block\.(.+)", ours)
    if m:
        return f"mtp.{m.group(1)}.{_block_part(m.group(2))}"
    m = _BLOCK.fullmatch(ours)
    if m and not (m.group(1).startswith("mtp") and m.group(2).startswith(_MTP_OWN)):
        return f"{m.group(1)}.{_block_part(m.group(2))}"
    prefix, leaf = (f"{m.group(1)}.", m.group(2)) if m else ("", ours)
    hc = _HC.fullmatch(leaf)
    return prefix + (f"hc_{hc.group(1)}_{hc.group(2)}" if hc else leaf)


def _block_part(rest: str) -> str:
    hc = _HC.fullmatch(rest)
    if hc:
        return f"hc_{hc.group(1)}_{hc.group(2)}"
    if rest.startswith("ffn.shared."):
        return "ffn.shared_experts." + rest[len("ffn.shared."):]
    return rest


def is_stacked_experts(ours: str) -> bool:
    """Our routed experts are stacked [E, out, in] parameters `...ffn.experts.w1` (the release: one per expert)."""
    return re.fullmatch(r".*ffn\.experts\.w[123]", ours) is not None


def expert_release_names(ours: str, n_experts: int) -> list[str]:
    """`layers.N.ffn.experts.w1` -> [`layers.N.ffn.experts.0.w1.weight`, ...] (one per expert)."""
    base = release_name(ours)
    head, w = base.rsplit(".", 1)
    return [f"{head}.{e}.{w}.weight" for e in range(n_experts)]


def linear_kind(release_weight: str) -> str | None:
    """"gemm" (an FP8 GEMM when shipped FP8), "dequantized" (shipped FP8, run in BF16), or None."""
    m = _BLOCK.fullmatch(release_weight)
    rest = m.group(2) if m else release_weight
    if not rest.endswith(".weight"):
        return None
    rest = rest[: -len(".weight")]
    if rest in FP8_GEMM_LINEARS:
        return "gemm"
    if rest in FP8_DEQUANTIZED_LINEARS:
        return "dequantized"
    return None


def mp_split_dim(release: str) -> int | None:
    """The dimension `inference/convert.py` cuts this tensor (or its scale) along across ranks, or None."""
    if release in MP_SPLIT_DIM:
        return MP_SPLIT_DIM[release]
    m = _BLOCK.fullmatch(release)
    if not m:
        return None
    rest = m.group(2)
    for suffix in (".weight", ".scale"):
        if rest.endswith(suffix):
            rest = rest[: -len(suffix)]
    return MP_SPLIT_DIM.get(rest)
