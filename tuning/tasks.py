"""What the correctness gate and the timer run for each kernel: inputs of a problem's shape, the plain
op's output (`torch.ops.dsv4.*`, the reference), the kernel's output under a config, and the comparison.

    task = TASKS["fp8_quantize"]
    inputs = task.inputs(problem, device, seed=0)            # a tuple of tensors / scalars
    ref = task.reference(inputs)                             # torch.ops.dsv4.fp8_quantize(...)
    out = task.run(space, inputs, config)                    # the Triton kernel with `config`
    error = task.compare(ref, out)                           # None, or one line saying what is wrong

`small=True` shrinks a problem to a size the Triton CPU interpreter runs in well under a second (the
gate on a CPU machine); the shapes keep their structure (ragged edges, padding, -1 indices).

Tolerances (relative RMS against the plain op, NaN positions must match):
- fp8/fp4 quantize: exact (the kernels round bit for bit as the plain op; kernels/_jit_utils.py).
- newton_schulz: 1e-2 (bf16 operands, 10 compounded steps; the kernel tests' NS_TOL).
- hc_pre: y 1e-2 in bf16 (one bf16 rounding, REL_RMS_TOL), post and comb 1e-3 in fp32 (fp32 dot
  products give ~1e-6; tf32 mixes, ~5e-4 relative, pass or fail here on their merits).
- hc_sinkhorn: 1e-5 (fp32, summation order only).
- sparse attention: 1e-2 in bf16 (the probabilities are rounded to bf16 for the second dot, as
  FlashAttention does), 1e-5 in fp32.
- compress_kv: the outputs are FP8 / FP4 / BF16 codes, so a relative RMS says little: at most
  max(4, 1%) of the values may differ, each by at most one code step (half the larger magnitude, or
  between 0 and a nonzero code), NaN positions equal (the kernel tests' criterion: the pooling sums in
  another order, so a value on a rounding boundary may flip).
- moe_experts: 1e-2 in bf16 (bf16 operands, the SwiGLU activation rounded to bf16 once, the routing
  weight applied before that rounding in the plain op and after w2 in the kernel).
- moe_experts_fp8 (W8A16): as moe_experts, against the plain FP8 op.
- moe_experts_fp8_w8a8 (W8A8): against the kernel's W8A8 naive twin (kernels/moe_experts/naive.py, the
  plain W8A8 op's numbers: a loop over experts, one expert dequantized at a time, where the plain op's
  grouped form gathers ~T/7 experts' weights per call: minutes at 32K tokens), at 1e-2: the same FP8
  codes and exact products, summed in another order (on Hopper's FP8 MMA with ~14 bits per 128-step
  sum), and a neighbouring code where an activation sits near an e4m3 rounding midpoint (the kernel
  tests' W8A8_HOPPER_TOL; the interpreter's fp32 sums stay under 1e-5). Never against the W8A16 op with
  a tolerance that admits the activation quantization: that error is ~5e-2 (test_moe_experts.py), so a
  tolerance above it would pass a kernel with a wrong scale on part of the tiles.
- moe_experts_mxfp4_w4a8 (W4A8): as W8A8, against its naive twin (the plain W4A8 op's numbers) at 1e-2:
  the e2m1 codes decode to e4m3 exactly and the 1 x 32 scales fold exactly, so the same reasons hold.
- fp8_linear: 1e-2 (bf16 output, REL_RMS_TOL; the kernel and the plain op sum the same FP8 products
  in another order, in fp32).
- float32_linear: 1e-5 (float32 output: the same exact products as the plain op's float32 GEMM,
  summed in another order).
- indexer_topk: exact. The inputs are small dyadic numbers (k / 4, |k| <= 12), so every score is exact
  in fp32 at the model's 64 heads x 128 dims and the selection, ties included, is fully determined.
- indexer_topk_cached: exact, likewise (FP4 keys e2m1 x 1/2 against dyadic q and weights).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..metrics import REL_RMS_TOL, few_flips, mismatch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def close(name: str, ref: torch.Tensor, out: torch.Tensor, tol: float) -> str | None:
    """None when shapes, dtypes and NaN / Inf positions match and the relative RMS error is within tol
    (0: exact); the package's one comparison rule (dsv4_compile.metrics.mismatch)."""
    return mismatch(name, ref, out, tol, same_dtype=True)


