"""compress_kv (the compressor) against the per-block loop twin, in both quant modes and both overlap
modes, plus its structure: block 0 of the overlapping mode, causality, the ignored trailing tokens,
partial and empty blocks (N = cos.shape[-2] may exceed T // ratio; a -inf gate logit marks an absent
token), and the gradients (straight-through the quantization) against autograd through the float64 twin.

Tolerances: the outputs are quantized values (FP8 e4m3 or FP4 e2m1 with pow2 scales, BF16 rope dims),
so the float32 op and the float64 twin give the same codes unless a pre-quantization value lies within
~1e-7 relative of a rounding boundary (probability ~1e-6 per element). The test allows 0.2% of
elements to differ (measured: none) and bounds the relative RMS error by 1e-2; a real error above
~1e-4 relative before quantization would flip well over 0.2% of the FP8 codes. The quantization hides
smaller errors, so the pre-quantization maths is also checked through the gradients, which pass the
quantizers straight through: float32 vs float64, relative RMS 1e-4 (measured about 1e-7).
"""
from __future__ import annotations

import pytest
import torch

import dsv4_compile.model.ops  # noqa: F401  (registers torch.ops.dsv4.*)
import naive_ops as naive
from helpers import assert_close, rel_rms

dsv4 = torch.ops.dsv4
EPS = 1e-6

# (B, T, d, R, ratio, overlap, quant): T % ratio != 0 mostly, ratio 3 (not a power of two), HCA's 128.
COMPRESS_CASES = [
    pytest.param((2, 19, 128, 64, 4, True, "fp8"), id="B2-T19-d128-r4-overlap-fp8"),
    pytest.param((1, 21, 192, 64, 4, False, "fp8"), id="B1-T21-d192-r4-fp8"),
    pytest.param((1, 261, 128, 64, 128, False, "fp8"), id="B1-T261-d128-r128-fp8"),
    pytest.param((2, 13, 64, 32, 4, True, "hadamard_fp4"), id="B2-T13-d64-r4-overlap-fp4"),
    pytest.param((1, 10, 128, 64, 3, False, "hadamard_fp4"), id="B1-T10-d128-r3-fp4"),
    pytest.param((2, 12, 128, 64, 4, True, "hadamard_fp4"), id="B2-T12-d128-r4-overlap-fp4"),
]


