"""The indexer top-k kernel's FP8 path (config score_mma="fp8", kernels/indexer_topk/DESIGN.md, FP8
path) against its naive twin, the plain op and the bf16 path.

The path multiplies each q row (a query's head) and key row by a power-of-two row scale and runs the
score MMA on the e4m3 values; rows that are not "FP4-like" (4 significant bits on one grid in each
32-dim K step, steps within 13 binades of the row's largest) get scale 0, and the kernel gives them
the bf16 dots: keys from the tile of a batch row's first such key on, and query blocks holding one.

CPU: the Triton interpreter (fp32 copies of the e4m3 values, IEEE dots) at tiny odd shapes: the
conversion (exact where accepted; the 13-binade boundary; NaN / Inf / zero rows; the first bad key
of each batch row), the path on dyadic inputs (every partial sum exact: the selection equals the
plain op's, ties included) and on FP4-simulated Gaussians (the model's operands: identical picks to
the bf16 path), and rows that must take the fallback with a selection that flushing their small block
would change. GPU (marked): the compiled kernel at V4-Flash's indexer shapes (64 heads x 128 dims,
top-512) against the bf16 path and the plain op.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel import (conftest does it too)

import pytest  # noqa: E402

import dsv4_compile.model.ops  # noqa: E402,F401  (registers torch.ops.dsv4.*)
from dsv4_compile.kernels.indexer_topk import indexer_topk, naive  # noqa: E402
from dsv4_compile.kernels.indexer_topk.config import launch_plan  # noqa: E402
from dsv4_compile.kernels.indexer_topk.indexer_topk import fp8_rows  # noqa: E402
from dsv4_compile.model.ops import fp4_simulate, hadamard  # noqa: E402
from indexer_inputs import DEVICE, dyadic, fp4_gauss  # noqa: E402

dsv4 = torch.ops.dsv4
FP8 = "score_mma=fp8"


def positions(B, S, N, ratio, g):
    pos = torch.randint(0, (N + 3) * ratio, (B, S), generator=g)
    pos[0, 0] = 0
    pos[-1, -1] = (N + 3) * ratio
    return pos


def scales(x):
    """Row scales of x [..., d] as the launcher makes them (0 = not FP4-like)."""
    return fp8_rows(x.reshape(-1, x.shape[-1]))[1]


def test_launch_plan_takes_fp8_only_for_bf16_q():
    assert launch_plan(torch.bfloat16, torch.float32, "fp8") == "fp8" == launch_plan("bfloat16", "bfloat16", "fp8")
    assert launch_plan(torch.bfloat16, torch.float32, "bf16") == "bf16_fix"
    assert launch_plan(torch.float32, torch.float32, "fp8") == "exact"
    assert launch_plan(torch.float16, torch.float16, "fp8") == "fp16"


def test_fp8_rows_exact_where_accepted_and_refused_beyond():
    """FP4-simulated rows over 60 decades are accepted and exact (x8 * scale == x); a 32-dim block 13
    binades below the row's largest is accepted, 14 is refused; so are NaN, Inf, 5 significant bits
    and fp32 subnormals; zero rows take scale 1. first_bad: the lowest refused row of each group."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 128, generator=g) * torch.logspace(-30, 30, 64).unsqueeze(1)
    x = fp4_simulate(hadamard(x), 32)[:, :96].contiguous()                     # 3 K steps
    x8, s, first = fp8_rows(x.to(DEVICE), group=16)
    assert (s > 0).all() and torch.equal(first.cpu(), torch.full((4,), 16, dtype=torch.int32))
    assert torch.equal((x8.float() * s[:, None]).cpu(), x)
    assert torch.equal(s.cpu(), torch.exp2(torch.floor(torch.log2(x.abs().amax(1))) - 7))
    row = torch.tensor([6.0, -1.5, 0.5, 4.0] * 8 + [3.0, -0.5, 1.0, 0.0] * 8)   # two e2m1 blocks
    # the second block's amax exponent is 1 - k, the first's 2: 13 and 14 binades apart
    rows = torch.stack([row * torch.tensor([1.0] * 32 + [2.0 ** -k] * 32) for k in (12, 13)]
                       + [row.clone() for _ in range(5)] + [torch.zeros(64)])
    rows[2, 5] = float("nan")
    rows[3, 40] = float("inf")
    rows[4, 7] = 6.0 + 2.0 ** -3                                                # 6.125: 6 significant bits
    rows[5, 33:] = 2.0 ** -130                                                 # fp32 subnormals
    rows[6, 33] = 1.0 + 2.0 ** -4                                              # 1.0625 in a block of max 3
    x8, s, first = fp8_rows(rows.to(DEVICE), group=4)
    assert s.cpu().tolist() == [2.0 ** -5, 0, 0, 0, 0, 0, 0, 1.0]
    assert torch.equal(x8[0].float().cpu() * 2.0 ** -5, rows[0]) and (x8[7].float() == 0).all()
    assert first.cpu().tolist() == [1, 0]


