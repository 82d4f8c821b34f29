"""The routed experts of a MoE layer as `torch.ops.dsv4.*` ops (ours): `moe_experts` over float
expert weights, `moe_experts_fp8` and `moe_experts_mxfp4` over the weights as DeepSeek ships them
(model/weight_formats.py), the activations in x's dtype (W8A16, W4A16), and `moe_experts_fp8_w8a8` /
`moe_experts_mxfp4_w4a8`, FP8 / MXFP4 weights with the activations quantized to FP8 as DeepSeek's
inference does (W8A8, W4A8). Part of the op
boundary (model/ops.py); a module of its own because the quantized ops decode through weight_formats,
which builds on ops.

Plain form: the T*k assignments sorted by expert and padded to blocks of rows (`expert_blocks`), a
batched matmul over the blocks (each block with its expert's weights, gathered, dequantized after the
gather), a scatter-add back to the tokens. Static shapes throughout, so it exports. The dense form
(every expert on every token, masked) is used where it costs less (few experts: dense_is_cheaper).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import is_concrete_int

from .ops import CHUNK_BYTES, FP8_LINEAR_BLOCK, LIB, _fp8_code_blocks, _fp8_values, _plain_autograd
from .weight_formats import dequantize_fp8_weight, dequantize_mxfp4


def swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """silu(min(gate, limit)) * clamp(up, -limit, limit) in float32 (no clamp when limit <= 0)."""
    gate, up = gate.float(), up.float()
    if limit > 0:
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    return F.silu(gate) * up


def max_expert_blocks(n_assignments, n_experts: int, block: int):
    """Blocks of `block` rows that any routing of n_assignments over n_experts fills at most: every
    expert in use leaves fewer than `block` rows of its last block empty, and at most
    min(n_experts, n_assignments) experts are in use. A function of the sizes only (static shapes)."""
    return (n_assignments + torch.sym_min(n_experts, n_assignments) * (block - 1)) // block


def expert_blocks(topk_ids: torch.Tensor, n_experts: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The layout of a grouped-expert GEMM: the N = T*k assignments (token t, slot j) sorted by expert,
    each expert's run padded to a multiple of `block` rows.

    topk_ids [T, k] integer; an id outside [0, n_experts) (-1) is no assignment.
    Returns slot [n_blocks, block] int64: the assignment t*k + j in each row (N in padding rows), an
    expert's assignments in their original order; block_expert [n_blocks] int64: the expert of each
    block, n_experts for the blocks after the last one in use. n_blocks = max_expert_blocks(N, E, block).
    Built with gathers over static shapes only (no data-dependent sizes, no reshape of a symbolic
    length), so it traces for export.
    """
    slot, block_expert = chunked_expert_blocks(topk_ids, n_experts, block, topk_ids.shape[0], 1)
    return slot[0], block_expert[0]


