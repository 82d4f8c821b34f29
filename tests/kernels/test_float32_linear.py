"""float32 linear kernel (a bf16 x against a float32 W split into three exact bf16 pieces) against the plain
op (torch.ops.dsv4.float32_linear) and its naive twin, and its substitution.

CPU: the Triton interpreter at small odd shapes (M, N, K not multiples of the tiles), every config
kind (swapped tile, split K). GPU (marked): compiled, at V4-Flash's float32 projections.

Tolerance 1e-5 relative RMS everywhere (float32 output; the kernel's products are exact, so only the
float32 sums' order differs from the plain op's float32 GEMM, and the naive twin rounds its float64
sums once). Exactness of the split itself is tested bit for bit: with one-hot rows of x the kernel
returns W's own float32 values, which two bf16 pieces (16 significant bits) could not.
"""
import importlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel import (conftest does it too)

import pytest  # noqa: E402
from torch.fx.experimental.proxy_tensor import make_fx  # noqa: E402

import dsv4_compile.model.ops  # noqa: E402,F401  (registers torch.ops.dsv4.*)
from dsv4_compile import passes  # noqa: E402
from dsv4_compile.kernels.float32_linear import DEFAULT_CONFIGS, default_config, float32_linear, naive  # noqa: E402
from dsv4_compile.passes.kernel_substitutions import float32_linear as sub  # noqa: E402
from helpers import assert_bits_equal, assert_close, exported_op_args  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-5


def make(m_shape, k, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*m_shape, k, generator=g) * torch.logspace(-3, 1, k)).bfloat16()
    w = torch.randn(n, k, generator=g) * torch.logspace(-2, 0, n).unsqueeze(1)   # full 24-bit significands
    return x.to(DEVICE), w.to(DEVICE)


CONFIGS = ["", "swap_ab=yes", "swap_ab=yes,split_k=4", "swap_ab=no,split_k=3,block_k=16", "block_m=32,block_n=16,group_m=1"]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c or "default")
@pytest.mark.parametrize("m_shape,k,n", [((5,), 200, 70), ((2, 17), 96, 33), ((1,), 300, 50), ((1, 1), 16, 1)],
                         ids=["5x200x70", "2x17x96x33", "1x300x50", "1x1x16x1"])
def test_matches_plain_and_naive(m_shape, k, n, cfg):
    x, w = make(m_shape, k, n)
    y = float32_linear(x, w, cfg)
    ref = torch.ops.dsv4.float32_linear(x, w)
    assert y.shape == (*m_shape, n) and y.dtype == torch.float32
    assert_close("kernel vs plain", ref, y, TOL)
    assert_close("naive vs plain", naive.float32_linear(x, w), ref.cpu(), TOL)


@pytest.mark.parametrize("cfg", ["", "swap_ab=yes,split_k=4"], ids=["default", "swapped-split"])
def test_the_three_pieces_are_exact(cfg):
    """x's rows one-hot (1.0 at column i): y[r, j] = W[j, i] for every float32 W of magnitude >= 2^-110,
    bit for bit (two bf16 pieces would keep 16 of its 24 significant bits)."""
    k, n = 40, 24
    _, w = make((1,), k, n, seed=1)
    w[3, 3], w[5, 7] = 2.0 ** -100 * 1.2345678, 3.0e38
    x = torch.eye(k, device=DEVICE).bfloat16()                                     # [K, K]
    assert_bits_equal("one-hot rows", w.t().contiguous(), float32_linear(x, w, cfg))


@pytest.mark.parametrize("cfg", ["", "swap_ab=yes,split_k=4"], ids=["default", "swapped-split"])
def test_infinite_and_nan_weights_as_the_plain_op(cfg):
    """An infinite w is its hi piece alone (inf - inf would make the others NaN), a NaN w gives NaN:
    the plain op's infinities and NaNs, in the same places."""
    x, w = make((6,), 48, 20, seed=2)
    w[0, 0], w[1, 5], w[2, 9] = float("inf"), -float("inf"), float("nan")
    x[3, 0] = 0.0                                                                   # 0 x inf: NaN in both
    ref = torch.ops.dsv4.float32_linear(x, w)
    assert ref[:, :3].isinf().any() and ref[:, :3].isnan().any()
    assert_close("non-finite weights", ref, float32_linear(x, w, cfg), TOL)


