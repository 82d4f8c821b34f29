"""Block-scaled FP8 linear kernel against the plain op (torch.ops.dsv4.fp8_linear) and its naive twin.

CPU: the Triton interpreter at small odd shapes (M, N not multiples of the tiles; K several 128-steps),
both quantization modes, every input dtype. GPU (marked): compiled, at V4-Flash's linear shapes.

Tolerances (relative RMS against the plain op, which dequantizes and then sums in another order):
float32 output 1e-5 on the CPU (only the summation order differs); on the GPU 1e-3, since Hopper's FP8
MMA keeps about 14 significant bits while it accumulates inside each 128-step (DeepGEMM's reason to
promote every 128 to fp32, as the kernel does); bfloat16 / float16 outputs: tests/helpers.py's 1e-2 /
2e-3 (one output rounding). The FP8 codes and scales themselves are the plain op's exactly.
"""
import importlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel import (conftest does it too)

import pytest  # noqa: E402

import dsv4_compile.model.ops  # noqa: E402,F401  (registers torch.ops.dsv4.*)
from dsv4_compile.kernels.fp8_linear import fp8_linear, naive  # noqa: E402
from dsv4_compile.model.weight_formats import e8m0_to_float, quantize_fp8_weight  # noqa: E402
from helpers import REL_RMS_TOL, assert_close  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16"),
          pytest.param(torch.float16, id="fp16")]


def tol(dtype: torch.dtype) -> float:
    if dtype == torch.float32:
        return 1e-3 if DEVICE == "cuda" else 1e-5
    return REL_RMS_TOL[dtype]


