"""Indexer top-k kernel (dsv4_triton.indexer_topk) against its naive twin and the plain op.

CPU: the Triton interpreter on tiny odd shapes (S and N not multiples of the key tile, topk not a
power of two and larger than the visible count, several ratios, batch rows with different positions,
exact ties across tiles, -0.0 scores, NaN, topk 1024). GPU (marked): the compiled kernel at the real
indexer shapes (64 heads x 128, topk 512 / 1024).

Selections are compared exactly where the scores are exact: inputs are small dyadic numbers (k / 4,
|k| <= 12), so every product and sum is exact in fp32, bf16 and float64 alike (up to 64 heads x 128
dims: |score| < 2^18 on a 2^-6 grid, 24 bits), and ties are frequent. Gaussian inputs are compared by
the float64 scores of the selected keys (1e-5 relative: fp32 vs float64 summation order), which
tolerates two nearly equal scores swapping places.

The model's dtypes (q bf16, keys fp32) take the bf16 MMA path: the keys are rounded to bf16, which is
exact for the model's FP4-simulated keys (test_model_keys_are_bf16_exact), and keys that are not
bf16-exact add two residual dots (test_keys_not_bf16_exact_take_the_residual_dots). Every product is
exact on that path; only the summation order differs from the plain op, so on the dyadic inputs the
selection is exact, and on Gaussian inputs a near-tie at the top-k boundary may go either way: those
compare by the score gap (test_bf16_path_gaussian_recall_and_score_gap).
"""
import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel import (conftest does it too)

import pytest  # noqa: E402

import dsv4_compile.model.ops  # noqa: E402,F401  (registers torch.ops.dsv4.*)
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from dsv4_compile.kernels.indexer_topk import IndexerTopkConfig, indexer_topk, naive  # noqa: E402
from dsv4_compile.kernels.indexer_topk.sort_keys import pack_keys  # noqa: E402
from indexer_inputs import (DEVICE, KERNEL_MODULE, assert_substituted, dyadic, make_inputs,  # noqa: E402
                            ordered_inputs)

dsv4 = torch.ops.dsv4

# (B, S, H, d, N, ratio, topk)
CASES = [
    pytest.param((2, 7, 3, 8, 37, 4, 13), id="B2-S7-H3-d8-N37-r4-k13"),
    pytest.param((1, 5, 2, 20, 23, 1, 30), id="B1-S5-H2-d20-N23-r1-k30-pad"),
    pytest.param((2, 4, 5, 16, 50, 3, 6), id="B2-S4-H5-d16-N50-r3-k6"),
    pytest.param((1, 3, 17, 8, 19, 128, 3), id="B1-S3-H17-d8-N19-r128-k3"),
]


def scores64(q, w, keys):
    return torch.einsum("bshd,bnd->bshn", q.double(), keys.double()).relu().mul(w.double().unsqueeze(-1)).sum(2)


@pytest.mark.parametrize("dtype,config", [pytest.param(torch.float32, None, id="fp32-default"),
                                          pytest.param(torch.bfloat16, "block_n=32", id="bf16-bn32")])
@pytest.mark.parametrize("case", CASES)
def test_matches_naive_and_plain_exactly(case, dtype, config):
    B, S, H, d, N, ratio, topk = case
    q, w, keys, pos = make_inputs(*case, dtype=dtype)
    out = indexer_topk(q, w, keys, pos, ratio, topk, config)
    assert out.dtype == torch.int32 and out.shape == (B, S, topk)
    assert torch.equal(out.cpu(), naive.indexer_topk(q, w, keys, pos, ratio, topk).cpu())
    assert torch.equal(out, dsv4.indexer_topk(q, w, keys, pos, ratio, topk))


def test_mixed_dtypes_and_fp16():
    q, w, keys, pos = make_inputs(1, 4, 3, 8, 21, 4, 5, seed=1)
    ref = dsv4.indexer_topk(q, w, keys, pos, 4, 5)
    assert torch.equal(indexer_topk(q.half(), w, keys.half(), pos, 4, 5), ref)
    assert torch.equal(indexer_topk(q.bfloat16(), w.half(), keys, pos, 4, 5), ref)


