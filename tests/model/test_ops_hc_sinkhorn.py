"""mHC ops: hc_sinkhorn and hc_pre against the naive loop twins, Sinkhorn's convergence, and the
gradients of the registered autograd formulas against autograd through the float64 naive versions.

Tolerances: the op runs in float32 and the twin in float64 with a different summation order. Sinkhorn's
entries are in [0, 1] and each round divides by sums near 1, so float32 rounding stays at a few ulps
of 1 (about 1e-7 to 3e-7): 1e-6 absolute is the bar (the issue's). hc_pre's y is a sum of n terms
with O(1) weights: float32 gives relative RMS about 1e-7; 1e-5 is REL_RMS_TOL[float32]. For a bf16 or
fp16 x the sum is taken in float32 and rounded once to x's dtype: a uniform rounding error of one ulp
has RMS ulp / sqrt(12), about 1.5e-3 relative for bf16 (measured 1.4e-3 to 1.7e-3) and 2e-4 for fp16
(measured 1.9e-4 to 2.2e-4); the bars are twice that (3e-3, 4e-4), tighter than the generic
REL_RMS_TOL, so that a second rounding step anywhere would show.
"""
from __future__ import annotations

import pytest
import torch

import dsv4_compile.model.ops  # noqa: F401  (registers torch.ops.dsv4.*)
import naive_ops as naive
from helpers import assert_close

dsv4 = torch.ops.dsv4
EPS = 1e-6  # V4's hc_eps


# ------------------------------------------------------------------------------------------------
# Sinkhorn
# ------------------------------------------------------------------------------------------------

SINKHORN_SHAPES = [
    pytest.param((7, 4, 4), 20, id="7x4x4-it20"),
    pytest.param((2, 3, 5, 5), 20, id="2x3x5x5-it20"),
    pytest.param((3, 1, 1), 20, id="3x1x1"),
    pytest.param((6, 3, 3), 1, id="6x3x3-it1"),
    pytest.param((4, 4), 7, id="4x4-it7"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("shape,iters", SINKHORN_SHAPES)
def test_sinkhorn_matches_naive(shape, iters, dtype):
    logits = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 2).to(dtype)
    out = dsv4.hc_sinkhorn(logits, iters, EPS)
    assert out.dtype == torch.float32 and out.shape == logits.shape
    ref = naive.sinkhorn(logits, iters, EPS)
    err = (out.double() - ref).abs().max().item()
    assert err <= 1e-6, f"max abs error {err:.2e} > 1e-6"


@pytest.mark.parametrize("shape,iters", SINKHORN_SHAPES)
def test_sinkhorn_rounds_as_one_loop_give_the_unrolled_bits(shape, iters):
    """The CPU engines' export runs the rounds as one while_loop node (passes/decompose.py): the same
    ops in the same order, so the same bits, NaN matrices included; the decomposition of hc_pre too."""
    from dsv4_compile.model.ops import _hc_pre_plain, _sinkhorn_plain

    logits = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 2
    logits.view(-1)[0] = float("nan")
    unrolled = _sinkhorn_plain(logits, iters, EPS)
    assert torch.equal(_sinkhorn_plain(logits, iters, EPS, as_loop=True).nan_to_num(7.0), unrolled.nan_to_num(7.0))
    assert unrolled.isnan().any()
    n, d = 4, 8
    gen = torch.Generator().manual_seed(1)
    x, fn = torch.randn(2, 3, n, d, generator=gen), torch.randn((2 + n) * n, n * d, generator=gen)
    scale, base = torch.rand(3, generator=gen), torch.randn((2 + n) * n, generator=gen)
    for a, b in zip(_hc_pre_plain(x, fn, scale, base, iters, 1e-6, EPS),
                    _hc_pre_plain(x, fn, scale, base, iters, 1e-6, EPS, as_loop=True)):
        assert torch.equal(a, b)


def test_sinkhorn_converges_on_100000_unit_variance_matrices():
    logits = torch.randn(100_000, 4, 4, generator=torch.Generator().manual_seed(1))
    out = dsv4.hc_sinkhorn(logits, 20, EPS)
    ref = naive.sinkhorn(logits, 20, EPS)
    err = (out.double() - ref).abs().max().item()
    assert err <= 1e-6, f"max abs error vs naive {err:.2e} > 1e-6"
    c = out.double()
    col = (c.sum(-2) - 1).abs().amax(-1)  # the last normalisation is by columns: sums = S / (S + eps)
    row = (c.sum(-1) - 1).abs().amax(-1)
    assert col.max().item() <= 1e-5, f"worst column sum off by {col.max().item():.2e}"
    frac = (row <= 1e-3).double().mean().item()
    assert frac >= 0.999, f"only {frac:.5f} of samples have every row sum within 1e-3"
    assert (c >= 0).all()


def test_sinkhorn_nan_poisons_only_its_matrix():
    logits = torch.randn(3, 4, 4)
    logits[1, 2, 3] = float("nan")
    out = dsv4.hc_sinkhorn(logits, 20, EPS)
    assert out[1].isnan().all()
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[2]).all()