def test_split_k_exports_with_a_symbolic_row_count():
    """An engine's M is symbolic: its parts of K are split_k // cdiv(M, block_m), evaluated at run time (no
    guard on M): the exported program at M = 3 (4 parts) and M = 40 (1) is eager's numbers at those M
    (bits in the interpreter; on a GPU the parts' float32 atomics land in any order: last-bit differences)."""
    _, w = make((1,), 512, 40, seed=4)
    cfg = "swap_ab=yes,block_m=16,block_n=32,block_k=64,split_k=4"

    class Linear(torch.nn.Module):
        def forward(self, x):
            return torch.ops.dsv4_triton.float32_linear(x, w, cfg)

    ep = torch.export.export(Linear(), (make((9,), 512, 40)[0],),
                             dynamic_shapes=({0: torch.export.Dim("M", min=2, max=64)},))
    for rows in (3, 40):
        x = make((rows,), 512, 40, seed=rows)[0]
        got, want = ep.module()(x), float32_linear(x, w, cfg)
        if DEVICE == "cuda":
            assert_close(f"exported at {rows} rows", want, got, 1e-6)
        else:
            assert torch.equal(got, want)


def test_split_k_counts_parts_at_one_row_block(monkeypatch):
    """40 rows (3 blocks of 16) with split_k 8 run 8 // 3 = 2 parts (the launch's n_split), 16 rows 8."""
    module = importlib.import_module("dsv4_compile.kernels.float32_linear.float32_linear")
    parts = []
    launch = module.launch
    monkeypatch.setattr(module, "launch", lambda kernel, grid, *a, **kw: (parts.append((grid[1], a[7])),
                                                                         launch(kernel, grid, *a, **kw)))
    cfg = "swap_ab=yes,block_m=16,block_n=32,block_k=32,split_k=8"
    for rows, want in ((40, 2), (16, 8)):
        x, w = make((rows,), 256, 40, seed=rows)   # 8 K steps
        parts.clear()
        assert_close(f"{rows} rows", torch.ops.dsv4.float32_linear(x, w), float32_linear(x, w, cfg), TOL)
        assert parts == [(8, want)], parts


def test_default_config_by_rows_and_shape():
    """Many rows: the prefill tile; few rows: the swapped tile with K split until about 256 programs
    stream W (at most 32 parts, each at least one K step); past 16 rows on the H100 / H200, 32-row blocks
    and about 512 programs."""
    cfg = lambda m, n, k: default_config("H200", m, n, k)  # noqa: E731
    assert cfg(4096, 1024, 4096) == DEFAULT_CONFIGS["H200"] == cfg(None, 1024, 4096)
    assert (cfg(1, 1024, 4096).swap_ab, cfg(1, 1024, 4096).split_k) == ("yes", 16)   # 16 tiles of 64 columns
    assert cfg(64, 256, 4096).split_k == 32 and cfg(1, 512, 4096).split_k == 32 and cfg(1, 16384, 4096).split_k == 1
    assert cfg(1, 256, 128).split_k == 2                                              # 2 K steps: a part each
    assert (cfg(16, 1024, 4096).block_m, cfg(16, 1024, 4096).split_k) == (16, 16)
    assert (cfg(17, 1024, 4096).block_m, cfg(17, 1024, 4096).split_k) == (32, 32)    # 16 tiles x 32 parts
    assert cfg(64, 512, 4096) == default_config("H100", 64, 512, 4096) == cfg(17, 512, 4096)
    assert default_config("NVIDIA A100-SXM4-80GB", 64, 1024, 4096).block_m == 16       # other GPUs keep 16


def test_input_errors():
    x, w = make((2,), 64, 8)
    with pytest.raises(ValueError, match="x is torch.float32; accepted: torch.bfloat16"):
        float32_linear(x.float(), w)
    with pytest.raises(ValueError, match="weight is torch.bfloat16; accepted: torch.float32"):
        float32_linear(x, w.bfloat16())
    with pytest.raises(ValueError, match=r"x \[..., 64\] against weight \[8, 32\]: K must match"):
        float32_linear(x, w[:, :32].contiguous())
    with pytest.raises(ValueError, match="swap_ab"):
        float32_linear(x, w, {"swap_ab": "maybe"})
    with pytest.raises(ValueError, match="not contiguous"):
        float32_linear(x, w.t().contiguous().t())


# ---- the substitution ----------------------------------------------------------------------------