@pytest.mark.parametrize("config", [FP8, FP8 + ",block_s=1", FP8 + ",block_s=4,block_n=32",
                                    FP8 + ",score_rows=heads"])
@pytest.mark.parametrize("case", [(2, 7, 3, 40, 37, 4, 13), (1, 5, 2, 20, 23, 1, 30), (2, 4, 5, 64, 50, 3, 6)],
                         ids=["B2-S7-H3-d40-N37-r4-k13", "B1-S5-H2-d20-N23-r1-k30-pad", "B2-S4-H5-d64-N50-r3-k6"])
def test_fp8_path_dyadic_matches_naive_and_plain_exactly(case, config):
    """Dyadic q (bf16) and keys (fp32): FP4-like, so every tile takes the FP8 dots (checked), and
    every partial sum is exact: the selection is the naive twin's and the plain op's, ties included."""
    B, S, H, d, N, ratio, topk = case
    g = torch.Generator().manual_seed(1)
    q, w, keys = dyadic((B, S, H, d), g).bfloat16(), dyadic((B, S, H), g).bfloat16(), dyadic((B, N, d), g)
    pos = positions(B, S, N, ratio, g)
    assert (scales(q.float()) > 0).all() and (scales(keys) > 0).all()
    q, w, keys, pos = (t.to(DEVICE) for t in (q, w, keys, pos))
    out = indexer_topk(q, w, keys, pos, ratio, topk, config)
    assert torch.equal(out.cpu(), naive.indexer_topk(q, w, keys, pos, ratio, topk).cpu())
    assert torch.equal(out, dsv4.indexer_topk(q, w, keys, pos, ratio, topk))


@pytest.mark.parametrize("k_dtype", [torch.float32, torch.bfloat16], ids=["fp32-keys", "bf16-keys"])
def test_fp8_path_fp4_gaussian_identical_to_bf16_path(k_dtype):
    """The model's operands (FP4-simulated q in bf16, keys fp32 or bf16), blocks of a row up to 6
    binades apart: the FP8 path's scores are the bf16 path's scaled by powers of two, so the picks are
    identical (and agree with the plain op up to fp32 summation order: checked by the naive twin's
    float64 scores of the picks)."""
    B, S, H, d, N, ratio, topk = 2, 6, 3, 64, 45, 2, 17
    g = torch.Generator().manual_seed(2)
    q = fp4_gauss((B, S, H, d), g, spread=6).bfloat16()
    keys = fp4_gauss((B, N, d), g, spread=6).to(k_dtype)
    w = torch.randn(B, S, H, generator=g).bfloat16()
    pos = positions(B, S, N, ratio, g)
    assert (scales(q.float()) > 0).all() and (scales(keys.float()) > 0).all()
    q, w, keys, pos = (t.to(DEVICE) for t in (q, w, keys, pos))
    out = indexer_topk(q, w, keys, pos, ratio, topk, FP8 + ",block_n=16")
    assert torch.equal(out, indexer_topk(q, w, keys, pos, ratio, topk, "block_n=16"))
    ref = naive.indexer_topk(q, w, keys, pos, ratio, topk)
    s64 = torch.einsum("bshd,bnd->bshn", q.double().cpu(), keys.double().cpu()).relu()
    s64 = s64.mul(w.double().cpu().unsqueeze(-1)).sum(2)
    pick = lambda idx: torch.where(idx >= 0, s64.gather(-1, idx.long().clamp_min(0)), 0.0)  # noqa: E731
    assert ((pick(out.cpu()) - pick(ref)).abs() <= 1e-5 * pick(ref).abs().max()).all()


