"""A model's weights as a DeepSeek-V4 release ships them, made in memory (no checkpoint written).

`quantize_as_shipped(model)` turns a model in its compute dtype (seeded weights, or a weights file of
our own names) into the model `from_pretrained(weights="as-shipped")` loads from a release of it: it
equals writing `model` with `write_checkpoint` and loading that back as shipped (the writer's
quantizers, `write._shipped`; the loader's choice of modules):
- the linears DeepSeek runs as FP8 GEMMs (names.FP8_GEMM_LINEARS) with K a multiple of 128 become
  `FP8Linear`: e4m3 codes [N, K] + float32 power-of-two scales [N/128, K/128];
- the other FP8-shipped linears (attn.wo_a, which DeepSeek multiplies in BF16; K < 128 in test
  models) keep their module, with the values FP8 rounds them to;
- routed experts become `MXFP4Experts`: two e2m1 codes per int8 byte + a scale per 1 x 32;
- every other tensor is rounded to its shipped dtype (bf16, or fp32 for mHC, sinks, biases) and kept
  in the model's own.
The bytes of the linears are halved (bf16 -> FP8) and those of the experts cut to 0.53 B/weight (their
e8m0 scale bytes included, held as a release ships them): V4-Flash ~162 GB instead of ~583 GB in bf16.

`shipped_modules(model, state)` gives a plain model the modules of an as-shipped state_dict (one of
the above, or of from_pretrained(weights="as-shipped"), whose FP8-shipped experts are `FP8Experts`), on
the meta device, so that `model.load_state_dict(state, assign=True)` takes it.
"""
from __future__ import annotations

import torch
from torch import nn

from ..model import Transformer
from ..model.layers import FP8Linear
from ..model.moe import FP8Experts, MXFP4Experts, RoutedExperts
from ..model.ops import FP8_LINEAR_BLOCK
from ..model.weight_formats import dequantize_fp8_weight, quantize_fp8_weight, quantize_mxfp4
from . import names
from .write import AS_SHIPPED_MODULES, _shipped


@torch.no_grad()
def quantize_as_shipped(model: Transformer) -> Transformer:
    """`model`, in place, with its weights as a release ships them (module docstring); returns it.
    Quantizes on the weights' device, one tensor (one expert) at a time: beyond the model, memory holds
    one tensor's float32 copy. On the meta device the modules are swapped and nothing is computed (the
    shipped layout's shapes and bytes: `weight_sizes`)."""
    c = model.config
    for ours in list(model.state_dict()):
        owner_name, _, leaf = ours.rpartition(".")
        owner = model.get_submodule(owner_name)
        if isinstance(owner, AS_SHIPPED_MODULES):  # as shipped already (or swapped with their w1)
            continue
        if isinstance(owner, RoutedExperts):
            _swap(model, owner_name, _mxfp4_experts(owner, c.simulate_quantization))
            continue
        tensor = getattr(owner, leaf)
        if not tensor.is_floating_point():  # tid2eid: expert ids, shipped as they are
            continue
        kind = names.linear_kind(names.release_name(ours))
        if kind == "gemm" and type(owner) is nn.Linear and owner.in_features % FP8_LINEAR_BLOCK == 0:
            _swap(model, owner_name, _fp8_linear(owner, c.simulate_quantization))
        elif tensor.is_meta:  # the values below change, not their bytes
            continue
        elif kind is not None:  # shipped FP8, run dequantized
            tensor.copy_(dequantize_fp8_weight(*quantize_fp8_weight(tensor), dtype=tensor.dtype))
        else:
            (shipped,) = _shipped(ours, tensor, c.n_routed_experts, "fp4").values()
            tensor.copy_(shipped)
    return model


