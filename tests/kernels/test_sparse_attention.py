"""Sparse attention kernel (dsv4_triton.sparse_attention) against its naive twin and the plain op.

CPU: the Triton interpreter on small odd shapes (S not a multiple of anything, K not a power of two,
D not a power of two, -1 holes, repeated indices, rows with no entries), one head block and several,
one split and several. GPU (marked): the compiled kernel at the real head shapes in bf16.

Tolerances (relative RMS against a float64 reference computed from the same input values):
- float32: 1e-5. Operands are exact, dots are IEEE fp32 (not tf32), accumulation fp32: only the
  summation order differs (measured ~1.5e-7).
- bfloat16: 5e-3. Two roundings to bf16 (unit roundoff u = 2^-9): the probabilities before the
  second dot (as FlashAttention rounds them; RMS ~u/sqrt(3) = 1.1e-3 per term, averaged down over
  the K terms) and the output itself (~1.1e-3): measured ~2e-3; the bar is 2.5x that and below the
  generic REL_RMS_TOL of 1e-2.
- float16: 1e-3, the same two roundings with u = 2^-11 (measured ~2.7e-4).
Against the plain op (itself rounded once to q's dtype), the same bars hold (its error and ours add
up to at most about sqrt(2) of the above).
"""
import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel import (conftest does it too)

import pytest  # noqa: E402
from torch.fx.experimental.proxy_tensor import make_fx  # noqa: E402

import dsv4_compile.model.ops  # noqa: E402,F401  (registers torch.ops.dsv4.*)
from dsv4_compile.kernels.sparse_attention import SparseAttentionConfig, naive, sparse_attention  # noqa: E402
from dsv4_compile.kernels.sparse_attention.config import value_split  # noqa: E402
from helpers import assert_close  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 5e-3, torch.float16: 1e-3}
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16"),
          pytest.param(torch.float16, id="fp16")]

# (B, S, H, D, N, K)
SHAPES = [
    pytest.param((2, 7, 4, 64, 11, 37), id="B2-S7-H4-D64-N11-K37"),
    pytest.param((1, 9, 3, 24, 9, 9), id="B1-S9-H3-D24-N9-K9-odd-D"),
    pytest.param((1, 1, 4, 32, 13, 6), id="B1-S1-H4-D32-N13-K6-decode"),
    pytest.param((3, 5, 1, 16, 4, 7), id="B3-S5-H1-D16-N4-K7-repeats"),
    pytest.param((1, 3, 20, 32, 30, 50), id="B1-S3-H20-D32-N30-K50-two-head-blocks"),
    # split: the combine's head blocks of 4 (one partial) and column blocks of 128 (the last partial)
    pytest.param((1, 1, 5, 320, 40, 60), id="B1-S1-H5-D320-N40-K60-wide-D"),
]
CONFIGS = [pytest.param(None, id="default"),
           pytest.param("block_k=16,num_splits=3", id="bk16-split3")]


