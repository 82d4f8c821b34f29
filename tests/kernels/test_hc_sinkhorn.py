"""mHC kernels (Sinkhorn alone, the fused hc_pre step) against their naive twins and the plain ops.

Tolerances: fp32 outputs (post, comb, Sinkhorn) 1e-5 relative RMS (helpers' fp32 bound: the same
math in another summation order, exp and division rounded to nearest; measured ~1e-7); y in x's
dtype with that dtype's bound (one rounding of an fp32 sum).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel import (conftest does it too)

import pytest  # noqa: E402

import dsv4_compile.model.ops  # noqa: E402,F401  (registers torch.ops.dsv4.*)
from dsv4_compile.kernels.hc_sinkhorn import hc_pre, hc_sinkhorn, naive  # noqa: E402
from helpers import assert_close  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16"),
          pytest.param(torch.float16, id="fp16")]


def randn(*shape, seed=0, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype).to(DEVICE)


# ------------------------------------------------------------------------------------------------
# hc_sinkhorn
# ------------------------------------------------------------------------------------------------

SINKHORN_SHAPES = [
    pytest.param((5, 4, 4), 20, id="5x4x4-20it"),
    pytest.param((3, 7, 3, 3), 20, id="3x7x3x3-n3-20it"),
    pytest.param((33, 2, 2), 5, id="33x2x2-n2-5it"),
    pytest.param((2, 5, 5), 1, id="2x5x5-n5-1it"),
    pytest.param((7, 1, 1), 3, id="7x1x1-n1"),
    pytest.param((300, 4, 4), 20, id="300x4x4-several-programs"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,iters", SINKHORN_SHAPES)
def test_sinkhorn_matches_plain_and_naive(shape, iters, dtype):
    logits = randn(*shape, scale=3.0, dtype=dtype)
    out = hc_sinkhorn(logits, iters, 1e-6)
    assert out.dtype == torch.float32
    assert_close("vs plain", torch.ops.dsv4.hc_sinkhorn(logits, iters, 1e-6), out)
    assert_close("vs naive", naive.hc_sinkhorn(logits.cpu(), iters, 1e-6), out.cpu())


def test_sinkhorn_doubly_stochastic():
    """Columns sum to 1 after the last (column) step; 20 rounds leave rows within ~2e-3 of 1."""
    out = hc_sinkhorn(randn(64, 4, 4, seed=1, scale=2.0), 20, 1e-6).cpu()
    assert (out.sum(-2) - 1).abs().max() < 1e-4 and (out.sum(-1) - 1).abs().max() < 1e-2


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on NaN rows
def test_sinkhorn_nan_inf():
    """Docstring: NaN in a matrix makes that matrix NaN; +Inf too (exp(inf - inf) = NaN), as the
    plain op (tl.max drops NaN: the kernel must not)."""
    logits = randn(4, 4, 4, seed=2)
    logits[0, 1, 2] = float("nan")
    logits[2, 3, 3] = float("inf")
    out = hc_sinkhorn(logits, 20, 1e-6).cpu()
    assert torch.isnan(out[0]).all() and torch.isnan(out[2]).all()
    assert torch.isfinite(out[1]).all() and torch.isfinite(out[3]).all()
    assert_close("vs plain", torch.ops.dsv4.hc_sinkhorn(logits, 20, 1e-6).cpu(), out)


# ------------------------------------------------------------------------------------------------
# hc_pre
# ------------------------------------------------------------------------------------------------

def make_hc_inputs(lead, n, D, dtype, seed=0):
    W = (2 + n) * n
    x = randn(*lead, n, D, seed=seed, dtype=dtype)
    fn = randn(W, n * D, seed=seed + 1, scale=(n * D) ** -0.5)
    scale = torch.tensor([0.5, 0.7, 1.3], device=DEVICE)
    base = randn(W, seed=seed + 2, scale=0.3)
    return x, fn, scale, base


HC_SHAPES = [
    pytest.param((2, 5), 4, 96, id="B2xS5-n4-D96"),
    pytest.param((1, 19), 4, 64, id="B1xS19-n4-D64-two-token-blocks"),
    pytest.param((3,), 3, 40, id="S3-n3-D40"),
    pytest.param((1, 17), 2, 48, id="B1xS17-n2-D48"),
    pytest.param((2, 3), 1, 24, id="B2xS3-n1-D24"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,n,D", HC_SHAPES)
def test_hc_pre_matches_plain_and_naive(lead, n, D, dtype):
    args = make_hc_inputs(lead, n, D, dtype)
    y, post, comb = hc_pre(*args, 20, 1e-6, 1e-6)
    assert y.shape == (*lead, D) and y.dtype == dtype
    assert post.shape == (*lead, n) and comb.shape == (*lead, n, n)
    check_hc_pre(args, (y, post, comb))


def check_hc_pre(args, out):
    """The kernel's (y, post, comb) against the plain op and the naive twin: y to its dtype's rounding
    (one rounding of an fp32 sum), post and comb to fp32's."""
    y, post, comb = out
    for name, ref in (("plain", torch.ops.dsv4.hc_pre(*args, 20, 1e-6, 1e-6)),
                      ("naive", naive.hc_pre(*[a.cpu() for a in args], 20, 1e-6, 1e-6))):
        assert_close(f"y vs {name}", ref[0].float(), y.float().cpu() if name == "naive" else y.float(),
                     {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[y.dtype])
        assert_close(f"post vs {name}", ref[1], post.cpu() if name == "naive" else post)
        assert_close(f"comb vs {name}", ref[2], comb.cpu() if name == "naive" else comb)


def test_hc_pre_config_variants():
    args = make_hc_inputs((2, 9), 4, 80, torch.float32, seed=3)
    ref = hc_pre(*args, 20, 1e-6, 1e-6)
    for cfg in ({"block_k": 16, "block_d": 16}, "block_t=32,block_k=64,block_d=32,dot_precision=ieee"):
        for r, o in zip(ref, hc_pre(*args, 20, 1e-6, 1e-6, config=cfg)):
            assert_close(f"config {cfg}", r, o)


SPLIT_SHAPES = [
    pytest.param((1, 1), 4, 96, 3, id="B1-n4-D96-3splits"),
    pytest.param((5, 1), 3, 40, 4, id="B5-n3-D40-4splits"),
    pytest.param((2, 17), 4, 72, 2, id="B2xS17-n4-D72-2splits-two-token-blocks"),
    pytest.param((3, 1), 4, 24, 8, id="B3-n4-D24-splits-clamped-to-K-steps"),
    pytest.param((17, 1), 4, 40, 2, id="B17-n4-D40-a-lone-token-in-the-last-block"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,n,D,splits", SPLIT_SHAPES)
def test_hc_pre_split_matches_plain_and_naive(lead, n, D, splits, dtype):
    """num_splits > 1 (the decode config): partial mixes per K range, added in range order, y made by
    ranges of D; block_k / block_d 16 so that every range spans several steps and D is cut unevenly. A
    block of one token (B 1; the 17th of B 17) sweeps with fp32 FMAs, the others with tl.dot."""
    args = make_hc_inputs(lead, n, D, dtype, seed=5)
    cfg = {"num_splits": splits, "block_k": 16, "block_d": 16}
    y, post, comb = hc_pre(*args, 20, 1e-6, 1e-6, config=cfg)
    assert y.dtype == dtype
    check_hc_pre(args, (y, post, comb))
    again = hc_pre(*args, 20, 1e-6, 1e-6, config=cfg)
    assert all(torch.equal(a, b) for a, b in zip((y, post, comb), again)), "split sums must not depend on timing"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_t,splits", [(1, 3), (2, 1), (4, 4), (8, 2)],
                         ids=["bt1-3splits", "bt2-unsplit", "bt4-4splits", "bt8-2splits"])
def test_hc_pre_few_token_blocks_match_plain_and_naive(block_t, splits, dtype):
    """block_t < 16 (decode's few tokens): the mixes as fp32 FMAs on the CUDA cores instead of tl.dot,
    split and unsplit, over token blocks of which the last is partial (5 tokens), against the plain op
    and the naive twin, and the same sums on every run."""
    args = make_hc_inputs((5, 1), 4, 72, dtype, seed=7)
    cfg = {"block_t": block_t, "num_splits": splits, "block_k": 32, "block_d": 16}
    y, post, comb = hc_pre(*args, 20, 1e-6, 1e-6, config=cfg)
    check_hc_pre(args, (y, post, comb))
    again = hc_pre(*args, 20, 1e-6, 1e-6, config=cfg)
    assert all(torch.equal(a, b) for a, b in zip((y, post, comb), again))


def test_hc_pre_split_count():
    """The launch cuts K into num_splits ranges, at most one per block_k step; the decode default is
    split on every GPU entry (the one-program-per-token-block grid is what it exists to avoid)."""
    from dsv4_compile.kernels.hc_sinkhorn.config import DECODE_CONFIGS, HcConfig, decode_config, hc_pre_splits

    assert hc_pre_splits(HcConfig(num_splits=32, block_k=256), 4 * 4096) == 32
    assert hc_pre_splits(HcConfig(num_splits=32, block_k=256), 4 * 1024) == 16
    assert hc_pre_splits(HcConfig(), 4 * 4096) == 1
    for gpu, cfg in DECODE_CONFIGS.items():
        assert cfg.num_splits > 1 and decode_config(gpu) == cfg
    with pytest.raises(ValueError, match="num_splits = 0"):
        HcConfig(num_splits=0)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on NaN rows
def test_hc_pre_nan_token():
    """A NaN in one token's streams makes that token's y, post and comb NaN, and only that token's."""
    x, fn, scale, base = make_hc_inputs((1, 6), 4, 32, torch.float32, seed=4)
    x[0, 2, 1, 5] = float("nan")
    y, post, comb = hc_pre(x, fn, scale, base, 20, 1e-6, 1e-6)
    for out in (y, post, comb):
        out = out.cpu()
        assert torch.isnan(out[0, 2]).all() and torch.isfinite(out[0, :2]).all() and torch.isfinite(out[0, 3:]).all()
    ref = torch.ops.dsv4.hc_pre(x, fn, scale, base, 20, 1e-6, 1e-6)
    for r, o in zip(ref, (y, post, comb)):
        assert_close("vs plain", r, o)


def test_input_errors():
    x, fn, scale, base = make_hc_inputs((1, 4), 4, 32, torch.float32)
    with pytest.raises(ValueError, match="fn has shape"):
        hc_pre(x, fn[:, :64].contiguous(), scale, base, 20, 1e-6, 1e-6)
    with pytest.raises(ValueError, match="accepted"):
        hc_pre(x, fn.double(), scale, base, 20, 1e-6, 1e-6)
    with pytest.raises(ValueError, match="not contiguous"):
        hc_pre(x.transpose(-1, -2), fn, scale, base, 20, 1e-6, 1e-6)
    with pytest.raises(ValueError, match="n, n"):
        hc_sinkhorn(torch.zeros(3, 4, 5, device=DEVICE), 20, 1e-6)
    with pytest.raises(ValueError, match="dot_precision"):
        hc_sinkhorn(torch.zeros(3, 4, 4, device=DEVICE), 20, 1e-6, config={"dot_precision": "fp16"})


@pytest.mark.gpu
@pytest.mark.parametrize("D", [4096, 7168])
def test_gpu_real_shapes(D):
    args = make_hc_inputs((1, 4096), 4, D, torch.bfloat16)
    out = hc_pre(*args, 20, 1e-6, 1e-6)
    ref = torch.ops.dsv4.hc_pre(*args, 20, 1e-6, 1e-6)
    assert_close("y", ref[0].float(), out[0].float(), 1e-2)
    assert_close("post", ref[1], out[1])
    assert_close("comb", ref[2], out[2])
    logits = randn(16384, 4, 4, scale=3.0)
    assert_close("sinkhorn", torch.ops.dsv4.hc_sinkhorn(logits, 20, 1e-6), hc_sinkhorn(logits, 20, 1e-6))


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 64])
def test_gpu_decode_split(B):
    """A decode step's shapes with the GPU's decode config (split) against the plain op and the unsplit
    kernel."""
    from dsv4_compile.kernels.hc_sinkhorn.config import decode_config

    args = make_hc_inputs((B, 1), 4, 4096, torch.bfloat16, seed=6)
    out = hc_pre(*args, 20, 1e-6, 1e-6, config=decode_config())
    assert decode_config().num_splits > 1
    for name, ref in (("plain", torch.ops.dsv4.hc_pre(*args, 20, 1e-6, 1e-6)), ("unsplit", hc_pre(*args, 20, 1e-6, 1e-6))):
        assert_close(f"y vs {name}", ref[0].float(), out[0].float(), 1e-2)
        assert_close(f"post vs {name}", ref[1], out[1])
        assert_close(f"comb vs {name}", ref[2], out[2])