def _swap(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def _fp8_linear(linear: nn.Linear, quantize_input: bool) -> FP8Linear:
    """linear's weight [N, K] as FP8 e4m3 codes + float32 scales per 128 x 128 tile (meta: the module only)."""
    w = linear.weight
    fp8 = FP8Linear(linear.in_features, linear.out_features, device=w.device, quantize_input=quantize_input)
    if w.is_meta:
        return fp8
    codes, scale = quantize_fp8_weight(w, scale_dtype=fp8.scale.dtype)
    fp8.weight.copy_(codes)
    fp8.scale.copy_(scale)
    return fp8


def _mxfp4_experts(experts: RoutedExperts, quantize_input: bool) -> MXFP4Experts:
    """experts' w1, w2, w3 [E, rows, cols] as MXFP4, quantized one expert at a time (a float32 copy of
    one expert's weight at a time: V4-Flash's 256 x 3 x 2048 x 4096 would take 25 GB at once; meta: the
    module only), running W4A8 with quantize_input (MXFP4Experts)."""
    e, inter, dim = experts.w1.shape
    out = MXFP4Experts(e, dim, inter, experts.limit, device=experts.w1.device, quantize_input=quantize_input)
    if experts.w1.is_meta:
        return out
    for name in ("w1", "w2", "w3"):
        w, codes, scales = getattr(experts, name), getattr(out, name), getattr(out, name + "_scale")
        for i in range(e):
            packed, scale = quantize_mxfp4(w[i], scale_dtype=scales.dtype)
            codes[i].copy_(packed)
            scales[i].copy_(scale)
    return out


def shipped_modules(model: Transformer, state: dict[str, torch.Tensor]) -> Transformer:
    """`model` (plain), in place, with FP8Linear where `state` holds `X.weight` FP8 codes and `X.scale`,
    and MXFP4Experts (FP8Experts) where it holds `...experts.w1_scale` beside int8 (FP8) `...experts.w1`:
    empty modules on the meta device, for `load_state_dict(state, assign=True)`. Returns it."""
    for name, t in state.items():
        if name.endswith(".weight") and t.dtype == torch.float8_e4m3fn:
            linear = model.get_submodule(name[: -len(".weight")])
            if type(linear) is nn.Linear:
                _swap(model, name[: -len(".weight")], FP8Linear(linear.in_features, linear.out_features, device="meta",
                                                                 quantize_input=model.config.simulate_quantization))
        elif name.endswith("experts.w1_scale"):
            experts = model.get_submodule(name[: -len(".w1_scale")])
            if isinstance(experts, RoutedExperts):
                e, inter, dim = experts.w1.shape
                shipped = (FP8Experts(e, dim, inter, experts.limit, device="meta",
                                      quantize_input=model.config.simulate_quantization)
                           if state[name[: -len("_scale")]].dtype == torch.float8_e4m3fn
                           else MXFP4Experts(e, dim, inter, experts.limit, device="meta",
                                             quantize_input=model.config.simulate_quantization))
                _swap(model, name[: -len(".w1_scale")], shipped)
    return model


def weight_sizes(model: Transformer) -> tuple[int, int, int]:
    """(parameters, bytes, bytes dequantized) of `model`: its parameters plus the weights its FP8 /
    MXFP4 buffers hold (an FP8 code one each, an MXFP4 byte two); the bytes of its parameters and
    buffers as held (what its engines' weights file holds, near enough), and as if every FP8 / MXFP4
    weight were in the model's dtype without its scales."""
    width = model.config.torch_dtype.itemsize
    weights = held = dequantized = 0
    for module in model.modules():
        shipped = 1 if isinstance(module, (FP8Linear, FP8Experts)) else 2 if isinstance(module, MXFP4Experts) else 0
        for t in module.parameters(recurse=False):
            weights, held, dequantized = weights + t.numel(), held + t.nbytes, dequantized + t.nbytes
        for name, t in module.named_buffers(recurse=False):
            held += t.nbytes
            if not shipped:
                dequantized += t.nbytes
            elif not name.endswith("scale"):
                weights, dequantized = weights + t.numel() * shipped, dequantized + t.numel() * shipped * width
    return weights, held, dequantized
