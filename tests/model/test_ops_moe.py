"""torch.ops.dsv4.moe_experts: the plain op against a float64 loop over (token, slot) written from the
contract, its grouped and dense forms against each other, the expert-block layout, and the MoE layer
against the dense-masked MoE it replaced.

Tolerances: float32 inputs against the float64 loop 1e-5 relative RMS (helpers' fp32: summation order
only); bf16 inputs against the float64 loop of the same bf16 values 1e-2 (the activation is rounded to
bf16 before w2 and the matmuls take bf16 operands: a few bf16 roundings).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dsv4_compile.model.ops  # noqa: F401  (registers torch.ops.dsv4.*)
from dsv4_compile.model import ModelConfig, ops
from dsv4_compile.model.moe import MoE
from helpers import assert_close

LIMIT = 10.0


def reference(x, topk_ids, topk_weights, w1, w2, w3, limit):
    """out[t] = sum_j w[t, j] w2[e] @ swiglu(w1[e] x[t], w3[e] x[t]), e = ids[t, j] in [0, E), in float64."""
    T, D = x.shape
    E = w1.shape[0]
    out = torch.zeros(T, D, dtype=torch.float64)
    for t in range(T):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            if not 0 <= e < E:
                continue
            xt = x[t].double()
            gate, up = w1[e].double() @ xt, w3[e].double() @ xt
            if limit > 0:
                gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
            out[t] += float(topk_weights[t, j]) * (w2[e].double() @ (F.silu(gate) * up))
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
    assert_close("moe_experts vs float64 loop", reference(x, ids, w, w1, w2, w3, LIMIT).float(), out,
                 1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("block", [1, 3, 16])
@pytest.mark.parametrize("kind", ["random", "holes", "one-expert"])
def test_grouped_and_dense_forms_agree(block, kind):
    """Every block size gives the dense form's numbers (fp32 noise); the clamp is active (limit 0.5)."""
    T, k, E, D, I = 37, 3, 7, 16, 12
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(1))
    ids, w = routing(T, k, E, kind, seed=2)
    w1, w2, w3 = weights(E, I, D, torch.float32, seed=3)
    dense = ops._moe_dense(x, ids, w, w1, w2, w3, 0.5)
    assert_close(f"grouped (block {block}) vs dense", dense, ops._moe_grouped(x, ids, w, w1, w2, w3, 0.5, block))


@pytest.mark.parametrize("T,k,E,block", [(1, 6, 256, 1), (5, 2, 3, 4), (64, 6, 9, 16), (0, 2, 3, 2)])
def test_expert_blocks_layout(T, k, E, block):
    """Each assignment sits in exactly one row, in a block of its own expert, in its original order;
    -1 ids nowhere; padding rows hold N; the block count is the static bound."""
    ids, _ = routing(max(T, 1), k, E, "holes" if E > 2 else "random", seed=4)
    ids = ids[:T]
    N = T * k
    slot, block_expert = ops.expert_blocks(ids, E, block)
    assert slot.shape == (ops.max_expert_blocks(N, E, block), block) and block_expert.shape == slot.shape[:1]
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


def test_dense_form_is_chosen_only_where_it_computes_no_more_rows():
    """E = 8, k = 6 (the mini preset): dense from T = 4 on; E = 256, k = 6: never (grouped always fewer)."""
    def dense(T, k, E):
        block = ops.moe_block_rows(T, k, E)
        return T * E <= ops.max_expert_blocks(T * k, E, block) * block
    assert [dense(T, 6, 8) for T in (1, 4, 64, 4096)] == [False, True, True, True]
    assert not any(dense(T, 6, 256) for T in (1, 8, 64, 4096, 32768))


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
            return ops._moe_experts_plain(x, ids, w, w1, w2, w3, LIMIT)

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


def _dense_masked_moe(moe: MoE, x: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """The MoE as the model computed it before the op: combine weights [T, E] (0 = not picked) on every
    expert's output, x [B, S, D] -> [B, S, D]."""
    flat = x.flatten(0, 1)
    ids, w = moe.gate(flat, token_ids.flatten())
    combine = torch.zeros(flat.shape[0], moe.experts.w1.shape[0]).scatter_add(-1, ids.long(), w)
    ex = moe.experts
    gate = torch.einsum("td,eid->eti", flat, ex.w1)
    up = torch.einsum("td,eid->eti", flat, ex.w3)
    act = ops.swiglu(gate, up, ex.limit) * combine.T.unsqueeze(-1)
    y = torch.einsum("eti,edi->td", act.to(flat.dtype), ex.w2).float() + moe.shared(flat).float()
    return y.to(x.dtype).view_as(x)


@pytest.mark.parametrize("layer_id", [0, 3], ids=["hash-routed", "score-routed"])
def test_moe_layer_with_the_op_equals_the_dense_masked_moe(layer_id):
    config = ModelConfig.from_preset("tiny").replace(n_routed_experts=7, n_activated_experts=3)
    torch.manual_seed(0)
    moe = MoE(config, layer_id)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=p.shape[-1] ** -0.5 if p.dim() > 1 else 0.1)
    if moe.gate.hashed:
        moe.gate.tid2eid.copy_(torch.randint(0, 7, moe.gate.tid2eid.shape))  # duplicates included
    x = torch.randn(2, 45, config.dim)
    tokens = torch.randint(0, config.vocab_size, (2, 45))
    with torch.no_grad():
        assert_close("MoE with moe_experts vs dense masked", _dense_masked_moe(moe, x, tokens), moe(x, tokens))
