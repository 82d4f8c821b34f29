"""torch.ops.dsv4.moe_experts: the plain op against a float64 loop over (token, slot) written from the
contract, its grouped and dense forms against each other, the expert-block layout, and the MoE layer
against the dense-masked MoE it replaced.

Tolerances: float32 inputs against the float64 loop 1e-5 relative RMS (helpers' fp32: summation order
only); bf16 inputs against the float64 loop of the same bf16 values 1e-2 (the activation is rounded to
bf16 before w2 and the matmuls take bf16 operands: a few bf16 roundings). moe_experts_fp8_w8a8 against
its float64 loop (the contract's quantization by the fp8_quantize op): W8A8_TOL = 1e-3, the same FP8
codes and exact products summed in another order, but where the float64 activation and the op's
float32 one straddle an e4m3 rounding midpoint they take neighbouring codes (~5e-4 relative RMS over a
T = 300 output per flip); the activation quantization itself is ~4e-2 (W8A8_VS_W8A16's floor).
moe_experts_mxfp4_w4a8 against a transcription of DeepSeek's act_quant / fp4_gemm / Expert: W8A8_TOL
for the same reasons (its "* (1/448)" scale against our division may also differ at a tie).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dsv4_compile.model.ops  # noqa: F401  (registers torch.ops.dsv4.*)
from dsv4_compile.model import ModelConfig, moe_ops, weight_formats
from dsv4_compile.model.moe import MoE
from helpers import assert_close

LIMIT = 10.0


def reference(x, topk_ids, topk_weights, w1, w2, w3, limit, act=None):
    """out[t] = sum_j w2[e] @ act(w[t, j] swiglu(w1[e] act(x[t]), w3[e] act(x[t]))), e = ids[t, j] in [0, E),
    in float64; act: the identity, or the W8A8 op's quantization (fp8_act_reference)."""
    T, D = x.shape
    E = w1.shape[0]
    act = act or (lambda v: v.double())
    xs = act(x)
    out = torch.zeros(T, D, dtype=torch.float64)
    for t in range(T):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            if not 0 <= e < E:
                continue
            gate, up = w1[e].double() @ xs[t], w3[e].double() @ xs[t]
            if limit > 0:
                gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
            out[t] += w2[e].double() @ act(float(topk_weights[t, j]) * F.silu(gate) * up)
    return out


def routing(T, k, E, kind, seed):
    """topk_ids [T, k] int32 and positive weights [T, k] float32 for a routing kind."""
    g = torch.Generator().manual_seed(seed)
    if kind == "random":  # distinct experts per token, as a top-k gives
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    elif kind == "one-expert":  # every assignment to expert 2 (duplicates within a token count twice)
        ids = torch.full((T, k), 2)
    elif kind == "holes":  # -1 ids, duplicates, and experts 0 and E-1 never used
        ids = torch.randint(1, E - 1, (T, k), generator=g)
        ids[torch.rand(T, k, generator=g) < 0.3] = -1
    else:
        raise ValueError(kind)
    return ids.to(torch.int32), torch.rand(T, k, generator=g) + 0.1


