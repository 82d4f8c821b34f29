"""Search space of the block-scaled FP8 linear (kernels/fp8_linear): V4's `wo_b` linear (N = dim,
K = o_groups * o_lora_rank) over a prefill's tokens (M = context x batch) or a decode step's
sequences (M = batch)."""
from __future__ import annotations

from .framework import ACC_PER_THREAD, KernelSpace, Param, next_pow2, rule_threads, smem_reason, threads

STEP = 128  # the kernel's K step (the scale block)
# gemm=cublas leaves the Triton tile fields unused: one trial per cast, with each of them at its first choice
CUBLAS_TRIAL = {"block_m": 16, "block_n": 32, "num_warps": 4, "num_stages": 1, "group_m": 1, "split_k": 1,
                "quant": "fused", "swap_ab": "no", "block_k": STEP}
# gemm=gemv (the CUDA-core kernel: a program per block_n weight rows and row of x) leaves these unused
GEMV_UNUSED = {"block_m": 16, "group_m": 1, "split_k": 1, "quant": "fused", "swap_ab": "no"}
GEMV_MAX_ROWS = 4    # it reads W once a row of x: at 8 rows 1.4-4.9x the tile's time on the H100 (session 35)
TRITON_MIN_BLOCK_N = 32


def fp8_linear_hard(cfg, problem, gpu) -> str | None:
    if cfg.gemm == "gemv":
        if cfg.block_n > STEP:
            return f"gemm=gemv: block_n {cfg.block_n} > {STEP} (a program's rows in one row of weight-scale tiles)"
        acc = cfg.block_n * cfg.block_k / threads(cfg.num_warps)
        if acc > ACC_PER_THREAD:
            return (f"gemv accumulator {cfg.block_n}x{cfg.block_k} over {cfg.num_warps} warps = {acc:g} fp32 a "
                    f"thread > {ACC_PER_THREAD}")
        return None
    acc = cfg.block_m * cfg.block_n / threads(cfg.num_warps)
    if acc > ACC_PER_THREAD:
        return f"accumulator {cfg.block_m}x{cfg.block_n} over {cfg.num_warps} warps = {acc:g} fp32 a thread > {ACC_PER_THREAD}"
    # Per pipeline stage an FP8 [block_m, 128] activation tile (its bf16 source when quantized in the
    # kernel) and an FP8 [block_n, 128] weight tile.
    a_bytes = cfg.block_m * STEP * (3 if cfg.quant == "fused" else 1)
    return smem_reason(cfg.num_stages * (a_bytes + cfg.block_n * STEP), gpu, f"{cfg.num_stages} stages")


def fp8_linear_redundant(cfg, problem, gpu) -> str | None:
    m, n, k = problem.dim("m"), problem.dim("n"), problem.dim("k")
    if cfg.gemm == "cublas" and any(getattr(cfg, f) != v for f, v in CUBLAS_TRIAL.items()):
        return "gemm=cublas ignores the Triton tile fields (tried once, with each at its first choice)"
    if cfg.gemm == "triton" and (cfg.block_k != STEP or cfg.block_n < TRITON_MIN_BLOCK_N):
        return (f"block_k and block_n < {TRITON_MIN_BLOCK_N} are gemm=gemv's (the tensor-core tile steps K by "
                f"{STEP}; its narrowest tile is {TRITON_MIN_BLOCK_N})")
    if cfg.gemm == "gemv":
        if m > GEMV_MAX_ROWS:
            return f"gemm=gemv reads W once a row: {m} rows > {GEMV_MAX_ROWS}"
        if any(getattr(cfg, f) != v for f, v in GEMV_UNUSED.items()):
            return "gemm=gemv ignores block_m, group_m, split_k, quant and swap_ab (tried at their first choices)"
        if cfg.block_k > next_pow2(k):
            return f"block_k {cfg.block_k} > the {k} of K"
        if cfg.block_n > next_pow2(n):
            return f"block_n {cfg.block_n} > the {n} columns need"
        return None
    if cfg.block_m > max(16, next_pow2(m)):
        return f"block_m {cfg.block_m} > the {m} rows need (tl.dot's minimum 16 aside)"
    if cfg.block_n > next_pow2(n):
        return f"block_n {cfg.block_n} > the {n} columns need"
    if cfg.split_k > k // STEP:
        return f"split_k {cfg.split_k} > the {k // STEP} K steps: clamped by the launcher"
    return None


def _problem(mc, context, batch, phase):
    m = batch if phase == "decode" else context * batch
    n, k = mc.dim, mc.o_groups * mc.o_lora_rank
    dims = {"m": m, "n": n, "k": k, "dtype": "bfloat16"}
    return dims, m * k * 2 + n * k + n * (k // STEP) * 4 + m * n * 2


FP8_LINEAR = KernelSpace(
    name="fp8_linear", package="fp8_linear", config_class="Fp8LinearConfig", function="fp8_linear:fp8_linear",
    params=(Param("block_m", (16, 32, 64, 128)), Param("block_n", (4, 8, 16, 32, 64, 128, 256)),
            Param("num_warps", (4, 8)),
            Param("num_stages", (1, 2, 3, 4, 5)), Param("group_m", (1, 8)), Param("split_k", (1, 2, 4, 8, 16, 32)),
            Param("quant", ("fused", "separate")), Param("cast", ("bits", "native")),
            Param("swap_ab", ("no", "yes")), Param("gemm", ("triton", "cublas", "gemv")),
            Param("block_k", (128, 256, 512, 1024, 2048))),
    problem=_problem, phases=("prefill", "decode"),
    defaults={"prefill": "default_config", "decode": "decode_config"},
    hard=(rule_threads, fp8_linear_hard), redundant=(fp8_linear_redundant,),
    doc="x [M, K] bf16 @ W [N, K]^T FP8 with 128x128 scales: V4's wo_b (N = dim, K = o_groups x "
        "o_lora_rank); M = the prefill's tokens or the decode batch. The substitution reads the prefill "
        "table by row count for M > SMALL_M and keeps the small-M default below (kernel_substitutions). "
        "gemm=gemv (CUDA cores, no split-K) is a decode choice up to GEMV_MAX_ROWS rows, with block_n 4..128 "
        "and block_k.")