@pytest.mark.parametrize("case", CASES[:3])
def test_gaussian_selected_scores_match(case):
    B, S, H, d, N, ratio, topk = case
    q, w, keys, pos = make_inputs(*case, seed=2, gaussian=True)
    out = indexer_topk(q, w, keys, pos, ratio, topk).cpu()
    ref = naive.indexer_topk(q, w, keys, pos, ratio, topk)
    assert torch.equal(out < 0, ref < 0), "the -1 padding differs"
    s = scores64(q.cpu(), w.cpu(), keys.cpu())
    pick = lambda idx: torch.where(idx >= 0, s.gather(-1, idx.long().clamp_min(0)), 0.0)  # noqa: E731
    a, b = pick(out), pick(ref)
    assert ((a - b).abs() <= 1e-5 * b.abs().max()).all(), "selected scores differ"


@pytest.mark.parametrize("config", [None, "block_s=1", "block_s=4,block_n=32", "block_s=4,block_n=32,score_rows=heads"])
@pytest.mark.parametrize("case", CASES)
def test_model_dtypes_bf16_q_fp32_keys_exact(case, config):
    """q (and weights) bf16, keys fp32 (bf16-exact): the bf16 MMA path with several queries a program
    (block_s 2 by default under the interpreter; S not a multiple of it). Dyadic inputs: every partial
    sum is exact in any order, so the selection equals the naive twin's and the plain op's, ties included."""
    q, w, keys, pos = make_inputs(*case, seed=11)
    q, w = q.bfloat16(), w.bfloat16()
    out = indexer_topk(q, w, keys, pos, case[5], case[6], config)
    assert torch.equal(out.cpu(), naive.indexer_topk(q, w, keys, pos, case[5], case[6]).cpu())
    assert torch.equal(out, dsv4.indexer_topk(q, w, keys, pos, case[5], case[6]))


@pytest.mark.parametrize("config", [None, "block_s=4,block_n=32", "score_rows=heads"])
def test_keys_not_bf16_exact_take_the_residual_dots(config):
    """fp32 keys with 12 significant bits (k / 4 + j / 1024, the k / 4 part repeating so that the j
    part decides): not bf16-exact, so rounding them to bf16 alone would change the selection; the launcher's flag adds the residual dots (keys = hi + mid + lo
    exactly) and the selection is exact again. The scores stay exact in fp32 at this shape (checked)."""
    B, S, H, d, N, ratio, topk = 2, 7, 3, 8, 37, 4, 13
    q, w, keys, pos = make_inputs(B, S, H, d, N, ratio, topk, seed=12)
    g = torch.Generator().manual_seed(13)
    keys = keys[:, torch.arange(N) % 5]                                       # 5 distinct rows: tied coarse scores,
    keys = keys + (dyadic(keys.shape, g) / 256).to(keys.device)              # broken by j / 1024, |j| <= 12
    q, w = q.bfloat16(), w.bfloat16()
    assert not torch.equal(keys.bfloat16().float(), keys)
    s32 = torch.einsum("bshd,bnd->bshn", q.float(), keys).relu().mul(w.float().unsqueeze(-1)).sum(2)
    assert torch.equal(s32.double().cpu(), scores64(q.cpu(), w.cpu(), keys.cpu())), "scores not exact in fp32"
    ref = naive.indexer_topk(q, w, keys, pos, ratio, topk).cpu()
    assert not torch.equal(naive.indexer_topk(q, w, keys.bfloat16(), pos, ratio, topk).cpu(), ref)
    out = indexer_topk(q, w, keys, pos, ratio, topk, config)
    assert torch.equal(out.cpu(), ref)
    assert torch.equal(out, dsv4.indexer_topk(q, w, keys, pos, ratio, topk))
    # fp16 keys (exact in fp32, not in bf16) with bf16 q: the same path
    keys16 = keys.half()                                                     # 11 significant bits
    assert not torch.equal(keys16.bfloat16().float(), keys16.float())
    out = indexer_topk(q, w, keys16, pos, ratio, topk, config)
    assert torch.equal(out.cpu(), naive.indexer_topk(q, w, keys16, pos, ratio, topk).cpu())