def weights(E, I, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w1, w3 = (torch.randn(E, I, D, generator=g) * D ** -0.5 for _ in range(2))
    w2 = torch.randn(E, D, I, generator=g) * I ** -0.5
    return w1.to(dtype), w2.to(dtype), w3.to(dtype)


# T = 1, 7, 300; E = 5 (not a power of two) and 12; k = 1 and 6 (6 > E: duplicates forced).
CASES = [(1, 1, 5, "random"), (7, 6, 12, "random"), (300, 6, 12, "random"), (300, 1, 5, "random"),
         (7, 6, 5, "one-expert"), (300, 6, 5, "holes"), (7, 1, 12, "holes")]


@pytest.mark.parametrize("T,k,E,kind", CASES, ids=[f"T{c[0]}-k{c[1]}-E{c[2]}-{c[3]}" for c in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_op_matches_the_float64_loop(T, k, E, kind, dtype):
    D, I = 24, 20
    g = torch.Generator().manual_seed(T + k + E)
    x = (torch.randn(T, D, generator=g) * 2).to(dtype)
    ids, w = routing(T, k, E, kind, seed=T * k)
    w1, w2, w3 = weights(E, I, D, dtype, seed=E)
    out = torch.ops.dsv4.moe_experts(x, ids, w, w1, w2, w3, LIMIT)
    assert out.dtype == torch.float32 and out.shape == (T, D)
    ref = reference(x, ids, w, w1, w2, w3, LIMIT).float()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert_close("moe_experts vs float64 loop", ref, out, tol)
    # Both forms, whichever the op picked: the grouped one at its block size.
    grouped = moe_ops._moe_grouped(x, ids, w, lambda e: (w1[e], w2[e], w3[e]), E, LIMIT,
                                   moe_ops.moe_block_rows(k, E), I, 3 * I * D * x.element_size())
    assert_close("grouped form vs float64 loop", ref, grouped, tol)


@pytest.mark.parametrize("block", [1, 3, 16])
@pytest.mark.parametrize("kind", ["random", "holes", "one-expert"])
@pytest.mark.parametrize("chunked", [False, True], ids=["one-chunk", "block-per-chunk"])
def test_grouped_and_dense_forms_agree(block, kind, chunked, monkeypatch):
    """Every block size, in one chunk or one block per chunk, gives the dense form's numbers (fp32
    noise); the clamp is active (limit 0.5)."""
    if chunked:
        monkeypatch.setattr(moe_ops, "CHUNK_BYTES", 1)
    T, k, E, D, I = 37, 3, 7, 16, 12
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(1))
    ids, w = routing(T, k, E, kind, seed=2)
    w1, w2, w3 = weights(E, I, D, torch.float32, seed=3)
    dense = moe_ops._moe_dense(x, ids, w, lambda e: (w1, w2, w3), E, 0.5)
    assert_close(f"grouped (block {block}) vs dense", dense, moe_ops._moe_grouped(x, ids, w, lambda e: (w1[e], w2[e], w3[e]), E, 0.5, block, I, 1 << 20))


@pytest.mark.parametrize("T,k,E,block", [(1, 6, 256, 1), (5, 2, 3, 4), (64, 6, 9, 16), (0, 2, 3, 2)])
def test_expert_blocks_layout(T, k, E, block):
    """Each assignment sits in exactly one row, in a block of its own expert, in its original order;
    -1 ids nowhere; padding rows hold N; the block count is the static bound."""
    ids, _ = routing(max(T, 1), k, E, "holes" if E > 2 else "random", seed=4)
    ids = ids[:T]
    N = T * k
    slot, block_expert = moe_ops.expert_blocks(ids, E, block)
    assert slot.shape == (moe_ops.max_expert_blocks(N, E, block), block) and block_expert.shape == slot.shape[:1]
    flat_ids = ids.reshape(-1).long()
    real = slot[slot < N]
    valid = torch.nonzero((flat_ids >= 0) & (flat_ids < E)).flatten()
    assert torch.equal(real.sort().values, valid)
    row_expert = block_expert.unsqueeze(1).expand_as(slot)
    assert torch.equal(flat_ids[real], row_expert[slot < N])
    for e in range(E):  # stable: an expert's assignments in their original order
        mine = real[flat_ids[real] == e]
        assert torch.equal(mine, mine.sort().values)
    assert (block_expert[1:] >= block_expert[:-1]).all() and (block_expert <= E).all()


@pytest.mark.parametrize("T,k,E,block,chunk", [(7, 3, 5, 4, 2), (64, 6, 9, 16, 10), (5, 2, 3, 4, 5), (1, 6, 256, 1, 1)])
def test_chunked_expert_blocks_are_each_chunks_own_layout(T, k, E, block, chunk):
    """Chunk c of chunked_expert_blocks is expert_blocks of its tokens alone (assignment numbers offset by
    the chunk's first, N = T*k in padding rows), then padding blocks up to the static count; a chunk
    past T holds padding only."""
    ids, _ = routing(T, k, E, "holes" if T > 1 else "random", seed=5)
    n_chunks = -(-T // chunk) + 1
    slot, block_expert = moe_ops.chunked_expert_blocks(ids, E, block, chunk, n_chunks)
    N = T * k
    assert slot.shape == (n_chunks, moe_ops.max_expert_blocks(min(chunk, T) * k, E, block), block)
    for c in range(n_chunks):
        own = ids[c * chunk:(c + 1) * chunk]
        own_slot, own_expert = moe_ops.expert_blocks(own, E, block)
        n = own_slot.shape[0]
        assert torch.equal(slot[c, :n], torch.where(own_slot < own.numel(), own_slot + c * chunk * k, N))
        assert torch.equal(block_expert[c, :n], own_expert)
        assert (slot[c, n:] == N).all() and (block_expert[c, n:] == E).all()


def test_dense_form_is_chosen_only_where_it_costs_less():
    """Dense for 8 experts (tiny: k = 2, mini: k = 6) and E = 7, k = 3 below; grouped for V4's 256 / 6,
    for E = 32, k = 2 and for E = 12, k = 1."""
    assert all(moe_ops.dense_is_cheaper(k, E) for k, E in ((2, 8), (6, 8), (3, 7), (6, 12)))
    assert not any(moe_ops.dense_is_cheaper(k, E) for k, E in ((6, 256), (6, 384), (2, 32), (1, 12)))


def test_opcheck_and_export_with_a_symbolic_token_count():
    """Schema / fake / autograd registration; and torch.export with T dynamic traces the grouped form
    (static block E // k) without specialising T, matching eager at other T."""
    from torch.library import opcheck

    E, k, D, I = 6, 2, 16, 8
    w1, w2, w3 = weights(E, I, D, torch.float32, seed=5)
    x = torch.randn(9, D, generator=torch.Generator().manual_seed(6))
    ids, w = routing(9, k, E, "holes", seed=7)
    grad = [t.clone().requires_grad_() for t in (x, w, w1, w2, w3)]
    opcheck(torch.ops.dsv4.moe_experts.default, (grad[0], ids, *grad[1:], LIMIT))

    class Experts(torch.nn.Module):
        def forward(self, x, ids, w):
            return moe_ops._moe_experts_plain(x, ids, w, w1, w2, w3, LIMIT)

    T = torch.export.Dim("T", min=2, max=512)
    ep = torch.export.export(Experts(), (x, ids, w), dynamic_shapes=({0: T}, {0: T}, {0: T}))
    for n in (2, 33, 300):
        xn = torch.randn(n, D)
        idn, wn = routing(n, k, E, "holes", seed=n)
        assert_close(f"exported at T={n}", reference(xn, idn, wn, w1, w2, w3, LIMIT).float(), ep.module()(xn, idn, wn))


def test_bad_input_is_one_line():
    w1, w2, w3 = weights(3, 4, 8, torch.float32, seed=0)
    with pytest.raises(ValueError, match="topk_ids"):
        torch.ops.dsv4.moe_experts(torch.randn(2, 8), torch.zeros(3, 1, dtype=torch.int32), torch.ones(3, 1), w1, w2, w3, LIMIT)
    with pytest.raises(ValueError, match="w2"):
        torch.ops.dsv4.moe_experts(torch.randn(2, 8), torch.zeros(2, 1, dtype=torch.int32), torch.ones(2, 1), w1, w3, w3, LIMIT)


QUANT = {"fp8": (torch.ops.dsv4.moe_experts_fp8, weight_formats.quantize_fp8_weight, weight_formats.dequantize_fp8_weight),
         "mxfp4": (torch.ops.dsv4.moe_experts_mxfp4, weight_formats.quantize_mxfp4, weight_formats.dequantize_mxfp4)}


@pytest.mark.parametrize("fmt", ["fp8", "mxfp4"])
@pytest.mark.parametrize("scale_dtype", [torch.float8_e8m0fnu, torch.float32], ids=["e8m0", "f32-scales"])
@pytest.mark.parametrize("T,k,E,kind", [(1, 6, 12, "random"), (300, 6, 5, "holes")], ids=["T1-k6-E12", "T300-k6-E5-holes"])
def test_quantized_ops_equal_moe_experts_on_the_dequantized_weights(fmt, scale_dtype, T, k, E, kind):
    """Shipped formats: the op equals moe_experts on weight_formats' dequantization, exactly in fp32
    (the same float weights reach the same code), and the float64 loop to fp32 noise. D = 160 and
    I = 96: FP8 tiles partial along both (ceil(160 / 128) = 2 tile columns)."""
    op, quantize, dequantize = QUANT[fmt]
    D, I = 160, 96
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(8))
    ids, w = routing(T, k, E, kind, seed=9)
    packed = [quantize(t, scale_dtype=scale_dtype) for t in weights(E, I, D, torch.float32, seed=10)]
    deq = [dequantize(q, s) for q, s in packed]
    out = op(x, ids, w, *(q for q, _ in packed), *(s for _, s in packed), LIMIT)
    assert torch.equal(out, torch.ops.dsv4.moe_experts(x, ids, w, *deq, LIMIT))
    assert_close(f"moe_experts_{fmt} vs float64 loop", reference(x, ids, w, *deq, LIMIT).float(), out)


def test_quantized_ops_refuse_mismatched_weights():
    q, s = weight_formats.quantize_mxfp4(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="w1"):  # w2 given unpacked width
        torch.ops.dsv4.moe_experts_mxfp4(torch.randn(2, 64), torch.zeros(2, 1, dtype=torch.int32), torch.ones(2, 1),
                                         q, torch.zeros(3, 64, 64, dtype=torch.int8), q, s, s, s, LIMIT)
    with pytest.raises(ValueError, match="multiple of the MXFP4 block"):
        torch.ops.dsv4.moe_experts_mxfp4(torch.randn(2, 48), torch.zeros(2, 1, dtype=torch.int32), torch.ones(2, 1),
                                         q, q, q, s, s, s, LIMIT)


W8A8_TOL = 1e-3


def fp8_act_reference(v: torch.Tensor) -> torch.Tensor:
    """The contract's q(v): fp8_quantize(v, 128, pow2_scale=True) dequantized, in float64."""
    return torch.ops.dsv4.fp8_dequantize(*torch.ops.dsv4.fp8_quantize(v.float(), 128, True), 128).double()


# Dense form (k = 1 of 5, 6 of 5 with duplicates) and grouped form (1 of 12, 3 of 32 with duplicates).
W8A8_CASES = [(1, 1, 5, "random"), (7, 6, 5, "one-expert"), (300, 6, 5, "holes"), (7, 1, 12, "holes"),
              (37, 3, 32, "holes")]


@pytest.mark.parametrize("T,k,E,kind", W8A8_CASES, ids=[f"T{c[0]}-k{c[1]}-E{c[2]}-{c[3]}" for c in W8A8_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_w8a8_op_matches_its_float64_loop(T, k, E, kind, dtype):
    """moe_experts_fp8_w8a8 against the loop written from its contract (x and the weighted SwiGLU output
    quantized per 128, an expert picked twice quantized twice), in both forms, D = 256, I = 128; it is
    really quantized: the W8A16 op on the same weights differs by more than 1e-2."""
    D, I = 256, 128
    assert moe_ops.dense_is_cheaper(k, E) == (E == 5)
    x = (torch.randn(T, D, generator=torch.Generator().manual_seed(T + E)) * 2).to(dtype)
    ids, w = routing(T, k, E, kind, seed=T * k)
    packed = [weight_formats.quantize_fp8_weight(t) for t in weights(E, I, D, torch.float32, seed=E)]
    codes, scales = [q for q, _ in packed], [sc for _, sc in packed]
    out = torch.ops.dsv4.moe_experts_fp8_w8a8(x, ids, w, *codes, *scales, LIMIT)
    assert out.dtype == torch.float32 and out.shape == (T, D)
    deq = [weight_formats.dequantize_fp8_weight(q, sc) for q, sc in packed]
    assert_close("moe_experts_fp8_w8a8 vs float64 loop", reference(x, ids, w, *deq, LIMIT, fp8_act_reference).float(), out,
                 W8A8_TOL)
    w8a16 = torch.ops.dsv4.moe_experts_fp8(x.float(), ids, w, *codes, *scales, LIMIT)
    assert ((w8a16 - out).norm() / w8a16.norm()).item() > 1e-2


def check_registration_and_export(op, plain, codes, scales, test_utils):
    """opcheck of `op` (x and the routing weights get gradients) with these utils, and torch.export of
    its plain form `plain` with T dynamic equal to the op at other T (E 12, k 1, D 128)."""
    from torch.library import opcheck

    E, k, D = 12, 1, 128
    x = torch.randn(9, D, generator=torch.Generator().manual_seed(6))
    ids, w = routing(9, k, E, "holes", seed=7)
    opcheck(op.default, (x.clone().requires_grad_(), ids, w.clone().requires_grad_(), *codes, *scales, LIMIT),
            test_utils=test_utils)

    class Experts(torch.nn.Module):
        def forward(self, x, ids, w):
            return plain(x, ids, w, *codes, *scales, LIMIT)

    T = torch.export.Dim("T", min=2, max=512)
    ep = torch.export.export(Experts(), (x, ids, w), dynamic_shapes=({0: T}, {0: T}, {0: T}))
    for n in (2, 33):
        xn = torch.randn(n, D)
        idn, wn = routing(n, k, E, "holes", seed=n)
        assert torch.equal(ep.module()(xn, idn, wn), op(xn, idn, wn, *codes, *scales, LIMIT))
    return x, ids, w


def test_w8a8_opcheck_export_and_bad_shapes():
    """Fake / autograd registration (the schema test compares float8 inputs, which torch cannot on the
    CPU), AOT dispatch; torch.export of the grouped form with T dynamic matches eager at other T; D or I
    not a multiple of 128 is a one-line ValueError."""
    packed = [weight_formats.quantize_fp8_weight(t) for t in weights(12, 128, 128, torch.float32, seed=5)]
    x, ids, w = check_registration_and_export(
        torch.ops.dsv4.moe_experts_fp8_w8a8, moe_ops._moe_experts_fp8_w8a8_plain, [q for q, _ in packed],
        [sc for _, sc in packed], ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))
    narrow = [weight_formats.quantize_fp8_weight(t) for t in weights(12, 96, 128, torch.float32, seed=5)]
    with pytest.raises(ValueError, match="moe_experts_fp8_w8a8: D = 128, I = 96; W8A8 needs multiples of 128"):
        torch.ops.dsv4.moe_experts_fp8_w8a8(x, ids, w, *(q for q, _ in narrow), *(sc for _, sc in narrow), LIMIT)


# ---- W4A8: moe_experts_mxfp4_w4a8 against DeepSeek's own arithmetic ------------------------------

_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def deepseek_act_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek V4's act_quant(x, 128, scale_fmt="ue8m0") (inference/kernel.py: act_quant_kernel with
    round_scale), transcribed: per row and 128-block amax = max(|x|, 1e-4), scale = 2^ceil(log2(amax *
    (1/448))), codes = clamp(x / scale, -448, 448) cast to e4m3 -> (codes [n, K], scale [n, K/128])."""
    blocks = x.float().unflatten(-1, (-1, 128))
    amax = blocks.abs().amax(-1).clamp_min(1e-4)
    scale = 2.0 ** torch.ceil(torch.log2(amax * (1.0 / 448.0)))
    codes = (blocks / scale.unsqueeze(-1)).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return codes.flatten(-2), scale


def deepseek_fp4_gemm(a, a_scale, b, b_scale) -> torch.Tensor:
    """DeepSeek V4's fp4_gemm (inference/kernel.py: fp4_gemm_kernel), transcribed: C [M, N] = A_e4m3 [M, K]
    @ B_e2m1 [N, K]^T, B packed two codes per byte along K (low nibble first), a scale per 1 x 32 of B
    and per 1 x 128 of A; per K step of 32 the FP8 x FP8 partial sum is added to the fp32 accumulator
    times the row's activation scale and the column's weight scale. Not rounded to bf16 at the end
    (DeepSeek returns bf16; the op's contract keeps fp32)."""
    byte = b.view(torch.uint8).long()
    nibbles = torch.stack([byte & 0xF, byte >> 4], -1).flatten(-2)                      # [N, K], low nibble first
    values = torch.where(nibbles >= 8, -1.0, 1.0) * _E2M1[nibbles & 7]
    out = torch.zeros(a.shape[0], b.shape[0])
    for k in range(a.shape[1] // 32):
        part = a[:, 32 * k:32 * k + 32].float() @ values[:, 32 * k:32 * k + 32].T
        out += part * a_scale[:, k // 4, None] * b_scale.float()[None, :, k]
    return out


def deepseek_moe(x, ids, w, w1, w2, w3, s1, s2, s3, limit) -> torch.Tensor:
    """DeepSeek V4's MoE over its experts (inference/model.py: Expert.forward with linear's FP4 branch:
    act_quant + fp4_gemm for w1, w3, then w2 on `weights * silu(gate) * up`)."""
    out = torch.zeros(x.shape)
    for e in range(w1.shape[0]):
        t, j = (ids == e).nonzero(as_tuple=True)
        if not t.numel():
            continue
        xq = deepseek_act_quant(x[t])
        gate, up = deepseek_fp4_gemm(*xq, w1[e], s1[e]), deepseek_fp4_gemm(*xq, w3[e], s3[e])
        if limit > 0:
            up, gate = up.clamp(-limit, limit), gate.clamp(max=limit)
        h = w[t, j].unsqueeze(-1) * (F.silu(gate) * up)
        out.index_add_(0, t, deepseek_fp4_gemm(*deepseek_act_quant(h), w2[e], s2[e]))
    return out


# Dense form (k 2 and 6 of 5: duplicates) and grouped (1 of 12, 3 of 32 with -1 ids); D = 256 (two activation
# blocks), I = 128.
W4A8_CASES = [(7, 2, 5, "random"), (5, 6, 5, "one-expert"), (9, 3, 32, "holes"), (1, 1, 12, "random")]


@pytest.mark.parametrize("T,k,E,kind", W4A8_CASES, ids=[f"T{c[0]}-k{c[1]}-E{c[2]}-{c[3]}" for c in W4A8_CASES])
def test_w4a8_op_is_deepseeks_expert_arithmetic(T, k, E, kind):
    """moe_experts_mxfp4_w4a8 against a transcription of DeepSeek's act_quant, fp4_gemm and Expert
    (written from their code, none of ours: its own nibble decode, log2 scales, per-32 promotions) at
    W8A8_TOL (the same codes and exact products summed in another order; "* (1/448)" against our
    division may put a scale a power of two apart at a tie). Weights with e8m0 scales whose 1 x 32 runs
    differ (x 2^-3 .. 2^3); it is really quantized: the W4A16 op differs by more than 1e-2."""
    D, I = 256, 128
    assert moe_ops.dense_is_cheaper(k, E) == (E == 5)
    g = torch.Generator().manual_seed(T + E)
    x = torch.randn(T, D, generator=g) * 2
    ids, w = routing(T, k, E, kind, seed=T * k)
    packed = []
    for t in weights(E, I, D, torch.float32, seed=E):
        runs = 2.0 ** torch.randint(-3, 4, (*t.shape[:-1], t.shape[-1] // 32), generator=g)
        packed.append(weight_formats.quantize_mxfp4(t * runs.repeat_interleave(32, -1)))
    codes, scales = [q for q, _ in packed], [sc for _, sc in packed]
    out = torch.ops.dsv4.moe_experts_mxfp4_w4a8(x, ids, w, *codes, *scales, LIMIT)
    assert out.dtype == torch.float32 and out.shape == (T, D)
    assert_close("moe_experts_mxfp4_w4a8 vs DeepSeek's arithmetic", deepseek_moe(x, ids, w, *codes, *scales, LIMIT), out,
                 W8A8_TOL)
    w4a16 = torch.ops.dsv4.moe_experts_mxfp4(x, ids, w, *codes, *scales, LIMIT)
    assert ((w4a16 - out).norm() / w4a16.norm()).item() > 1e-2


def test_w4a8_opcheck_export_and_bad_shapes():
    """Fake / autograd registration (the schema test compares e8m0 inputs, which torch cannot on the CPU;
    AOT dispatch: W8A8's test covers the shared plain form, at ~6 s); torch.export of the grouped form
    with T dynamic matches eager at other T; D or I not a multiple of 128 is a one-line ValueError, from
    the op and from its fake."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    packed = [weight_formats.quantize_mxfp4(t) for t in weights(12, 128, 128, torch.float32, seed=5)]
    x, ids, w = check_registration_and_export(
        torch.ops.dsv4.moe_experts_mxfp4_w4a8, moe_ops._moe_experts_mxfp4_w4a8_plain, [q for q, _ in packed],
        [sc for _, sc in packed], ("test_autograd_registration", "test_faketensor"))
    narrow = [weight_formats.quantize_mxfp4(t) for t in weights(12, 96, 128, torch.float32, seed=5)]
    args = (x, ids, w, *(q for q, _ in narrow), *(sc for _, sc in narrow), LIMIT)
    with pytest.raises(ValueError, match="moe_experts_mxfp4_w4a8: D = 128, I = 96; W4A8 needs multiples of 128"):
        torch.ops.dsv4.moe_experts_mxfp4_w4a8(*args)
    with FakeTensorMode() as mode, pytest.raises(ValueError, match="W4A8 needs multiples of 128"):
        torch.ops.dsv4.moe_experts_mxfp4_w4a8(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))


def _dense_masked_moe(moe: MoE, x: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """The MoE as the model computed it before the op: combine weights [T, E] (0 = not picked) on every
    expert's output, x [B, S, D] -> [B, S, D]."""
    flat = x.flatten(0, 1)
    ids, w = moe.gate(flat, token_ids.flatten())
    combine = torch.zeros(flat.shape[0], moe.experts.w1.shape[0]).scatter_add(-1, ids.long(), w)
    ex = moe.experts
    gate = torch.einsum("td,eid->eti", flat, ex.w1)
    up = torch.einsum("td,eid->eti", flat, ex.w3)
    act = moe_ops.swiglu(gate, up, ex.limit) * combine.T.unsqueeze(-1)
    y = torch.einsum("eti,edi->td", act.to(flat.dtype), ex.w2).float() + moe.shared(flat).float()
    return y.to(x.dtype).view_as(x)


@pytest.mark.parametrize("layer_id", [0, 3], ids=["hash-routed", "score-routed"])
def test_moe_layer_with_the_op_equals_the_dense_masked_moe(layer_id):
    """32 experts, top 2: the op takes its grouped form (dense_is_cheaper is False)."""
    config = ModelConfig.from_preset("tiny").replace(n_routed_experts=32, n_activated_experts=2)
    assert not moe_ops.dense_is_cheaper(2, 32)
    torch.manual_seed(0)
    moe = MoE(config, layer_id)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=p.shape[-1] ** -0.5 if p.dim() > 1 else 0.1)
    if moe.gate.hashed:
        moe.gate.tid2eid.copy_(torch.randint(0, 32, moe.gate.tid2eid.shape))  # duplicates included
    x = torch.randn(2, 45, config.dim)
    tokens = torch.randint(0, config.vocab_size, (2, 45))
    with torch.no_grad():
        assert_close("MoE with moe_experts vs dense masked", _dense_masked_moe(moe, x, tokens), moe(x, tokens))


@pytest.mark.slow
def test_grouped_form_exports_to_onnx_with_a_dynamic_token_count(tmp_path):
    """The plain op's grouped form (32 experts, top 2: not dense) through torch.export with T dynamic
    and the project's ONNX exporter (standard ops only), run by onnxruntime at two other T."""
    import onnxruntime as ort

    from dsv4_compile.export import ExportResult, export_onnx

    E, k, D, I = 32, 2, 16, 8
    assert not moe_ops.dense_is_cheaper(k, E)
    w1, w2, w3 = weights(E, I, D, torch.float32, seed=11)
    router = torch.randn(E, D, generator=torch.Generator().manual_seed(12))

    class Routed(torch.nn.Module):
        def forward(self, x):
            scores = (x @ router.T).softmax(-1)
            w, ids = scores.topk(k, dim=-1)
            ids = torch.where(ids == 3, -1, ids).to(torch.int32)  # expert 3 switched off: -1 ids
            return moe_ops._moe_experts_plain(x, ids, w, w1, w2, w3, LIMIT)

    x = torch.randn(9, D)
    program = torch.export.export(Routed(), (x,), dynamic_shapes=({0: torch.export.Dim("T", min=2, max=256)},))
    path = str(tmp_path / "moe.onnx")
    export_onnx(ExportResult(program, (2, 256), (1, 1), True, {}), path, x)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for n in (5, 130):
        xn = torch.randn(n, D, generator=torch.Generator().manual_seed(n))
        out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: xn.numpy()})[0])
        assert_close(f"onnxruntime at T={n}", Routed()(xn), out)