def projections(x, w_kv, w_gate, w_head):
    """A compressor's two float32 projections and a bf16 head over one bf16 x."""
    return (torch.ops.dsv4.float32_linear(x, w_kv) * torch.ops.dsv4.float32_linear(x, w_gate).sigmoid(),
            torch.ops.dsv4.float32_linear(x, w_head))


def test_float32_weights_replaced_16_bit_left_with_why():
    x, w_kv = make((3, 5), 96, 40)
    w_gate, w_head = make((1,), 96, 40, seed=1)[1], make((1,), 96, 70, seed=2)[1].bfloat16()
    args = (x, w_kv, w_gate, w_head)
    gm = make_fx(projections, tracing_mode="fake")(*args)
    manager = passes.PassManager(sub.interpreter_substitutions() if DEVICE == "cpu" else [sub.SUBSTITUTION],
                                 gpu="H200" if DEVICE == "cuda" else "cpu")
    manager(gm.graph)
    gm.recompile()
    ops = manager.graph_ops[0]
    assert ops["before"]["dsv4.float32_linear.default"] == 3
    assert ops["after"]["dsv4.float32_linear.default"] == 1 and ops["after"]["dsv4_triton.float32_linear.default"] == 2
    assert manager.report.replaced("dsv4.float32_linear") == 2
    for name, want, got in zip(("compressed", "head"), projections(*args), gm(*args)):
        assert_close(f"substituted vs eager: {name}", want, got, TOL)
    e = lambda *shape, dtype=torch.float32: torch.empty(*shape, device=DEVICE, dtype=dtype)  # noqa: E731
    assert "needs float32" in sub._reason(e(4, 96, dtype=torch.bfloat16), e(8, 96, dtype=torch.bfloat16), allow_cpu=True)
    assert "needs bfloat16" in sub._reason(e(4, 96), e(8, 96), allow_cpu=True)
    if DEVICE == "cpu":
        assert "needs CUDA tensors" in sub._reason(e(4, 96, dtype=torch.bfloat16), e(8, 96))


def test_config_follows_rows():
    """Few rows (a symbolic decode batch by its bound) the few-rows default for W's shape or the tuned decode
    entry of the smallest batch >= M; many rows the prefill default or the tuned table by row count."""
    w = torch.randn(256, 4096).to(DEVICE)
    gpu = "H200" if DEVICE == "cuda" else "interpreter"
    target = passes.Target(gpu="H200")
    few = lambda *shape: torch.randn(*shape).to(device=DEVICE, dtype=torch.bfloat16)  # noqa: E731
    assert sub.SUBSTITUTION.config(target, few(2, 4096), w)["config"] == default_config(gpu, 2, 256, 4096).to_str()
    assert sub.SUBSTITUTION.config(target, few(128, 4096), w)["config"] == DEFAULT_CONFIGS[gpu].to_str()
    entries = {"a": {"phase": "decode", "batch": 8, "config": {"block_n": 32, "split_k": 4}}}
    tuned = passes.Target(gpu="H200", table={"entries": entries, "by_context": {"8192": "block_m=32,block_n=32"}})
    assert sub.SUBSTITUTION.config(tuned, few(128, 4096), w)["config"] == "block_m=32,block_n=32"
    assert sub.SUBSTITUTION.config(tuned, few(2, 4096), w)["config"] == default_config(gpu, 2, 256, 4096).replace(
        block_n=32, split_k=4).to_str()
    B = torch.export.Dim("B", min=2, max=8)
    decode = exported_op_args(lambda x: torch.ops.dsv4.float32_linear(x, w), (few(3, 1, 4096),), ({0: B},),
                              torch.ops.dsv4.float32_linear.default)
    assert not isinstance(decode[0].shape[0], int), "the export did not keep B symbolic"
    assert sub.SUBSTITUTION.config(target, *decode)["config"] == default_config(gpu, 8, 256, 4096).to_str()


# V4-Flash's float32 projections (N, K): the CSA compressor's wkv / wgate, the HCA compressor's, the indexer's
FLASH_PROJECTIONS = [(1024, 4096), (512, 4096), (256, 4096)]


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 7, 64, 4096])
@pytest.mark.parametrize("n,k", FLASH_PROJECTIONS, ids=[f"{n}x{k}" for n, k in FLASH_PROJECTIONS])
def test_gpu_flash_shapes(n, k, m):
    x, w = make((m,), k, n, seed=n + m)
    assert_close(f"float32 linear [{m}, {k}] x [{n}, {k}]", torch.ops.dsv4.float32_linear(x, w), float32_linear(x, w), TOL)
