"""Sparse attention over the FP8 cache (dsv4_triton.sparse_attention_cached) against its naive twin
(byte-level decoding of the entries) and the plain op (kv_layout.unpack_main_entries).

The cache values are exact in q's dtype for bf16/fp32 (e4m3 code x power of two, bf16 rope values),
so the tolerances are those of the unquantised kernel (see test_sparse_attention.py): fp32 1e-5
(summation order), bf16 5e-3 and fp16 1e-3 (probabilities and output each rounded once). For fp16
the dequantised values are rounded to fp16 first, as the plain op does; the reference gets the same.
"""
import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel import (conftest does it too)

import pytest  # noqa: E402
from torch.fx.experimental.proxy_tensor import make_fx  # noqa: E402

import dsv4_compile.model.ops  # noqa: E402,F401  (registers torch.ops.dsv4.*)
from dsv4_compile.kernels.sparse_attention_cached import auto_config, auto_splits, entry_layout, naive, sparse_attention_cached  # noqa: E402
from dsv4_compile.model.kv_layout import main_entry_bytes, pack_main_entries  # noqa: E402
from dsv4_compile.model.ops import fp8_simulate  # noqa: E402
from helpers import assert_close  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 5e-3, torch.float16: 1e-3}
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16"),
          pytest.param(torch.float16, id="fp16")]

# (B, S, H, D, R, N, K): D - R a multiple of 64; tiny-preset head (96 = 64 + 32 rope) included.
SHAPES = [
    pytest.param((3, 1, 4, 128, 64, 13, 37), id="B3-S1-H4-D128-R64-N13-K37"),
    pytest.param((2, 2, 3, 96, 32, 9, 10), id="B2-S2-H3-D96-R32-N9-K10-tiny-preset"),
    pytest.param((1, 3, 5, 192, 64, 20, 23), id="B1-S3-H5-D192-R64-N20-K23-two-scales"),
]
CONFIGS = [pytest.param(None, id="default"), pytest.param("block_k=16,num_splits=3", id="bk16-split3"),
           pytest.param("block_k=16,num_splits=3,dequant=chunks", id="chunks-bk16-split3")]


def make_cache(B, N, D, R, seed=0, scale_exp=None):
    """Entries as the model writes them: FP8-simulated non-rope dims (pow2 scales, rows of very
    different magnitudes), BF16 rope dims; packed into the production layout."""
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(B, N, D, generator=g)
    kv = kv * torch.exp2(torch.randint(-6, 4, (B, N, 1), generator=g).float())
    kv = torch.cat([fp8_simulate(kv[..., :D - R], 64), kv[..., D - R:].bfloat16().float()], dim=-1)
    cache = pack_main_entries(kv, R)
    assert cache.shape[-1] == main_entry_bytes(D, R) == entry_layout(D, R)[1]
    return cache


