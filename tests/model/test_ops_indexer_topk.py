"""indexer_topk against the per-query loop twin (sort key: NaN first, then (-score, index)), with exact
ties, -1 padding, the visibility rule n < (t + 1) // ratio, chunking and NaN ordering.

Selections are compared exactly. To make that meaningful, most inputs are small dyadic numbers (k / 4
with |k| <= 12): every product and sum is exact in float32, bf16 and float64 alike, so the op and the
twin see identical scores, and ties are frequent. Gaussian inputs are compared by the scores of the
selected keys (1e-5 relative: float32 vs float64 summation order), which tolerates two nearly equal
scores swapping places.
"""
from __future__ import annotations

import math

import pytest
import torch

import dsv4_compile.model.ops as ops
import naive_ops as naive

dsv4 = torch.ops.dsv4

# (B, S, H, d, N, ratio, topk): topk > visible (padding), ratio 3, decode (S = 1), no keys at all.
INDEXER_CASES = [
    pytest.param((2, 9, 3, 8, 6, 4, 4), id="B2-S9-H3-d8-N6-r4-k4"),
    pytest.param((1, 5, 2, 16, 12, 4, 16), id="B1-S5-H2-d16-N12-r4-k16"),
    pytest.param((2, 1, 4, 8, 7, 128, 3), id="B2-S1-H4-d8-N7-r128-k3"),
    pytest.param((1, 11, 1, 4, 10, 3, 5), id="B1-S11-H1-d4-N10-r3-k5"),
    pytest.param((1, 3, 2, 8, 0, 4, 2), id="B1-S3-H2-d8-N0-r4-k2"),
]
DTYPES = [pytest.param(t, id=n) for t, n in ((torch.float32, "f32"), (torch.bfloat16, "bf16"), (torch.float16, "f16"))]


def dyadic(shape, g):
    return torch.randint(-12, 13, shape, generator=g).float() / 4


