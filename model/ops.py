"""The op boundary: every fusable region of the model as a `torch.library` custom op `torch.ops.dsv4.*`.

Each op's implementation here is plain PyTorch and is registered for every device (CompositeExplicit
`default`), with a fake implementation for tracing and an autograd formula that re-runs the plain
implementation (its backward is the reference backward). The model calls these ops; the compile
passes swap them for Triton kernels, which are separate ops this module knows nothing about.

Public contract (names, argument order, semantics): `sparse_attention`, `fp8_quantize`,
`fp8_dequantize`, `fp4_quantize`, `fp4_dequantize`, `newton_schulz`, `hc_sinkhorn`.
Ours (documented below, stable within the project): `compress_kv`, `indexer_topk`, `hc_pre`,
`sparse_attention_cached`, `indexer_topk_cached`, `fp8_linear`, `float32_linear`.

Long-context memory: `sparse_attention`, `sparse_attention_cached`, `indexer_topk` and
`indexer_topk_cached` work in chunks of queries so that a 128K prefill never materialises [S, K, D] or
[S, H, N] at once (`indexer_topk_cached` also unpacks its keys chunk by chunk: never the whole cache
as float32). Each exposes its per-chunk function (`*_chunk`) so that export can trace a chunk-free
version for symbolic lengths.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .kv_layout import index_cache_mismatch, unpack_indexer_keys, unpack_main_entries

LIB = "dsv4"
FP8_MAX = 448.0
FP4_MAX = 6.0
AMAX_FLOOR = 1e-4
FP4_AMAX_FLOOR = FP4_MAX * 2.0 ** -126  # DeepSeek's FP4 floor (its FP8 floor is AMAX_FLOOR)
# Bytes of float32 intermediates one chunk of a chunked op may hold (about 1 GiB).
CHUNK_BYTES = 1 << 30


# ================================================================================================
# Registration helpers
# ================================================================================================

def _plain_autograd(op, plain: Callable, n_inputs: int, differentiable: Sequence[int]) -> None:
    """Register a backward for `op` that differentiates `plain` (the same math) by recomputation.

    The forward stays the opaque custom op; backward re-runs `plain` on detached copies of the saved
    inputs under autograd and returns their gradients, so the plain implementation's own backward is
    the op's backward. Inputs not listed in `differentiable` (indices, ints, floats) get None.
    """

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*[inputs[i] for i in differentiable])
        ctx.inputs = [None if i in differentiable else x for i, x in enumerate(inputs)]

    def backward(ctx, *grads):
        saved = iter(ctx.saved_tensors)
        args = list(ctx.inputs)
        leaves = []
        for i in differentiable:
            leaf = next(saved).detach().requires_grad_(True)
            args[i] = leaf
            leaves.append(leaf)
        with torch.enable_grad():
            outputs = plain(*args)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None and o.requires_grad]
        result = [None] * n_inputs
        if pairs:
            grads_in = torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs], allow_unused=True)
            for i, g in zip(differentiable, grads_in):
                result[i] = g
        return tuple(result)

    torch.library.register_autograd(op, backward, setup_context=setup_context)


def _query_chunk(n_queries: int, bytes_per_query: int) -> int:
    return max(1, min(n_queries, CHUNK_BYTES // max(1, bytes_per_query)))


# ================================================================================================
# FP8 e4m3 blockwise quantization
# ================================================================================================

def _block_scale(x: torch.Tensor, block_size: int, qmax: float, pow2_scale: bool, name: str):
    """x [..., D] -> (blocks [..., D/bs, bs] float32, scale [..., D/bs] float32).

    The amax floor is DeepSeek's per format: 1e-4 for FP8, 6 * 2^-126 for FP4 (so a block of tiny
    values still gets a scale that represents them, down to float32's smallest normal)."""
    if block_size <= 0 or x.shape[-1] % block_size != 0:
        raise ValueError(f"{name}: last dim {x.shape[-1]} is not divisible by block_size {block_size}; "
                         f"pass a block_size that divides it")
    blocks = x.float().unflatten(-1, (x.shape[-1] // block_size, block_size))
    floor = FP4_AMAX_FLOOR if qmax == FP4_MAX else AMAX_FLOOR
    scale = blocks.abs().amax(-1).clamp_min(floor) / qmax
    if pow2_scale:
        pow2 = torch.exp2(torch.ceil(torch.log2(scale)))
        # float32 log2 rounds to the integer k for scales just above 2^k: step those up (NaN/Inf stay).
        scale = torch.where(pow2 < scale, 2 * pow2, pow2)
    return blocks, scale


@torch.library.custom_op(f"{LIB}::fp8_quantize", mutates_args=())
def fp8_quantize(x: torch.Tensor, block_size: int, pow2_scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise FP8 e4m3 quantization along the last dim.

    x [..., D] (any float dtype) -> x_fp8 [..., D] float8_e4m3fn, scale [..., D/block_size] float32.
    scale = max(amax, 1e-4) / 448 per block, rounded up to a power of two when `pow2_scale`;
    x_fp8 = x / scale (round to nearest even). D not divisible by block_size is a ValueError.
    NaN/Inf: a block holding a NaN gets scale NaN and all its codes NaN; a block holding +-Inf gets
    scale +Inf, its infinite elements become NaN codes and its finite elements 0.
    """
    codes, scale = _fp8_code_blocks(x, block_size, pow2_scale, "fp8_quantize")
    return codes.flatten(-2).contiguous(), scale.contiguous()  # contiguous, as the fake says


def _fp8_code_blocks(x: torch.Tensor, block_size: int, pow2_scale: bool, name: str):
    """x [..., D] -> (codes [..., D/bs, bs] float8_e4m3fn, scale [..., D/bs] float32): fp8_quantize's math."""
    blocks, scale = _block_scale(x, block_size, FP8_MAX, pow2_scale, name)
    return (blocks / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


@fp8_quantize.register_fake
def _(x, block_size, pow2_scale):
    if x.shape[-1] % block_size != 0:
        raise ValueError(f"fp8_quantize: last dim {x.shape[-1]} is not divisible by block_size {block_size}")
    return (x.new_empty(x.shape, dtype=torch.float8_e4m3fn),
            x.new_empty((*x.shape[:-1], x.shape[-1] // block_size), dtype=torch.float32))


@torch.library.custom_op(f"{LIB}::fp8_dequantize", mutates_args=())
def fp8_dequantize(x_fp8: torch.Tensor, scale: torch.Tensor, block_size: int) -> torch.Tensor:
    """x_fp8 [..., D] float8_e4m3fn, scale [..., D/block_size] float32 -> float32 [..., D]."""
    blocks = x_fp8.unflatten(-1, (x_fp8.shape[-1] // block_size, block_size))
    return _fp8_values(blocks, scale).contiguous()


def _fp8_values(code_blocks: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """codes [..., D/bs, bs] float8_e4m3fn, scale [..., D/bs] -> float32 [..., D]: fp8_dequantize's math."""
    return (code_blocks.float() * scale.unsqueeze(-1)).flatten(-2)


@fp8_dequantize.register_fake
def _(x_fp8, scale, block_size):
    return x_fp8.new_empty(x_fp8.shape, dtype=torch.float32)


# ================================================================================================
# FP4 e2m1 blockwise quantization, two codes per byte
# ================================================================================================

# Code k (0..7) of |value|; code + 8 is the negative. Boundaries between code k and k+1, and whether a
# value exactly on the boundary goes up (the upper code is even: ties go to the even code).
# Written with int32 arithmetic only (no in-place, bitwise or lookup-table ops), so that the same
# code is what export traces into AOTInductor and standard ONNX.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_FP4_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def fp4_codes(y: torch.Tensor) -> torch.Tensor:
    """Values already divided by their scale (float32) -> e2m1 codes (int32 0..15), ties to even code.

    NaN gives code 0 (+0): every comparison with NaN is false.
    """
    mag = y.abs()
    code = torch.zeros_like(y, dtype=torch.int32)
    for k, bound in enumerate(_FP4_BOUNDS):
        tie_goes_up = (k + 1) % 2 == 0
        code = code + (mag >= bound if tie_goes_up else mag > bound).to(torch.int32)
    return code + 8 * (y < 0).to(torch.int32)


def fp4_values(code: torch.Tensor) -> torch.Tensor:
    """e2m1 codes (integers 0..15) -> float32 values: sign(1) exponent(2) mantissa(1); exponent 0
    gives 0.5 * m (0, 0.5), otherwise 2^(e-1) * (1 + m/2) (1, 1.5, 2, 3, 4, 6); code 8 is -0."""
    magnitude_code = code % 8
    exponent = torch.div(magnitude_code, 2, rounding_mode="floor")
    mantissa = (magnitude_code % 2).float()
    magnitude = torch.where(exponent == 0, 0.5 * mantissa, torch.exp2((exponent - 1).float()) * (1 + 0.5 * mantissa))
    return torch.where(code >= 8, -magnitude, magnitude)


@torch.library.custom_op(f"{LIB}::fp4_quantize", mutates_args=())
def fp4_quantize(x: torch.Tensor, block_size: int, pow2_scale: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise FP4 e2m1 quantization along the last dim, packed two codes per byte.

    x [..., D] -> packed [..., D/2] uint8 (element 2i in the low nibble, 2i+1 in the high nibble),
    scale [..., D/block_size] float32 = max(amax, 6 * 2^-126) / 6, rounded up to a power of two when
    `pow2_scale`. Each x/scale goes to the nearest of 0, 0.5, 1, 1.5, 2, 3, 4, 6 (signed), a tie to the
    even code (0.25 -> 0, 0.75 -> 1, 2.5 -> 2, 5 -> 4). D must be divisible by block_size, and
    block_size even. NaN/Inf: a block holding a NaN gets scale NaN, one holding +-Inf scale +Inf; the
    codes of such a block follow the formula (NaN -> +0) and dequantize to NaN, as scale is not finite.
    """
    if block_size % 2:
        raise ValueError(f"fp4_quantize: block_size {block_size} must be even (two codes per byte)")
    blocks, scale = _block_scale(x, block_size, FP4_MAX, pow2_scale, "fp4_quantize")
    code = fp4_codes(blocks / scale.unsqueeze(-1)).flatten(-2)
    return (code[..., 0::2] + 16 * code[..., 1::2]).to(torch.uint8).contiguous(), scale.contiguous()


@fp4_quantize.register_fake
def _(x, block_size, pow2_scale=False):
    if x.shape[-1] % block_size != 0 or block_size % 2:
        raise ValueError(f"fp4_quantize: last dim {x.shape[-1]} is not divisible by even block_size {block_size}")
    return (x.new_empty((*x.shape[:-1], x.shape[-1] // 2), dtype=torch.uint8),
            x.new_empty((*x.shape[:-1], x.shape[-1] // block_size), dtype=torch.float32))


@torch.library.custom_op(f"{LIB}::fp4_dequantize", mutates_args=())
def fp4_dequantize(packed: torch.Tensor, scale: torch.Tensor, block_size: int) -> torch.Tensor:
    """packed [..., D/2] uint8, scale [..., D/block_size] float32 -> float32 [..., D]."""
    byte = packed.to(torch.int32)
    code = torch.stack([byte % 16, torch.div(byte, 16, rounding_mode="floor")], dim=-1).flatten(-2)
    values = fp4_values(code)
    blocks = values.unflatten(-1, (values.shape[-1] // block_size, block_size))
    return (blocks * scale.unsqueeze(-1)).flatten(-2)


@fp4_dequantize.register_fake
def _(packed, scale, block_size):
    return packed.new_empty((*packed.shape[:-1], packed.shape[-1] * 2), dtype=torch.float32)


def fp8_simulate(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Quantize-dequantize with power-of-two scales (QAT): forward sees FP8 values, backward is identity."""
    codes, scale = torch.ops.dsv4.fp8_quantize(x, block_size, True)
    sim = torch.ops.dsv4.fp8_dequantize(codes, scale, block_size).to(x.dtype)
    return x + (sim - x).detach()


def fp8_round(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """`fp8_simulate`'s numbers written as plain tensor code, with no dsv4 op: for the KV cache's window
    rows, so that a compiler fuses the rounding into the kernel that produces them (RMSNorm, RoPE)
    instead of running a standalone quantization pass over the cache."""
    codes, scale = _fp8_code_blocks(x, block_size, True, "fp8_round")
    sim = _fp8_values(codes, scale).to(x.dtype)
    return x + (sim - x).detach()


def bf16_round(x: torch.Tensor) -> torch.Tensor:
    """float32 x -> x rounded to bfloat16 values (nearest, ties to even), kept in float32: bit for bit
    `x.bfloat16().float()`, written in float arithmetic no compiler drops. (Inductor before torch 2.13
    drops a float32 -> bf16 -> float32 round trip even with emulate_precision_casts, so a compiled model
    kept fp32 rope dims where eager rounds them: bench/results/H200/session7_gpu_runs.md; a bitcast to
    int32 has no ONNX translation at our opset.) Backward is the cast's (the gradient rounded to bf16):
    where x requires grad the result is rounded.detach() + (c - c.detach()) with c the cast, which differs from
    the cast only in giving +0.0 for -0.0."""
    # Normal x: Veltkamp's split, c - (c - x) with c = x (2^16 + 1), keeps the top 24 - 16 = 8 significant
    # bits, rounded to nearest even. Large x is split at 2^-32 scale (c would overflow), subnormal x rounded
    # on bf16's subnormal grid 2^-133 (Veltkamp would keep 8 bits of a number that has fewer); power-of-two
    # scalings are exact.
    a = x.abs()
    big = a >= 2.0 ** 100
    scaled = torch.where(big, x * 2.0 ** -32, x)
    c = scaled * 65537.0
    rounded = c - (c - scaled)
    rounded = torch.where(big, rounded * 2.0 ** 32, rounded)
    subnormal = torch.round(x * 2.0 ** 67 * 2.0 ** 66) * 2.0 ** -67 * 2.0 ** -66
    rounded = torch.where(a < 2.0 ** -126, subnormal, rounded)
    rounded = torch.where(torch.isfinite(x), rounded, x)
    if not x.requires_grad:
        return rounded
    cast = x.bfloat16().float()
    return rounded.detach() + (cast - cast.detach())


def fp4_simulate(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """FP4 twin of `fp8_simulate` (power-of-two scales, as the indexer cache stores them)."""
    packed, scale = torch.ops.dsv4.fp4_quantize(x, block_size, True)
    sim = torch.ops.dsv4.fp4_dequantize(packed, scale, block_size).to(x.dtype)
    return x + (sim - x).detach()


# ================================================================================================
# FP8 linear (W8A8 with block scales), DeepSeek's inference semantics for FP8-shipped weights
# ================================================================================================

FP8_LINEAR_BLOCK = 128  # activation block along K, and the weight's tile edge


@torch.library.custom_op(f"{LIB}::fp8_linear", mutates_args=())
def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """y = x @ W^T with W shipped as FP8, as DeepSeek's inference computes it (act_quant + fp8_gemm).

    x [..., K] float; weight [N, K] float8_e4m3fn; scale [ceil(N/128), K/128] float32, one (power-of-
    two) scale per 128 x 128 tile of W -> y [..., N] in x's dtype.
    The input is quantized to FP8 first, exactly as `fp8_quantize(x, 128, pow2_scale=True)` (blocks of
    128 along K, scale = pow2_ceil(max(amax, 1e-4) / 448)); then y = (x_fp8 * x_scale) @ (W * W_scale)^T
    accumulated in float32 and cast once. K not a multiple of 128 is a ValueError (DeepSeek asserts
    the same); the Triton kernel refuses it too.
    """
    _check_fp8_linear(x, weight, scale)
    codes, x_scale = _fp8_code_blocks(x, FP8_LINEAR_BLOCK, True, "fp8_linear")
    x_deq = _fp8_values(codes, x_scale)                                                   # [..., K] fp32
    n, k = weight.shape
    w_scale = scale.float().repeat_interleave(FP8_LINEAR_BLOCK, 0)[:n].repeat_interleave(FP8_LINEAR_BLOCK, 1)[:, :k]
    w_deq = weight.float() * w_scale                                                      # [N, K] fp32
    return (x_deq @ w_deq.T).to(x.dtype)


def _check_fp8_linear(x, weight, scale) -> None:
    n, k = weight.shape
    if weight.dtype != torch.float8_e4m3fn:
        raise ValueError(f"fp8_linear: weight dtype {weight.dtype}; expected torch.float8_e4m3fn")
    if x.shape[-1] != k or k % FP8_LINEAR_BLOCK:
        raise ValueError(f"fp8_linear: x [..., {x.shape[-1]}] against weight [{n}, {k}]: K must match and be a "
                         f"multiple of {FP8_LINEAR_BLOCK} (the activation block)")
    tiles = (-(-n // FP8_LINEAR_BLOCK), k // FP8_LINEAR_BLOCK)
    if tuple(scale.shape) != tiles:
        raise ValueError(f"fp8_linear: scale shape {list(scale.shape)}; expected {list(tiles)} (one per 128x128 tile)")


@fp8_linear.register_fake
def _(x, weight, scale):
    _check_fp8_linear(x, weight, scale)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


# ================================================================================================
# float32 linear (the float32 products of the compressors, the MoE gate and the head)
# ================================================================================================

@torch.library.custom_op(f"{LIB}::float32_linear", mutates_args=())
def float32_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """y = x @ W^T in float32, whatever the operands' float dtypes: x [..., K], weight [N, K] -> [..., N]
    float32 (DeepSeek's float32 projections: the compressors' wkv / wgate and the MoE gate over the
    bf16 hidden state, the head's logits).

    On CUDA with two 16-bit operands of one dtype, the 16-bit GEMM writing its float32 accumulator
    (aten::mm.dtype: their products are exact in float32, and no float32 copy of the weight is made per
    call, which at V4's head would triple a decode step's weight traffic); elsewhere (the CPU has no
    such kernel, and its bf16 GEMMs are slower than float32 ones) a float32 GEMM of the upcast operands.
    Inference only (mm.dtype has no derivative): `model.layers.float32_product` calls F.linear where
    autograd records."""
    _check_float32_linear(x, weight)
    if x.is_cuda and x.dtype == weight.dtype and x.dtype != torch.float32 and hasattr(torch.ops.aten.mm, "dtype"):
        return torch.ops.aten.mm.dtype(x.reshape(-1, x.shape[-1]), weight.t(), torch.float32).reshape(*x.shape[:-1], -1)
    return F.linear(x.float(), weight.float())


def _check_float32_linear(x, weight) -> None:
    if not (x.is_floating_point() and weight.is_floating_point() and weight.dim() == 2 and x.dim() >= 1):
        raise ValueError(f"float32_linear: x {x.dtype} {list(x.shape)} and weight {weight.dtype} {list(weight.shape)}; "
                         "expected floating x [..., K] and weight [N, K]")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"float32_linear: x [..., {x.shape[-1]}] against weight {list(weight.shape)}: K must match")


@float32_linear.register_fake
def _(x, weight):
    _check_float32_linear(x, weight)
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=torch.float32)


# ================================================================================================
# Newton-Schulz orthogonalisation (Muon)
# ================================================================================================

@torch.library.custom_op(f"{LIB}::newton_schulz", mutates_args=())
def newton_schulz(G: torch.Tensor, coefficients: list[float]) -> torch.Tensor:
    """Orthogonalise G [..., M, N] by Newton-Schulz, matrix by matrix over the leading dims.

    coefficients: flat a0, b0, c0, a1, b1, c1, ...: one (a, b, c) triple per step. X = G / (||G||_F +
    1e-7) per matrix in bfloat16, transposed when M > N; each step X <- a X + (b A + c A A) X with
    A = X X^T. Returns G's dtype and shape. NaN/Inf in G propagate to that matrix's output.
    b A + c A A and a X + (...) X are each one fused bf16 baddbmm, rounding where torch.optim.Muon's
    addmm does (same bits on CPU; about 2x closer to float64 than rounding A A separately).
    """
    if len(coefficients) % 3 or not coefficients:
        raise ValueError(f"newton_schulz: coefficients has {len(coefficients)} values; need one (a, b, c) triple per step")
    if G.dim() < 2:
        raise ValueError(f"newton_schulz: G has shape {tuple(G.shape)}; need [..., M, N]")
    X = G.to(torch.bfloat16)
    X = X / (torch.linalg.matrix_norm(X.float(), keepdim=True) + 1e-7).to(torch.bfloat16)
    tall = G.shape[-2] > G.shape[-1]
    if tall:
        X = X.mT
    lead = X.shape[:-2]
    X = X.reshape(-1, *X.shape[-2:])                                         # [batch, m, n], m <= n
    for step in range(len(coefficients) // 3):
        a, b, c = coefficients[3 * step: 3 * step + 3]
        A = X @ X.mT
        # c = 0 skips A A: bf16 baddbmm with alpha=0 returns wrong values on CPU (torch 2.13, >= 17 rows).
        B = torch.baddbmm(A, A, A, beta=b, alpha=c) if c != 0 else b * A
        X = torch.baddbmm(X, B, X, beta=a)
    X = X.reshape(*lead, *X.shape[-2:])
    if tall:
        X = X.mT
    return X.to(G.dtype).contiguous()


@newton_schulz.register_fake
def _(G, coefficients):
    return G.new_empty(G.shape)  # contiguous, as the real output (empty_like would keep G's strides)


# ================================================================================================
# mHC: Sinkhorn-Knopp and the whole pre-mixing step
# ================================================================================================

def _sinkhorn_plain(logits: torch.Tensor, iters: int, eps: float, as_loop: bool = False) -> torch.Tensor:
    """hc_sinkhorn's math. as_loop: its iters - 1 rounds as one while_loop node rather than unrolled (the
    same bits; for exported engines, where the unrolled rounds were about a quarter of the tiny decode
    graph's nodes: bench/results/cpu/sinkhorn_loop.md); no autograd, and a device loop would read its
    counter on the host each round, so only the CPU engines' export takes it."""
    c = logits.float().softmax(-1) + eps
    c = c / (c.sum(-2, keepdim=True) + eps)
    if as_loop:
        from torch._higher_order_ops.while_loop import while_loop

        # counts down from a tensor: the round count must not be a Python int the loop's functions close
        # over, which torch traces as a dynamic input once a second count is seen (an export verifier error)
        def more(left, c):
            return left > 0

        def one_round(left, c):
            return left - 1, _sinkhorn_round(c, eps).clone()  # a loop body's outputs may not alias its inputs

        left = torch.full((), iters - 1, dtype=torch.int64, device=c.device)
        return while_loop(more, one_round, (left, c))[1]
    for _ in range(iters - 1):
        c = _sinkhorn_round(c, eps)
    return c


def _sinkhorn_round(c: torch.Tensor, eps: float) -> torch.Tensor:
    c = c / (c.sum(-1, keepdim=True) + eps)
    return c / (c.sum(-2, keepdim=True) + eps)


@torch.library.custom_op(f"{LIB}::hc_sinkhorn", mutates_args=())
def hc_sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """logits [..., n, n] -> comb [..., n, n] float32, nearly doubly stochastic.

    c = softmax(logits, -1) + eps; c /= (column sums + eps); then iters - 1 rounds of
    c /= (row sums + eps); c /= (column sums + eps). NaN in a matrix makes that matrix NaN.
    """
    return _sinkhorn_plain(logits, iters, eps)


@hc_sinkhorn.register_fake
def _(logits, iters, eps):
    return logits.new_empty(logits.shape, dtype=torch.float32)


_plain_autograd(hc_sinkhorn, _sinkhorn_plain, 3, (0,))


def _hc_pre_plain(x, fn, scale, base, iters: int, norm_eps: float, hc_eps: float, as_loop: bool = False):
    n = x.shape[-2]
    flat = x.flatten(-2).float()                                             # [B, S, n*D]
    mixes = (flat @ fn.float().T) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + norm_eps)
    pre = torch.sigmoid(mixes[..., :n] * scale[0] + base[:n]) + hc_eps      # [B, S, n]
    post = 2 * torch.sigmoid(mixes[..., n:2 * n] * scale[1] + base[n:2 * n])  # [B, S, n]
    comb_logits = (mixes[..., 2 * n:] * scale[2] + base[2 * n:]).unflatten(-1, (n, n))
    comb = _sinkhorn_plain(comb_logits, iters, hc_eps, as_loop)             # [B, S, n, n]
    y = (pre.unsqueeze(-1) * x.float()).sum(-2)                              # [B, S, D]
    return y.to(x.dtype), post, comb


@torch.library.custom_op(f"{LIB}::hc_pre", mutates_args=())
def hc_pre(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, iters: int,
           norm_eps: float, hc_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mHC pre-mixing of n residual streams (ours).

    x [B, S, n, D] streams; fn [(2+n)*n, n*D] float32; scale [3] float32; base [(2+n)*n] float32.
    mixes = (flat(x) @ fn^T) * rsqrt(mean(flat(x)^2) + norm_eps), split into n pre, n post, n*n comb:
    pre = sigmoid(mixes*scale0 + base) + hc_eps, post = 2 sigmoid(mixes*scale1 + base),
    comb = hc_sinkhorn(mixes*scale2 + base, iters, hc_eps).
    Returns y = sum_i pre_i x_i [B, S, D] in x's dtype, post [B, S, n] and comb [B, S, n, n] float32.
    """
    return _hc_pre_plain(x, fn, scale, base, iters, norm_eps, hc_eps)


@hc_pre.register_fake
def _(x, fn, scale, base, iters, norm_eps, hc_eps):
    *lead, n, d = x.shape
    return (x.new_empty((*lead, d)), x.new_empty((*lead, n), dtype=torch.float32),
            x.new_empty((*lead, n, n), dtype=torch.float32))


_plain_autograd(hc_pre, _hc_pre_plain, 7, (0, 1, 2, 3))


# ================================================================================================
# Sparse attention: one softmax over gathered entries of a shared K=V head, with an attention sink
# ================================================================================================

def sparse_attention_chunk(q, kv, attn_sink, topk_idxs, softmax_scale):
    """The whole of `sparse_attention` for one chunk of queries (no chunking)."""
    B, _, H, _ = q.shape
    valid = topk_idxs >= 0                                                   # [B, S, K]
    # -1 would wrap to the last row: clamp, gather, then mask.
    idx = topk_idxs.long().clamp_min(0)
    batch = torch.arange(B, device=q.device).view(B, 1, 1)
    entries = kv.float()[batch, idx]                                         # [B, S, K, D]
    # Zero the padding's rows too: a NaN/Inf in row 0 would otherwise reach rows with holes (0 * NaN).
    entries = entries.masked_fill(~valid.unsqueeze(-1), 0.0)
    logits = torch.einsum("bshd,bskd->bshk", q.float(), entries) * softmax_scale
    logits = logits.masked_fill(~valid.unsqueeze(2), float("-inf"))          # [B, S, H, K]
    sink = attn_sink.float().view(1, 1, H)
    row_max = torch.maximum(logits.amax(-1), sink)                           # [B, S, H]
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    p = torch.exp(logits - row_max.unsqueeze(-1))                            # [B, S, H, K]
    denom = p.sum(-1) + torch.exp(sink - row_max)                            # [B, S, H]
    # 0 only for an empty row with sink -inf; a safe 1 there keeps the backward free of 0/0.
    denom = torch.where(denom != 0, denom, torch.ones_like(denom))
    out = torch.einsum("bshk,bskd->bshd", p, entries) / denom.unsqueeze(-1)
    # A row with no entries gives zeros whatever the sink.
    out = torch.where(valid.any(-1).view(B, -1, 1, 1), out, torch.zeros_like(out))
    return out.to(q.dtype)


def _sparse_attention_plain(q, kv, attn_sink, topk_idxs, softmax_scale):
    B, S, H, D = q.shape
    K = topk_idxs.shape[-1]
    chunk = _query_chunk(S, B * K * (D + 2 * H) * 4)
    return torch.cat([sparse_attention_chunk(q[:, s:s + chunk], kv, attn_sink, topk_idxs[:, s:s + chunk], softmax_scale)
                      for s in range(0, S, chunk)], dim=1)


@torch.library.custom_op(f"{LIB}::sparse_attention", mutates_args=())
def sparse_attention(q: torch.Tensor, kv: torch.Tensor, attn_sink: torch.Tensor, topk_idxs: torch.Tensor,
                     softmax_scale: float) -> torch.Tensor:
    """Attention of every query over its own set of entries of one shared key=value head.

    q [B, S, H, D]; kv [B, N, D] (key and value); attn_sink [H] float32; topk_idxs [B, S, K] int32 in
    [-1, N), -1 = no entry, a repeated index counts each time; q and kv share one of bf16/fp16/fp32.
    out[b,s,h] = sum_j p_j kv[b, idx_j] with p_j = exp(l_j) / (sum_i exp(l_i) + exp(sink_h)),
    l_j = softmax_scale * q[b,s,h] . kv[b, idx_j]; fp32 accumulation; out [B, S, H, D] in q's dtype.
    A row whose indices are all -1 gives zeros whatever the sink. NaN in q or in a selected kv entry
    propagates to that row; a sink of -inf removes the sink.
    """
    if q.dtype != kv.dtype or q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"sparse_attention: q is {q.dtype} and kv is {kv.dtype}; both must be one of bf16, fp16, fp32")
    return _sparse_attention_plain(q, kv, attn_sink, topk_idxs, softmax_scale)


@sparse_attention.register_fake
def _(q, kv, attn_sink, topk_idxs, softmax_scale):
    return q.new_empty(q.shape)  # contiguous, as the real output (empty_like would keep q's strides)


_plain_autograd(sparse_attention, _sparse_attention_plain, 5, (0, 1, 2))


@torch.library.custom_op(f"{LIB}::sparse_attention_cached", mutates_args=())
def sparse_attention_cached(q: torch.Tensor, cache: torch.Tensor, attn_sink: torch.Tensor, topk_idxs: torch.Tensor,
                            softmax_scale: float, rope_dim: int) -> torch.Tensor:
    """`sparse_attention` over the FP8 production cache (ours; the decode path).

    q [B, S, H, D]; cache [B, N, entry_bytes] uint8 main entries (kv_layout: D - rope_dim FP8 e4m3
    values, rope_dim BF16 values, one power-of-two scale byte per 64 FP8 values, padding), dequantized
    before use; the rest is `sparse_attention`'s contract (out in q's dtype).
    """
    B, S, H, D = q.shape
    kv = unpack_main_entries(cache, D, rope_dim).to(q.dtype)               # [B, N, D]
    return _sparse_attention_plain(q, kv, attn_sink, topk_idxs, softmax_scale)


@sparse_attention_cached.register_fake
def _(q, cache, attn_sink, topk_idxs, softmax_scale, rope_dim):
    return q.new_empty(q.shape)  # contiguous, as the real output


# ================================================================================================
# Compressor: gated softmax pooling of blocks of tokens -> RMSNorm -> RoPE -> FP8 or Hadamard + FP4
# ================================================================================================

COMPRESS_QUANT = ("fp8", "hadamard_fp4", "none")


def rope_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x [..., R] by angles with cos/sin [..., R/2]
    (broadcast against x's leading dims); `inverse` rotates back. Computed in float32."""
    pairs = x.float().unflatten(-1, (-1, 2))
    re, im = pairs[..., 0], pairs[..., 1]
    if inverse:
        sin = -sin
    return torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).flatten(-2).to(x.dtype)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Normalised Walsh-Hadamard transform over the last dim (a power of two), x @ H / sqrt(D)."""
    D = x.shape[-1]
    out = x.float()
    h = 1
    while h < D:  # butterfly: pair element i with i + h inside each block of 2h
        blocks = out.unflatten(-1, (D // (2 * h), 2, h))
        out = torch.stack([blocks[..., 0, :] + blocks[..., 1, :], blocks[..., 0, :] - blocks[..., 1, :]], dim=-2).flatten(-3)
        h *= 2
    return (out * D ** -0.5).to(x.dtype)


def _compress_kv_plain(kv, score, ape, norm_weight, cos, sin, ratio: int, overlap: bool, norm_eps: float, quant: str):
    B, T, C = kv.shape
    d = C // 2 if overlap else C
    n_entries = cos.shape[-2]
    # Exactly n_entries * ratio rows: missing tokens are absent (score -inf), extra ones dropped.
    # Pad-then-slice keeps the size static when T is symbolic.
    rows = n_entries * ratio
    kv = F.pad(kv.float(), (0, 0, 0, rows))[:, :rows].unflatten(1, (n_entries, ratio))          # [B, N, r, C]
    score = F.pad(score.float(), (0, 0, 0, rows), value=float("-inf"))[:, :rows].unflatten(1, (n_entries, ratio))
    score = score + ape.float()
    if overlap:
        # Channels [0, d) pool the previous block, [d, 2d) the current one: one softmax over 2r rows.
        # Pad, then drop the last block (not the reverse): also right for N = 0.
        prev_kv = F.pad(kv[..., :d], (0, 0, 0, 0, 1, 0))[:, :-1]
        prev_score = F.pad(score[..., :d], (0, 0, 0, 0, 1, 0), value=float("-inf"))[:, :-1]
        kv = torch.cat([prev_kv, kv[:, :, :, d:]], dim=2)                                # [B, N, 2r, d]
        score = torch.cat([prev_score, score[:, :, :, d:]], dim=2)
    # Softmax over the rows, written out so that a block with no tokens pools to 0 instead of NaN.
    row_max = score.amax(dim=2, keepdim=True)
    weight = torch.exp(score - torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)))
    total = weight.sum(dim=2)
    pooled = (kv * weight).sum(dim=2)                                                    # [B, N, d]
    # Safe denominator: pooled / 0 in the branch not taken would still make the backward NaN.
    # (total != 0, not > 0: a NaN score must give NaN, not a silent 0.)
    pooled = torch.where(total != 0, pooled / torch.where(total != 0, total, torch.ones_like(total)), torch.zeros_like(pooled))
    pooled = pooled * torch.rsqrt(pooled.square().mean(-1, keepdim=True) + norm_eps) * norm_weight.float()
    rd = 2 * cos.shape[-1]
    pooled = torch.cat([pooled[..., :-rd], rope_rotate(pooled[..., -rd:], cos, sin)], dim=-1)
    if quant == "fp8":  # FP8 on the non-rope dims, BF16 on the rope dims: the cache's layout
        return torch.cat([fp8_simulate(pooled[..., :-rd], 64), bf16_round(pooled[..., -rd:])], dim=-1)
    if quant == "hadamard_fp4":
        return fp4_simulate(hadamard(pooled), 32)
    return pooled


@torch.library.custom_op(f"{LIB}::compress_kv", mutates_args=())
def compress_kv(kv: torch.Tensor, score: torch.Tensor, ape: torch.Tensor, norm_weight: torch.Tensor,
                cos: torch.Tensor, sin: torch.Tensor, ratio: int, overlap: bool, norm_eps: float,
                quant: str) -> torch.Tensor:
    """Compressor (ours): pool blocks of `ratio` tokens into N entries, N = cos.shape[-2].

    kv, score [B, T, C] float32 projections of the tokens (C = 2d when `overlap`, else d); ape
    [ratio, C] positional gate bias; norm_weight [d]; cos, sin [N, R/2] or [B, N, R/2]: RoPE angles at
    each entry's first token. Entry i pools tokens [i*ratio, (i+1)*ratio): tokens beyond T count as
    absent (a partial block pools the tokens present, an empty one gives 0 before the norm, so 0), a
    token with score -inf is absent too, and tokens beyond N*ratio are ignored. So N = T // ratio pools
    the full blocks, and a static N (max_seq_len // ratio) keeps the shape independent of T.
    entry = sum over the block's rows of softmax(score + ape) * kv per channel; with `overlap` channels
    [0, d) take the previous block's rows and [d, 2d) the current block's, in one softmax over 2*ratio
    rows (block 0 has no previous rows). Then RMSNorm(norm_eps) * norm_weight, RoPE on the last R dims,
    and `quant`: "fp8" = FP8-simulate the first d-R dims (block 64, pow2 scales) and round the rope dims
    to BF16; "hadamard_fp4" = Hadamard-rotate all d dims, then FP4-simulate (block 32, pow2 scales);
    "none" = no rounding (the model with `simulate_quantization=False`). Returns [B, N, d] float32 (the values the cache holds).
    """
    if quant not in COMPRESS_QUANT:
        raise ValueError(f"compress_kv: quant {quant!r}; accepted: {', '.join(COMPRESS_QUANT)}")
    return _compress_kv_plain(kv, score, ape, norm_weight, cos, sin, ratio, overlap, norm_eps, quant)


@compress_kv.register_fake
def _(kv, score, ape, norm_weight, cos, sin, ratio, overlap, norm_eps, quant):
    B, T, C = kv.shape
    return kv.new_empty((B, cos.shape[-2], C // 2 if overlap else C), dtype=torch.float32)


_plain_autograd(compress_kv, _compress_kv_plain, 10, (0, 1, 2, 3))


# ================================================================================================
# Lightning indexer: weighted ReLU scores and top-k with ties to the lowest index
# ================================================================================================

def indexer_scores(q, weights, keys):
    """q [B, S, H, d], weights [B, S, H], keys [B, N, d] -> I [B, S, N] float32, the weighted ReLU
    scores summed over the heads given (over a tensor-parallel rank's heads: its partial sum)."""
    scores = torch.einsum("bshd,bnd->bshn", q.float(), keys.float()).relu()           # [B, S, H, N]
    return (scores * weights.float().unsqueeze(-1)).sum(2)                             # [B, S, N]


def indexer_select(scores, positions, ratio: int, topk: int):
    """scores [B, S, N] (all heads summed), positions [B, S] -> [B, S, topk] int32: `indexer_topk`'s
    selection (visible keys only, best first, ties to the lowest index, -1 padding)."""
    N = scores.shape[-1]
    n_visible = torch.div(positions + 1, ratio, rounding_mode="floor").unsqueeze(-1)  # [B, S, 1]
    visible = torch.arange(N, device=scores.device) < n_visible                       # [B, S, N]
    scores = scores.masked_fill(~visible, float("-inf"))
    # Stable descending sort: among tied scores the lowest index comes first.
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :topk]
    if order.shape[-1] < topk:
        order = F.pad(order, (0, topk - order.shape[-1]), value=-1)
    picked_visible = (order >= 0) & (order < n_visible)
    return torch.where(picked_visible, order, -1).to(torch.int32)


def indexer_topk_chunk(q, weights, keys, positions, ratio: int, topk: int):
    """The whole of `indexer_topk` for one chunk of queries (no chunking)."""
    return indexer_select(indexer_scores(q, weights, keys), positions, ratio, topk)


def indexer_query_chunk(q: torch.Tensor, keys: torch.Tensor) -> int:
    """Queries per chunk of `indexer_topk` for q [B, S, H, d] and keys [B, N, d]."""
    B, S, H, _ = q.shape
    return _query_chunk(S, B * keys.shape[1] * (H + 2) * 4)


@torch.library.custom_op(f"{LIB}::indexer_topk", mutates_args=())
def indexer_topk(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor,
                 ratio: int, topk: int) -> torch.Tensor:
    """Lightning indexer selection (ours).

    q [B, S, H, d] indexer queries; weights [B, S, H] per-head weights; keys [B, N, d] compressed
    indexer keys; positions [B, S] int64 absolute positions of the queries. Key n is visible to a
    query at position t iff n < (t + 1) // ratio. Score I[s, n] = sum_h weights[s, h] * relu(q[s, h] .
    keys[n]). Returns [B, S, topk] int32: the visible keys with the highest scores, best first, ties to
    the lowest index, padded with -1 where fewer than topk are visible. NaN scores sort first.
    """
    S, chunk = q.shape[1], indexer_query_chunk(q, keys)
    return torch.cat([indexer_topk_chunk(q[:, s:s + chunk], weights[:, s:s + chunk], keys, positions[:, s:s + chunk], ratio, topk)
                      for s in range(0, S, chunk)], dim=1)


@indexer_topk.register_fake
def _(q, weights, keys, positions, ratio, topk):
    B, S = q.shape[:2]
    return q.new_empty((B, S, topk), dtype=torch.int32)



def indexer_topk_cached_chunk(q, weights, index_cache, positions, ratio: int, topk: int, fmt: str):
    """The whole of `indexer_topk_cached` for one chunk of queries, every key unpacked at once (no chunking)."""
    keys = unpack_indexer_keys(index_cache, q.shape[-1], fmt)                         # [B, N, d] float32
    return indexer_topk_chunk(q, weights, keys, positions, ratio, topk)


def _check_index_cache(q: torch.Tensor, index_cache: torch.Tensor, fmt: str) -> None:
    mismatch = index_cache_mismatch(index_cache, q.shape[-1], fmt)  # a ValueError naming fmt if unknown
    if mismatch:
        raise ValueError(f"indexer_topk_cached: {mismatch}")


@torch.library.custom_op(f"{LIB}::indexer_topk_cached", mutates_args=())
def indexer_topk_cached(q: torch.Tensor, weights: torch.Tensor, index_cache: torch.Tensor, positions: torch.Tensor,
                        ratio: int, topk: int, fmt: str) -> torch.Tensor:
    """`indexer_topk` over the packed indexer key cache (ours; the decode path).

    index_cache [B, N, entry_bytes] uint8 indexer keys in the layout of `fmt` (kv_layout: "fp4" = d/2
    bytes of e2m1 codes and one e8m0 scale byte per 32 values, "fp8" = d e4m3 codes and one float32
    scale); the rest is `indexer_topk`'s contract. Exactly `indexer_topk(q, weights,
    unpack_indexer_keys(index_cache, d, fmt), positions, ratio, topk)`. The keys are unpacked to
    float32 a chunk of keys at a time (the scores of a chunk of queries are [B, S_chunk, N], far
    smaller than [B, N, d] float32 keys at decode), never the whole cache at once.
    """
    _check_index_cache(q, index_cache, fmt)
    B, S, H, d = q.shape
    N = index_cache.shape[1]
    # Queries a chunk: their scores [B, s, N] fp32 and the selection's sort of them (a few copies).
    q_chunk = _query_chunk(S, B * N * 4 * 4)
    # Keys a chunk: their float32 values [B, n, d] and the per-head scores [B, s, H, n] of a query chunk.
    key_chunk = max(1, CHUNK_BYTES // (B * (d + q_chunk * (H + 2)) * 4))
    picked = []
    for s in range(0, S, q_chunk):
        q_s, w_s = q[:, s:s + q_chunk], weights[:, s:s + q_chunk]
        scores = torch.cat([indexer_scores(q_s, w_s, unpack_indexer_keys(index_cache[:, n:n + key_chunk], d, fmt))
                            for n in range(0, max(N, 1), key_chunk)], dim=-1)                 # [B, s, N]
        picked.append(indexer_select(scores, positions[:, s:s + q_chunk], ratio, topk))
    return torch.cat(picked, dim=1) if picked else q.new_empty((B, 0, topk), dtype=torch.int32)


@indexer_topk_cached.register_fake
def _(q, weights, index_cache, positions, ratio, topk, fmt):
    _check_index_cache(q, index_cache, fmt)
    B, S = q.shape[:2]
    return q.new_empty((B, S, topk), dtype=torch.int32)