def test_rows_not_fp4_like_take_the_bf16_dots_and_stay_exact():
    """Keys from index 21 on (of 45, tiles of 16: the first tile takes the FP8 dots) and one query
    head row carry a 32-dim block 17 binades below their largest: refused by the conversion, so the
    kernel gives those tiles (and that query's block) the bf16 dots. The keys repeat 5 coarse rows
    whose ties only the small blocks break, and the query's small block decides its order, so
    flushing them (what the e4m3 form with the row's scale would do) changes the selection; the
    kernel's equals the naive twin's and the plain op's (all scores exact in fp32: checked)."""
    B, S, H, d, N, ratio, topk = 1, 5, 2, 64, 45, 1, 9
    g = torch.Generator().manual_seed(3)
    coarse = torch.randint(-2, 3, (5, 32), generator=g).float() / 2               # e2m1, max exponent <= 0
    small = torch.randint(1, 4, (N, 32), generator=g).float() / 2 * 2.0 ** -17     # {0.5, 1, 1.5} 2^-17
    keys = torch.cat([coarse[torch.arange(N) % 5], small], dim=1).unsqueeze(0)   # [1, N, 64]
    keys[0, :21, 32:] = 0.0                                                       # the first 21 keys: FP4-like
    q = torch.randint(-1, 2, (B, S, H, d), generator=g).float()
    q[..., 32:] = 1.0
    q[0, 2, 0] = 0.0                                                              # query 2: head 1 alone decides,
    q[0, 2, 1, :32] *= 2.0 ** -17                                                 # its coarse block refused
    q, w = q.bfloat16(), torch.ones(B, S, H).bfloat16()
    pos = torch.tensor([[44, 30, 44, 10, 25]])
    s_keys, s_q = scales(keys), scales(q.float())
    assert (s_keys[:21] > 0).all() and (s_keys[21:] == 0).all() and (s_q == 0).sum() == 1
    s32 = torch.einsum("bshd,bnd->bshn", q.float(), keys).relu().mul(w.float().unsqueeze(-1)).sum(2)
    s64 = torch.einsum("bshd,bnd->bshn", q.double(), keys.double()).relu().mul(w.double().unsqueeze(-1)).sum(2)
    assert torch.equal(s32.double(), s64), "scores not exact in fp32"
    ref = naive.indexer_topk(q, w, keys, pos, ratio, topk)
    flushed_keys, flushed_q = keys.clone(), q.clone()
    flushed_keys[0, 21:, 32:] = 0.0
    flushed_q[0, 2, 1, :32] = 0.0
    assert not torch.equal(naive.indexer_topk(q, w, flushed_keys, pos, ratio, topk)[:, [0, 1, 4]], ref[:, [0, 1, 4]])
    assert not torch.equal(naive.indexer_topk(flushed_q, w, keys, pos, ratio, topk)[:, 2], ref[:, 2])
    args = [t.to(DEVICE) for t in (q, w, keys, pos)]
    for config in (FP8 + ",block_n=16", FP8 + ",block_n=16,block_s=1", FP8 + ",block_n=16,score_rows=heads"):
        out = indexer_topk(*args, ratio, topk, config)
        assert torch.equal(out.cpu(), ref), config
        assert torch.equal(out, dsv4.indexer_topk(*args, ratio, topk))
    out = indexer_topk(args[0], args[1], args[2].bfloat16(), args[3], ratio, topk, FP8 + ",block_n=16")  # bf16 keys
    assert torch.equal(out.cpu(), ref)