def make(m_shape, k, n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # columns spanning 1e-3 .. 10 (so that blocks get different scales) and one tiny block (the 1e-4 floor)
    x = torch.randn(*m_shape, k, generator=g) * torch.logspace(-3, 1, k)
    x[..., :128] *= 1e-6
    codes, scale = quantize_fp8_weight(torch.randn(n, k, generator=g) * torch.logspace(-2, 0, n).unsqueeze(1))
    return x.to(dtype).to(DEVICE), codes.to(DEVICE), e8m0_to_float(scale).to(DEVICE)


@pytest.mark.parametrize("quant", ["fused", "separate"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m_shape,k,n", [((5,), 256, 200), ((2, 17), 384, 130), ((1,), 128, 33)],
                         ids=["5x256x200", "2x17x384x130", "1x128x33"])
def test_matches_plain_and_naive(m_shape, k, n, dtype, quant):
    x, w, s = make(m_shape, k, n, dtype)
    y = fp8_linear(x, w, s, {"quant": quant, "block_m": 16, "block_n": 32})
    ref = torch.ops.dsv4.fp8_linear(x, w, s)
    assert y.shape == (*m_shape, n) and y.dtype == dtype
    assert_close("kernel vs plain", ref.float(), y.float(), tol(dtype))
    assert_close("naive vs plain", naive.fp8_linear(x, w, s).float(), ref.float().cpu(), tol(dtype))


def test_config_variants_agree():
    x, w, s = make((6,), 256, 96, torch.float32, seed=1)
    ref = torch.ops.dsv4.fp8_linear(x, w, s)
    for cfg in ({"quant": "fused", "block_m": 16, "block_n": 64}, {"quant": "separate", "block_m": 32, "block_n": 32},
                "quant=fused,block_m=16,block_n=16,group_m=1", "quant=fused,block_m=16,block_n=32,split_k=2",
                "quant=separate,block_m=16,block_n=32,split_k=4"):  # split_k 2 of K/128 = 2 steps; 4 > 2 is clamped
        assert_close(f"kernel {cfg}", ref, fp8_linear(x, w, s, cfg), tol(torch.float32))
    x, w, s = make((3,), 384, 40, torch.bfloat16, seed=2)  # 3 K-steps over 2 splits: parts of 2 and 1
    assert_close("split_k=2, uneven", torch.ops.dsv4.fp8_linear(x, w, s).float(),
                 fp8_linear(x, w, s, "quant=fused,block_m=16,block_n=32,split_k=2").float(), tol(torch.bfloat16))


@pytest.mark.parametrize("cfg", ["swap_ab=yes,quant=fused,block_m=16,block_n=32",
                                 "swap_ab=yes,quant=separate,block_m=16,block_n=16,split_k=2",
                                 "swap_ab=yes,quant=fused,block_m=16,block_n=256,split_k=3",
                                 "swap_ab=no,quant=fused,block_m=16,block_n=256",
                                 "gemm=cublas,quant=fused,block_m=16,block_n=32"])
def test_swapped_wide_and_cublas_configs(cfg):
    """The transposed tile (few rows: weight rows on the MMA's M side), split K at odd shapes (5 K-steps
    over 2 or 3 parts; N = 300: partial tiles, with block_n 256 spanning two weight-scale tiles), and
    gemm=cublas, which on the CPU / interpreter (no cuBLAS) must fall back to the Triton GEMM."""
    x, w, s = make((7,), 640, 300, torch.float32, seed=3)
    assert_close(f"kernel {cfg}", torch.ops.dsv4.fp8_linear(x, w, s), fp8_linear(x, w, s, cfg), tol(torch.float32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m_shape,k,n,cfg", [
    ((1,), 640, 300, "gemm=gemv,block_n=8,block_k=256"),     # K 5 blocks: the last iteration half-masked
    ((3,), 384, 200, "gemm=gemv,block_n=32,block_k=512"),    # one iteration past K
    ((2, 3), 128, 33, "gemm=gemv,block_n=128,block_k=128"),  # one weight-scale row tile, N partial
    ((2,), 1152, 90, "gemm=gemv,block_n=4,block_k=1024,num_warps=8"),  # the narrow default's shape of tile
], ids=["1x640x300", "3x384x200", "2x3x128x33", "2x1152x90"])
def test_gemv_route(m_shape, k, n, cfg, dtype):
    """gemm=gemv (the CUDA cores for a few rows, no split-K): partial row and column blocks, K not a
    multiple of block_k, every input dtype; the same products as the tensor-core tile, summed in fp32
    in another order."""
    x, w, s = make(m_shape, k, n, dtype, seed=k + n)
    y = fp8_linear(x, w, s, cfg)
    assert y.shape == (*m_shape, n) and y.dtype == dtype
    assert_close(f"kernel {cfg}", torch.ops.dsv4.fp8_linear(x, w, s).float(), y.float(), tol(dtype))


def _exported(x, w, s, cfg: str, min_rows: int, max_rows: int):
    """The kernel's op over weight w, scales s and config cfg, exported with a symbolic row count of x."""
    class Linear(torch.nn.Module):
        def forward(self, x):
            return torch.ops.dsv4_triton.fp8_linear(x, w, s, cfg)

    return torch.export.export(Linear(), (x,), dynamic_shapes=({0: torch.export.Dim("M", min=min_rows, max=max_rows)},))


def test_gemv_exports_with_a_symbolic_row_count():
    """The GEMV's grid is M programs a W tile: an engine's symbolic M sizes it at run time, and each
    output is summed in one program in a fixed order, so the exported program is eager's bits."""
    x, w, s = make((5,), 384, 72, torch.float32, seed=5)
    cfg = "gemm=gemv,block_n=16,block_k=256"
    ep = _exported(x, w, s, cfg, 1, 16)
    for rows in (1, 7):
        xn = make((rows,), 384, 72, torch.float32, seed=rows)[0]
        assert torch.equal(ep.module()(xn), fp8_linear(xn, w, s, cfg)), rows


def test_gemv_refuses_rows_past_one_scale_tile():
    x, w, s = make((1,), 256, 300, torch.float32)
    with pytest.raises(ValueError, match="gemm=gemv takes block_n <= 128 .* got block_n=256, block_k=128"):
        fp8_linear(x, w, s, "gemm=gemv,block_n=256")


def test_split_k_counts_parts_at_one_row_block(monkeypatch):
    """split_k is the parts of K at one block of block_m rows: 40 rows (3 blocks of 16) with split_k 8 run
    8 // 3 = 2 parts (the launch's n_split), 16 rows 8, and either way the plain op's numbers."""
    module = importlib.import_module("dsv4_compile.kernels.fp8_linear.fp8_linear")  # (the package's is the function)
    parts = []
    launch = module.launch
    monkeypatch.setattr(module, "launch", lambda kernel, grid, *a, **kw: (parts.append((grid[1], a[9])),
                                                                         launch(kernel, grid, *a, **kw)))
    cfg = "swap_ab=yes,quant=fused,block_m=16,block_n=32,split_k=8"
    for rows, want in ((40, 2), (16, 8)):
        x, w, s = make((rows,), 1024, 40, torch.float32, seed=rows)   # 8 K steps
        parts.clear()
        assert_close(f"{rows} rows", torch.ops.dsv4.fp8_linear(x, w, s), fp8_linear(x, w, s, cfg), tol(torch.float32))
        assert parts == [(8, want)], parts


def test_split_k_exports_with_a_symbolic_row_count():
    """An engine's M is symbolic: its parts of K are split_k // cdiv(M, block_m), evaluated at run time (no
    guard on M), so the exported program at M = 3 (4 parts) and M = 40 (1) is eager's numbers at those M:
    its bits in the interpreter (one program at a time); on a GPU the parts' fp32 atomics land in any
    order (last-bit differences, ~1e-7 relative: 1e-6 holds it, a wrong part count moves it by ~0.3)."""
    x, w, s = make((9,), 512, 40, torch.float32, seed=4)
    cfg = "swap_ab=yes,quant=fused,block_m=16,block_n=32,split_k=4"
    ep = _exported(x, w, s, cfg, 2, 64)
    for rows in (3, 40):
        xn = make((rows,), 512, 40, torch.float32, seed=rows)[0]
        got, want = ep.module()(xn), fp8_linear(xn, w, s, cfg)
        if DEVICE == "cuda":
            assert_close(f"exported at {rows} rows", want, got, 1e-6)
        else:
            assert torch.equal(got, want)


def test_cublas_route_exports_with_a_symbolic_row_count(monkeypatch):
    """The cuBLAS route pads M to a multiple of 16 and slices back: for an engine's symbolic M that
    slice must add no guard on M (one did: export's solver made it a congruence on the batch and failed,
    'Cannot create Dim with inconsistent min=1, max=-4'). Traced on the CPU with the route forced (the
    trace needs only _scaled_mm's shapes); run at 3 and 40 rows on a GPU."""
    module = importlib.import_module("dsv4_compile.kernels.fp8_linear.fp8_linear")
    if DEVICE != "cuda":
        monkeypatch.setattr(module, "cublas_blockwise_ready", lambda *args: True)
    elif not module.cublas_blockwise_ready(torch.empty(1, 512, device=DEVICE), 128, 512):
        pytest.skip("this GPU's torch has no blockwise-scaled cuBLAS FP8 GEMM")
    x, w, s = make((9,), 512, 128, torch.bfloat16, seed=5)
    ep = _exported(x, w, s, "gemm=cublas", 1, 64)
    ranges = [(r.lower, r.upper) for r in ep.range_constraints.values()]
    assert ranges == [(1, 64)], ranges
    if DEVICE == "cuda":
        for rows in (3, 40):
            xn = make((rows,), 512, 128, torch.bfloat16, seed=rows)[0]
            assert torch.equal(ep.module()(xn), fp8_linear(xn, w, s, "gemm=cublas"))


def test_default_config_by_rows_and_shape():
    """The H200's defaults: cuBLAS for many rows; for one or two rows the CUDA-core GEMV while M * N * K
    <= GEMV_MAX_WORK (a narrow W: fewer rows a program, more of K; block_k at most K's power of two);
    else for few rows the swapped Triton tile with K split until about 256 programs stream W at one row
    block (at most 32 parts of >= 1 K step), or cuBLAS for 17..64 rows of a wide W; the interpreter's
    default ignores the shape."""
    from dsv4_compile.kernels.fp8_linear import default_config
    from dsv4_compile.kernels.fp8_linear.config import GEMV_MAX_WORK
    cfg = lambda m, n, k: default_config("H200", m, n, k)  # noqa: E731
    assert cfg(4096, 1024, 4096).gemm == "cublas" and cfg(None, 1024, 4096).gemm == "cublas"
    gemv = lambda m, n, k: (cfg(m, n, k).gemm, cfg(m, n, k).block_n, cfg(m, n, k).block_k)  # noqa: E731
    assert gemv(1, 32768, 1024) == gemv(1, 4096, 8192) == gemv(2, 2048, 4096) == ("gemv", 8, 1024)
    assert gemv(1, 1024, 4096) == gemv(2, 512, 4096) == ("gemv", 4, 2048) and cfg(1, 512, 4096).num_warps == 8
    assert gemv(1, 1024, 256) == ("gemv", 4, 256) and 2 * 4096 * 8192 > GEMV_MAX_WORK
    assert (cfg(2, 4096, 8192).swap_ab, cfg(2, 4096, 8192).split_k, cfg(2, 4096, 8192).gemm) == ("yes", 8, "triton")
    assert (cfg(3, 32768, 1024).split_k, cfg(3, 32768, 1024).gemm) == (1, "triton") and cfg(16, 512, 4096).split_k == 32
    assert cfg(3, 8192, 1024).split_k == 4 and cfg(3, 2048, 4096).split_k == 16 and cfg(3, 1024, 256).split_k == 2
    assert cfg(64, 2048, 4096).gemm == "cublas" and cfg(17, 4096, 2048).gemm == "cublas"
    assert cfg(64, 1024, 4096).gemm == "triton" and cfg(64, 1024, 4096).split_k == 32   # 8 at 64 rows (run_splits)
    assert default_config("interpreter", 1, 4096, 8192) == default_config("interpreter", 1)


def test_input_errors():
    x, w, s = make((2,), 256, 64, torch.float32)
    with pytest.raises(ValueError, match="multiple of 128"):
        fp8_linear(x[:, :200].contiguous(), w[:, :200].contiguous(), s)
    with pytest.raises(ValueError, match="scale"):
        fp8_linear(x, w, s[:, :1].contiguous())
    with pytest.raises(ValueError, match="weight is torch.bfloat16"):
        fp8_linear(x, w.to(torch.bfloat16), s)
    with pytest.raises(ValueError, match="quant"):
        fp8_linear(x, w, s, {"quant": "later"})
    with pytest.raises(ValueError, match="not contiguous"):
        fp8_linear(torch.zeros(2, 512, device=DEVICE)[:, :256], w, s)


# V4-Flash linears (N, K): wq_a, wq_b, wkv, wo_b, indexer wq_b, shared w1/w3, shared w2
FLASH_LINEARS = [(1024, 4096), (32768, 1024), (512, 4096), (4096, 8192), (8192, 1024), (2048, 4096), (4096, 2048)]


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 64, 4096])
@pytest.mark.parametrize("n,k", FLASH_LINEARS, ids=[f"{n}x{k}" for n, k in FLASH_LINEARS])
def test_gpu_flash_shapes(n, k, m):
    x, w, s = make((m,), k, n, torch.bfloat16, seed=n + k + m)
    y = fp8_linear(x, w, s)
    ref = torch.ops.dsv4.fp8_linear(x.float(), w, s)
    assert_close(f"FP8 linear [{m}, {k}] x [{n}, {k}]", ref, y.float(), REL_RMS_TOL[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 37, 4096])
@pytest.mark.parametrize("cfg", ["gemm=cublas", "gemm=triton,swap_ab=yes,block_m=16,block_n=64,split_k=4,quant=fused",
                                 "gemm=gemv,block_n=8,block_k=1024,num_stages=3",
                                 "gemm=gemv,block_n=4,block_k=2048,num_warps=8"])
def test_gpu_cublas_and_small_m_paths(cfg, m, dtype):
    """cuBLAS's blockwise GEMM (where the probe admits it; the Triton GEMM otherwise), the swapped
    split-K Triton tile and the CUDA-core GEMV, against the plain op at a V4-Flash shape (wq_a: N 1024,
    K 4096)."""
    from dsv4_compile.kernels.fp8_linear.fp8_linear import cublas_blockwise_ready
    x, w, s = make((m,), 4096, 1024, dtype, seed=m)
    y = fp8_linear(x, w, s, cfg)
    ref = torch.ops.dsv4.fp8_linear(x.float(), w, s)
    print(f"cublas blockwise ready for {dtype}: {cublas_blockwise_ready(x, 1024, 4096)}")
    assert_close(f"FP8 linear {cfg} [{m}, 4096] x [1024, 4096]", ref, y.float(), tol(dtype))