def _as_float(codes: torch.Tensor) -> torch.Tensor:
    return codes.float() if codes.dtype == torch.float8_e4m3fn else codes


@dataclass(frozen=True)
class KernelTask:
    """inputs(problem, device, seed, small) -> args; reference(args) -> outputs (the plain op);
    call(fn, args, config) -> outputs (the kernel); compare(ref, out) -> None | reason."""

    inputs: Callable[..., tuple]
    reference: Callable[[tuple], Any]
    call: Callable[[Callable, tuple, Any], Any]
    compare: Callable[[Any, Any], "str | None"]

    def run(self, space, args: tuple, config) -> Any:
        return self.call(space.kernel_fn(), args, config)


def _gen(device, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _randn(shape, device, seed, dtype=torch.float32, scale=1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=_gen(device, seed), device=device, dtype=torch.float32) * scale).to(dtype)


# ---- quantization -------------------------------------------------------------------------------

def _quant_inputs(problem, device, seed=0, small=False):
    rows, cols = problem.dim("rows"), problem.dim("cols")
    if small:
        rows = min(rows, 37)                      # odd: ragged last row block
    x = _randn((rows, cols), device, seed)
    # Rows of very different magnitudes: scales that span many powers of two.
    x = x * torch.exp2(torch.arange(rows, device=device, dtype=torch.float32) % 17 - 8).unsqueeze(-1)
    return (x, problem.dim("block_size"), problem.dim("pow2_scale"))


def _quant_compare(ref, out) -> str | None:
    (rc, rs), (oc, os_) = ref, out
    return close("scale", rs, os_, 0.0) or close("codes", _as_float(rc), _as_float(oc), 0.0)


FP8_QUANTIZE = KernelTask(
    inputs=_quant_inputs,
    reference=lambda a: torch.ops.dsv4.fp8_quantize(*a),
    call=lambda fn, a, cfg: fn(*a, config=cfg),
    compare=_quant_compare)

FP4_QUANTIZE = KernelTask(
    inputs=_quant_inputs,
    reference=lambda a: torch.ops.dsv4.fp4_quantize(*a),
    call=lambda fn, a, cfg: fn(*a, config=cfg),
    compare=_quant_compare)


# ---- Newton-Schulz -------------------------------------------------------------------------------

def _ns_inputs(problem, device, seed=0, small=False):
    from dsv4_compile.model.muon import DSV4_NS_COEFFICIENTS

    mats, rows, cols = problem.dim("mats"), problem.dim("rows"), problem.dim("cols")
    if small:
        mats, rows, cols = 2, min(rows, 48), min(cols, 80)
    G = _randn((mats, rows, cols), device, seed, DTYPES[problem.dim("dtype")])
    coefficients = [c for triple in DSV4_NS_COEFFICIENTS[:problem.dim("steps")] for c in triple]
    return (G, coefficients)


NEWTON_SCHULZ = KernelTask(
    inputs=_ns_inputs,
    reference=lambda a: torch.ops.dsv4.newton_schulz(*a),
    call=lambda fn, a, cfg: fn(*a, config=cfg),
    compare=lambda ref, out: close("X", ref, out, 1e-2))


# ---- mHC ----------------------------------------------------------------------------------------

