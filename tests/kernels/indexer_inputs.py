"""Inputs of the indexer top-k tests (test_indexer_topk.py, _fp8.py, _radix.py, _cached.py): dyadic score
operands (every product and sum exact), the ordered candidate-buffer cases, the model's FP4-simulated
rows and packed index caches (FP4, and FP8 with float32 scales) whose scores are exact."""
import importlib
import math

import torch

from dsv4_compile.model.ops import fp4_simulate, hadamard

KERNEL_MODULE = importlib.import_module("dsv4_compile.kernels.indexer_topk.indexer_topk")  # the package's
# `indexer_topk` attribute is the function
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def dyadic(shape, g):
    return torch.randint(-12, 13, shape, generator=g).float() / 4


def make_inputs(B, S, H, d, N, ratio, topk, dtype=torch.float32, seed=0, gaussian=False):
    """q, weights, keys and positions: each batch row starts elsewhere (some tokens see nothing, some
    see every key), tokens strided by ratio // 2."""
    g = torch.Generator().manual_seed(seed)
    make = (lambda *s: torch.randn(s, generator=g)) if gaussian else (lambda *s: dyadic(s, g))  # noqa: E731
    q, w, keys = make(B, S, H, d).to(dtype), make(B, S, H).to(dtype), make(B, N, d).to(dtype)
    start = torch.randint(0, max(1, (N + 1) * ratio), (B, 1), generator=g)
    positions = (start + torch.arange(S).view(1, S) * max(1, ratio // 2)).long()
    positions[0, 0] = 0                       # nothing visible (ratio > 1) or one key
    positions[-1, -1] = (N + 3) * ratio       # every key visible
    return [t.to(DEVICE) for t in (q, w, keys, positions)]


def ordered_inputs(order, B=2, S=5, N=160, ratio=4, seed=20, topk=5):
    """q picks channel 0 of the keys (score = H x relu(keys[n, 0]) x w > 0, exact in fp32) whose values
    follow `order` along the key axis: ascending (every key beats the running top-k, so every tile
    appends all its keys and the row compacts every few tiles), descending (only the first tiles
    enter), random, ties (7 distinct values repeating: ties to the lowest index across compactions),
    late_kth (ascending over 8 tiles of 16, then 2 tiles of keys tied between the topk-th and the
    (topk-1)-th best so far: a compaction runs just before them and they must beat its threshold,
    the topk-th best exactly; the first of them takes the last slot), nan (random with 40 NaN scores
    scattered: NaN first, then the lowest indices among them).
    Positions of row 0 (ratio 4): none visible, 3 keys (fewer than topk), 37, all, all; row 1 random."""
    g = torch.Generator().manual_seed(seed)
    n = torch.arange(N, dtype=torch.float32)
    if order == "ascending":
        v = n / 4
    elif order == "descending":
        v = (N - n) / 4
    elif order == "ties":
        v = (n % 7) / 4
    elif order == "late_kth":
        v = torch.where(n < 128, n, 128 - topk + 0.5) / 4
    else:
        v = torch.randperm(N, generator=g).float() / 4
        if order == "nan":
            v[torch.randperm(N, generator=g)[:40]] = math.nan
    keys = dyadic((B, N, 4), g)                                     # channels 1.. carry noise q ignores
    keys[:, :, 0] = v
    q = torch.zeros(B, S, 2, 4)
    q[..., 0] = 1.0
    w = torch.randint(1, 5, (B, S, 2), generator=g).float() / 4     # per query, positive: the same order
    pos = torch.tensor([[0, 13, 150, N * ratio - 1, 10 ** 6]] * B)[:, :S].clone()
    pos[1:] = torch.randint(0, (N + 20) * ratio, (B - 1, S), generator=g)
    return [t.to(DEVICE) for t in (q, w, keys, pos)]


def fp4_gauss(shape, g, spread=0):
    """FP4-simulated (Hadamard, e2m1, power-of-two scales per 32 dims) Gaussian rows, as the model's
    indexer q and keys; spread > 0 multiplies each 32-dim block by 2^-U{0..spread} first."""
    x = torch.randn(shape, generator=g)
    if spread:
        blocks = x.unflatten(-1, (-1, 32))
        x = (blocks * 2.0 ** -torch.randint(0, spread + 1, blocks.shape[:-1] + (1,), generator=g)).flatten(-2)
    return fp4_simulate(hadamard(x), 32)


def fp4_cache_inputs(B, S, H, d, N, ratio, topk, dtype=torch.float32, seed=0):
    """q, weights (dyadic, k / 4), an FP4 index cache [B, N, d/2 + d/32] uint8 and positions (as
    make_inputs: each batch row elsewhere, one query seeing nothing, one every key). The keys are e2m1
    codes x 1/2, each 32-value block holding a +-6 code (packing keeps its scale 1/2 exactly): every
    product and sum of the scores is exact in fp32 at these shapes, so the selection is determined."""
    from dsv4_compile.model.kv_layout import pack_indexer_keys
    from dsv4_compile.model.ops import fp4_values

    q, w, _, positions = make_inputs(B, S, H, d, N, ratio, topk, dtype=dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    codes = torch.randint(0, 16, (B, N, d), generator=g)
    codes[..., ::32] = 7 + 8 * (codes[..., ::32] % 2)                       # +-6: the block's amax
    return q, w, pack_indexer_keys(fp4_values(codes) / 2, "fp4").to(DEVICE), positions


def fp8_cache(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """codes [B, N, d] (values exact in e4m3), scales [B, N] float32 -> the FP8 index cache [B, N, d + 4]
    uint8 written byte for byte (kv_layout's "fp8" layout with a scale of our choosing)."""
    return torch.cat([codes.to(torch.float8_e4m3fn).view(torch.uint8),
                      scales.float().contiguous().view(torch.uint8).view(*scales.shape, 4)], dim=-1)


def fp8_cache_inputs(B, S, H, d, N, ratio, topk, dtype=torch.float32, seed=0):
    """q, weights (integers in [-2, 2]), an FP8 index cache and positions (as make_inputs). Key n is
    codes[n % 5] x 2^-2 (1 + j_n 2^-9), j_n in [-8, 8]: 5 distinct code rows (tied coarse scores)
    whose per-key float32 scales break the ties by less than bf16 resolves, so the keys are not
    bf16-exact and only the residual dots select right. Every score is a multiple of 2^-11 below 2^12
    at these shapes (d <= 64, H <= 17): exact in fp32 (tests check it)."""
    _, _, _, positions = make_inputs(B, S, H, d, N, ratio, topk, dtype=dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 2)
    q = torch.randint(-2, 3, (B, S, H, d), generator=g).to(dtype)
    w = torch.randint(-2, 3, (B, S, H), generator=g).to(dtype)
    codes = torch.randint(-6, 7, (B, 5, d), generator=g).float()[:, torch.arange(N) % 5]
    scales = 0.25 * (1 + torch.randint(-8, 9, (B, N), generator=g) * 2.0 ** -9)
    return [t.to(DEVICE) for t in (q, w, fp8_cache(codes, scales), positions)]


def assert_substituted(fn, args, registered, interpreter_twin, op: str) -> None:
    """The pass on fn's fake-traced graph (one dsv4 `op` node): the kernel substitution (`registered` on
    a GPU, its interpreter twin on the CPU) replaces the node (ops before and after, the report), the
    graph picks what eager fn picks, and on the CPU the registered substitution declines, with its reason."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from dsv4_compile.passes import PassManager

    gm = make_fx(fn, tracing_mode="fake")(*args)
    on_gpu = DEVICE == "cuda"
    manager = PassManager([registered if on_gpu else interpreter_twin], gpu="H100" if on_gpu else "cpu")
    manager(gm.graph)
    gm.recompile()
    before, after = manager.graph_ops[0]["before"], manager.graph_ops[0]["after"]
    assert before[f"dsv4.{op}.default"] == 1 and f"dsv4.{op}.default" not in after
    assert after[f"dsv4_triton.{op}.default"] == 1
    assert manager.report.replaced(f"dsv4.{op}") == 1
    assert torch.equal(fn(*args), gm(*args))
    if DEVICE == "cpu":
        gm = make_fx(fn, tracing_mode="fake")(*args)
        manager = PassManager([registered], gpu="cpu")
        manager(gm.graph)
        assert "needs CUDA tensors" in manager.report.left_alone()[0].reason