def test_sinkhorn_grad_matches_naive():
    logits = torch.randn(5, 4, 4, generator=torch.Generator().manual_seed(2))
    g = torch.randn(5, 4, 4, generator=torch.Generator().manual_seed(3))
    x = logits.clone().requires_grad_()
    dsv4.hc_sinkhorn(x, 20, EPS).backward(g)
    x64 = logits.double().requires_grad_()
    naive.sinkhorn(x64, 20, EPS).backward(g.double())
    assert_close("sinkhorn grad", x64.grad, x.grad, 1e-5)


# ------------------------------------------------------------------------------------------------
# hc_pre
# ------------------------------------------------------------------------------------------------

HC_SHAPES = [  # (B, S, n, D)
    pytest.param((2, 5, 4, 24), id="B2-S5-n4-D24"),
    pytest.param((1, 3, 4, 7), id="B1-S3-n4-D7"),
    pytest.param((1, 1, 2, 33), id="B1-S1-n2-D33"),
    pytest.param((3, 2, 3, 16), id="B3-S2-n3-D16"),
]


def hc_inputs(B, S, n, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, S, n, D, generator=g).to(dtype)
    fn = torch.randn((2 + n) * n, n * D, generator=g) * (n * D) ** -0.5
    scale = torch.rand(3, generator=g) + 0.5
    base = torch.randn((2 + n) * n, generator=g) * 0.5
    return x, fn, scale, base


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("shape", HC_SHAPES)
def test_hc_pre_matches_naive(shape, dtype):
    x, fn, scale, base = hc_inputs(*shape, dtype)
    y, post, comb = dsv4.hc_pre(x, fn, scale, base, 20, 1e-6, EPS)
    B, S, n, D = shape
    assert y.dtype == dtype and y.shape == (B, S, D)
    assert post.dtype == comb.dtype == torch.float32 and post.shape == (B, S, n) and comb.shape == (B, S, n, n)
    ry, rpost, rcomb = naive.hc_pre(x, fn, scale, base, 20, 1e-6, EPS)
    assert_close("hc_pre y", ry, y, {torch.float32: 1e-5, torch.bfloat16: 3e-3, torch.float16: 4e-4}[dtype])
    assert_close("hc_pre post", rpost, post, 1e-5)
    err = (comb.double() - rcomb).abs().max().item()
    assert err <= 1e-6, f"hc_pre comb max abs error {err:.2e}"


def test_hc_pre_grads_match_naive():
    x, fn, scale, base = hc_inputs(2, 3, 4, 8, torch.float32, seed=4)
    leaves = [t.clone().requires_grad_() for t in (x, fn, scale, base)]
    y, post, comb = dsv4.hc_pre(*leaves, 20, 1e-6, EPS)
    g = torch.Generator().manual_seed(5)
    gy, gp, gc = (torch.randn(t.shape, generator=g) for t in (y, post, comb))
    torch.autograd.backward([y, post, comb], [gy, gp, gc])
    leaves64 = [t.double().requires_grad_() for t in (x, fn, scale, base)]
    ry, rp, rc = naive.hc_pre(*leaves64, 20, 1e-6, EPS)
    torch.autograd.backward([ry, rp, rc], [gy.double(), gp.double(), gc.double()])
    for name, a, b in zip(("x", "fn", "scale", "base"), leaves64, leaves):
        assert_close(f"hc_pre grad {name}", a.grad, b.grad, 1e-4)