def make_inputs(B, S, H, D, N, K, dtype, seed=0):
    """Random q, kv, sink and indices in [-1, N) with holes, a repeated index and an empty row."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S, H, D, generator=g).to(dtype)
    kv = torch.randn(B, N, D, generator=g).to(dtype)
    sink = torch.randn(H, generator=g)
    idx = torch.randint(-1, N, (B, S, K), generator=g, dtype=torch.int32)
    idx[0, 0, -1] = idx[0, 0, 0] = 0 if N else -1  # a repeated index (counts twice)
    if S > 1:
        idx[-1, S // 2] = -1  # a row with no entries
    return [t.to(DEVICE) for t in (q, kv, sink, idx)]


def reference(q, kv, sink, idx, scale):
    """float64 naive twin on the same input values (on the CPU)."""
    return naive.sparse_attention(q.double(), kv.double(), sink, idx, scale).cpu()


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_naive_and_plain(shape, dtype, config):
    q, kv, sink, idx = make_inputs(*shape, dtype)
    scale = shape[3] ** -0.5
    out = sparse_attention(q, kv, sink, idx, scale, config)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close("kernel vs naive (float64)", reference(q, kv, sink, idx, scale), out.cpu(), TOL[dtype])
    assert_close("kernel vs plain op", torch.ops.dsv4.sparse_attention(q, kv, sink, idx, scale).cpu(), out.cpu(),
                 TOL[dtype])
    # The naive twin in q's dtype agrees with the plain op (two independent versions of the contract).
    assert_close("naive vs plain op", torch.ops.dsv4.sparse_attention(q, kv, sink, idx, scale).cpu(),
                 naive.sparse_attention(q, kv, sink, idx, scale).cpu(), TOL[dtype])


SPLIT_D_SHAPES = [
    pytest.param((1, 9, 3, 24, 9, 9), id="B1-S9-H3-D24-odd-D"),              # 2 parts of 16 columns, 8 padded
    pytest.param((1, 2, 20, 48, 30, 21), id="B1-S2-H20-D48-two-head-blocks"),  # 4 parts of 16, the last padded
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SPLIT_D_SHAPES)
def test_split_d_is_exact(shape, dtype):
    """split_d > 1 (each program owns a part of the output columns, the logits and softmax statistics
    recomputed in each) gives split_d = 1's output bit for bit: the same logits and rounded
    probabilities, and each column the same reduction over K; also against the naive twin."""
    q, kv, sink, idx = make_inputs(*shape, dtype, seed=11)
    scale = shape[3] ** -0.5
    ref = reference(q, kv, sink, idx, scale)
    for base in ("block_k=16", "block_k=16,num_splits=3"):
        whole = sparse_attention(q, kv, sink, idx, scale, base)
        for split_d in (2, 4):
            out = sparse_attention(q, kv, sink, idx, scale, f"{base},split_d={split_d}")
            assert torch.equal(out, whole), f"{base},split_d={split_d}: differs from split_d=1"
        assert_close(f"{base} vs naive (float64)", ref, out.cpu(), TOL[dtype])


@pytest.mark.parametrize("sink_value", [-math.inf, 0.0, 30.0], ids=["sink-inf", "sink0", "sink30"])
def test_empty_rows_are_zero_and_sink(sink_value):
    q, kv, _, idx = make_inputs(2, 4, 3, 16, 6, 5, torch.float32, seed=3)
    idx[0, 1] = -1
    sink = torch.full((3,), sink_value, device=DEVICE)
    out = sparse_attention(q, kv, sink, idx, 0.3, "block_k=16,num_splits=2")
    empty = (idx < 0).all(-1)
    assert int(empty.sum()) == 2
    assert (out[empty] == 0).all() and torch.isfinite(out).all()
    assert_close("with sink", reference(q, kv, sink, idx, 0.3), out.cpu(), TOL[torch.float32])


def test_nan_stays_in_its_row():
    """NaN in q reaches only its (token, head); NaN in kv row 0, which the -1 holes would read after a
    clamp, reaches no row that does not select it."""
    q, kv, sink, idx = make_inputs(1, 6, 4, 16, 8, 10, torch.float32, seed=4)
    idx[0] = torch.where(idx[0] == 0, 1, idx[0])  # nobody selects row 0 ...
    idx[0, :, -1] = -1                            # ... while every row has holes
    kv[0, 0, 3] = float("nan")
    q[0, 2, 1, 5] = float("nan")
    out = sparse_attention(q, kv, sink, idx, 0.25)
    nan = torch.isnan(out).any(-1)                # [B, S, H]
    assert nan[0, 2, 1] and int(nan.sum()) == 1
    idx[0, 4, 0] = 0                              # now token 4 selects the NaN row: all its heads
    out = sparse_attention(q, kv, sink, idx, 0.25)
    assert torch.isnan(out[0, 4]).all(-1).all()


def test_indices_order_and_holes_do_not_matter():
    q, kv, sink, idx = make_inputs(1, 5, 4, 32, 12, 24, torch.float32, seed=5)
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    a = sparse_attention(q, kv, sink, idx, 0.2, "block_k=16")
    b = sparse_attention(q, kv, sink, idx[..., perm].contiguous(), 0.2, "block_k=16,num_splits=2")
    assert_close("permuted", a.cpu(), b.cpu(), TOL[torch.float32])


def test_config_api_and_input_checks():
    cfg = SparseAttentionConfig.from_str("block_k=64,num_splits=2")
    assert (cfg.block_k, cfg.num_splits) == (64, 2)
    assert SparseAttentionConfig.from_str(cfg.to_str()) == cfg
    with pytest.raises(ValueError, match="tl.dot needs >= 16"):
        SparseAttentionConfig(block_k=8)
    with pytest.raises(ValueError, match="power of two"):
        SparseAttentionConfig(block_h=48)
    with pytest.raises(ValueError, match="split_d = 3: must be a power of two"):
        SparseAttentionConfig(split_d=3)
    # each column part keeps >= 16 columns (>= 64, one scale block, over the FP8 cache)
    assert value_split(24, SparseAttentionConfig(split_d=4)) == 2                # padded 32 = 2 x 16
    assert value_split(16, SparseAttentionConfig(split_d=2)) == 1
    assert value_split(512, SparseAttentionConfig(split_d=2), kv_fp8=True) == 2
    assert value_split(96, SparseAttentionConfig(split_d=4), kv_fp8=True) == 2   # padded 128 = 2 x 64
    with pytest.raises(ValueError, match="dequant = 'rows': choose one of"):
        SparseAttentionConfig(dequant="rows")
    q, kv, sink, idx = make_inputs(1, 3, 2, 16, 5, 4, torch.float32)
    with pytest.raises(ValueError, match="dequant='chunks' is for the FP8 cache"):
        sparse_attention(q, kv, sink, idx, 0.1, "dequant=chunks")
    with pytest.raises(ValueError, match="topk_idxs is torch.int64"):
        sparse_attention(q, kv, sink, idx.long(), 0.1)
    with pytest.raises(ValueError, match="kv is torch.bfloat16"):
        sparse_attention(q, kv.bfloat16(), sink, idx, 0.1)
    with pytest.raises(ValueError, match="need \\[B, N, D\\]"):
        sparse_attention(q, kv[..., :8].contiguous(), sink, idx, 0.1)
    out = sparse_attention(q, kv, sink, idx, 0.1, {"block_k": 16})
    assert_close("dict config", reference(q, kv, sink, idx, 0.1), out.cpu(), TOL[torch.float32])


def test_torch_op_and_substitution():
    """The dsv4_triton op, and the pass: numbers vs eager, 1 node substituted, ops before/after."""
    from dsv4_compile.passes.kernel_substitutions.sparse_attention import SUBSTITUTION, interpreter_substitution
    from dsv4_compile.passes import PassManager

    q, kv, sink, idx = make_inputs(1, 5, 4, 32, 9, 7, torch.float32, seed=6)
    ref = torch.ops.dsv4.sparse_attention(q, kv, sink, idx, 0.2)
    assert_close("op", ref.cpu(), torch.ops.dsv4_triton.sparse_attention(q, kv, sink, idx, 0.2, "").cpu(),
                 TOL[torch.float32])

    def fn(q, kv, sink, idx):
        return torch.ops.dsv4.sparse_attention(q * 2, kv, sink, idx, 0.2)

    sub = SUBSTITUTION if DEVICE == "cuda" else interpreter_substitution()
    gm = make_fx(fn, tracing_mode="fake")(q, kv, sink, idx)
    manager = PassManager([sub], gpu="H100" if DEVICE == "cuda" else "cpu")
    manager(gm.graph)
    gm.recompile()
    before, after = manager.graph_ops[0]["before"], manager.graph_ops[0]["after"]
    assert before["dsv4.sparse_attention.default"] == 1 and "dsv4.sparse_attention.default" not in after
    assert manager.report.replaced("dsv4.sparse_attention") == 1
    assert_close("substituted graph", fn(q, kv, sink, idx).cpu(), gm(q, kv, sink, idx).cpu(), TOL[torch.float32])
    if DEVICE == "cpu":  # the registered substitution declines CPU tensors, with its reason
        gm = make_fx(fn, tracing_mode="fake")(q, kv, sink, idx)
        manager = PassManager([SUBSTITUTION], gpu="cpu")
        manager(gm.graph)
        assert "needs CUDA tensors" in manager.report.left_alone()[0].reason


# ================================================================================================
# GPU: the real head shapes (V4-Flash 64 x 512, V4-Pro 128 x 512, one shared K=V head), bf16
# ================================================================================================

def csa_indices(B, S, window, n_compressed_topk, ratio, seed=0, device=DEVICE):
    """Window (t-window+1..t) + up to n_compressed_topk distinct visible compressed entries (stored
    after the S raw tokens), -1 where fewer are visible: the model's prefill index layout."""
    g = torch.Generator(device=device).manual_seed(seed)
    t = torch.arange(S, device=device)
    win = t[:, None] - window + 1 + torch.arange(window, device=device)[None, :]
    win = torch.where(win >= 0, win, -1)
    n_c = S // ratio
    visible = (t + 1) // ratio                                                # [S]
    score = torch.rand(S, max(n_c, 1), generator=g, device=device)
    score = torch.where(torch.arange(max(n_c, 1), device=device)[None, :] < visible[:, None], score, -1.0)
    top = score.topk(min(n_compressed_topk, max(n_c, 1)), dim=-1)
    comp = torch.where(top.values >= 0, top.indices + S, -1)
    if comp.shape[-1] < n_compressed_topk:
        comp = torch.nn.functional.pad(comp, (0, n_compressed_topk - comp.shape[-1]), value=-1)
    idx = torch.cat([win, comp], dim=-1).to(torch.int32)
    return idx.unsqueeze(0).expand(B, S, -1).contiguous()