def _hc_pre_inputs(problem, device, seed=0, small=False):
    T, n, D = problem.dim("tokens"), problem.dim("n"), problem.dim("D")
    if small:
        T, D = min(T, 45), min(D, 96)
    W = (2 + n) * n
    x = _randn((T, n, D), device, seed, DTYPES[problem.dim("dtype")])
    fn = _randn((W, n * D), device, seed + 1, scale=1.0 / math.sqrt(n * D))
    scale = _randn((3,), device, seed + 2, scale=0.5)
    base = _randn((W,), device, seed + 3, scale=0.5)
    return (x, fn, scale, base, problem.dim("iters"), 1e-6, 1e-6)


def _hc_pre_compare(ref, out) -> str | None:
    y_tol = REL_RMS_TOL.get(ref[0].dtype, 1e-2)
    return (close("y", ref[0], out[0], y_tol) or close("post", ref[1], out[1], 1e-3)
            or close("comb", ref[2], out[2], 1e-3))


HC_PRE = KernelTask(
    inputs=_hc_pre_inputs,
    reference=lambda a: torch.ops.dsv4.hc_pre(*a),
    call=lambda fn, a, cfg: fn(*a, config=cfg),
    compare=_hc_pre_compare)


def _sinkhorn_inputs(problem, device, seed=0, small=False):
    T, n = problem.dim("matrices"), problem.dim("n")
    if small:
        T = min(T, 77)
    return (_randn((T, n, n), device, seed, scale=2.0), problem.dim("iters"), 1e-6)


HC_SINKHORN = KernelTask(
    inputs=_sinkhorn_inputs,
    reference=lambda a: torch.ops.dsv4.hc_sinkhorn(*a),
    call=lambda fn, a, cfg: fn(*a, config=cfg),
    compare=lambda ref, out: close("comb", ref, out, 1e-5))


# ---- sparse attention -----------------------------------------------------------------------------

def _attention_indices(B, S, K, window, n_raw, n_entries, positions, device, seed) -> torch.Tensor:
    """[B, S, K] int32: the causal window (raw rows t-window+1..t, -1 before 0), then random visible
    compressed entries (entry i visible iff i < (t+1)//4, -1 where none), offset by n_raw."""
    t = positions.view(B, S, 1)
    win = t - torch.arange(window - 1, -1, -1, device=device).view(1, 1, window)
    win = torch.where(win >= 0, win, -1)
    k_c = K - window
    visible = torch.div(t + 1, 4, rounding_mode="floor").clamp(max=n_entries)          # [B, S, 1]
    u = torch.rand((B, S, k_c), generator=_gen(device, seed), device=device)
    pick = (u * visible).long()
    comp = torch.where(visible > 0, pick + n_raw, -1)
    return torch.cat([win, comp], dim=-1).to(torch.int32)


def _attn_prefill_inputs(problem, device, seed=0, small=False):
    B, S, H, D, K, W = (problem.dim(k) for k in ("B", "S", "H", "D", "K", "window"))
    if small:
        B, S, H, D, K, W = 1, min(S, 40), min(H, 20), min(D, 64), min(K, 24), min(W, 8)
    dtype = DTYPES[problem.dim("dtype")]
    n_entries = math.ceil(S / 4)
    q = _randn((B, S, H, D), device, seed, dtype)
    kv = _randn((B, S + n_entries, D), device, seed + 1, dtype)
    sink = _randn((H,), device, seed + 2)
    pos = torch.arange(S, device=device).expand(B, S)
    idx = _attention_indices(B, S, K, W, S, n_entries, pos, device, seed + 3)
    return (q, kv, sink, idx, D ** -0.5)