def compress_inputs(B, T, d, R, ratio, overlap, seed=0, batched_rope=False, n_entries=None):
    g = torch.Generator().manual_seed(seed)
    C = 2 * d if overlap else d
    kv = torch.randn(B, T, C, generator=g)
    score = torch.randn(B, T, C, generator=g) * 2
    ape = torch.randn(ratio, C, generator=g)
    norm_weight = torch.rand(d, generator=g) + 0.5
    N = T // ratio if n_entries is None else n_entries
    angles = torch.rand(*((B,) if batched_rope else ()), N, R // 2, generator=g) * 6
    return kv, score, ape, norm_weight, angles.cos(), angles.sin()


def assert_quantized_close(name, ref, out, max_frac=2e-3, tol=1e-2):
    assert ref.shape == out.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    frac = (out.double() != ref).double().mean().item()
    assert frac <= max_frac, f"{name}: {frac:.2%} of the quantized values differ"
    err = rel_rms(ref, out)
    assert err <= tol, f"{name}: relative RMS error {err:.2e}"


@pytest.mark.parametrize("batched_rope", [False, True], ids=["rope-N", "rope-BN"])
@pytest.mark.parametrize("case", COMPRESS_CASES)
def test_compress_kv_matches_naive(case, batched_rope):
    B, T, d, R, ratio, overlap, quant = case
    args = compress_inputs(B, T, d, R, ratio, overlap, batched_rope=batched_rope)
    out = dsv4.compress_kv(*args, ratio, overlap, EPS, quant)
    assert out.dtype == torch.float32 and out.shape == (B, T // ratio, d)
    assert_quantized_close("compress_kv", naive.compress_kv(*args, ratio, overlap, EPS, quant), out)


@pytest.mark.parametrize("quant", ["fp8", "hadamard_fp4"])
def test_overlap_block0_has_no_previous_block(quant):
    """Block 0 of the overlapping mode pools only its own rows (the second half of the channels): it
    equals the non-overlapping compressor run on those channels alone."""
    B, T, d, R, ratio = 2, 13, 128, 64, 4
    kv, score, ape, nw, cos, sin = compress_inputs(B, T, d, R, ratio, True, seed=1)
    out = dsv4.compress_kv(kv, score, ape, nw, cos, sin, ratio, True, EPS, quant)
    own = dsv4.compress_kv(kv[..., d:], score[..., d:], ape[:, d:], nw, cos, sin, ratio, False, EPS, quant)
    assert_quantized_close("overlap block 0", own[:, 0].double(), out[:, 0])
    # block 0's first-half channels are read by block 1 only: NaN there leaves block 0 alone
    kv2 = kv.clone()
    kv2[:, :ratio, :d] = float("nan")
    out2 = dsv4.compress_kv(kv2, score, ape, nw, cos, sin, ratio, True, EPS, quant)
    assert torch.equal(out2[:, 0], out[:, 0])
    assert out2[:, 1].isnan().all(), "block 1 reads block 0's first-half channels"


def test_overlap_reads_previous_first_half_only():
    B, T, d, R, ratio = 1, 16, 128, 64, 4
    kv, score, ape, nw, cos, sin = compress_inputs(B, T, d, R, ratio, True, seed=2)
    out = dsv4.compress_kv(kv, score, ape, nw, cos, sin, ratio, True, EPS, "fp8")
    kv2 = kv.clone()
    kv2[:, 4:8, d:] = float("nan")  # block 1's second half: read by block 1 only
    out2 = dsv4.compress_kv(kv2, score, ape, nw, cos, sin, ratio, True, EPS, "fp8")
    assert out2[:, 1].isnan().all()
    assert torch.equal(out2[:, [0, 2, 3]], out[:, [0, 2, 3]])
    kv3 = kv.clone()
    kv3[:, 4:8, :d] = float("nan")  # block 1's first half: read by block 2 only
    out3 = dsv4.compress_kv(kv3, score, ape, nw, cos, sin, ratio, True, EPS, "fp8")
    assert out3[:, 2].isnan().all()
    assert torch.equal(out3[:, [0, 1, 3]], out[:, [0, 1, 3]])


@pytest.mark.parametrize("overlap", [False, True], ids=["no-overlap", "overlap"])
def test_trailing_tokens_ignored_and_causal(overlap):
    B, T, d, R, ratio = 2, 4 * 4 + 3, 128, 64, 4
    kv, score, ape, nw, cos, sin = compress_inputs(B, T, d, R, ratio, overlap, seed=3)
    out = dsv4.compress_kv(kv, score, ape, nw, cos, sin, ratio, overlap, EPS, "fp8")
    assert out.shape == (B, 4, d)
    kv2, score2 = kv.clone(), score.clone()
    kv2[:, 16:] = float("nan")
    score2[:, 16:] = float("nan")
    assert torch.equal(dsv4.compress_kv(kv2, score2, ape, nw, cos, sin, ratio, overlap, EPS, "fp8"), out)
    # causality: entry i reads no token at or after (i + 1) * ratio
    kv3 = kv.clone()
    kv3[:, 8:] = float("nan")
    out3 = dsv4.compress_kv(kv3, score, ape, nw, cos, sin, ratio, overlap, EPS, "fp8")
    assert torch.equal(out3[:, :2], out[:, :2]) and out3[:, 2:].isnan().all()
    # fewer tokens than one block: no entries
    empty = dsv4.compress_kv(kv[:, :3], score[:, :3], ape, nw, cos[:0], sin[:0], ratio, overlap, EPS, "fp8")
    assert empty.shape == (B, 0, d)


def test_bad_quant_raises():
    args = compress_inputs(1, 8, 128, 64, 4, False)
    with pytest.raises(ValueError, match="compress_kv: quant 'fp16'; accepted: fp8, hadamard_fp4"):
        dsv4.compress_kv(*args, 4, False, EPS, "fp16")


def test_hadamard_matches_sylvester():
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(4))
    from dsv4_compile.model.ops import hadamard
    assert_close("hadamard", naive.hadamard(x), hadamard(x), 1e-6)
    H = naive.sylvester(16)
    assert torch.equal(H @ H.T, 16 * torch.eye(16, dtype=torch.float64))


@pytest.mark.parametrize("case", [COMPRESS_CASES[0], COMPRESS_CASES[1], COMPRESS_CASES[3]])
def test_compress_kv_grads_match_naive(case):
    B, T, d, R, ratio, overlap, quant = case
    kv, score, ape, nw, cos, sin = compress_inputs(B, T, d, R, ratio, overlap, seed=5)
    leaves = [t.clone().requires_grad_() for t in (kv, score, ape, nw)]
    out = dsv4.compress_kv(*leaves, cos, sin, ratio, overlap, EPS, quant)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(6))
    out.backward(g)
    leaves64 = [t.double().requires_grad_() for t in (kv, score, ape, nw)]
    naive.compress_kv(*leaves64, cos, sin, ratio, overlap, EPS, quant).backward(g.double())
    for name, a, b in zip(("kv", "score", "ape", "norm_weight"), leaves64, leaves):
        assert_close(f"compress_kv grad {name}", a.grad, b.grad, 1e-4)
    assert (leaves[0].grad[:, T // ratio * ratio:] == 0).all(), "trailing tokens get no gradient"


@pytest.mark.parametrize("quant", ["fp8", "hadamard_fp4"])
@pytest.mark.parametrize("overlap", [False, True], ids=["no-overlap", "overlap"])
def test_partial_and_empty_blocks(overlap, quant):
    """A static N beyond T // ratio: the partial block pools the tokens present, a block with no token
    is exactly 0 (so is its overlap neighbour's missing half), and a token whose gate logit is -inf is
    absent (its kv value does not matter)."""
    B, T, d, R, ratio, N = 2, 9, 128, 64, 4, 5  # blocks: full, full, partial (1 token), empty, empty
    kv, score, ape, nw, cos, sin = compress_inputs(B, T, d, R, ratio, overlap, seed=7, n_entries=N)
    score[0, 5, :] = float("-inf")  # absent tokens, as the compressor state marks unwritten rows
    score[1, 8, : d // 2] = float("-inf")
    out = dsv4.compress_kv(kv, score, ape, nw, cos, sin, ratio, overlap, EPS, quant)
    assert out.shape == (B, N, d)
    assert_quantized_close("partial blocks", naive.compress_kv(kv, score, ape, nw, cos, sin, ratio, overlap, EPS, quant), out)
    assert (out[:, 4] == 0).all(), "a block with no tokens (and no previous tokens) is 0"
    assert (out[:, 3] == 0).all() != overlap, "with overlap, block 3 pools block 2's token"
    assert (out[0, 2] != 0).any()
    kv2 = kv.clone()
    kv2[0, 5] = 1e3  # absent token: any finite value
    assert torch.equal(dsv4.compress_kv(kv2, score, ape, nw, cos, sin, ratio, overlap, EPS, quant), out)


def test_nan_score_propagates():
    """A NaN gate logit gives a NaN entry (not a silently empty channel)."""
    B, T, d, R, ratio = 1, 12, 128, 64, 4
    kv, score, ape, nw, cos, sin = compress_inputs(B, T, d, R, ratio, False, seed=8)
    score[0, 5, 7] = float("nan")
    out = dsv4.compress_kv(kv, score, ape, nw, cos, sin, ratio, False, EPS, "fp8")
    assert out[0, 1].isnan().any() and torch.isfinite(out[0, [0, 2]]).all()