@pytest.mark.gpu
@pytest.mark.parametrize("H", [64, 128], ids=["flash-H64", "pro-H128"])
def test_gpu_real_shapes_bf16(H):
    B, S, D, ratio = 1, 1000, 512, 4
    idx = csa_indices(B, S, 128, 512, ratio)                                  # K = 640
    N = S + S // ratio
    g = torch.Generator(device=DEVICE).manual_seed(1)
    q = torch.randn(B, S, H, D, device=DEVICE, generator=g).bfloat16()
    kv = torch.randn(B, N, D, device=DEVICE, generator=g).bfloat16()
    sink = torch.randn(H, device=DEVICE, generator=g)
    ref = torch.ops.dsv4.sparse_attention(q.float(), kv.float(), sink, idx, D ** -0.5)  # fp32 plain op
    for config in (None, "num_splits=2", "block_k=64,num_stages=1"):
        out = sparse_attention(q, kv, sink, idx, D ** -0.5, config)
        assert not torch.isnan(out).any(), f"{config}: unwritten or NaN outputs"
        assert_close(f"H{H} {config}", ref, out, TOL[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.parametrize("base", ["block_k=32,num_stages=2", "block_k=64,num_stages=1"])
def test_gpu_split_d_real_shapes(base):
    """V4-Flash heads (64 x 512), bf16, the csa index set: split_d = 2 (acc [64, 256]; these configs
    compile to 195 / 255 registers with 0 / 148 bytes of spill and fit shared memory on sm_90a, see
    bench/results/H200/attention_compile_report.md) against split_d = 1 with the same other fields, bit
    for bit (same logits dot and softmax reductions; each output column the same k-ordered MMA
    reduction whatever the tile's width: a failure here means the column split changed a reduction
    order on this GPU, and the claim in kernels/sparse_attention must be relaxed), and against the
    fp32 plain op."""
    B, S, H, D = 1, 1000, 64, 512
    idx = csa_indices(B, S, 128, 512, 4)                                      # K = 640
    g = torch.Generator(device=DEVICE).manual_seed(3)
    q = torch.randn(B, S, H, D, device=DEVICE, generator=g).bfloat16()
    kv = torch.randn(B, S + S // 4, D, device=DEVICE, generator=g).bfloat16()
    sink = torch.randn(H, device=DEVICE, generator=g)
    ref = torch.ops.dsv4.sparse_attention(q.float(), kv.float(), sink, idx, D ** -0.5)
    whole = sparse_attention(q, kv, sink, idx, D ** -0.5, base)
    split = sparse_attention(q, kv, sink, idx, D ** -0.5, f"{base},split_d=2")
    assert not torch.isnan(split).any(), "unwritten or NaN outputs"
    assert torch.equal(split, whole), f"max |diff| {(split.float() - whole.float()).abs().max().item():.3g}"
    assert_close(f"{base},split_d=2 vs plain op", ref, split, TOL[torch.bfloat16])
    # one warpgroup, acc [64, 256]: 233 registers, no spill, 112 KB, 2 CTAs/SM on sm_90a
    narrow = sparse_attention(q, kv, sink, idx, D ** -0.5, "block_k=16,num_warps=4,num_stages=2,split_d=2")
    assert_close("4 warps, split_d=2 vs plain op", ref, narrow, TOL[torch.bfloat16])


@pytest.mark.gpu
def test_gpu_fp16_and_fp32_small():
    for dtype in (torch.float16, torch.float32):
        q, kv, sink, idx = make_inputs(2, 33, 8, 96, 40, 70, dtype, seed=7)
        out = sparse_attention(q, kv, sink, idx, 0.1)
        assert_close(f"{dtype}", reference(q.cpu(), kv.cpu(), sink.cpu(), idx.cpu(), 0.1), out.cpu(), TOL[dtype])


@pytest.mark.gpu
def test_gpu_compile_substitutes_the_kernel(tmp_path, monkeypatch):
    """dsv4_compile.compile on CUDA: the node becomes the Triton kernel inside the Inductor graph."""
    import dsv4_compile

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch._dynamo.reset()

    class Attn(torch.nn.Module):
        def forward(self, q, kv, sink, idx):
            return torch.ops.dsv4.sparse_attention(q * 1.5, kv, sink, idx, 0.125)

    B, S, H, D = 1, 300, 64, 512
    idx = csa_indices(B, S, 128, 64, 4)
    q = torch.randn(B, S, H, D, device=DEVICE).bfloat16()
    kv = torch.randn(B, S + S // 4, D, device=DEVICE).bfloat16()
    sink = torch.randn(H, device=DEVICE)
    compiled = dsv4_compile.compile(Attn(), gpu="auto", passes="sparse_attention")
    with torch.no_grad():
        out = compiled(q, kv, sink, idx)
    assert compiled.dsv4_report.replaced("dsv4.sparse_attention") == 1
    ref = torch.ops.dsv4.sparse_attention((q * 1.5).float(), kv.float(), sink, idx, 0.125)
    assert_close("compiled", ref, out, TOL[torch.bfloat16])
    torch._dynamo.reset()


def test_op_schema_and_opcheck():
    """torch.ops.dsv4_triton.sparse_attention mirrors dsv4.sparse_attention plus `config`, and passes
    torch.library.opcheck (schema, fake tensor, dynamic-shape AOT dispatch)."""
    ours = torch.ops.dsv4_triton.sparse_attention.default._schema
    plain = torch.ops.dsv4.sparse_attention.default._schema
    assert [a.name for a in ours.arguments] == [a.name for a in plain.arguments] + ["config"]
    assert [str(a.type) for a in ours.arguments[:-1]] == [str(a.type) for a in plain.arguments]
    q, kv, sink, idx = make_inputs(1, 3, 2, 16, 5, 4, torch.float32, seed=8)
    torch.library.opcheck(torch.ops.dsv4_triton.sparse_attention.default, (q, kv, sink, idx, 0.25, ""),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