def indexer_inputs(B, S, H, d, N, ratio, topk, dtype=torch.float32, seed=0, gaussian=False):
    g = torch.Generator().manual_seed(seed)
    make = (lambda *s: torch.randn(s, generator=g)) if gaussian else (lambda *s: dyadic(s, g))
    q, keys = make(B, S, H, d).to(dtype), make(B, N, d).to(dtype)
    weights = make(B, S, H).to(dtype)
    # positions: a prefix start per batch row, then consecutive or strided tokens, some before any key
    start = torch.randint(0, max(1, (N + 1) * ratio), (B, 1), generator=g)
    positions = (start + torch.arange(S).view(1, S) * max(1, ratio // 2)).long()
    positions[0, 0] = 0  # nothing visible to the first token (for ratio > 1)
    return q, weights, keys, positions


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", INDEXER_CASES)
def test_indexer_matches_naive_exactly(case, dtype):
    B, S, H, d, N, ratio, topk = case
    q, w, keys, pos = indexer_inputs(*case, dtype=dtype)
    out = dsv4.indexer_topk(q, w, keys, pos, ratio, topk)
    assert out.dtype == torch.int32 and out.shape == (B, S, topk)
    assert torch.equal(out, naive.indexer_topk(q, w, keys, pos, ratio, topk))


@pytest.mark.parametrize("case", INDEXER_CASES[:4])
def test_indexer_gaussian_scores_match_naive(case):
    B, S, H, d, N, ratio, topk = case
    q, w, keys, pos = indexer_inputs(*case, seed=1, gaussian=True)
    out = dsv4.indexer_topk(q, w, keys, pos, ratio, topk)
    ref = naive.indexer_topk(q, w, keys, pos, ratio, topk)
    assert torch.equal(out < 0, ref < 0), "the -1 padding differs"
    scores = torch.einsum("bshd,bnd->bshn", q.double(), keys.double()).relu().mul(w.double().unsqueeze(-1)).sum(2)
    pick = lambda idx: torch.where(idx >= 0, scores.gather(-1, idx.long().clamp_min(0)), 0.0)  # noqa: E731
    a, b = pick(out), pick(ref)
    assert ((a - b).abs() <= 1e-5 * b.abs().max()).all(), "selected scores differ"


def test_ties_go_to_the_lowest_index():
    B, S, H, d, N, ratio = 1, 2, 2, 8, 9, 4
    g = torch.Generator().manual_seed(2)
    keys = dyadic((B, N, d), g) / 8  # small scores
    best = torch.full((d,), 3.0)
    for n in (7, 2, 5):  # three exactly tied best keys, listed out of order
        keys[0, n] = best
    keys[0, 4] = best / 2  # the runner-up
    q = torch.ones(B, S, H, d)
    w = torch.ones(B, S, H)
    pos = torch.tensor([[N * ratio - 1, 100]])  # all N visible
    out = dsv4.indexer_topk(q, w, keys, pos, ratio, 4)
    assert out[0, 0].tolist() == [2, 5, 7, 4] and out[0, 1].tolist() == [2, 5, 7, 4]
    # all keys equal: the first topk indices, in order
    out = dsv4.indexer_topk(q, w, torch.ones(B, N, d), pos, ratio, 6)
    assert out[0].tolist() == [[0, 1, 2, 3, 4, 5]] * 2
    # all scores zero (ReLU of negative products): still the lowest indices, not -1
    out = dsv4.indexer_topk(q, w, -torch.ones(B, N, d), pos, ratio, 3)
    assert out[0].tolist() == [[0, 1, 2]] * 2


@pytest.mark.parametrize("ratio", [1, 3, 4, 128])
def test_visibility_rule_and_padding(ratio):
    """Key n is visible at position t iff n < (t + 1) // ratio; fewer than topk visible -> -1 padding."""
    N, topk = 6, 4
    ts = sorted({0, ratio - 2, ratio - 1, ratio, 2 * ratio - 1, 3 * ratio - 2, 3 * ratio - 1, 7 * ratio, 100 * ratio} - {-1})
    S = len(ts)
    q = torch.ones(1, S, 1, 4)
    keys = torch.arange(1, N + 1, dtype=torch.float32).view(1, N, 1).expand(1, N, 4).contiguous()  # key n scores n+1: later wins
    out = dsv4.indexer_topk(q, torch.ones(1, S, 1), keys, torch.tensor([ts]), ratio, topk)
    for s, t in enumerate(ts):
        visible = min(N, (t + 1) // ratio)
        want = list(range(visible - 1, max(-1, visible - 1 - topk), -1))
        want += [-1] * (topk - len(want))
        assert out[0, s].tolist() == want, f"t={t}, ratio={ratio}"


def test_nan_scores_sort_first():
    B, S, H, d, N, ratio = 1, 2, 2, 4, 6, 4
    q, w, keys, _ = indexer_inputs(B, S, H, d, N, ratio, 3, seed=3)
    q[0, 0, 1, 2] = math.nan  # every visible score of query 0 is NaN
    keys[0, 4, 0] = math.nan  # key 4 scores NaN for every query that sees it
    pos = torch.tensor([[4 * ratio - 1, 6 * ratio - 1]])  # query 0 sees keys 0..3 (not 4), query 1 all
    out = dsv4.indexer_topk(q, w, keys, pos, ratio, 3)
    assert out[0, 0].tolist() == [0, 1, 2]
    assert out[0, 1, 0].item() == 4
    assert torch.equal(out, naive.indexer_topk(q, w, keys, pos, ratio, 3))


@pytest.mark.parametrize("per_chunk", [1, 2])
def test_indexer_chunking_is_exact(monkeypatch, per_chunk):
    B, S, H, d, N, ratio, topk = 2, 9, 3, 8, 6, 4, 4
    q, w, keys, pos = indexer_inputs(B, S, H, d, N, ratio, topk, seed=4, gaussian=True)
    whole = dsv4.indexer_topk(q, w, keys, pos, ratio, topk)
    monkeypatch.setattr(ops, "CHUNK_BYTES", per_chunk * B * N * (H + 2) * 4)
    calls = []
    monkeypatch.setattr(ops, "indexer_topk_chunk", lambda *a, f=ops.indexer_topk_chunk: calls.append(1) or f(*a))
    chunked = dsv4.indexer_topk(q, w, keys, pos, ratio, topk)
    assert len(calls) == math.ceil(S / per_chunk), "the monkeypatched CHUNK_BYTES did not split the queries"
    assert torch.equal(whole, chunked)


# ---- indexer_topk_cached: the same selection over the packed key cache ----------------------------

def cached_inputs(B, S, H, d, N, ratio, topk, fmt, seed=0):
    """indexer_inputs with the keys FP4-simulated (what the cache holds exactly in "fp4"; "fp8"
    re-quantizes them) and packed: (q, weights, index cache, positions, the unpacked keys)."""
    from dsv4_compile.model.kv_layout import pack_indexer_keys, unpack_indexer_keys

    q, w, keys, pos = indexer_inputs(B, S, H, d, max(N, 1), ratio, topk, seed=seed, gaussian=True)
    cache = pack_indexer_keys(ops.fp4_simulate(keys, 32), fmt)[:, :N]       # (packing refuses N = 0 in fp8)
    return q, w, cache, pos, unpack_indexer_keys(cache, d, fmt)


@pytest.mark.parametrize("fmt", ["fp4", "fp8"])
@pytest.mark.parametrize("case", [pytest.param((2, 1, 3, 32, 37, 4, 40), id="decode-B2-N37-k40-pad"),
                                  pytest.param((1, 7, 2, 64, 20, 2, 5), id="S7-N20-r2"),
                                  pytest.param((1, 3, 2, 32, 0, 4, 2), id="no-keys")])
def test_cached_equals_indexer_topk_over_the_unpacked_keys(case, fmt):
    B, S, H, d, N, ratio, topk = case
    q, w, cache, pos, keys = cached_inputs(*case, fmt, seed=5)
    out = dsv4.indexer_topk_cached(q, w, cache, pos, ratio, topk, fmt)
    assert out.dtype == torch.int32 and out.shape == (B, S, topk)
    assert torch.equal(out, dsv4.indexer_topk(q, w, keys, pos, ratio, topk))


@pytest.mark.parametrize("budget_keys,budget_queries", [(5, 1), (8, 3), (1, 7)])
def test_cached_unpacks_chunk_by_chunk(monkeypatch, budget_keys, budget_queries):
    """A small CHUNK_BYTES splits the keys (never the whole cache unpacked at once) and the queries:
    the picks do not change."""
    from dsv4_compile.model import kv_layout

    B, S, H, d, N, ratio, topk = 2, 7, 3, 32, 37, 4, 6
    q, w, cache, pos, keys = cached_inputs(B, S, H, d, N, ratio, topk, "fp4", seed=6)
    whole = dsv4.indexer_topk(q, w, keys, pos, ratio, topk)
    q_chunk = budget_queries
    # the op's own budget arithmetic: q_chunk queries (scores [B, s, N] x 4), key_chunk keys a chunk
    monkeypatch.setattr(ops, "CHUNK_BYTES", max(B * N * 4 * 4 * q_chunk, B * (d + q_chunk * (H + 2)) * 4 * budget_keys))
    unpacked = []
    monkeypatch.setattr(ops, "unpack_indexer_keys",
                        lambda c, *a, f=kv_layout.unpack_indexer_keys: unpacked.append(c.shape[1]) or f(c, *a))
    assert torch.equal(dsv4.indexer_topk_cached(q, w, cache, pos, ratio, topk, "fp4"), whole)
    assert max(unpacked) < N and sum(unpacked) == N * math.ceil(S / q_chunk), unpacked


def test_cached_refuses_bad_caches():
    q, w, cache, pos, _ = cached_inputs(1, 2, 2, 32, 5, 4, 3, "fp4")
    with pytest.raises(ValueError, match="indexer cache format 'fp6'; accepted: fp4, fp8"):
        dsv4.indexer_topk_cached(q, w, cache, pos, 4, 3, "fp6")
    with pytest.raises(ValueError, match=r"need uint8 \[B, N, 36\] \(fp8 keys of head dim 32\)"):
        dsv4.indexer_topk_cached(q, w, cache, pos, 4, 3, "fp8")