def make_inputs(B, S, H, D, R, N, K, dtype, seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    q = torch.randn(B, S, H, D, generator=g).to(dtype)
    sink = torch.randn(H, generator=g)
    idx = torch.randint(-1, N, (B, S, K), generator=g, dtype=torch.int32)
    idx[0, 0, 1] = idx[0, 0, 0] = 2          # a repeated index
    idx[-1, -1, K // 2:] = -1                # a shorter sequence in the batch
    if B > 1:
        idx[1, 0] = -1                       # an empty row
    cache = make_cache(B, N, D, R, seed)
    return [t.to(DEVICE) for t in (q, cache, sink, idx)]


def reference(q, cache, sink, idx, scale, R):
    """float64 naive twin on the values the op attends over (dequantised, then rounded to q's dtype)."""
    kv = torch.stack([torch.tensor([naive.unpack_entry(row, q.shape[-1], R) for row in cache[b].tolist()])
                      for b in range(cache.shape[0])]).to(q.dtype)
    from dsv4_compile.kernels.sparse_attention import naive as attention_naive
    return attention_naive.sparse_attention(q.cpu().double(), kv.double(), sink.cpu(), idx.cpu(), scale)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_naive_and_plain(shape, dtype, config):
    B, S, H, D, R, N, K = shape
    q, cache, sink, idx = make_inputs(*shape, dtype)
    scale = D ** -0.5
    out = sparse_attention_cached(q, cache, sink, idx, scale, R, config)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close("kernel vs naive (float64)", reference(q, cache, sink, idx, scale, R), out.cpu(), TOL[dtype])
    plain = torch.ops.dsv4.sparse_attention_cached(q, cache, sink, idx, scale, R)
    assert_close("kernel vs plain op", plain.cpu(), out.cpu(), TOL[dtype])
    assert_close("naive vs plain op", plain.cpu(),
                 naive.sparse_attention_cached(q.cpu(), cache.cpu(), sink.cpu(), idx.cpu(), scale, R), TOL[dtype])
    if B > 1:
        assert (out[1, 0] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_split_d_is_exact(dtype):
    """split_d > 1 over the FP8 cache: each part dequantises its own columns (codes, the scale blocks
    from d0 / 64 on, the rope dims), and the output equals split_d = 1's bit for bit. D = 192 with 64
    rope dims, padded to 256: split_d = 2 gives parts [0, 128) (two scale blocks) and [128, 256) (rope,
    then padding); split_d = 4 gives one scale block, the second, rope, padding. Also vs the naive twin."""
    B, S, H, D, R, N, K = 2, 1, 5, 192, 64, 20, 23
    q, cache, sink, idx = make_inputs(B, S, H, D, R, N, K, dtype, seed=4)
    scale = D ** -0.5
    for base in ("block_k=16", "block_k=16,num_splits=2"):
        whole = sparse_attention_cached(q, cache, sink, idx, scale, R, base)
        for split_d in (2, 4):
            out = sparse_attention_cached(q, cache, sink, idx, scale, R, f"{base},split_d={split_d}")
            assert torch.equal(out, whole), f"{base},split_d={split_d}: differs from split_d=1"
    assert_close("split_d=4 vs naive (float64)", reference(q, cache, sink, idx, scale, R), out.cpu(), TOL[dtype])


@pytest.mark.parametrize("config", [None, "dequant=chunks"], ids=["tile", "chunks"])
def test_dequantisation_is_exact(config):
    """One-entry attention (sink -inf) returns the entry itself: checks every byte's decoding against
    the plain unpacking, bit for bit in fp32 (p = 1 exactly, one product each); D = 192 pads to 256:
    the chunks are two FP8 scale blocks, the rope dims, padding."""
    B, N, D, R = 1, 6, 192, 64
    cache = make_cache(B, N, D, R, seed=9).to(DEVICE)
    idx = torch.arange(N, dtype=torch.int32, device=DEVICE).view(1, N, 1)
    q = torch.zeros(1, N, 1, D, device=DEVICE)
    sink = torch.full((1,), -math.inf, device=DEVICE)
    out = sparse_attention_cached(q, cache, sink, idx, 1.0, R, config)
    from dsv4_compile.model.kv_layout import unpack_main_entries
    assert torch.equal(out[0, :, 0].cpu(), unpack_main_entries(cache.cpu(), D, R)[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_dequant_chunks_is_exact(dtype):
    """dequant="chunks" (64-column chunks: logits summed over the chunks, accumulator in chunks):
    - one chunk (D = 64, all FP8 or all rope): the same operations as the tile kernel, bit for bit,
      holes, an empty row and split-K included;
    - D = 192 (two scale blocks, rope, padding to 256): split_d 2 and 4 (each part its own value
      chunks of the same probabilities) equal split_d 1 bit for bit, with and without split-K; the
      tile kernel sums the logits in one dot, so only within the tolerances (fp32: last bits)."""
    for R in (0, 64):
        q, cache, sink, idx = make_inputs(3, 2, 5, 64, R, 11, 29, dtype, seed=6)
        for base in ("block_k=16", "block_k=16,num_splits=3"):
            tile = sparse_attention_cached(q, cache, sink, idx, 0.125, R, base)
            chunks = sparse_attention_cached(q, cache, sink, idx, 0.125, R, f"{base},dequant=chunks")
            assert torch.equal(chunks, tile), f"D=64 R={R} {base}: chunks differ from tile"
    B, S, H, D, R, N, K = 2, 1, 5, 192, 64, 20, 23
    q, cache, sink, idx = make_inputs(B, S, H, D, R, N, K, dtype, seed=7)
    for base in ("block_k=16,dequant=chunks", "block_k=16,num_splits=2,dequant=chunks"):
        whole = sparse_attention_cached(q, cache, sink, idx, D ** -0.5, R, base)
        for split_d in (2, 4):
            out = sparse_attention_cached(q, cache, sink, idx, D ** -0.5, R, f"{base},split_d={split_d}")
            assert torch.equal(out, whole), f"{base},split_d={split_d}: differs from split_d=1"
    tile = sparse_attention_cached(q, cache, sink, idx, D ** -0.5, R, "block_k=16,num_splits=2")
    assert_close("chunks vs tile", tile.cpu(), whole.cpu(), TOL[dtype])
    assert_close("chunks split_d=4 vs naive (float64)", reference(q, cache, sink, idx, D ** -0.5, R), out.cpu(),
                 TOL[dtype])


def test_auto_splits_and_checks():
    assert auto_splits(n_programs=64, K=640, block_k=32, n_sm=132) == 2
    assert auto_splits(n_programs=20, K=640, block_k=32, n_sm=132) == 6         # 120 programs: one wave
    assert auto_splits(n_programs=200, K=640, block_k=32, n_sm=132) == 1
    assert auto_splits(n_programs=1, K=64, block_k=32, n_sm=132) == 1
    from dsv4_compile.kernels.sparse_attention import SparseAttentionConfig
    base = SparseAttentionConfig(block_h=64, block_k=32, num_warps=8)
    # batch 64 x 64 heads: 64 programs -> 2 splits (128 programs, one wave on 132 SMs)
    assert auto_config(64, 1, 64, 640, base, 132) == base.replace(num_splits=2)
    assert auto_config(64, 1, 128, 640, base, 132) == base.replace(num_splits=1)   # 128 programs: enough
    assert auto_config(1, 1, 64, 640, base, 132) == base.replace(num_splits=10)    # at most K / (2 block_k)
    assert auto_config(512, 1, 64, 640, base, 132) == base
    q, cache, sink, idx = make_inputs(1, 1, 2, 128, 64, 5, 4, torch.float32)
    with pytest.raises(ValueError, match="need \\[B, N, entry_bytes\\]"):
        sparse_attention_cached(q, cache[..., :-8].contiguous(), sink, idx, 0.1, 64)
    with pytest.raises(ValueError, match="multiple of 64"):
        sparse_attention_cached(q, cache, sink, idx, 0.1, 32)


@pytest.mark.parametrize("dequant", ["tile", "chunks"])
@pytest.mark.parametrize("run", [1, 2, 3])
def test_splits_run_below_the_grids_split_axis(run, dequant):
    """A launch whose grid has 4 splits a token but runs `run` of them (an engine's dynamic batch: its
    count known at run time, split_count) equals the launch with `run` splits in the grid, and the naive
    twin: the programs past `run` return before writing anything, the workspace and the combine go by
    `run`. Bit for bit where both go through the workspace (run >= 2); one split run through it is
    normalised by the combine kernel instead of the main one (fp32 rounding apart)."""
    from dsv4_compile.kernels.sparse_attention import SparseAttentionConfig
    from dsv4_compile.kernels.sparse_attention.sparse_attention import launch_sparse_attention

    B, S, H, D, R, N, K = 3, 1, 4, 128, 64, 13, 37
    q, cache, sink, idx = make_inputs(B, S, H, D, R, N, K, torch.float32, seed=7)
    nope, entry = entry_layout(D, R)

    def launched(num_splits, run_splits):
        cfg = SparseAttentionConfig(block_h=16, block_k=16, num_splits=num_splits, num_warps=4, num_stages=1,
                                    dequant=dequant)
        out = torch.full(q.shape, float("nan"), device=DEVICE)
        launch_sparse_attention(q.to(DEVICE), cache.to(DEVICE), sink.to(DEVICE), idx.to(DEVICE), out, D ** -0.5,
                                cfg, N=N, kv_fp8=True, nope=nope, entry_bytes=entry, run_splits=run_splits)
        return out.cpu()

    out = launched(4, run)
    if run >= 2:
        assert torch.equal(out, launched(run, None))
    else:
        assert_close("one split run through the workspace vs none", launched(1, None), out, TOL[torch.float32])
    assert_close("run splits vs naive (float64)", reference(q, cache, sink, idx, D ** -0.5, R), out, TOL[torch.float32])


def test_split_count_of_a_symbolic_batch_is_evaluated_at_run_time():
    """At a symbolic batch B in [1, 64] (an engine's) the split count is an expression of B with no guard
    on it (the range intact), equal at every B to the count of that batch as an int; the grid's split axis
    (auto_config's num_splits) is one token's count, the most any batch takes."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from dsv4_compile.kernels.sparse_attention import SparseAttentionConfig
    from dsv4_compile.kernels.sparse_attention_cached.config import split_count

    base = SparseAttentionConfig(block_h=64, block_k=32, num_warps=8)
    env = ShapeEnv()
    b = env.create_unbacked_symint()
    torch._check(b >= 1)
    torch._check(b <= 64)
    count = split_count(b, 1, 64, 640, base, 132)
    assert not isinstance(count, int) and env.guards == []
    assert auto_config(b, 1, 64, 640, base, 132) == base.replace(num_splits=10)
    for batch in (1, 2, 13, 16, 20, 33, 64):
        assert int(count.node.expr.xreplace({b.node.expr: batch})) == split_count(batch, 1, 64, 640, base, 132)
    assert [split_count(batch, 1, 64, 640, base, 132) for batch in (1, 13, 20, 64)] == [10, 10, 6, 2]
    # split_launch: the launcher's (config, run_splits); a concrete batch launched as an engine launches it
    # (the benchmarks' --engine) takes the symbolic batch's grid and that batch's count
    from dsv4_compile.kernels.sparse_attention_cached.sparse_attention_cached import split_launch
    assert split_launch(b, 1, 64, 640, base, 132, True)[0] == base.replace(num_splits=10)
    assert split_launch(64, 1, 64, 640, base, 132, True) == (base.replace(num_splits=10), 2)
    assert split_launch(64, 1, 64, 640, base, 132, False) == (auto_config(64, 1, 64, 640, base, 132), None)


def test_substitution():
    from dsv4_compile.passes.kernel_substitutions.sparse_attention_cached import SUBSTITUTION, interpreter_substitution
    from dsv4_compile.passes import PassManager

    q, cache, sink, idx = make_inputs(2, 1, 4, 128, 64, 7, 12, torch.float32, seed=3)

    def fn(q, cache, sink, idx):
        return torch.ops.dsv4.sparse_attention_cached(q, cache, sink, idx, 0.2, 64)

    sub = SUBSTITUTION if DEVICE == "cuda" else interpreter_substitution()
    gm = make_fx(fn, tracing_mode="fake")(q, cache, sink, idx)
    manager = PassManager([sub], gpu="H100" if DEVICE == "cuda" else "cpu")
    manager(gm.graph)
    gm.recompile()
    assert manager.report.replaced("dsv4.sparse_attention_cached") == 1
    assert "dsv4.sparse_attention_cached.default" not in manager.graph_ops[0]["after"]
    assert_close("substituted graph", fn(q, cache, sink, idx).cpu(), gm(q, cache, sink, idx).cpu(), TOL[torch.float32])


def test_substitution_takes_the_entry_tuned_at_the_caches_size(tmp_path):
    """A decode engine's cache holds window + context / ratio entries: the config is the tuned entry of the
    smallest such size >= the node's (tuned like the H200 table: 8K / 32K / 128K at batch 64, N 2176 / 8320
    / 32896, and a batch-1 entry beside the 32K one), else the largest; before, every decode engine took
    the table's default (the 128K entry)."""
    from types import SimpleNamespace

    from dsv4_compile.kernels.sparse_attention.config import decode_default_config
    from dsv4_compile.passes.kernel_substitutions.sparse_attention_cached import SUBSTITUTION
    from dsv4_compile.tuning.tables import config_source, write_entries

    fields = {"8k": {"block_k": 64, "num_splits": 2}, "32k": {"block_k": 32, "num_splits": 4},
              "128k": {"block_k": 16, "num_splits": 2}}
    entries = [("sparse_attention_cached", f"decode-{c}-b64",
                {"phase": "decode", "context": n, "batch": 64, "config": fields[c], "latency_ms": 0.1,
                 "dims": {"B": 64, "S": 1, "N": 128 + n // 4}})
               for c, n in (("8k", 8192), ("32k", 32768), ("128k", 131072))]
    entries.append(("sparse_attention_cached", "decode-32k-b1",
                    {"phase": "decode", "context": 32768, "batch": 1, "config": {"block_k": 16, "num_splits": 8},
                     "latency_ms": 0.1, "dims": {"B": 1, "S": 1, "N": 8320}}))
    write_entries("H200", entries, tmp_path)
    table = config_source("sparse_attention_cached.triton", "H200", tmp_path)
    target = SimpleNamespace(gpu="H200", table=table)
    q = torch.empty(64, 1, 64, 512, device=DEVICE)
    default = decode_default_config("H200" if DEVICE == "cuda" else "interpreter")

    def config(n_entries):
        cache = torch.empty(64, n_entries, 584, dtype=torch.uint8, device="meta")   # its shape is what counts
        return SUBSTITUTION.config(target, q, cache, None, None, 0.1, 64)["config"]

    tuned = {c: default.replace(**f).to_str() for c, f in fields.items()}
    assert config(2176) == tuned["8k"] and config(192) == tuned["8k"]        # CSA at 8K; HCA's few entries
    assert config(8320) == tuned["32k"] and config(2177) == tuned["32k"]     # the batch-64 entry of that size
    assert config(32896) == config(10 ** 6) == tuned["128k"] != tuned["8k"]


@pytest.mark.gpu
@pytest.mark.parametrize("H", [64, 128], ids=["flash-H64", "pro-H128"])
def test_gpu_decode_real_shapes(H):
    """Batch 64 of sequences of different lengths over a V4 cache (584-byte entries), bf16 queries."""
    B, D, R, N, K = 64, 512, 64, 128 + 2048, 640
    g = torch.Generator(device=DEVICE).manual_seed(2)
    kv = torch.randn(B, N, D, device=DEVICE, generator=g)
    kv = torch.cat([fp8_simulate(kv[..., :D - R], 64), kv[..., D - R:].bfloat16().float()], dim=-1)
    cache = pack_main_entries(kv, R)
    lengths = torch.randint(1, K + 1, (B,), device=DEVICE, generator=g)
    idx = torch.randint(0, N, (B, 1, K), device=DEVICE, generator=g, dtype=torch.int32)
    idx = torch.where(torch.arange(K, device=DEVICE).view(1, 1, K) < lengths.view(B, 1, 1), idx, -1)
    q = torch.randn(B, 1, H, D, device=DEVICE, generator=g).bfloat16()
    sink = torch.randn(H, device=DEVICE, generator=g)
    ref = torch.ops.dsv4.sparse_attention_cached(q.float(), cache, sink, idx, D ** -0.5, R)
    for config in (None, "num_splits=1", "num_splits=4,block_k=64"):
        out = sparse_attention_cached(q, cache, sink, idx, D ** -0.5, R, config)
        assert not torch.isnan(out).any()
        assert_close(f"decode H{H} {config}", ref, out, TOL[torch.bfloat16])


# V4-Flash's decode shape: batch 64, 64 x 512 bf16 heads over 584-byte entries (64 rope dims), K = 640.
REAL_DECODE = dict(B=64, H=64, D=512, R=64, N=128 + 2048, K=640)


def _real_decode_case(seed: int):
    """(q, cache, sink, idx, ref): REAL_DECODE's inputs on the GPU, the second half of the batch with
    holes (shorter sequences), and the fp32 plain op's output."""
    B, H, D, R, N, K = REAL_DECODE.values()
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    kv = torch.randn(B, N, D, device=DEVICE, generator=g)
    kv = torch.cat([fp8_simulate(kv[..., :D - R], 64), kv[..., D - R:].bfloat16().float()], dim=-1)
    cache = pack_main_entries(kv, R)
    idx = torch.randint(0, N, (B, 1, K), device=DEVICE, generator=g, dtype=torch.int32)
    idx[B // 2:, :, K // 3:] = -1                                            # shorter sequences
    q = torch.randn(B, 1, H, D, device=DEVICE, generator=g).bfloat16()
    sink = torch.randn(H, device=DEVICE, generator=g)
    return q, cache, sink, idx, torch.ops.dsv4.sparse_attention_cached(q.float(), cache, sink, idx, D ** -0.5, R)


@pytest.mark.gpu
def test_gpu_decode_split_d_real_shapes():
    """Batch 64 over a V4 cache (584-byte entries), 64 x 512 bf16 heads: split_d = 2 against split_d = 1
    with the same other fields, bit for bit (see test_sparse_attention.py's GPU split_d test), and the
    4-warp split_d = 2 build (acc [64, 256] a warpgroup, 2 CTAs/SM by registers on sm_90a) against the
    fp32 plain op."""
    D, R = REAL_DECODE["D"], REAL_DECODE["R"]
    q, cache, sink, idx, ref = _real_decode_case(5)
    for base in ("block_k=16,num_splits=4", "block_k=32,num_splits=2"):
        whole = sparse_attention_cached(q, cache, sink, idx, D ** -0.5, R, base)
        split = sparse_attention_cached(q, cache, sink, idx, D ** -0.5, R, f"{base},split_d=2")
        assert not torch.isnan(split).any()
        assert torch.equal(split, whole), f"{base}: max |diff| {(split.float() - whole.float()).abs().max().item():.3g}"
        assert_close(f"decode {base},split_d=2", ref, split, TOL[torch.bfloat16])
    narrow = sparse_attention_cached(q, cache, sink, idx, D ** -0.5, R,
                                     "block_k=16,num_splits=4,num_warps=4,num_stages=1,split_d=2")
    assert_close("decode 4 warps split_d=2", ref, narrow, TOL[torch.bfloat16])


@pytest.mark.gpu
def test_gpu_decode_chunks_real_shapes():
    """dequant="chunks" at V4's decode shape (batch 64, 64 x 512 bf16 heads, 584-byte entries, holes):
    the spill-free builds of the compile report against the fp32 plain op, and split_d 2 against 1
    bit for bit (the same chunk dots; only the value chunks a program owns differ)."""
    D, R = REAL_DECODE["D"], REAL_DECODE["R"]
    q, cache, sink, idx, ref = _real_decode_case(11)
    for config in ("block_k=32,num_splits=4,dequant=chunks", "block_k=64,num_splits=4,dequant=chunks",
                   "block_k=32,num_splits=4,num_warps=4,split_d=2,dequant=chunks"):
        out = sparse_attention_cached(q, cache, sink, idx, D ** -0.5, R, config)
        assert not torch.isnan(out).any()
        assert_close(f"decode {config}", ref, out, TOL[torch.bfloat16])
    base = "block_k=16,num_splits=4,dequant=chunks"
    whole = sparse_attention_cached(q, cache, sink, idx, D ** -0.5, R, base)
    split = sparse_attention_cached(q, cache, sink, idx, D ** -0.5, R, f"{base},split_d=2")
    assert torch.equal(split, whole), f"max |diff| {(split.float() - whole.float()).abs().max().item():.3g}"


def test_op_schema_and_opcheck():
    ours = torch.ops.dsv4_triton.sparse_attention_cached.default._schema
    plain = torch.ops.dsv4.sparse_attention_cached.default._schema
    assert [a.name for a in ours.arguments] == [a.name for a in plain.arguments] + ["config"]
    assert [str(a.type) for a in ours.arguments[:-1]] == [str(a.type) for a in plain.arguments]
    q, cache, sink, idx = make_inputs(1, 1, 2, 128, 64, 5, 4, torch.float32, seed=8)
    torch.library.opcheck(torch.ops.dsv4_triton.sparse_attention_cached.default, (q, cache, sink, idx, 0.25, 64, ""),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
