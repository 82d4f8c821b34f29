"""sparse_attention and sparse_attention_cached against the per-(b, s, h) loop twin, causal SDPA, the
sink's exact share of the denominator, empty rows, NaN/Inf confinement, chunking and gradients.

Tolerances: the op accumulates in float32 and the twin in float64 on the same input values (bf16/fp16
inputs are upcast exactly), so for a float32 output the difference is summation order only:
REL_RMS_TOL[float32] = 1e-5 (measured about 1e-7). For bf16/fp16 the only extra error is the single
rounding of the output to q's dtype: ulp / sqrt(12) RMS, about 1.5e-3 relative for bf16 and 2e-4 for
fp16; the bars are 3e-3 and 4e-4 (twice that), tighter than the generic REL_RMS_TOL so that a second
rounding anywhere (say, of the probabilities) would show. Chunking is compared bit for bit: chunks are
independent queries computed by the same ops.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import dsv4_compile.model.ops as ops
import naive_ops as naive
from dsv4_compile.model.kv_layout import pack_main_entries, unpack_main_entries
from helpers import assert_close

dsv4 = torch.ops.dsv4
DTYPES = [pytest.param(t, id=n) for t, n in ((torch.float32, "f32"), (torch.bfloat16, "bf16"), (torch.float16, "f16"))]
OUT_TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-3, torch.float16: 4e-4}

# (B, S, H, D, N, K): odd S, K not a power of two, K > N (repeats forced), decode-like S = 1.
ATTN_SHAPES = [
    pytest.param((2, 7, 3, 16, 11, 5), id="B2-S7-H3-D16-N11-K5"),
    pytest.param((1, 9, 2, 24, 9, 9), id="B1-S9-H2-D24-N9-K9"),
    pytest.param((1, 1, 4, 32, 13, 6), id="B1-S1-H4-D32-N13-K6"),
    pytest.param((3, 5, 1, 8, 4, 7), id="B3-S5-H1-D8-N4-K7"),
]


def attn_inputs(B, S, H, D, N, K, dtype, seed=0):
    """Random q, kv, sink and indices in [-1, N) with -1 holes, repeated indices and one empty row."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S, H, D, generator=g).to(dtype)
    kv = torch.randn(B, N, D, generator=g).to(dtype)
    sink = torch.randn(H, generator=g)
    idx = torch.randint(-1, N, (B, S, K), generator=g, dtype=torch.int32)
    idx[0, 0, -1] = idx[0, 0, 0]  # a repeated index (counts twice)
    if S > 1:
        idx[-1, S // 2] = -1      # a row with no entries
    return q, kv, sink, idx


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ATTN_SHAPES)
def test_sparse_attention_matches_naive(shape, dtype):
    q, kv, sink, idx = attn_inputs(*shape, dtype)
    scale = shape[3] ** -0.5
    out = dsv4.sparse_attention(q, kv, sink, idx, scale)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close("sparse_attention", naive.sparse_attention(q, kv, sink, idx, scale), out, OUT_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,S,H,D", [pytest.param(2, 13, 4, 16, id="B2-S13-H4-D16"), pytest.param(1, 6, 3, 8, id="B1-S6-H3-D8")])
def test_causal_indices_equal_sdpa(B, S, H, D, dtype):
    """All causal indices, sink -inf == causal SDPA with K = V = kv expanded over the heads (computed in
    float64 from the same input values)."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, S, H, D, generator=g).to(dtype)
    kv = torch.randn(B, S, D, generator=g).to(dtype)
    k = torch.arange(S)
    idx = torch.where(k.view(1, S) <= k.view(S, 1), k.view(1, S), -1).to(torch.int32).expand(B, S, S).contiguous()
    scale = 0.37
    out = dsv4.sparse_attention(q, kv, torch.full((H,), -math.inf), idx, scale)
    kv_h = kv.double().unsqueeze(1).expand(B, H, S, D)
    ref = F.scaled_dot_product_attention(q.double().transpose(1, 2), kv_h, kv_h, is_causal=True, scale=scale).transpose(1, 2)
    assert_close("sparse_attention vs causal SDPA", ref, out, OUT_TOL[dtype])
    # the order of the indices and where the -1s sit do not matter
    perm = torch.randperm(S, generator=g)
    assert_close("permuted indices", out.float(), dsv4.sparse_attention(q, kv, torch.full((H,), -math.inf), idx[..., perm], scale).float(),
                 OUT_TOL[dtype])  # only the summation order changes (and, for bf16/fp16, the last rounding)


def test_sink_shrinks_output_by_its_share():
    """out(sink) == out(no sink) * Z / (Z + exp(sink)), Z = sum_j exp(l_j), computed here in float64."""
    B, S, H, D, N, K = 2, 5, 4, 16, 9, 6
    q, kv, _, idx = attn_inputs(B, S, H, D, N, K, torch.float32, seed=2)
    idx[-1, S // 2, 0] = 3  # no empty rows here: they are checked below
    sink = torch.tensor([-3.0, 0.0, 2.5, 8.0])
    scale = 0.25
    with_sink = dsv4.sparse_attention(q, kv, sink, idx, scale)
    no_sink = dsv4.sparse_attention(q, kv, torch.full((H,), -math.inf), idx, scale)
    factor = torch.empty(B, S, H, 1, dtype=torch.float64)
    for b in range(B):
        for s in range(S):
            sel = [int(j) for j in idx[b, s] if j >= 0]
            for h in range(H):
                logits = [scale * float(q[b, s, h].double() @ kv[b, j].double()) for j in sel]
                lse = max(logits) + math.log(sum(math.exp(v - max(logits)) for v in logits))
                factor[b, s, h] = 1.0 / (1.0 + math.exp(float(sink[h]) - lse))  # Z / (Z + e^sink)
    assert_close("sink share", no_sink.double() * factor, with_sink, 1e-5)
    assert (factor < 1).all() and (factor > 0.5e-3).all()  # the sink really does something here


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sink", [-math.inf, -30.0, 0.0, 40.0], ids=["sink-inf", "sink-30", "sink0", "sink40"])
def test_empty_rows_give_zeros(sink, dtype):
    q, kv, _, idx = attn_inputs(2, 4, 3, 8, 6, 5, dtype, seed=3)
    idx[0, 1] = -1
    idx[1, 3] = -1
    out = dsv4.sparse_attention(q, kv, torch.full((3,), sink), idx, 0.3)
    empty = (idx < 0).all(-1)  # [B, S]: (0, 1), (1, 3) and attn_inputs' own empty row (1, 2)
    assert empty[0, 1] and empty[1, 3] and int(empty.sum()) == 3
    assert (out[empty] == 0).all()
    assert torch.isfinite(out).all()
    if sink <= 0:  # (a sink of 40 shrinks the other rows by ~e^-40: zero in fp16)
        assert (out[~empty].abs().sum(-1) > 0).all()


def test_nan_and_inf_stay_in_their_rows():
    """NaN in q or in a selected kv entry propagates to that row only; a NaN/Inf in an entry that a row
    does not select (in particular kv row 0, where -1 holes point after clamping) does not reach it."""
    B, S, H, D, N = 1, 4, 2, 8, 6
    q, kv, sink, _ = attn_inputs(B, S, H, D, N, 3, torch.float32, seed=4)
    idx = torch.tensor([[[1, -1, 2], [3, -1, -1], [0, 4, -1], [5, 5, 2]]], dtype=torch.int32)
    kv[0, 0] = math.nan   # selected only by row 2
    kv[0, 4, 3] = math.inf  # selected only by row 2
    q[0, 3, 1, 0] = math.nan  # row 3, head 1
    out = dsv4.sparse_attention(q, kv, sink, idx, 0.3)
    assert out[0, 2].isnan().all()
    assert out[0, 3, 1].isnan().all() and torch.isfinite(out[0, 3, 0]).all()
    assert torch.isfinite(out[0, :2]).all(), "a NaN/Inf entry leaked into rows that do not select it"


def test_wrong_dtypes_raise():
    q, kv, sink, idx = attn_inputs(1, 2, 2, 8, 4, 3, torch.float32)
    with pytest.raises(ValueError, match="sparse_attention: q is torch.float32 and kv is torch.bfloat16"):
        dsv4.sparse_attention(q, kv.bfloat16(), sink, idx, 0.3)
    with pytest.raises(ValueError, match="one of bf16, fp16, fp32"):
        dsv4.sparse_attention(q.double(), kv.double(), sink, idx, 0.3)


@pytest.mark.parametrize("n_chunk", [1, 3])
def test_sparse_attention_chunking_is_exact(monkeypatch, n_chunk):
    B, S, H, D, N, K = 2, 7, 3, 16, 11, 5
    q, kv, sink, idx = attn_inputs(B, S, H, D, N, K, torch.float32, seed=5)
    whole = dsv4.sparse_attention(q, kv, sink, idx, 0.25)
    monkeypatch.setattr(ops, "CHUNK_BYTES", n_chunk * B * K * (D + 2 * H) * 4)  # n_chunk queries per chunk
    calls = []
    monkeypatch.setattr(ops, "sparse_attention_chunk", lambda *a, f=ops.sparse_attention_chunk: calls.append(1) or f(*a))
    chunked = dsv4.sparse_attention(q, kv, sink, idx, 0.25)
    assert len(calls) == math.ceil(S / n_chunk), "the monkeypatched CHUNK_BYTES did not split the queries"
    assert torch.equal(whole, chunked)


def test_sparse_attention_grads_match_naive():
    B, S, H, D, N, K = 2, 5, 3, 8, 7, 6
    q, kv, sink, idx = attn_inputs(B, S, H, D, N, K, torch.float32, seed=6)
    leaves = [t.clone().requires_grad_() for t in (q, kv, sink)]
    out = dsv4.sparse_attention(*leaves, idx, 0.3)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    out.backward(g)
    leaves64 = [t.double().requires_grad_() for t in (q, kv, sink)]
    naive.sparse_attention(*leaves64, idx, 0.3).backward(g.double())
    for name, a, b in zip(("q", "kv", "sink"), leaves64, leaves):
        assert_close(f"sparse_attention grad {name}", a.grad, b.grad, 1e-5)


# ------------------------------------------------------------------------------------------------
# sparse_attention_cached: the same over the packed FP8 cache
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,S,H,D,R,N,K", [pytest.param(2, 3, 2, 128, 64, 9, 5, id="B2-S3-H2-D128-R64-N9-K5"),
                                           pytest.param(1, 1, 3, 192, 64, 6, 4, id="B1-S1-H3-D192-R64-N6-K4")])
def test_sparse_attention_cached_equals_unpacked(B, S, H, D, R, N, K, dtype):
    g = torch.Generator().manual_seed(8)
    raw = torch.randn(B, N, D, generator=g)
    kv = torch.cat([naive.fp8_simulate(raw[..., :D - R], 64).float(), raw[..., D - R:].bfloat16().float()], -1)
    cache = pack_main_entries(kv, R)
    q, _, sink, idx = attn_inputs(B, S, H, D, N, K, dtype, seed=9)
    out = dsv4.sparse_attention_cached(q, cache, sink, idx, D ** -0.5, R)
    assert out.dtype == dtype and out.shape == q.shape
    assert torch.equal(out, dsv4.sparse_attention(q, unpack_main_entries(cache, D, R).to(dtype), sink, idx, D ** -0.5))
    assert_close("cached vs naive", naive.sparse_attention(q, kv.to(dtype), sink, idx, D ** -0.5), out, OUT_TOL[dtype])


def test_sparse_attention_cached_chunking_is_exact(monkeypatch):
    B, S, H, D, R, N, K = 1, 5, 2, 128, 64, 8, 3
    kv = torch.randn(B, N, D)
    cache = pack_main_entries(torch.cat([naive.fp8_simulate(kv[..., :64], 64).float(), kv[..., 64:].bfloat16().float()], -1), R)
    q, _, sink, idx = attn_inputs(B, S, H, D, N, K, torch.float32, seed=10)
    whole = dsv4.sparse_attention_cached(q, cache, sink, idx, 0.1, R)
    monkeypatch.setattr(ops, "CHUNK_BYTES", 2 * B * K * (D + 2 * H) * 4)
    assert torch.equal(whole, dsv4.sparse_attention_cached(q, cache, sink, idx, 0.1, R))
