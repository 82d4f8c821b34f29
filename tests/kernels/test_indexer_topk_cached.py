"""Cached indexer top-k kernel (dsv4_triton.indexer_topk_cached: indexer_topk's kernels reading the packed
index cache) against its naive twin, the plain op and `indexer_topk` over `unpack_indexer_keys`.

CPU: the Triton interpreter on small odd shapes (B, S, H, N odd; topk above the visible count; batch
rows at different positions, one query seeing nothing and one every key), both cache formats, q fp32
(the exact path) and bf16 (the 16-bit MMA: FP4 keys as bf16, FP8 keys with the residual dots), both
selections (radix, the decode default, and the fused threshold kernel), one and several queries a
sequence. Special bytes (e8m0 255 = inf scale, 0 = 2^-127, e4m3 NaN codes, -0) against the plain op.
GPU (marked): the compiled kernels at the real indexer shape (64 heads x 128, top-512, N = 32768, B 1
and 8).

Selections are compared exactly where the scores are exact (indexer_inputs: FP4 keys e2m1 x 1/2 with
dyadic q and weights; FP8 keys code x a float32 scale 2^-2 (1 + j 2^-9) with integer q and weights,
tied coarse scores broken below bf16's resolution), as test_indexer_topk.py does; model-like Gaussian
inputs by the float64 scores of the selected keys (1e-5 relative: only the summation order differs).
"""
import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel import (conftest does it too)

import pytest  # noqa: E402
import dsv4_compile.model.ops  # noqa: E402,F401  (registers torch.ops.dsv4.*)
from dsv4_compile.kernels.indexer_topk_cached import indexer_topk_cached, naive  # noqa: E402
from dsv4_compile.model.kv_layout import pack_indexer_keys, unpack_indexer_keys  # noqa: E402
from indexer_inputs import (DEVICE, assert_substituted, fp4_cache_inputs, fp4_gauss, fp8_cache,  # noqa: E402
                            fp8_cache_inputs)

dsv4 = torch.ops.dsv4
INPUTS = {"fp4": fp4_cache_inputs, "fp8": fp8_cache_inputs}

# (B, S, H, d, N, ratio, topk): decode (S = 1) and a few queries a sequence
CASES = [
    pytest.param((3, 1, 5, 32, 37, 4, 13), id="B3-S1-H5-d32-N37-k13"),
    pytest.param((2, 1, 3, 64, 23, 4, 30), id="B2-S1-H3-d64-N23-k30-pad"),
    pytest.param((1, 3, 17, 32, 50, 2, 7), id="B1-S3-H17-d32-N50-r2-k7"),
]


def scores64(q, w, keys):
    return torch.einsum("bshd,bnd->bshn", q.double(), keys.double()).relu().mul(w.double().unsqueeze(-1)).sum(2)


def assert_scores_exact(q, w, keys):
    """The inputs' premise: fp32 scores equal float64 ones (so every summation order selects alike)."""
    s32 = torch.einsum("bshd,bnd->bshn", q.float(), keys.float()).relu().mul(w.float().unsqueeze(-1)).sum(2)
    assert torch.equal(s32.double().cpu(), scores64(q.cpu(), w.cpu(), keys.cpu())), "scores not exact in fp32"