def test_model_keys_are_bf16_exact():
    """The bf16 path's caller contract holds for the model's indexer keys: FP4-simulated (Hadamard,
    e2m1, power-of-two block scales, as compress_kv's "hadamard_fp4" and the fp4 cache produce) over
    60 decades of magnitude, and FP8 e4m3 with power-of-two scales, are all exact in bf16."""
    from dsv4_compile.model.ops import fp4_simulate, fp8_simulate, hadamard

    g = torch.Generator().manual_seed(14)
    x = torch.randn(64, 128, generator=g) * torch.logspace(-30, 30, 64).unsqueeze(1)
    for k in (fp4_simulate(hadamard(x), 32), fp8_simulate(x, 64), fp8_simulate(x, 128)):
        assert torch.isfinite(k).all() and torch.equal(k.bfloat16().float(), k)


@pytest.mark.parametrize("config", [None, "block_s=4,block_n=32", "score_rows=heads"])
def test_bf16_path_gaussian_recall_and_score_gap(config):
    """Gaussian q (bf16) and FP4-simulated fp32 keys (the model's operands): the products are exact,
    the sums are fp32 in another order than the plain op's, so scores agree to ~1e-6 relative and only
    keys whose float64 score is within that of the k-th best may differ. Checked per query: every key
    scoring clearly above the k-th best (float64) is picked, every pick scores at least about the k-th
    best, and the picks are in descending order up to that tolerance."""
    from dsv4_compile.model.ops import fp4_simulate, hadamard

    B, S, H, d, N, ratio, topk = 2, 9, 8, 32, 70, 2, 20
    q, w, keys, pos = make_inputs(B, S, H, d, N, ratio, topk, seed=15, gaussian=True)
    q = fp4_simulate(hadamard(q.cpu()), 32).bfloat16().to(DEVICE)
    keys = fp4_simulate(hadamard(keys.cpu()), 32).to(DEVICE)
    out = indexer_topk(q, w, keys, pos, ratio, topk, config).cpu()
    ref = dsv4.indexer_topk(q, w, keys, pos, ratio, topk).cpu()
    assert torch.equal(out < 0, ref < 0), "the -1 padding differs"
    s = scores64(q.cpu(), w.cpu(), keys.cpu())                                 # [B, S, N]
    # fp32 summation error bound of one score: ~ (d + H) * 2^-24 * sum_h |w| |q|.|k| (generous: x4)
    bound = 4 * (d + H) * 2.0 ** -24 * torch.einsum("bshd,bnd->bshn", q.double().abs().cpu(),
                                                      keys.double().abs().cpu()).mul(w.double().abs().cpu().unsqueeze(-1)).sum(2)
    tol = bound.amax(-1)                                                       # [B, S]
    for b in range(B):
        for i in range(S):
            n_vis = min(N, max(0, (int(pos[b, i]) + 1) // ratio))
            k = min(topk, n_vis)
            if k == 0:
                continue
            sv = s[b, i, :n_vis]
            kth = sv.sort(descending=True).values[k - 1]
            picks = out[b, i, :k].long()
            assert len(set(picks.tolist())) == k and (picks >= 0).all()
            must = set(torch.nonzero(sv > kth + tol[b, i]).flatten().tolist())
            assert must <= set(picks.tolist()), (b, i)
            assert (sv[picks] >= kth - tol[b, i]).all(), (b, i)
            assert (sv[picks][1:] <= sv[picks][:-1] + tol[b, i]).all(), (b, i)
    recall = (out.unsqueeze(-1) == ref.unsqueeze(-2)).any(-1).float().mean()
    assert recall >= 0.95


def test_ties_go_to_the_lowest_index_across_tiles():
    """Tied scores spread over several key tiles (block_n 16): the lowest indices win, in order."""
    B, S, H, d, N, ratio = 1, 3, 2, 8, 70, 4
    g = torch.Generator().manual_seed(3)
    keys = dyadic((B, N, d), g) / 8                     # small scores
    best = torch.full((d,), 3.0)
    for n in (66, 2, 35, 17, 50):                        # five exactly tied best keys, out of order
        keys[0, n] = best
    keys[0, 40] = keys[0, 8] = best / 2                  # two tied runners-up
    q, w = torch.ones(B, S, H, d), torch.ones(B, S, H)
    pos = torch.tensor([[N * ratio - 1, 10 ** 6, 36 * ratio - 1]])   # all, all, keys 0..35
    args = [t.to(DEVICE) for t in (q, w, keys, pos)]
    out = indexer_topk(*args, ratio, 7, "block_n=16").cpu()
    assert out[0, 0].tolist() == [2, 17, 35, 50, 66, 8, 40] == out[0, 1].tolist()
    assert out[0, 2, :4].tolist() == [2, 17, 35, 8]
    assert torch.equal(out, naive.indexer_topk(q, w, keys, pos, ratio, 7))
    # all keys equal: the first topk indices, in order
    out = indexer_topk(args[0], args[1], torch.ones(B, N, d, device=DEVICE), args[3], ratio, 21, "block_n=16")
    assert out[0, 0].tolist() == list(range(21))
    # ReLU zeros times negative weights: -0.0 scores tie, lowest indices first (see also test_packed_keys_order)
    w_neg = -torch.ones(B, S, H, device=DEVICE)
    keys0 = dyadic((B, N, d), g).abs().to(DEVICE) * -1
    keys0[0, 5] = -keys0[0, 5]                           # key 5: positive dots, a negative score
    keys0[0, 3] = 0.0                                    # key 3: zero dots
    out = indexer_topk(-args[0], w_neg, -keys0, args[3], ratio, 5, "block_n=16").cpu()
    assert out[0, 0].tolist() == [0, 1, 2, 3, 4]
    assert torch.equal(out, dsv4.indexer_topk(-args[0], w_neg, -keys0, args[3], ratio, 5).cpu())


@triton.jit
def _pack_kernel(p_s, p_n, p_out, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    n = tl.load(p_n + o)
    tl.store(p_out + o, pack_keys(tl.load(p_s + o), n, n >= 0))


def test_packed_keys_order():
    """The int64 sort key: score order (NaN of either sign first, -0.0 == +0.0, -inf last among
    valid), then the lower index; invalid slots below everything."""
    nan = float("nan")
    neg_nan = torch.tensor([nan]).neg().item()
    scores = torch.tensor([0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), nan, neg_nan,
                           1.0, -0.0, 0.0, 2.5, -3.0, nan, 7.0, 0.0], device=DEVICE)
    scores[7] = -scores[7].abs()                          # a NaN with the sign bit set
    assert math.copysign(1.0, scores[7].item()) == -1.0
    n = torch.tensor([3, 0, 9, 4, 6, 5, 8, 1, 2, 7, 10, 11, 12, 13, 14, -1], dtype=torch.int32, device=DEVICE)
    out = torch.empty(16, dtype=torch.int64, device=DEVICE)
    _pack_kernel[(1,)](scores, n, out, BLOCK=16)
    order = [int(n[i]) for i in torch.argsort(out.cpu(), descending=True, stable=True)]
    # NaN: 1, 8, 13; inf: 6; 7.0: 14; 2.5: 11; 1.0: 2, 9; zeros: 0, 3, 7, 10; -1: 4; -3: 12; -inf: 5
    assert order == [1, 8, 13, 6, 14, 11, 2, 9, 0, 3, 7, 10, 4, 12, 5, -1]


@pytest.mark.parametrize("ratio", [1, 3, 4, 128])
def test_visibility_rule_and_padding(ratio):
    """Key n is visible at position t iff n < (t + 1) // ratio; fewer than topk visible -> -1 padding."""
    N, topk = 20, 5
    ts = sorted({0, ratio - 2, ratio - 1, ratio, 2 * ratio - 1, 3 * ratio - 2, 17 * ratio - 1, 100 * ratio} - {-1})
    S = len(ts)
    q = torch.ones(1, S, 1, 4, device=DEVICE)
    # key n scores n + 1: the latest visible keys win
    keys = torch.arange(1, N + 1, dtype=torch.float32, device=DEVICE).view(1, N, 1).expand(1, N, 4).contiguous()
    out = indexer_topk(q, torch.ones(1, S, 1, device=DEVICE), keys, torch.tensor([ts], device=DEVICE), ratio, topk)
    for s, t in enumerate(ts):
        visible = min(N, (t + 1) // ratio)
        want = list(range(visible - 1, max(-1, visible - 1 - topk), -1))
        want += [-1] * (topk - len(want))
        assert out[0, s].tolist() == want, f"t={t}, ratio={ratio}"


def test_nan_scores_sort_first():
    B, S, H, d, N, ratio = 1, 3, 2, 4, 40, 4
    q, w, keys, _ = make_inputs(B, S, H, d, N, ratio, 3, seed=4)
    q[0, 0, 1, 2] = math.nan   # every visible score of query 0 is NaN
    keys[0, 33, 0] = math.nan  # key 33 scores NaN for every query that sees it (a later tile)
    keys[0, 20, 1] = math.nan  # and key 20
    pos = torch.tensor([[30 * ratio - 1, 40 * ratio - 1, 25 * ratio - 1]], device=DEVICE)
    out = indexer_topk(q, w, keys, pos, ratio, 3).cpu()
    assert out[0, 0].tolist() == [0, 1, 2]
    assert out[0, 1, :2].tolist() == [20, 33] and out[0, 2, 0].item() == 20
    assert torch.equal(out, naive.indexer_topk(q, w, keys, pos, ratio, 3))
    assert torch.equal(out, dsv4.indexer_topk(q, w, keys, pos, ratio, 3).cpu())


def test_large_topk_1024():
    """V4-Pro's topk: a 1024-key buffer, some queries see fewer keys, one sees more."""
    B, S, H, d, N, ratio, topk = 1, 2, 2, 8, 1100, 1, 1024
    q, w, keys, pos = make_inputs(B, S, H, d, N, ratio, topk, seed=5)
    pos = torch.tensor([[300, 1099]], device=DEVICE)     # 301 keys (one tile), 1100 (three tiles)
    out = indexer_topk(q, w, keys, pos, ratio, topk, "block_n=512")
    assert torch.equal(out, dsv4.indexer_topk(q, w, keys, pos, ratio, topk))
    assert (out[0, 0, 301:] == -1).all() and (out[0, 0, :301] >= 0).all() and (out[0, 1] >= 0).all()


# ---- the candidate buffer: threshold-filtered appends, compactions, persistent programs -----------

@pytest.mark.parametrize("order,topk", [("ascending", 24), ("descending", 24), ("random", 5),
                                        ("random", 24), ("ties", 24), ("late_kth", 5), ("late_kth", 24),
                                        ("nan", 5), ("nan", 24)])
def test_candidate_buffer_compactions_exact(order, topk, monkeypatch):
    """block_n 16, buffer_factor 2: C = 32 (topk 5) or 64 (topk 24) slots a query, so ascending scores
    compact before every tile (topk 5) or every second (topk 24), random ones a few times. bf16 q (block_s 2,
    S = 5: a partial last block) over fp32 keys that are not bf16-exact (the residual dots); 2 x 3 =
    6 query blocks over 4 persistent programs (two reuse their workspace rows for a second block)."""
    monkeypatch.setattr(KERNEL_MODULE, "INTERPRET_PROGRAMS", 4)
    q, w, keys, pos = ordered_inputs(order, topk=topk)
    q, w = q.bfloat16(), w.bfloat16()
    ratio = 4
    ref = naive.indexer_topk(q, w, keys, pos, ratio, topk).cpu()
    assert (ref[0, 0] == -1).all() and (ref[0, 1, 3:] == -1).all() and (ref[0, 2:] >= 0).all()
    out = indexer_topk(q, w, keys, pos, ratio, topk, "block_s=2,block_n=16,buffer_factor=2")
    assert torch.equal(out.cpu(), ref)
    assert torch.equal(out, dsv4.indexer_topk(q, w, keys, pos, ratio, topk))
    if order == "ascending":                                       # the last keys, best first
        assert out[0, -1].tolist() == list(range(159, 159 - topk, -1))
    if order == "late_kth":
        assert out[0, -1].tolist() == list(range(127, 128 - topk, -1)) + [128]


@pytest.mark.parametrize("order,config,programs", [
    pytest.param("ascending", "block_n=16,buffer_factor=2", 1, id="exact-ascending-1prog"),
    pytest.param("nan", "block_n=32,buffer_factor=4", 3, id="exact-nan-bn32-f4"),
    pytest.param("ties", "block_s=4,block_n=16,buffer_factor=4", 2, id="bf16-ties-bs4-f4"),
    pytest.param("random", "block_s=4,block_n=32,buffer_factor=2", 1, id="bf16-random-bs4-bn32"),
])
def test_candidate_buffer_paths_and_programs(order, config, programs, monkeypatch):
    """The exact path (fp32 q: one query a program, 5 blocks) and block_s 4 (2 blocks, the second
    partial), buffer_factor 4, one to three persistent programs, topk 13 (not a power of two)."""
    monkeypatch.setattr(KERNEL_MODULE, "INTERPRET_PROGRAMS", programs)
    q, w, keys, pos = ordered_inputs(order, B=1, seed=21)
    if config.startswith("block_s"):
        q, w = q.bfloat16(), w.bfloat16()
    out = indexer_topk(q, w, keys, pos, 4, 13, config)
    assert torch.equal(out.cpu(), naive.indexer_topk(q, w, keys, pos, 4, 13).cpu())


def test_empty_inputs():
    q, w, keys, pos = make_inputs(1, 3, 2, 8, 5, 4, 4)
    out = indexer_topk(q, w, keys[:, :0].contiguous(), pos, 4, 4)
    assert out.shape == (1, 3, 4) and (out == -1).all()
    assert indexer_topk(q, w, keys, pos, 4, 0).shape == (1, 3, 0)
    assert indexer_topk(q[:, :0], w[:, :0], keys, pos[:, :0], 4, 4).shape == (1, 0, 4)


def test_config_api_and_input_checks():
    cfg = IndexerTopkConfig.from_str("block_n=128,num_warps=4")
    assert (cfg.block_n, cfg.num_warps) == (128, 4)
    assert IndexerTopkConfig.from_str(cfg.to_str()) == cfg
    with pytest.raises(ValueError, match="tl.dot needs >= 16"):
        IndexerTopkConfig(block_n=8)
    with pytest.raises(ValueError, match="power of two"):
        IndexerTopkConfig(block_n=48)
    with pytest.raises(ValueError, match="buffer_factor = 1: need >= 2"):
        IndexerTopkConfig(buffer_factor=1)
    with pytest.raises(ValueError, match="power of two"):
        IndexerTopkConfig(buffer_factor=3)
    assert IndexerTopkConfig.from_str("block_n=32").buffer_factor == 2     # tables without the field load
    q, w, keys, pos = make_inputs(1, 3, 2, 8, 5, 4, 4)
    with pytest.raises(ValueError, match="positions is torch.int32"):
        indexer_topk(q, w, keys, pos.int(), 4, 4)
    with pytest.raises(ValueError, match="need \\[B, N, d\\]"):
        indexer_topk(q, w, keys[..., :4].contiguous(), pos, 4, 4)
    with pytest.raises(ValueError, match="weights has shape"):
        indexer_topk(q, w[..., :1].contiguous(), keys, pos, 4, 4)
    with pytest.raises(ValueError, match="ratio = 0"):
        indexer_topk(q, w, keys, pos, 0, 4)
    with pytest.raises(ValueError, match="not contiguous"):
        indexer_topk(q.transpose(1, 2), w, keys, pos, 4, 4)
    out = indexer_topk(q, w, keys, pos, 4, 4, {"block_n": 16})
    assert torch.equal(out, dsv4.indexer_topk(q, w, keys, pos, 4, 4))


def test_torch_op_and_substitution():
    """The dsv4_triton op, and the pass: equal selection vs eager, 1 node substituted, ops before/after."""
    from dsv4_compile.passes.kernel_substitutions.indexer_topk import SUBSTITUTION, interpreter_substitution

    q, w, keys, pos = make_inputs(2, 5, 3, 8, 17, 4, 6, seed=6)
    ref = dsv4.indexer_topk(q, w, keys, pos, 4, 6)
    assert torch.equal(ref, torch.ops.dsv4_triton.indexer_topk(q, w, keys, pos, 4, 6, ""))

    def fn(q, w, keys, pos):
        return dsv4.indexer_topk(q * 2, w, keys, pos, 4, 6)

    assert_substituted(fn, (q, w, keys, pos), SUBSTITUTION, interpreter_substitution(), "indexer_topk")


def test_op_schema_and_opcheck():
    """torch.ops.dsv4_triton.indexer_topk mirrors dsv4.indexer_topk plus `config`, and passes
    torch.library.opcheck (schema, fake tensor, dynamic-shape AOT dispatch)."""
    ours = torch.ops.dsv4_triton.indexer_topk.default._schema
    plain = torch.ops.dsv4.indexer_topk.default._schema
    assert [a.name for a in ours.arguments] == [a.name for a in plain.arguments] + ["config"]
    assert [str(a.type) for a in ours.arguments[:-1]] == [str(a.type) for a in plain.arguments]
    q, w, keys, pos = make_inputs(1, 3, 2, 8, 9, 4, 4, seed=8)
    torch.library.opcheck(torch.ops.dsv4_triton.indexer_topk.default, (q, w, keys, pos, 4, 4, ""),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


# ================================================================================================
# GPU: the real indexer shapes (64 heads x 128 dims; topk 512 V4-Flash, 1024 V4-Pro)
# ================================================================================================

@pytest.mark.gpu
@pytest.mark.parametrize("topk,N", [(512, 2048), (1024, 4096)], ids=["flash-k512-N2048", "pro-k1024-N4096"])
@pytest.mark.parametrize("config", [None, "block_n=64", "block_n=256,num_warps=4", "block_s=1", "block_s=4,block_n=64",
                                    "score_rows=heads"])
@pytest.mark.parametrize("k_dtype", [torch.bfloat16, torch.float32], ids=["bf16-keys", "fp32-keys"])
def test_gpu_real_shapes_exact_bf16(topk, N, config, k_dtype):
    """Dyadic bf16 q (exact fp32 scores, many ties), keys bf16 or fp32 (the model's: rounded to bf16
    by the launcher, exactly): the same selection as the plain op, whatever the MMA's summation order."""
    B, S, H, d, ratio = 2, 300, 64, 128, 4
    q, w, keys, _ = make_inputs(B, S, H, d, N, ratio, topk, dtype=torch.bfloat16, seed=9)
    w, keys = w.float(), keys.to(k_dtype)
    pos = torch.stack([torch.arange(S) * (N * ratio // S), torch.arange(S) * 3 + 7]).long().to(DEVICE)
    pos[0, -1] = N * ratio - 1
    ref = dsv4.indexer_topk(q, w, keys, pos, ratio, topk)
    out = indexer_topk(q, w, keys, pos, ratio, topk, config)
    assert torch.equal(out, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("keys_kind", ["bf16", "fp4-fp32", "fp32"])
def test_gpu_real_shapes_gaussian_bf16(keys_kind):
    """Gaussian bf16 q; keys bf16, FP4-simulated fp32 (the model's) or raw fp32 Gaussians (not
    bf16-exact: the residual dots): selected scores within 1e-4 of the plain op's (summation order)."""
    from dsv4_compile.model.ops import fp4_simulate, hadamard

    B, S, H, d, N, ratio, topk = 1, 512, 64, 128, 2048, 4, 512
    q, w, keys, _ = make_inputs(B, S, H, d, N, ratio, topk, dtype=torch.bfloat16, seed=10, gaussian=True)
    w = w.float()
    if keys_kind != "bf16":
        keys = torch.randn(keys.shape, generator=torch.Generator().manual_seed(16)).to(DEVICE)
        keys = fp4_simulate(hadamard(keys), 32) if keys_kind == "fp4-fp32" else keys
    pos = (torch.arange(S) * 16 + 15).view(1, S).long().to(DEVICE)
    out = indexer_topk(q, w, keys, pos, ratio, topk)
    ref = dsv4.indexer_topk(q, w, keys, pos, ratio, topk)
    assert torch.equal(out < 0, ref < 0), "the -1 padding differs"
    s = scores64(q, w, keys)
    pick = lambda idx: torch.where(idx >= 0, s.gather(-1, idx.long().clamp_min(0)), 0.0)  # noqa: E731
    a, b = pick(out), pick(ref)
    assert ((a - b).abs() <= 1e-4 * b.abs().max()).all(), "selected scores differ"


def test_key_rows_refused_beyond_the_measured_range():
    """score_rows=keys beyond 256 MMA columns (block_s x padded heads) or 8 warps gave wrong
    selections on an H100: the launcher refuses it with a one-line error naming the values, and
    score_rows=heads takes the same tiles."""
    q, w, keys, pos = make_inputs(1, 9, 64, 16, 20, 2, 5, seed=21)
    q = q.bfloat16()
    for config in ("block_s=8,block_n=16,score_rows=keys", "block_s=2,block_n=16,num_warps=16,score_rows=keys"):
        with pytest.raises(ValueError, match=r"score_rows=keys with block_s \d+ x 64 heads = \d+ columns and \d+ warps"):
            indexer_topk(q, w, keys, pos, 2, 5, config)
    out = indexer_topk(q, w, keys, pos, 2, 5, "block_s=8,block_n=16,score_rows=heads")
    assert torch.equal(out.cpu(), naive.indexer_topk(q, w, keys, pos, 2, 5).cpu())
