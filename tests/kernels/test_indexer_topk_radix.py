"""Radix-select top-k (kernels/indexer_topk/radix_topk.py) against its naive twin (naive.radix_topk):
exact equality of the selected indices and their order.

CPU: the Triton interpreter at odd shapes (R 1 / 3 / 7; N 1 / 5 / 129 / 1000 / 4099; k 1 / 7 / 64 / 512,
k > N included), small tiles so rows span many, both digit widths (8 and 11 bits). Scores: Gaussian;
drawn from a few values (exact ties across tiles and passes: the k-th best's class is resolved by
the lowest indices); NaN, +-inf, -0.0 and +0.0 mixed in; rows shorter than N (lengths, 0 included)
and strided rows. The tie rule is pinned by explicit expectations and by checking that the tie-heavy
inputs' reference differs from the reversed-index rule's, so equality with the twin is not trivial.
GPU (marked): the compiled kernel against torch's stable sort at the indexer's shapes.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel import (conftest does it too)

import pytest  # noqa: E402

from dsv4_compile.kernels.indexer_topk import RadixTopkConfig, naive, radix_topk  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_scores(R, N, kind, seed=0):
    """[R, N] fp32 scores: 'gauss'; 'ties' (5 values, so every class is full of ties); 'special'
    (Gaussian with NaN of both signs, +-inf, -0.0 and +0.0 scattered, and a few exact ties)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "ties":
        return (torch.randint(0, 5, (R, N), generator=g).float() - 2) / 4
    s = torch.randn(R, N, generator=g)
    if kind == "special":
        pick = torch.rand(R, N, generator=g)
        s = torch.where(pick < 0.05, float("nan"), s)
        s = torch.where((pick >= 0.05) & (pick < 0.08), float("inf"), s)
        s = torch.where((pick >= 0.08) & (pick < 0.11), float("-inf"), s)
        s = torch.where((pick >= 0.11) & (pick < 0.16), -0.0, s)
        s = torch.where((pick >= 0.16) & (pick < 0.21), 0.0, s)
        s = torch.where((pick >= 0.21) & (pick < 0.25), 0.5, s)
        s = torch.where(torch.rand(R, N, generator=g) < 0.5, s, s.neg())  # NaN with the sign bit too
    return s


def reversed_tie_rule(scores, lengths, k):
    """The twin's selection with ties going to the HIGHEST index instead: the rule a wrong kernel could
    share with a wrong reference. The tests assert it differs from the real rule on their tie inputs."""
    R, N = scores.shape
    n = torch.full((R,), N) if lengths is None else lengths.long().clamp(0, N)
    flipped = torch.stack([torch.cat([row[:m].flip(0), row[m:]]) for row, m in zip(scores.cpu(), n.tolist())])
    out = naive.radix_topk(flipped, n.int(), k).long()
    return torch.where(out >= 0, n[:, None] - 1 - out, -1).int()


def check(scores, lengths, k, config=None):
    out = radix_topk(scores.to(DEVICE), None if lengths is None else lengths.to(DEVICE), k, config)
    assert out.dtype == torch.int32 and out.shape == (scores.shape[0], k)
    ref = naive.radix_topk(scores, lengths, k)
    assert torch.equal(out.cpu(), ref), f"{int((out.cpu() != ref).sum())} of {ref.numel()} indices differ"
    return ref


SHAPES = [(1, 1, 1), (3, 5, 7), (7, 5, 1), (3, 129, 7), (1, 129, 512), (3, 1000, 64), (1, 4099, 512),
          (7, 129, 64)]


@pytest.mark.parametrize("kind", ["gauss", "ties", "special"])
@pytest.mark.parametrize("R,N,k", SHAPES, ids=[f"R{r}-N{n}-k{k}" for r, n, k in SHAPES])
def test_matches_naive(R, N, k, kind):
    check(make_scores(R, N, kind, seed=R * N + k), None, k)


@pytest.mark.parametrize("config", ["block_n=16", "block_n=32,digit_bits=11"])
@pytest.mark.parametrize("kind", ["gauss", "ties", "special"])
def test_small_tiles_and_lengths(kind, config):
    """Rows of 150 keys in tiles of 16 or 32, lengths 0, 1, shorter than k, at a tile edge, > N
    (clamped) and -5 (clamped to 0); both digit widths."""
    R, N, k = 7, 150, 40
    scores = make_scores(R, N, kind, seed=1)
    lengths = torch.tensor([0, 1, 17, 64, 65, 150, 1000], dtype=torch.int32)
    ref = check(scores, lengths, k, config)
    assert (ref[0] == -1).all() and (ref[1, 1:] == -1).all() and (ref[2, 17:] == -1).all() and (ref[3:] >= 0).all()
    check(scores[:4], torch.tensor([-5, 40, 41, 39], dtype=torch.int32), k, config)