@pytest.mark.parametrize("config", [None, "selection=threshold", "selection=threshold,block_n=32,buffer_factor=4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["q-fp32", "q-bf16"])
@pytest.mark.parametrize("fmt", ["fp4", "fp8"])
@pytest.mark.parametrize("case", CASES)
def test_matches_naive_plain_and_unpacked_exactly(case, fmt, dtype, config):
    B, S, H, d, N, ratio, topk = case
    q, w, cache, pos = INPUTS[fmt](*case, dtype=dtype, seed=3)
    keys = unpack_indexer_keys(cache, d, fmt)
    assert_scores_exact(q, w, keys)
    out = indexer_topk_cached(q, w, cache, pos, ratio, topk, fmt, config)
    assert out.dtype == torch.int32 and out.shape == (B, S, topk)
    ref = dsv4.indexer_topk(q, w, keys, pos, ratio, topk)
    assert torch.equal(out, ref)
    assert torch.equal(dsv4.indexer_topk_cached(q, w, cache, pos, ratio, topk, fmt), ref)
    assert torch.equal(naive.indexer_topk_cached(q, w, cache, pos, ratio, topk, fmt).cpu(), ref.cpu())
    assert (ref == -1).any() and (ref >= 16).any()                         # padding; keys past one tile


def test_fp8_keys_need_the_residual_dots():
    """The FP8 inputs' ties are broken below bf16's resolution: rounding the keys to bf16 changes the
    selection, so the bf16-q path's equality above shows its residual dots at work."""
    case = (3, 1, 5, 32, 37, 4, 13)
    q, w, cache, pos = fp8_cache_inputs(*case, dtype=torch.bfloat16, seed=3)
    keys = unpack_indexer_keys(cache, 32, "fp8")
    assert not torch.equal(keys.bfloat16().float(), keys)
    assert not torch.equal(dsv4.indexer_topk(q, w, keys.bfloat16().float(), pos, 4, 13),
                           dsv4.indexer_topk(q, w, keys, pos, 4, 13))


@pytest.mark.parametrize("fmt", ["fp4", "fp8"])
def test_model_like_gaussian_keys_selected_scores_match(fmt):
    """FP4-simulated Gaussian keys (the model's: Hadamard, e2m1, power-of-two scales) packed in either
    format and bf16 FP4-simulated q: the selected keys' float64 scores match the plain op's (only the
    summation order differs; a near-tie may swap)."""
    g = torch.Generator().manual_seed(5)
    B, S, H, d, N, ratio, topk = 2, 1, 4, 64, 45, 4, 11
    keys = fp4_gauss((B, N, d), g, spread=3)
    cache = pack_indexer_keys(keys, fmt).to(DEVICE)
    q = fp4_gauss((B, S, H, d), g).bfloat16().to(DEVICE)
    w = torch.randn(B, S, H, generator=g).to(DEVICE)
    pos = torch.tensor([[N * ratio - 1], [70]], device=DEVICE)
    for config in (None, "selection=threshold"):
        out = indexer_topk_cached(q, w, cache, pos, ratio, topk, fmt, config).cpu()
        ref = dsv4.indexer_topk_cached(q, w, cache, pos, ratio, topk, fmt).cpu()
        assert torch.equal(out < 0, ref < 0), "the -1 padding differs"
        s = scores64(q.cpu(), w.cpu(), unpack_indexer_keys(cache, d, fmt).cpu())
        pick = lambda idx: torch.where(idx >= 0, s.gather(-1, idx.long().clamp_min(0)), 0.0)  # noqa: E731
        a, b = pick(out), pick(ref)
        assert ((a - b).abs() <= 1e-5 * b.abs().max()).all(), "selected scores differ"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["q-fp32", "q-bf16"])
def test_special_bytes(dtype):
    """Bytes the model never writes, decoded as unpack_indexer_keys does: an e8m0 scale of 255 (inf:
    inf and NaN keys), of 0 (2^-127, subnormal keys that still score; CPU only: whether the compiled
    kernel keeps fp32 subnormals through the MMA is not checked), e4m3 NaN codes, -0 codes, an FP8
    scale of inf. The selection (NaN first) equals the plain op's and the naive twin's."""
    B, S, H, d, N, ratio, topk = 1, 2, 3, 32, 21, 4, 9
    q, w, cache4, pos = fp4_cache_inputs(B, S, H, d, N, ratio, topk, dtype=dtype, seed=7)
    pos = torch.tensor([[N * ratio - 1, 40]], device=DEVICE)
    cache4 = cache4.clone()
    cache4[0, 2, d // 2] = 255                                              # key 2: inf / NaN values
    if DEVICE == "cpu":
        cache4[0, 5, d // 2] = 0                                            # key 5: 2^-127 scale
    cache4[0, 6, :d // 2] = 0x88                                            # key 6: -0.0 codes
    g = torch.Generator().manual_seed(8)
    codes = torch.randint(-6, 7, (B, N, d), generator=g).float()
    cache8 = fp8_cache(codes, torch.full((B, N), 0.375)).to(DEVICE)
    cache8[0, 3, 4] = 0x7F                                                  # key 3: a NaN code
    cache8[0, 9, d:] = torch.tensor([0, 0, 0x80, 0x7F], dtype=torch.uint8)  # key 9: scale +inf
    for fmt, cache in (("fp4", cache4), ("fp8", cache8)):
        keys = unpack_indexer_keys(cache, d, fmt)
        assert keys.isnan().any() and (keys.isinf().any() or fmt == "fp8")
        ref = dsv4.indexer_topk(q, w, keys, pos, ratio, topk)
        for config in (None, "selection=threshold"):
            assert torch.equal(indexer_topk_cached(q, w, cache, pos, ratio, topk, fmt, config), ref), (fmt, config)
        assert torch.equal(naive.indexer_topk_cached(q, w, cache, pos, ratio, topk, fmt).cpu(), ref.cpu()), fmt
    if DEVICE == "cpu":
        assert unpack_indexer_keys(cache4, d, "fp4")[0, 5].abs().max() == 6 * 2.0 ** -127


def test_empty_inputs_and_checks():
    q, w, cache, pos = fp4_cache_inputs(2, 1, 3, 32, 9, 4, 5)
    assert (indexer_topk_cached(q, w, cache[:, :0].contiguous(), pos, 4, 5, "fp4") == -1).all()
    assert indexer_topk_cached(q, w, cache, pos, 4, 0, "fp4").shape == (2, 1, 0)
    with pytest.raises(ValueError, match="fmt 'fp6'; accepted: fp4, fp8"):
        indexer_topk_cached(q, w, cache, pos, 4, 5, "fp6")
    with pytest.raises(ValueError, match=r"need \[B, N, entry_bytes\] = \[2, N, 36\]"):
        indexer_topk_cached(q, w, cache, pos, 4, 5, "fp8")
    with pytest.raises(ValueError, match="head dim 16 with fmt fp4; need a multiple of 32"):
        indexer_topk_cached(q[..., :16].contiguous(), w, cache, pos, 4, 5, "fp4")
    with pytest.raises(ValueError, match="index_cache is torch.float32"):
        indexer_topk_cached(q, w, cache.float(), pos, 4, 5, "fp4")
    with pytest.raises(ValueError, match="score_mma='fp8'; the packed cache takes score_mma=bf16"):
        indexer_topk_cached(q.bfloat16(), w, cache, pos, 4, 5, "fp4", "score_mma=fp8")
    with pytest.raises(ValueError, match="positions is torch.int32"):
        indexer_topk_cached(q, w, cache, pos.int(), 4, 5, "fp4")


def test_decode_key_splits(monkeypatch):
    """Decode's radix path splits each query's key tiles over programs (the grid's second axis): with
    more programs than tiles every tile is its own program, with fewer each program takes several;
    the picks do not change."""
    import importlib

    kernel = importlib.import_module("dsv4_compile.kernels.indexer_topk.indexer_topk")
    case = (2, 1, 3, 32, 75, 4, 20)
    q, w, cache, pos = fp4_cache_inputs(*case, dtype=torch.bfloat16, seed=9)
    ref = dsv4.indexer_topk_cached(q, w, cache, pos, 4, 20, "fp4")
    grids = []
    launch = kernel.launch
    monkeypatch.setattr(kernel, "launch", lambda k, grid, *a, **kw: (grids.append(grid), launch(k, grid, *a, **kw)))
    for programs in (1, 4, 64):
        monkeypatch.setattr(kernel, "persistent_programs", lambda device, n=programs: n)
        assert torch.equal(indexer_topk_cached(q, w, cache, pos, 4, 20, "fp4", "block_n=16"), ref), programs
    splits = [g[1] for g in grids if len(g) == 2]
    assert splits == [1, 2, 5], splits                                      # min(tiles 5, cdiv(programs, B 2))


def test_torch_op_and_substitution():
    """The dsv4_triton op, and the pass: the same picks as eager, 1 node substituted, ops before/after."""
    from dsv4_compile.passes.kernel_substitutions.indexer_topk_cached import SUBSTITUTION, interpreter_substitution

    q, w, cache, pos = fp4_cache_inputs(3, 1, 3, 32, 17, 4, 6, seed=6)
    ref = dsv4.indexer_topk_cached(q, w, cache, pos, 4, 6, "fp4")
    assert torch.equal(ref, torch.ops.dsv4_triton.indexer_topk_cached(q, w, cache, pos, 4, 6, "fp4", ""))

    def fn(q, w, cache, pos):
        return dsv4.indexer_topk_cached(q * 2, w, cache, pos, 4, 6, "fp4")

    assert_substituted(fn, (q, w, cache, pos), SUBSTITUTION, interpreter_substitution(), "indexer_topk_cached")


def test_substitution_predicate_and_decode_config():
    """The predicate names what it refuses; the config is the tuned decode entry of the smallest batch
    >= B x S (else the kernel's decode default)."""
    from dsv4_compile.kernels.indexer_topk.config import IndexerTopkConfig
    from dsv4_compile.kernels.indexer_topk_cached.config import default_config
    from dsv4_compile.passes import Target
    from dsv4_compile.passes.kernel_substitutions import indexer_topk_cached as sub

    q, w, cache, pos = fp4_cache_inputs(3, 1, 3, 32, 17, 4, 6, seed=6)
    assert sub._reason(q, w, cache, pos, 4, 6, "fp4", allow_cpu=True) is None
    assert "fp6" in sub._reason(q, w, cache, pos, 4, 6, "fp6", allow_cpu=True)
    assert "need uint8 [B, N, 36]" in sub._reason(q, w, cache, pos, 4, 6, "fp8", allow_cpu=True)
    assert "multiple of 32" in sub._reason(q[..., :16], w, cache, pos, 4, 6, "fp4", allow_cpu=True)
    assert "int64" in sub._reason(q, w, cache, pos.int(), 4, 6, "fp4", allow_cpu=True)
    gpu = "H100" if DEVICE == "cuda" else "interpreter"
    def config(target):
        return IndexerTopkConfig.from_str(sub.SUBSTITUTION.config(target, q, w, cache, pos, 4, 6, "fp4")["config"])

    assert config(Target(gpu="H100")) == default_config(gpu)
    tuned = {"entries": {"b2": {"phase": "decode", "batch": 2, "config": {"block_n": 32}},
                         "b64": {"phase": "decode", "batch": 64, "config": {"block_n": 128, "selection": "threshold"}}}}
    assert config(Target(gpu="H100", table=tuned)) == default_config(gpu).replace(block_n=128, selection="threshold")


def test_op_schema_and_opcheck():
    """torch.ops.dsv4_triton.indexer_topk_cached mirrors dsv4.indexer_topk_cached plus `config`, and
    passes torch.library.opcheck (schema, fake tensor, dynamic-shape AOT dispatch)."""
    ours = torch.ops.dsv4_triton.indexer_topk_cached.default._schema
    plain = torch.ops.dsv4.indexer_topk_cached.default._schema
    assert [a.name for a in ours.arguments] == [a.name for a in plain.arguments] + ["config"]
    assert [str(a.type) for a in ours.arguments[:-1]] == [str(a.type) for a in plain.arguments]
    q, w, cache, pos = fp4_cache_inputs(1, 1, 2, 32, 9, 4, 4, seed=8)
    torch.library.opcheck(torch.ops.dsv4_triton.indexer_topk_cached.default, (q, w, cache, pos, 4, 4, "fp4", ""),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


# ================================================================================================
# GPU: V4's indexer (64 heads x 128 dims, top-512) at decode over 32K keys
# ================================================================================================

@pytest.mark.gpu
@pytest.mark.parametrize("config", [None, "selection=threshold", "block_n=128", "selection=threshold,block_n=128"])
@pytest.mark.parametrize("B", [1, 8])
def test_gpu_real_shapes_exact_fp4(B, config):
    """Exact FP4 inputs (dyadic q, e2m1 x 1/2 keys: scores exact in fp32 at 64 x 128), bf16 q, sequences
    at different positions (the first sees fewer than 512 keys): the plain op's picks, ties included."""
    H, d, N, ratio, topk = 64, 128, 32768, 4, 512
    q, w, cache, _ = fp4_cache_inputs(B, 1, H, d, N, ratio, topk, dtype=torch.bfloat16, seed=12)
    pos = ((torch.arange(B, device=DEVICE) + 1) * N * ratio // B - 1).view(B, 1)
    pos[0] = 300 * ratio                                                    # 301 keys < topk: -1 padding
    ref = dsv4.indexer_topk_cached(q, w, cache, pos, ratio, topk, "fp4")
    assert torch.equal(indexer_topk_cached(q, w, cache, pos, ratio, topk, "fp4", config), ref)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["fp4", "fp8"])
@pytest.mark.parametrize("B", [1, 8])
def test_gpu_real_shapes_model_like(B, fmt):
    """The model's keys (FP4-simulated Gaussians) packed in either format, bf16 FP4-simulated q, at
    decode over 32K keys: selected scores within 1e-5 of the plain op's (summation order only), the
    same -1 padding, and (FP4: exact products) at most a few picks outside the plain op's set."""
    H, d, N, ratio, topk = 64, 128, 32768, 4, 512
    g = torch.Generator().manual_seed(13)
    cache = torch.cat([pack_indexer_keys(fp4_gauss((1, N, d), g), fmt) for _ in range(B)]).to(DEVICE)
    q = fp4_gauss((B, 1, H, d), g).bfloat16().to(DEVICE)
    w = (torch.randn(B, 1, H, generator=g) / 8).bfloat16().to(DEVICE)
    pos = torch.tensor([N * ratio - 1 - 977 * b for b in range(B)], device=DEVICE).view(B, 1)
    ref = dsv4.indexer_topk_cached(q, w, cache, pos, ratio, topk, fmt)
    s = scores64(q, w, unpack_indexer_keys(cache, d, fmt))
    for config in (None, "selection=threshold"):
        out = indexer_topk_cached(q, w, cache, pos, ratio, topk, fmt, config)
        assert torch.equal(out < 0, ref < 0), "the -1 padding differs"
        pick = lambda idx: torch.where(idx >= 0, s.gather(-1, idx.long().clamp_min(0)), 0.0)  # noqa: E731
        a, b = pick(out), pick(ref)
        assert ((a - b).abs() <= 1e-5 * b.abs().max()).all(), "selected scores differ"
        outside = (~(out.unsqueeze(-1) == ref.unsqueeze(-2)).any(-1)).sum().item()
        assert outside <= math.ceil(0.01 * B * topk), f"{outside} picks outside the plain op's set"