# ================================================================================================
# GPU: V4-Flash's indexer shapes (64 heads x 128 dims, top-512, ratio 4)
# ================================================================================================

@pytest.mark.gpu
@pytest.mark.parametrize("config", ["", "block_n=64", "block_s=1", "block_s=4,block_n=64", "score_rows=heads",
                                    "num_warps=4,block_n=64"])
def test_gpu_fp8_identical_to_bf16_path_on_fp4_data(config):
    """FP4-simulated Gaussian q (bf16) and keys (fp32), as the model makes them: every row FP4-like,
    each 32-dim K step's FP8 sum exact (promoted into fp32 every step), so the scores are the bf16
    path's times powers of two and the picks identical; plus a key row and a query head row that are
    not FP4-like (the bf16 dots from their tile / block on): still identical."""
    B, S, H, d, N, ratio, topk = 1, 1024, 64, 128, 2048, 4, 512
    g = torch.Generator().manual_seed(4)
    q = fp4_gauss((B, S, H, d), g).bfloat16().to(DEVICE)
    keys = fp4_gauss((B, N, d), g).to(DEVICE)
    w = (torch.randn(B, S, H, generator=g) * (d * H) ** -0.5).bfloat16().to(DEVICE)
    pos = (torch.arange(S) * 8 + 7).view(1, S).to(DEVICE)
    cfg = ",".join(c for c in (FP8, config) if c)
    assert torch.equal(indexer_topk(q, w, keys, pos, ratio, topk, cfg),
                       indexer_topk(q, w, keys, pos, ratio, topk, config))
    keys[0, 1500, :32] *= 2.0 ** -20
    q[0, 700, 5, 96:] *= 2.0 ** -20
    assert (scales(keys) == 0).sum() == 1 and (scales(q.float()) == 0).sum() == 1
    assert torch.equal(indexer_topk(q, w, keys, pos, ratio, topk, cfg),
                       indexer_topk(q, w, keys, pos, ratio, topk, config))


@pytest.mark.gpu
@pytest.mark.parametrize("topk,N", [(512, 2048), (1024, 4096)], ids=["flash-k512-N2048", "pro-k1024-N4096"])
def test_gpu_fp8_dyadic_exact_and_wide_blocks_close(topk, N):
    """Dyadic q and keys (exact sums: the plain op's selection, ties included); then FP4 blocks up to
    13 binades apart in a row (still FP4-like: each K step's sum exact, the fp32 sum of the steps
    rounded as any fp32 sum): selected scores within 1e-5 of the plain op's (float64 scores)."""
    B, S, H, d, ratio = 2, 300, 64, 128, 4
    g = torch.Generator().manual_seed(5)
    q, w, keys = dyadic((B, S, H, d), g).bfloat16(), dyadic((B, S, H), g).float(), dyadic((B, N, d), g)
    pos = torch.stack([torch.arange(S) * (N * ratio // S), torch.arange(S) * 3 + 7]).long()
    q, w, keys, pos = (t.to(DEVICE) for t in (q, w, keys, pos))
    assert torch.equal(indexer_topk(q, w, keys, pos, ratio, topk, FP8), dsv4.indexer_topk(q, w, keys, pos, ratio, topk))
    q = fp4_gauss((B, S, H, d), g, spread=13).bfloat16().to(DEVICE)
    keys = fp4_gauss((B, N, d), g, spread=13).to(DEVICE)
    assert (scales(keys) > 0).all()
    out = indexer_topk(q, w, keys, pos, ratio, topk, FP8)
    ref = dsv4.indexer_topk(q, w, keys, pos, ratio, topk)
    assert torch.equal(out < 0, ref < 0)
    s64 = torch.einsum("bshd,bnd->bshn", q.double(), keys.double()).relu().mul(w.double().unsqueeze(-1)).sum(2)
    pick = lambda idx: torch.where(idx >= 0, s64.gather(-1, idx.long().clamp_min(0)), 0.0)  # noqa: E731
    assert ((pick(out) - pick(ref)).abs() <= 1e-5 * pick(ref).abs().max()).all()