def test_tie_rule_is_pinned():
    """Ties go to the lowest index: explicit expectations, and on the tie-heavy inputs the reference
    differs from the reversed-index rule (so the equality tests above cannot pass with either)."""
    # all equal: the first k indices in order; NaN first among them; -0.0 ties +0.0
    assert radix_topk(torch.ones(1, 20, device=DEVICE), None, 5, "block_n=16").tolist() == [[0, 1, 2, 3, 4]]
    row = torch.tensor([[0.0, -0.0, 1.0, float("nan"), -0.0, 1.0, 0.0, float("-inf"), -float("nan"), 2.0]])
    assert radix_topk(row.to(DEVICE), None, 10, "block_n=16").tolist() == [[3, 8, 9, 2, 5, 0, 1, 4, 6, 7]]
    # five tied best keys out of order across tiles of 16, then two tied runners-up
    scores = torch.zeros(1, 70)
    scores[0, [66, 2, 35, 17, 50]] = 3.0
    scores[0, [40, 8]] = 1.5
    assert radix_topk(scores.to(DEVICE), None, 7, "block_n=16").tolist() == [[2, 17, 35, 50, 66, 8, 40]]
    assert reversed_tie_rule(scores, None, 7).tolist() == [[66, 50, 35, 17, 2, 40, 8]]
    for kind, (R, N, k) in [("ties", (3, 1000, 64)), ("special", (3, 1000, 64)), ("ties", (1, 129, 7))]:
        scores = make_scores(R, N, kind, seed=R * N + k)
        assert not torch.equal(naive.radix_topk(scores, None, k), reversed_tie_rule(scores, None, k)), kind


def test_strided_rows_and_inputs():
    """Rows of a wider buffer (row stride > N); bad inputs get one-line errors naming the value."""
    wide = make_scores(3, 200, "ties", seed=2)
    check(wide[:, :150], None, 33, "block_n=64")
    s = wide.to(DEVICE)
    assert radix_topk(s, None, 0).shape == (3, 0)
    assert radix_topk(s[:0], None, 4).shape == (0, 4)
    assert (radix_topk(s[:, :0], None, 4) == -1).all()
    with pytest.raises(ValueError, match="unit stride in the last dimension"):
        radix_topk(s.t(), None, 4)
    with pytest.raises(ValueError, match="scores is torch.float16"):
        radix_topk(s.half(), None, 4)
    with pytest.raises(ValueError, match="lengths is torch.int64"):
        radix_topk(s, torch.zeros(3, dtype=torch.int64, device=DEVICE), 4)
    with pytest.raises(ValueError, match="k = -1"):
        radix_topk(s, None, -1)
    with pytest.raises(ValueError, match="digit_bits = 9"):
        RadixTopkConfig(digit_bits=9)


@pytest.mark.gpu
@pytest.mark.parametrize("R,N,k", [(64, 32768, 512), (16, 131072, 1024), (300, 5000, 512)])
@pytest.mark.parametrize("kind", ["gauss", "ties", "special"])
def test_gpu_matches_stable_sort(R, N, k, kind):
    """The compiled kernel at the indexer's sizes against torch's stable descending sort (every NaN
    first, -0.0 == +0.0, ties to the lowest index: the plain op's rule), random lengths."""
    scores = make_scores(R, N, kind, seed=3).to(DEVICE)
    lengths = torch.randint(0, N + 1, (R,), generator=torch.Generator().manual_seed(4)).int().to(DEVICE)
    lengths[0] = N
    out = radix_topk(scores, lengths, k)
    # every NaN counts as the best score; torch's CUDA sort orders a NaN with its sign bit set last
    # (it sorts the bits), so the reference sorts sign-cleared NaNs
    canonical = torch.where(scores.isnan(), float("nan"), scores)
    masked = canonical.masked_fill(torch.arange(N, device=DEVICE) >= lengths[:, None].long(), float("-inf"))
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices[:, :k]
    ref = torch.where(order < lengths[:, None].long(), order, -1).int()
    if ref.shape[1] < k:
        ref = torch.nn.functional.pad(ref, (0, k - ref.shape[1]), value=-1)
    assert torch.equal(out, ref)