def chunked_expert_blocks(topk_ids: torch.Tensor, n_experts: int, block: int, chunk_tokens, n_chunks: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """expert_blocks of each run of `chunk_tokens` tokens (chunk c: tokens c * chunk_tokens onwards) on
    its own, from one sort: slot [n_chunks, n_blocks, block] (global assignment numbers t*k + j, N in
    padding rows), block_expert [n_chunks, n_blocks], n_blocks = max_expert_blocks(min(chunk_tokens, T)
    * k, E, block). n_chunks must cover T (n_chunks * chunk_tokens >= T); chunks past T hold padding
    only. A chunk's rows are those expert_blocks gives its tokens alone (same order, same padding)."""
    T, k = topk_ids.shape
    N, E = T * k, n_experts
    n_blocks = max_expert_blocks(torch.sym_min(chunk_tokens, T) * k, E, block)
    dev = topk_ids.device
    ids = topk_ids.long()
    ids = torch.where((ids >= 0) & (ids < E), ids, E)                                    # [T, k], E = none
    if n_chunks > 1:  # key chunk * (E + 1) + expert: one sort orders by chunk, then by expert
        ids = ids + (torch.arange(T, device=dev) // chunk_tokens * (E + 1)).unsqueeze(1)
    ids = ids.reshape(-1)                                                                # [N]
    order = torch.sort(ids, stable=True).indices                                         # [N] by (chunk, expert)
    count = torch.zeros(n_chunks * (E + 1), dtype=torch.long, device=dev).scatter_add(0, ids, torch.ones_like(ids))
    start = (torch.cumsum(count, 0) - count).view(n_chunks, E + 1)[:, :E]               # [C, E] first sorted position
    count = count.view(n_chunks, E + 1)[:, :E]                                           # [C, E]
    padded = (count + block - 1) // block * block
    padded_end = torch.cumsum(padded, 1)                                                 # [C, E]
    block_start = torch.arange(n_blocks, device=dev) * block                             # [n_blocks]
    block_expert = (padded_end.unsqueeze(1) <= block_start.view(1, -1, 1)).sum(-1)      # [C, n_blocks] in [0, E]
    e = block_expert.clamp(max=E - 1)
    rank = (block_start - (padded_end - padded).gather(1, e)).unsqueeze(-1) + torch.arange(block, device=dev)
    used = (block_expert < E).unsqueeze(-1) & (rank < count.gather(1, e).unsqueeze(-1))  # [C, n_blocks, block]
    pos = torch.where(used, start.gather(1, e).unsqueeze(-1) + rank, 0)                  # 0: any valid index
    return torch.where(used, order[pos], N), block_expert


# Expert weights as the plain forms see them: `take(e)` -> (w1[e], w2[e], w3[e]) in the activation
# dtype for a [n] tensor of expert ids (a gather, then a dequantization of the gathered experts only);
# `take(None)` -> every expert (no gather).
ExpertWeights = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
# How the plain forms round the weighted SwiGLU output (float32) into w2's operand: None, to x's dtype
# (moe_experts, _fp8, _mxfp4); the W8A8 and W4A8 ops' `fp8_act`.
RoundAct = Callable[[torch.Tensor], torch.Tensor] | None


def fp8_act(a: torch.Tensor) -> torch.Tensor:
    """a [..., K] -> float32 [..., K]: fp8_quantize(a, 128, pow2_scale=True) dequantized (DeepSeek's
    act_quant: per row and block of 128 along K, power-of-two scales), the W8A8 and W4A8 ops' activations
    (their ops check K first: _check_w8a8)."""
    return _fp8_values(*_fp8_code_blocks(a, FP8_LINEAR_BLOCK, True, "fp8_act"))


def _combine(topk_ids, topk_weights, n_experts: int) -> torch.Tensor:
    """[T, k'] ids and weights -> [E, T, 1] float32: each expert's routing weights summed per token (0 where
    not picked; ids outside [0, E) dropped)."""
    E = n_experts
    ids = topk_ids.long()
    valid = (ids >= 0) & (ids < E)
    combine = torch.zeros(ids.shape[0], E, dtype=torch.float32, device=ids.device).scatter_add(
        1, ids.clamp(0, E - 1), torch.where(valid, topk_weights.float(), 0.0))            # [T, E]
    return combine.T.unsqueeze(-1)


def _moe_dense(x, topk_ids, topk_weights, take: ExpertWeights, n_experts: int, swiglu_limit: float,
               round_act: RoundAct = None):
    """Every expert on every token, scaled by its routing weight (0 where not picked): [T, D] float32."""
    w1, w2, w3 = take(None)
    gate = torch.einsum("td,eid->eti", x, w1)                                            # [E, T, I]
    up = torch.einsum("td,eid->eti", x, w3)
    act = swiglu(gate, up, swiglu_limit)
    if round_act is None:  # one w2 product per expert: a token's weights for it summed before the rounding
        return torch.einsum("eti,edi->td", (act * _combine(topk_ids, topk_weights, n_experts)).to(x.dtype), w2).float()
    # Rounded per assignment (W8A8 quantizes the weighted activation): one w2 product per slot j, so that
    # an expert picked twice by a token is rounded twice, as the grouped form and the kernel do.
    return sum(torch.einsum("eti,edi->td", round_act(act * _combine(topk_ids[:, j:j + 1], topk_weights[:, j:j + 1],
                                                                    n_experts)), w2)
               for j in range(topk_ids.shape[1])).float()


def _moe_grouped(x, topk_ids, topk_weights, take: ExpertWeights, n_experts: int, swiglu_limit: float,
                 block: int, inter_dim: int, bytes_per_expert: int, round_act: RoundAct = None):
    """The assignments sorted by expert in blocks of `block` rows (expert_blocks), one batched matmul
    per weight over the blocks (each block multiplies its expert's weights, gathered), the routing
    weight on the activation, a scatter-add back to the tokens: [T, D] float32.

    With concrete sizes the blocks run in chunks whose gathered weights (`bytes_per_expert` each) and
    fp32 activations fit CHUNK_BYTES; with symbolic sizes (export) all at once. Beyond a chunk and the
    output, only the routing layout (tens of bytes an assignment): no padded copy of x, and the scatter-add
    accumulates into the output in place (out of place, each chunk copied the [T, D] float32 output:
    2 GiB at 128K tokens x D 4096).
    """
    T, D = x.shape
    k = topk_ids.shape[1]
    E = n_experts
    slot, block_expert = expert_blocks(topk_ids, E, block)                               # [nb, block], [nb]
    token = slot // k                                                                    # T in padding rows
    weight = F.pad(topk_weights.reshape(-1).float(), (0, 1))[slot]                       # [nb, block], 0 in padding
    expert = block_expert.clamp(max=E - 1)                                               # spare blocks: padding only
    out = torch.zeros(T + 1, D, dtype=torch.float32, device=x.device)
    n_blocks = slot.shape[0]
    chunks = [slice(None)]
    if is_concrete_int(n_blocks):
        step = max(1, CHUNK_BYTES // (bytes_per_expert + block * (2 * D + 3 * inter_dim) * 4))
        chunks = [slice(b0, b0 + step) for b0 in range(0, n_blocks, step)]
    for blocks in chunks:
        tok = token[blocks]
        w1, w2, w3 = take(expert[blocks])
        xs = torch.where((tok < T).unsqueeze(-1), x[tok.clamp(max=T - 1)], 0)            # [nb, block, D], 0 in padding
        gate = torch.bmm(xs, w1.transpose(1, 2))                                         # [nb, block, I]
        up = torch.bmm(xs, w3.transpose(1, 2))
        act = swiglu(gate, up, swiglu_limit) * weight[blocks].unsqueeze(-1)
        act = act.to(x.dtype) if round_act is None else round_act(act)
        y = torch.bmm(act, w2.transpose(1, 2)).float()                                   # [nb, block, D]
        out.index_put_((tok,), y, accumulate=True)                                      # row T: padding
    return out[:T]


def moe_block_rows(top_k: int, n_experts: int) -> int:
    """The plain form's block: E // top_k rows, from static sizes only. So every block's matmul has
    the same shape whatever T is: a row's numbers do not depend on which tokens share the call (decode
    reproduces prefill), and a symbolic T never reaches a block size (it would specialise export).
    The padding stays within the dense form's rows: N + min(E, N)(E/k - 1) <= T*E."""
    return max(1, n_experts // top_k)


# One expert's weights gathered (read, written, read again by the bmm: 9 I D elements moved) cost about
# as much as this many rows of its matmuls (6 I D FLOPs each) on a machine doing ~10 FLOP per byte.
GATHER_ROWS = 64


def dense_is_cheaper(top_k: int, n_experts: int) -> bool:
    """Per token, the dense form costs E rows (each expert's weights read once per call), the padded
    groups k rows plus k / block weight gathers (GATHER_ROWS each) at large T, and fewer at small T.
    Dense where E <= k (1 + GATHER_ROWS / block): few experts (the tiny and mini presets' 8), never at
    V4's 256 of which 6 are picked. Independent of T, so decode and prefill take the same form."""
    return n_experts <= top_k * (1 + GATHER_ROWS / moe_block_rows(top_k, n_experts))


def _moe_plain(x, topk_ids, topk_weights, take: ExpertWeights, n_experts: int, inter_dim: int,
               bytes_per_expert: int, swiglu_limit: float, round_act: RoundAct = None):
    T, k = topk_ids.shape
    if dense_is_cheaper(k, n_experts):
        return _moe_dense(x, topk_ids, topk_weights, take, n_experts, swiglu_limit, round_act)
    return _moe_grouped(x, topk_ids, topk_weights, take, n_experts, swiglu_limit,
                        moe_block_rows(k, n_experts), inter_dim, bytes_per_expert, round_act)


def _check_moe(name: str, x, topk_ids, topk_weights) -> None:
    T = x.shape[0]
    if x.dim() != 2:
        raise ValueError(f"{name}: x has shape {tuple(x.shape)}; need [T, D]")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != T or topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}: topk_ids is {topk_ids.dtype} {tuple(topk_ids.shape)}; need int32 [T={T}, k]")
    if tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(f"{name}: topk_weights has shape {tuple(topk_weights.shape)}; need topk_ids' {tuple(topk_ids.shape)}")


def _check_shapes(name: str, w1, w2, w3, D: int, d_packed: int, i_packed: int) -> tuple[int, int]:
    """w1, w3 [E, I, d_packed], w2 [E, D, i_packed] (packed = the stored last dim) -> (E, I)."""
    E, I = w1.shape[:2]
    if tuple(w1.shape) != (E, I, d_packed) or tuple(w3.shape) != (E, I, d_packed) or tuple(w2.shape) != (E, D, i_packed(I)):
        raise ValueError(f"{name}: w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}, w3 {tuple(w3.shape)} against x [T, {D}]; "
                         f"need w1, w3 [E, I, {d_packed}] and w2 [E, {D}, {i_packed(I)}]")
    return E, I


# ---- float expert weights ------------------------------------------------------------------------------

def _moe_experts_plain(x, topk_ids, topk_weights, w1, w2, w3, swiglu_limit: float):
    E = w1.shape[0]
    take = lambda e: (w1, w2, w3) if e is None else (w1[e], w2[e], w3[e])  # noqa: E731
    return _moe_plain(x, topk_ids, topk_weights, take, E, w1.shape[1],
                      3 * w1[0].numel() * w1.element_size(), swiglu_limit)


@torch.library.custom_op(f"{LIB}::moe_experts", mutates_args=())
def moe_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w1: torch.Tensor,
                w2: torch.Tensor, w3: torch.Tensor, swiglu_limit: float) -> torch.Tensor:
    """The routed experts of a DeepSeek MoE layer (ours).

    x [T, D]; topk_ids [T, k] int32; topk_weights [T, k] float32; w1, w3 [E, I, D], w2 [E, D, I] in
    x's dtype. out[t] = sum_j topk_weights[t, j] * w2[e] @ swiglu(w1[e] @ x[t], w3[e] @ x[t],
    swiglu_limit) with e = topk_ids[t, j]: an id outside [0, E) (-1) contributes nothing, the same
    expert picked twice counts twice. The activation is computed in float32, scaled by the routing
    weight, rounded to x's dtype before w2. Returns [T, D] float32.
    The dense form (few experts, see dense_is_cheaper) also turns an Inf in an unpicked expert's output into NaN
    (0 * Inf); the grouped one never evaluates unpicked experts.
    """
    _check_moe("moe_experts", x, topk_ids, topk_weights)
    _check_shapes("moe_experts", w1, w2, w3, x.shape[1], x.shape[1], lambda i: i)
    return _moe_experts_plain(x, topk_ids, topk_weights, w1, w2, w3, swiglu_limit)


@moe_experts.register_fake
def _(x, topk_ids, topk_weights, w1, w2, w3, swiglu_limit):
    return x.new_empty(x.shape, dtype=torch.float32)


_plain_autograd(moe_experts, _moe_experts_plain, 7, (0, 2, 3, 4, 5))


# ---- expert weights as shipped: FP8 e4m3 with 128 x 128 scales, MXFP4 with 1 x 32 scales -----------------
# Separate ops rather than optional scale arguments: each op's dtypes follow from its name, so its
# fake, its decomposition and its kernel's predicate need no case analysis over which scales are None.
# No backward through the weights (they are inference formats); x and topk_weights get gradients.

def _shipped_take(decode, w1, w2, w3, w1_scale, w2_scale, w3_scale, dtype: torch.dtype) -> ExpertWeights:
    """ExpertWeights of shipped codes and scales, decoded by `decode` (weight_formats) into dtype."""
    pairs = ((w1, w1_scale), (w2, w2_scale), (w3, w3_scale))
    return lambda e: tuple(decode(w if e is None else w[e], s if e is None else s[e], dtype=dtype) for w, s in pairs)


def _moe_experts_fp8_plain(x, topk_ids, topk_weights, w1, w2, w3, w1_scale, w2_scale, w3_scale, swiglu_limit: float):
    take = _shipped_take(dequantize_fp8_weight, w1, w2, w3, w1_scale, w2_scale, w3_scale, x.dtype)
    return _moe_plain(x, topk_ids, topk_weights, take, w1.shape[0], w1.shape[1],
                      3 * w1[0].numel() * (1 + x.element_size()), swiglu_limit)


@torch.library.custom_op(f"{LIB}::moe_experts_fp8", mutates_args=())
def moe_experts_fp8(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w1: torch.Tensor,
                    w2: torch.Tensor, w3: torch.Tensor, w1_scale: torch.Tensor, w2_scale: torch.Tensor,
                    w3_scale: torch.Tensor, swiglu_limit: float) -> torch.Tensor:
    """`moe_experts` with FP8 expert weights (ours): w1, w3 [E, I, D], w2 [E, D, I] float8_e4m3fn, and
    their scales [E, ceil(rows/128), ceil(cols/128)] (float8_e8m0fnu, or float32 as base models ship),
    one per 128 x 128 tile; each weight = code * its tile's scale (weight_formats.dequantize_fp8_weight),
    rounded to x's dtype. The rest is moe_experts' contract."""
    _check_moe("moe_experts_fp8", x, topk_ids, topk_weights)
    _check_shapes("moe_experts_fp8", w1, w2, w3, x.shape[1], x.shape[1], lambda i: i)
    return _moe_experts_fp8_plain(x, topk_ids, topk_weights, w1, w2, w3, w1_scale, w2_scale, w3_scale, swiglu_limit)


@moe_experts_fp8.register_fake
def _(x, topk_ids, topk_weights, w1, w2, w3, w1_scale, w2_scale, w3_scale, swiglu_limit):
    return x.new_empty(x.shape, dtype=torch.float32)


_plain_autograd(moe_experts_fp8, _moe_experts_fp8_plain, 10, (0, 2))


def _moe_experts_fp8_w8a8_plain(x, topk_ids, topk_weights, w1, w2, w3, w1_scale, w2_scale, w3_scale,
                                swiglu_limit: float):
    take = _shipped_take(dequantize_fp8_weight, w1, w2, w3, w1_scale, w2_scale, w3_scale, torch.float32)
    return _moe_plain(fp8_act(x), topk_ids, topk_weights, take, w1.shape[0], w1.shape[1], 3 * w1[0].numel() * (1 + 4),
                      swiglu_limit, fp8_act)


def _check_w8a8(name: str, D: int, I: int, kind: str = "W8A8") -> None:
    """The FP8-activation ops (kind W8A8, W4A8): whole activation blocks along both reductions."""
    if D % FP8_LINEAR_BLOCK or I % FP8_LINEAR_BLOCK:
        raise ValueError(f"{name}: D = {D}, I = {I}; {kind} needs multiples of {FP8_LINEAR_BLOCK} (the activation block)")


@torch.library.custom_op(f"{LIB}::moe_experts_fp8_w8a8", mutates_args=())
def moe_experts_fp8_w8a8(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w1: torch.Tensor,
                         w2: torch.Tensor, w3: torch.Tensor, w1_scale: torch.Tensor, w2_scale: torch.Tensor,
                         w3_scale: torch.Tensor, swiglu_limit: float) -> torch.Tensor:
    """The routed experts over FP8 weights with FP8 activations (W8A8, ours), as DeepSeek's inference
    runs FP8-shipped linears (act_quant before each FP8 GEMM; `fp8_linear`'s semantics per GEMM).

    x [T, D] float; topk_ids [T, k] int32; topk_weights [T, k] float32; w1, w3 [E, I, D], w2 [E, D, I]
    float8_e4m3fn with scales [E, ceil(rows/128), ceil(cols/128)] (e8m0 or float32), W = code * tile
    scale, as moe_experts_fp8. D and I multiples of 128 (ValueError otherwise).
    With q(v) = fp8_quantize(v, 128, pow2_scale=True) dequantized (per row, blocks of 128 along the
    last dim; `fp8_act`), for each assignment (t, j) with e = topk_ids[t, j] in [0, E):
        h = topk_weights[t, j] * swiglu(W1[e] @ q(x[t]), W3[e] @ q(x[t]), swiglu_limit)
        out[t] += W2[e] @ q(h)
    every product one of dequantized values (exact in float32), summed in float32; the SwiGLU (and
    its clamps) in float32; h quantized with its routing weight in it, as DeepSeek's Expert does
    (`x = weights * x` before w2). An id outside [0, E) (-1) contributes nothing, the same expert
    picked twice counts twice. Returns [T, D] float32. Unlike DeepSeek's inference, nothing is rounded
    to x's dtype in between (DeepSeek's GEMMs return bf16 gate, up and w2 outputs, and h is cast to
    bf16 before its act_quant): a bf16 rounding each, small beside the FP8 ones.
    The dense form (few experts) also turns an Inf in an unpicked expert's output into NaN (0 * Inf).
    """
    _check_moe("moe_experts_fp8_w8a8", x, topk_ids, topk_weights)
    _check_shapes("moe_experts_fp8_w8a8", w1, w2, w3, x.shape[1], x.shape[1], lambda i: i)
    _check_w8a8("moe_experts_fp8_w8a8", x.shape[1], w1.shape[1])
    return _moe_experts_fp8_w8a8_plain(x, topk_ids, topk_weights, w1, w2, w3, w1_scale, w2_scale, w3_scale,
                                       swiglu_limit)


@moe_experts_fp8_w8a8.register_fake
def _(x, topk_ids, topk_weights, w1, w2, w3, w1_scale, w2_scale, w3_scale, swiglu_limit):
    _check_w8a8("moe_experts_fp8_w8a8", x.shape[1], w1.shape[1])
    return x.new_empty(x.shape, dtype=torch.float32)


_plain_autograd(moe_experts_fp8_w8a8, _moe_experts_fp8_w8a8_plain, 10, (0, 2))


def _moe_experts_mxfp4_plain(x, topk_ids, topk_weights, w1, w2, w3, w1_scale, w2_scale, w3_scale, swiglu_limit: float):
    take = _shipped_take(dequantize_mxfp4, w1, w2, w3, w1_scale, w2_scale, w3_scale, x.dtype)
    return _moe_plain(x, topk_ids, topk_weights, take, w1.shape[0], w1.shape[1],
                      3 * w1[0].numel() * (1 + 2 * x.element_size()), swiglu_limit)


@torch.library.custom_op(f"{LIB}::moe_experts_mxfp4", mutates_args=())
def moe_experts_mxfp4(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w1: torch.Tensor,
                      w2: torch.Tensor, w3: torch.Tensor, w1_scale: torch.Tensor, w2_scale: torch.Tensor,
                      w3_scale: torch.Tensor, swiglu_limit: float) -> torch.Tensor:
    """`moe_experts` with MXFP4 expert weights (ours), as the V4 releases ship the routed experts:
    w1, w3 [E, I, D/2], w2 [E, D, I/2] int8 (or uint8), two e2m1 codes per byte, element 2i in the low
    nibble; scales [E, I, D/32] and [E, D, I/32] (float8_e8m0fnu, or float32), one per 1 x 32 run along
    the reduction dim (weight_formats.dequantize_mxfp4), rounded to x's dtype. D and I multiples of 32.
    The rest is moe_experts' contract."""
    _check_moe("moe_experts_mxfp4", x, topk_ids, topk_weights)
    D = x.shape[1]
    if D % 32:
        raise ValueError(f"moe_experts_mxfp4: D = {D} is not a multiple of the MXFP4 block 32")
    _check_shapes("moe_experts_mxfp4", w1, w2, w3, D, D // 2, lambda i: i // 2)
    return _moe_experts_mxfp4_plain(x, topk_ids, topk_weights, w1, w2, w3, w1_scale, w2_scale, w3_scale, swiglu_limit)


@moe_experts_mxfp4.register_fake
def _(x, topk_ids, topk_weights, w1, w2, w3, w1_scale, w2_scale, w3_scale, swiglu_limit):
    return x.new_empty(x.shape, dtype=torch.float32)


_plain_autograd(moe_experts_mxfp4, _moe_experts_mxfp4_plain, 10, (0, 2))


def _moe_experts_mxfp4_w4a8_plain(x, topk_ids, topk_weights, w1, w2, w3, w1_scale, w2_scale, w3_scale,
                                  swiglu_limit: float):
    take = _shipped_take(dequantize_mxfp4, w1, w2, w3, w1_scale, w2_scale, w3_scale, torch.float32)
    return _moe_plain(fp8_act(x), topk_ids, topk_weights, take, w1.shape[0], w1.shape[1], 3 * w1[0].numel() * (1 + 2 * 4),
                      swiglu_limit, fp8_act)


@torch.library.custom_op(f"{LIB}::moe_experts_mxfp4_w4a8", mutates_args=())
def moe_experts_mxfp4_w4a8(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w1: torch.Tensor,
                           w2: torch.Tensor, w3: torch.Tensor, w1_scale: torch.Tensor, w2_scale: torch.Tensor,
                           w3_scale: torch.Tensor, swiglu_limit: float) -> torch.Tensor:
    """The routed experts over MXFP4 weights with FP8 activations (W4A8, ours), as DeepSeek's inference
    runs the V4 releases' MXFP4 experts (act_quant before each `fp4_gemm`).

    x [T, D] float; topk_ids [T, k] int32; topk_weights [T, k] float32; w1, w3 [E, I, D/2], w2 [E, D, I/2]
    int8 (or uint8), two e2m1 codes per byte (element 2i in the low nibble) with scales [E, I, D/32],
    [E, D, I/32] (float8_e8m0fnu, or float32), W = code * its 1 x 32 run's scale, as moe_experts_mxfp4.
    D and I multiples of 128 (ValueError otherwise). With q = fp8_act (DeepSeek's act_quant: per row and
    128-block, power-of-two scales), for each assignment (t, j) with e = topk_ids[t, j] in [0, E):
        h = topk_weights[t, j] * swiglu(W1[e] @ q(x[t]), W3[e] @ q(x[t]), swiglu_limit)
        out[t] += W2[e] @ q(h)
    every product one of dequantized values (an e4m3 code times an e2m1 code times two powers of two:
    exact in float32), summed in float32: DeepSeek's fp4_gemm multiplies the FP8 codes per 32 along K
    and adds each partial sum times the row's activation scale and the column's weight scale into an
    fp32 accumulator, the same products in another order. The routing weight is in h before its
    quantization (DeepSeek's Expert: `x = weights * x` before w2). The rest (ids outside [0, E), a
    repeated expert, no bf16 rounding in between, float32 out, the dense form's 0 * Inf) is
    moe_experts_fp8_w8a8's contract.
    """
    _check_moe("moe_experts_mxfp4_w4a8", x, topk_ids, topk_weights)
    D = x.shape[1]
    _check_w8a8("moe_experts_mxfp4_w4a8", D, w1.shape[1], "W4A8")
    _check_shapes("moe_experts_mxfp4_w4a8", w1, w2, w3, D, D // 2, lambda i: i // 2)
    return _moe_experts_mxfp4_w4a8_plain(x, topk_ids, topk_weights, w1, w2, w3, w1_scale, w2_scale, w3_scale,
                                         swiglu_limit)


@moe_experts_mxfp4_w4a8.register_fake
def _(x, topk_ids, topk_weights, w1, w2, w3, w1_scale, w2_scale, w3_scale, swiglu_limit):
    _check_w8a8("moe_experts_mxfp4_w4a8", x.shape[1], w1.shape[1], "W4A8")
    return x.new_empty(x.shape, dtype=torch.float32)


_plain_autograd(moe_experts_mxfp4_w4a8, _moe_experts_mxfp4_w4a8_plain, 10, (0, 2))