def _attn_decode_inputs(problem, device, seed=0, small=False):
    from dsv4_compile.model.kv_layout import pack_main_entries

    B, H, D, R, K, W, N = (problem.dim(k) for k in ("B", "H", "D", "rope_dim", "K", "window", "N"))
    context = problem.context
    if small:
        B, H, D, R, K, W = min(B, 3), min(H, 20), 128, 64, min(K, 24), min(W, 8)
        context = min(context, 64)
        N = W + math.ceil(context / 4)
    dtype = DTYPES[problem.dim("dtype")]
    q = _randn((B, 1, H, D), device, seed, dtype)
    values = _randn((B, N, D), device, seed + 1)
    cache = pack_main_entries(values, R)
    sink = _randn((H,), device, seed + 2)
    # Sequences of different lengths (batches mix lengths): position t in [context/2, context).
    pos = (context // 2 + (torch.arange(B, device=device) * 7919) % max(1, context - context // 2)).view(B, 1)
    n_entries = N - W
    # Window slots of the ring: (t - j) % W for j < W, -1 before 0.
    t = pos.view(B, 1, 1)
    win = t - torch.arange(W - 1, -1, -1, device=device).view(1, 1, W)
    win = torch.where(win >= 0, win % W, -1)
    visible = torch.div(t + 1, 4, rounding_mode="floor").clamp(max=n_entries)
    u = torch.rand((B, 1, K - W), generator=_gen(device, seed + 3), device=device)
    comp = torch.where(visible > 0, (u * visible).long() + W, -1)
    idx = torch.cat([win, comp], dim=-1).to(torch.int32)
    return (q, cache, sink, idx, D ** -0.5, R)


SPARSE_ATTENTION = KernelTask(
    inputs=_attn_prefill_inputs,
    reference=lambda a: torch.ops.dsv4.sparse_attention(*a),
    call=lambda fn, a, cfg: fn(*a, config=cfg),
    compare=lambda ref, out: close("out", ref, out, REL_RMS_TOL.get(ref.dtype, 1e-2)))

SPARSE_ATTENTION_CACHED = KernelTask(
    inputs=_attn_decode_inputs,
    reference=lambda a: torch.ops.dsv4.sparse_attention_cached(*a),
    call=lambda fn, a, cfg: fn(*a, config=cfg),
    compare=lambda ref, out: close("out", ref, out, REL_RMS_TOL.get(ref.dtype, 1e-2)))


# ---- compressor ------------------------------------------------------------------------------------

def _compress_inputs(problem, device, seed=0, small=False):
    """One argument tuple per compressor call of spaces.compress_kv.compress_variants (a CSA and an HCA layer)."""
    from .spaces.compress_kv import compress_variants

    B, T, R = problem.dim("B"), problem.dim("T"), problem.dim("rope_dim")
    if small:
        B, T = 1, min(T, 41)                          # odd: a partial last block
    calls = []
    for i, (_, d, ratio, quant, overlap) in enumerate(compress_variants(problem)):
        r = R
        if small:
            # Interpreter-sized rows that keep each call's constraints: fp8 needs (d - R) % 64 == 0,
            # fp4 a power-of-two d; HCA blocks shortened so that T holds a few of them.
            d, r, ratio = (32, 8, ratio) if quant == "hadamard_fp4" else (80, 16, min(ratio, 16))
        C = 2 * d if overlap else d
        n_entries = math.ceil(T / ratio)
        s = seed + 10 * i
        kv = _randn((B, T, C), device, s, scale=2.0)
        score = _randn((B, T, C), device, s + 1)
        ape = _randn((ratio, C), device, s + 2, scale=0.5)
        weight = torch.rand(d, generator=_gen(device, s + 3), device=device) + 0.5
        angles = torch.rand((n_entries, r // 2), generator=_gen(device, s + 4), device=device) * 6.3
        calls.append((kv, score, ape, weight, angles.cos(), angles.sin(), ratio, overlap, 1e-6, quant))
    return tuple(calls)


def _compress_compare(refs, outs) -> str | None:
    for i, (ref, out) in enumerate(zip(refs, outs)):
        reason = few_flips(f"call {i}", ref, out)
        if reason:
            return reason
    return None


COMPRESS_KV = KernelTask(
    inputs=_compress_inputs,
    reference=lambda calls: tuple(torch.ops.dsv4.compress_kv(*a) for a in calls),
    call=lambda fn, calls, cfg: tuple(fn(*a, config=cfg) for a in calls),
    compare=_compress_compare)


# ---- lightning-indexer top-k ----------------------------------------------------------------------

def _dyadic(shape, device, seed, dtype) -> torch.Tensor:
    """k / 4 with |k| <= 12: exact in every float dtype, products and sums exact in fp32 (tasks docstring)."""
    k = torch.randint(-12, 13, shape, generator=_gen(device, seed), device=device)
    return (k.float() / 4).to(dtype)


def _indexer_inputs(problem, device, seed=0, small=False):
    B, S, H, d, N, ratio, topk = (problem.dim(k) for k in ("B", "S", "H", "d", "N", "ratio", "topk"))
    if small:
        # Fewer queries, spread over more keys than one tile, so that tiles merge and padding shows.
        B, S, H, d, N, topk = 1, min(S, 9), min(H, 3), min(d, 16), min(N, 37), min(topk, 13)
        positions = (torch.arange(S, device=device) * (N * ratio // S)).view(1, S)
        positions[0, -1] = N * ratio - 1
    else:
        positions = torch.arange(S, device=device).expand(B, S)
    q = _dyadic((B, S, H, d), device, seed, DTYPES[problem.dim("q_dtype")])
    weights = _dyadic((B, S, H), device, seed + 1, DTYPES[problem.dim("q_dtype")])
    keys = _dyadic((B, N, d), device, seed + 2, DTYPES[problem.dim("k_dtype")])
    return (q, weights, keys, positions.to(torch.int64).contiguous(), ratio, topk)


INDEXER_TOPK = KernelTask(
    inputs=_indexer_inputs,
    reference=lambda a: torch.ops.dsv4.indexer_topk(*a),
    call=lambda fn, a, cfg: fn(*a, config=cfg),
    compare=lambda ref, out: close("indices", ref, out, 0.0))


def _indexer_cached_inputs(problem, device, seed=0, small=False):
    """Decode over an FP4 cache: dyadic q and weights (k / 4) and keys e2m1 x 1/2 (each 32-value block
    holding a +-6 code, so that packing keeps the scale 1/2 and the values exactly): every score is a
    multiple of 2^-6 below 2^18 at the model's 64 heads x 128 dims, exact in fp32, so the selection, ties
    included, is determined. Sequences at different positions (some see fewer than topk keys)."""
    from ..model.kv_layout import FP4_BLOCK, pack_indexer_keys
    from ..model.ops import fp4_values

    B, H, d, N, ratio, topk = (problem.dim(k) for k in ("B", "H", "d", "N", "ratio", "topk"))
    if small:
        B, H, d, N, topk = min(B, 3), min(H, 3), min(d, 32), min(N, 37), min(topk, 13)
    q = _dyadic((B, 1, H, d), device, seed, DTYPES[problem.dim("q_dtype")])
    weights = _dyadic((B, 1, H), device, seed + 1, DTYPES[problem.dim("q_dtype")])
    codes = torch.randint(0, 16, (B, N, d), generator=_gen(device, seed + 2), device=device)
    codes[..., ::FP4_BLOCK] = 7 + 8 * (codes[..., ::FP4_BLOCK] % 2)                    # +-6
    cache = pack_indexer_keys(fp4_values(codes) / 2, problem.dim("fmt"))
    # sequence b sees (b + 1) / B of the keys: the last all of them, the first ones fewer than topk
    positions = ((torch.arange(B, device=device) + 1) * N * ratio // B - 1).view(B, 1)
    return (q, weights, cache, positions.to(torch.int64).contiguous(), ratio, topk, problem.dim("fmt"))


INDEXER_TOPK_CACHED = KernelTask(
    inputs=_indexer_cached_inputs,
    reference=lambda a: torch.ops.dsv4.indexer_topk_cached(*a),
    call=lambda fn, a, cfg: fn(*a, config=cfg),
    compare=lambda ref, out: close("indices", ref, out, 0.0))


# ---- MoE experts --------------------------------------------------------------------------------

def _moe_inputs(problem, device, seed=0, small=False, small_dims=(64, 48)):
    """(x, topk_ids, topk_weights, w1, w2, w3, swiglu_limit) in the problem's dtype; small: 37 tokens,
    9 experts, D, I = small_dims."""
    T, k, E, D, I = (problem.dim(n) for n in ("T", "k", "E", "D", "I"))
    if small:
        T, E, D, I = min(T, 37), min(E, 9), min(D, small_dims[0]), min(I, small_dims[1])
        k = min(k, E)
    dtype = DTYPES[problem.dim("dtype")]
    x = _randn((T, D), device, seed, dtype)
    ids = torch.rand((T, E), generator=_gen(device, seed + 1), device=device).argsort(-1)[:, :k].to(torch.int32)
    weights = torch.rand((T, k), generator=_gen(device, seed + 2), device=device) + 0.1
    w1 = _randn((E, I, D), device, seed + 3, dtype, D ** -0.5)
    w2 = _randn((E, D, I), device, seed + 4, dtype, I ** -0.5)
    w3 = _randn((E, I, D), device, seed + 5, dtype, D ** -0.5)
    return (x, ids, weights, w1, w2, w3, 10.0)


MOE_EXPERTS = KernelTask(
    inputs=_moe_inputs,
    reference=lambda a: torch.ops.dsv4.moe_experts(*a),
    call=lambda fn, a, cfg: fn(*a, config=cfg),
    compare=lambda ref, out: close("out", ref, out, 1e-2))


def _moe_fp8_inputs(problem, device, seed=0, small=False):
    """_moe_inputs with the experts' weights as FP8 (e4m3, one e8m0 scale per 128 x 128 tile; quantized
    32 experts at a time: whole-tensor quantization's temporaries are tens of GiB at V4-Flash's 256)
    -> (x, ids, weights, w1, w2, w3, limit, (s1, s2, s3)); small: D = I = 128 (W8A8's whole blocks)."""
    from ..model.weight_formats import quantize_experts, quantize_fp8_weight

    x, ids, weights, *ws, limit = _moe_inputs(problem, device, seed, small, small_dims=(128, 128))
    quantized = [quantize_experts(quantize_fp8_weight, w) for w in ws]
    return (x, ids, weights, *(q for q, _ in quantized), limit, tuple(s for _, s in quantized))


def _moe_mxfp4_inputs(problem, device, seed=0, small=False):
    """_moe_fp8_inputs with the experts' weights as MXFP4 (two e2m1 codes a byte, an e8m0 scale per 1 x 32)."""
    from ..model.weight_formats import quantize_experts, quantize_mxfp4

    x, ids, weights, *ws, limit = _moe_inputs(problem, device, seed, small, small_dims=(128, 128))
    quantized = [quantize_experts(quantize_mxfp4, w) for w in ws]
    return (x, ids, weights, *(q for q, _ in quantized), limit, tuple(s for _, s in quantized))


def _fp8_act_reference(weight_format: str):
    """The naive twin of the kernel's act="fp8" (W8A8 / W4A8) over `weight_format` weights."""
    from ..kernels.moe_experts import naive

    return lambda a: naive.moe_experts(*a[:7], None, weight_format, a[7], act="fp8")


MOE_EXPERTS_FP8 = KernelTask(
    inputs=_moe_fp8_inputs,
    reference=lambda a: torch.ops.dsv4.moe_experts_fp8(*a[:6], *a[7], a[6]),
    call=lambda fn, a, cfg: fn(*a[:7], config=cfg, weight_format="fp8", scales=a[7]),
    compare=lambda ref, out: close("out", ref, out, 1e-2))

MOE_EXPERTS_FP8_W8A8 = KernelTask(
    inputs=_moe_fp8_inputs,
    reference=_fp8_act_reference("fp8"),
    call=lambda fn, a, cfg: fn(*a[:7], config=cfg, weight_format="fp8", scales=a[7], act="fp8"),
    compare=lambda ref, out: close("out (W8A8, against the naive W8A8 twin)", ref, out, 1e-2))

MOE_EXPERTS_MXFP4_W4A8 = KernelTask(
    inputs=_moe_mxfp4_inputs,
    reference=_fp8_act_reference("mxfp4"),
    call=lambda fn, a, cfg: fn(*a[:7], config=cfg, weight_format="mxfp4", scales=a[7], act="fp8"),
    compare=lambda ref, out: close("out (W4A8, against the naive W4A8 twin)", ref, out, 1e-2))


# ---- FP8 linear ----------------------------------------------------------------------------------

def _fp8_linear_inputs(problem, device, seed=0, small=False):
    from ..model.weight_formats import e8m0_to_float, quantize_fp8_weight

    m, n, k = problem.dim("m"), problem.dim("n"), problem.dim("k")
    if small:
        m, n, k = min(m, 37), min(n, 96), min(k, 256)  # odd rows, a partial weight tile
    x = _randn((m, k), device, seed, torch.bfloat16)
    codes, scale = quantize_fp8_weight(_randn((n, k), device, seed + 1, scale=k ** -0.5))
    return (x, codes, e8m0_to_float(scale))


FP8_LINEAR = KernelTask(
    inputs=_fp8_linear_inputs,
    reference=lambda a: torch.ops.dsv4.fp8_linear(*a),
    call=lambda fn, a, cfg: fn(*a, config=cfg),
    compare=lambda ref, out: close("y", ref, out, REL_RMS_TOL[torch.bfloat16]))


def _float32_linear_inputs(problem, device, seed=0, small=False):
    m, n, k = problem.dim("m"), problem.dim("n"), problem.dim("k")
    if small:
        m, n, k = min(m, 37), min(n, 96), min(k, 200)  # odd rows, a partial tile, K not a multiple of the step
    return (_randn((m, k), device, seed, torch.bfloat16), _randn((n, k), device, seed + 1, scale=k ** -0.5))


FLOAT32_LINEAR = KernelTask(
    inputs=_float32_linear_inputs,
    reference=lambda a: torch.ops.dsv4.float32_linear(*a),
    call=lambda fn, a, cfg: fn(*a, config=cfg),
    compare=lambda ref, out: close("y", ref, out, 1e-5))


TASKS: dict[str, KernelTask] = {
    "fp8_quantize": FP8_QUANTIZE, "fp4_quantize": FP4_QUANTIZE, "newton_schulz": NEWTON_SCHULZ,
    "hc_pre": HC_PRE, "hc_sinkhorn": HC_SINKHORN, "sparse_attention": SPARSE_ATTENTION,
    "sparse_attention_cached": SPARSE_ATTENTION_CACHED, "compress_kv": COMPRESS_KV, "indexer_topk": INDEXER_TOPK,
    "indexer_topk_cached": INDEXER_TOPK_CACHED, "moe_experts": MOE_EXPERTS,
    "moe_experts_fp8": MOE_EXPERTS_FP8, "moe_experts_fp8_w8a8": MOE_EXPERTS_FP8_W8A8,
    "moe_experts_mxfp4_w4a8": MOE_EXPERTS_MXFP4_W4A8, "fp8_linear": FP8_LINEAR,
    "float32_linear": FLOAT32_LINEAR,
}


def tensors_nbytes(args: Sequence[Any]) -> int:
    """Bytes of the tensors in args (nested tuples of arguments included: compress_kv's calls)."""
    return sum(a.numel() * a.element_size() if isinstance(a, torch.Tensor) else tensors_nbytes(a)
               for a in args if isinstance(a, (torch.Tensor, tuple)))
