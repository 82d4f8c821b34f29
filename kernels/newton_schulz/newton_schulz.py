"""Newton-Schulz orthogonalisation (Muon) for any coefficient schedule, batched over leading dims
(`torch.ops.dsv4.newton_schulz` semantics, see model/ops.py).

One launch sequence serves every matrix of a batch (grid axis 1 = matrix):
  1. `_ns_sumsq_kernel` + `_ns_den_kernel`: sums of squares of bf16(G) in blocks, then per matrix in a
     fixed order (deterministic): den = bf16(||bf16(G)||_F + 1e-7); in `fused_muon_step` (Muon's
     whole step) the first pass also advances the momentum buffer and G is its direction U;
  2. `_ns_normalize_kernel`: X = bf16(bf16(G) / den), transposed when M > N;
  then per step (a, b, c), with X [m, n], m = min(M, N):
  3. `_ns_sym_kernel` (X -> A = X X^T): upper-triangle tiles only, each stored twice (mirrored);
  4. `_ns_sym_kernel` (A -> B = b A + c A A): A is symmetric, so A A = A A^T: the same kernel, with
     `b A` fused into the epilogue; upper triangle only, mirrored;
  5. `_ns_gemm_kernel` (X <- a X + B X): `a X` fused into the epilogue; the last step writes the
     output directly in G's layout (transposed back when M > N) and dtype, or (`fused_muon_step`)
     updates the parameter with it.
Operands bf16, accumulation fp32, every intermediate rounded once to bf16 (to nearest even) where the
plain op rounds each of A, A A, b A + c A A, B X and a X + B X separately: results agree with the
plain op to bf16 accuracy (relative RMS ~1e-2 after 10 steps), not bit for bit.
FLOPs per step: m^2 n (A, half of X X^T) + m^3 (A A, half) + 2 m^2 n (B X).
NaN/Inf in G propagate to that matrix's whole output (through the norm and the products).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._common import FLOAT_DTYPES, INTERPRET, check, check_tensor, kernel_op, launch, placeholder, resolve_config
from .._jit_utils import round_bf16, tile_ids
from .config import NewtonSchulzConfig, default_config, fit_block

# ================================================================================================
# Kernels
# ================================================================================================

@triton.jit
def _lerp(start, end, weight):
    # torch.lerp's formula (ATen/native/Lerp.h): the small-weight form below 0.5, the other above
    return tl.where(tl.abs(weight) < 0.5, start + weight * (end - start), end - (end - start) * (1.0 - weight))


@triton.jit
def _ns_sumsq_kernel(p_g, p_part, numel, chunk, NPART, p_buf, p_u, w_buf, w_dir,
                     MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, BLOCK: tl.constexpr):
    # p_g [Bt, numel] any float; p_part [Bt, NPART] float32; program (p, b) sums chunk p of matrix b.
    # MOMENTUM (Muon's prologue, float32 p_g = the gradient): p_buf [Bt, numel] float32 <- buf.lerp(g,
    # w_buf); U = g.lerp(buf, w_dir) if NESTEROV else buf, stored as bf16(U) at p_u [Bt, numel]; the sums
    # are of bf16(U). Float arguments are fp64 in AOTInductor's launch signature: the math stays fp32.
    pid_p = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    start = pid_p * chunk
    for i in range(0, chunk, BLOCK):
        o = start + i + tl.arange(0, BLOCK)
        mask = (o < numel) & (o < start + chunk)
        g = tl.load(p_g + pid_b * numel + o, mask=mask, other=0.0).to(tl.float32)
        if MOMENTUM:
            buf = _lerp(tl.load(p_buf + pid_b * numel + o, mask=mask, other=0.0), g, tl.cast(w_buf, tl.float32))
            tl.store(p_buf + pid_b * numel + o, buf, mask=mask)
            g = _lerp(g, buf, tl.cast(w_dir, tl.float32)) if NESTEROV else buf
        g = round_bf16(g)                                                   # the plain op's bf16(G)
        if MOMENTUM:
            tl.store(p_u + pid_b * numel + o, g.to(tl.bfloat16), mask=mask)
        acc += g * g
    tl.store(p_part + pid_b * NPART + pid_p, tl.sum(acc, axis=0))


@triton.jit
def _ns_den_kernel(p_part, p_den, NPART, BLOCK_P: tl.constexpr):
    # p_part [Bt, NPART] float32 partial sums of squares -> p_den [Bt] = bf16(||X||_F + 1e-7) (as fp32)
    pid_b = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    for i in range(0, NPART, BLOCK_P):
        o = i + tl.arange(0, BLOCK_P)
        acc += tl.load(p_part + pid_b * NPART + o, mask=o < NPART, other=0.0)
    tl.store(p_den + pid_b, round_bf16(tl.sqrt_rn(tl.sum(acc, axis=0)) + 1e-7))


@triton.jit
def _ns_normalize_kernel(p_g, p_den, p_x, m, n, s_i, s_j, TILE: tl.constexpr):
    # p_g: matrix b of G read as X0 [m, n] with strides (s_i, s_j) (transposed view when M > N);
    # p_den [Bt] float32; p_x [Bt, m, n] bfloat16
    pid_b = tl.program_id(1).to(tl.int64)
    den = tl.load(p_den + pid_b)
    n_tj = tl.cdiv(n, TILE)
    ti = tl.program_id(0) // n_tj
    tj = tl.program_id(0) % n_tj
    o_i = ti * TILE + tl.arange(0, TILE)
    o_j = tj * TILE + tl.arange(0, TILE)
    mask = (o_i[:, None] < m) & (o_j[None, :] < n)
    g = tl.load(p_g + pid_b * m * n + o_i[:, None] * s_i + o_j[None, :] * s_j, mask=mask, other=0.0)
    x = round_bf16(tl.div_rn(round_bf16(g.to(tl.float32)), tl.broadcast_to(den, g.shape)))
    tl.store(p_x + pid_b * m * n + o_i[:, None] * n + o_j[None, :], x.to(tl.bfloat16), mask=mask)


@triton.jit
def _ns_sym_kernel(p_x, p_o, alpha, beta, m, K, ADD_X: tl.constexpr, UPCAST: tl.constexpr,
                   BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    # p_x [Bt, m, K] bf16 (symmetric and K = m when ADD_X); p_o [Bt, m, m] bf16.
    # O = alpha * X + beta * X X^T (ADD_X) or X X^T, on the upper-triangle tile (ti <= tj) of this
    # program, stored at (ti, tj) and mirrored at (tj, ti). X is read through the one pointer for both
    # terms (no second argument aliasing it: kernels/_common.placeholder says why).
    # float arguments are fp64 in AOTInductor's launch signature: keep the math in fp32
    alpha = tl.cast(alpha, tl.float32)
    beta = tl.cast(beta, tl.float32)
    pid = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    # pid = r (r + 1) / 2 + c with c <= r; the fp32 sqrt is corrected by exact integer checks
    r = ((tl.sqrt((8 * pid + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    r = tl.where((r + 1) * (r + 2) // 2 <= pid, r + 1, r)
    r = tl.where(r * (r + 1) // 2 > pid, r - 1, r)
    ti = pid - r * (r + 1) // 2
    tj = r
    o_i = ti * BLOCK + tl.arange(0, BLOCK)
    o_j = tj * BLOCK + tl.arange(0, BLOCK)
    o_k = tl.arange(0, BLOCK_K)
    p_xb = p_x + pid_b * m * K
    acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        m_k = (k + o_k) < K
        b_a = tl.load(p_xb + o_i[:, None] * K + (k + o_k)[None, :], mask=(o_i[:, None] < m) & m_k[None, :], other=0.0)
        b_b = tl.load(p_xb + o_j[:, None] * K + (k + o_k)[None, :], mask=(o_j[:, None] < m) & m_k[None, :], other=0.0)
        if UPCAST:  # the interpreter's bf16 tl.dot is wrong: multiply exact fp32 copies instead
            b_a = b_a.to(tl.float32)
            b_b = b_b.to(tl.float32)
        acc = tl.dot(b_a, tl.trans(b_b), acc)
    mask = (o_i[:, None] < m) & (o_j[None, :] < m)
    offs = pid_b * m * m + o_i[:, None] * m + o_j[None, :]
    if ADD_X:
        b_c = tl.load(p_x + offs, mask=mask, other=0.0).to(tl.float32)
        acc = alpha * b_c + beta * acc
    out = round_bf16(acc).to(tl.bfloat16)
    tl.store(p_o + offs, out, mask=mask)
    if ti != tj:
        offs_t = pid_b * m * m + o_j[:, None] * m + o_i[None, :]
        tl.store(p_o + offs_t, tl.trans(out), mask=(o_j[:, None] < m) & (o_i[None, :] < m))


@triton.jit
def _ns_gemm_kernel(p_b, p_x, p_o, a, m, n, so_i, so_j, so_b, decay, alpha, UPDATE: tl.constexpr,
                    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # p_b [Bt, m, m] bf16; p_x [Bt, m, n] bf16; O = a X + B X written at p_o + b so_b + i so_i + j so_j
    # (so the last step can write G's layout and dtype directly). UPDATE (Muon's epilogue): p_o is the
    # float32 parameter, updated in place: P <- P * decay + alpha * O (param.mul_(decay) then
    # param.add_(O, alpha=alpha)).
    # float arguments are fp64 in AOTInductor's launch signature: keep the math in fp32
    a = tl.cast(a, tl.float32)
    pid_b = tl.program_id(1).to(tl.int64)
    pid_m, pid_n = tile_ids(tl.cdiv(m, BLOCK_M), n, BLOCK_N, GROUP_M)
    o_i = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_k = tl.arange(0, BLOCK_K)
    p_bb = p_b + pid_b * m * m
    p_xb = p_x + pid_b * m * n
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, m, BLOCK_K):
        m_k = (k + o_k) < m
        b_l = tl.load(p_bb + o_i[:, None] * m + (k + o_k)[None, :], mask=(o_i[:, None] < m) & m_k[None, :], other=0.0)
        b_r = tl.load(p_xb + (k + o_k)[:, None] * n + o_j[None, :], mask=m_k[:, None] & (o_j[None, :] < n), other=0.0)
        if UPCAST:
            b_l = b_l.to(tl.float32)
            b_r = b_r.to(tl.float32)
        acc = tl.dot(b_l, b_r, acc)
    mask = (o_i[:, None] < m) & (o_j[None, :] < n)
    b_x = tl.load(p_xb + o_i[:, None] * n + o_j[None, :], mask=mask, other=0.0).to(tl.float32)
    out = round_bf16(a * b_x + acc)
    p_out = p_o + pid_b * so_b + o_i[:, None] * so_i + o_j[None, :] * so_j
    if UPDATE:
        decayed = tl.load(p_out, mask=mask, other=0.0) * tl.cast(decay, tl.float32)
        out = decayed + tl.cast(alpha, tl.float32) * out
    tl.store(p_out, out.to(p_o.dtype.element_ty), mask=mask)


# ================================================================================================
# Launchers
# ================================================================================================

def _launch_normalize(G: torch.Tensor, X: torch.Tensor, Bt: int, M: int, N: int, cfg: NewtonSchulzConfig,
                      momentum: tuple[torch.Tensor, float, bool] | None = None) -> None:
    # Three launches: one norm_block of partial sums per program (full parallelism even for one
    # matrix: the first version, 256 partials per matrix, spent 0.3 ms on one 4096 x 4096 matrix on
    # the H100, latency-bound), their sum per matrix in a fixed order, then the scaling.
    # momentum = (buf, momentum, nesterov): G is a float32 gradient, the first pass also advances buf
    # and keeps bf16(U) (Muon's direction), which the scaling then reads instead of G.
    numel = M * N
    n_part = triton.cdiv(numel, cfg.norm_block)
    part = torch.empty((Bt, n_part), dtype=torch.float32, device=G.device)
    den = torch.empty((Bt,), dtype=torch.float32, device=G.device)
    if momentum is None:
        buf, U = placeholder(G.device, torch.float32), placeholder(G.device, torch.bfloat16)
        w_buf = w_dir = 0.0
        nesterov = False
    else:
        buf, beta, nesterov = momentum
        U = torch.empty((Bt, M, N), dtype=torch.bfloat16, device=G.device)
        w_buf, w_dir = 1 - beta, beta
    launch(_ns_sumsq_kernel, (n_part, Bt), G, part, numel, cfg.norm_block, n_part, buf, U, float(w_buf), float(w_dir),
           MOMENTUM=momentum is not None, NESTEROV=nesterov, BLOCK=cfg.norm_block, num_warps=4)
    launch(_ns_den_kernel, (Bt,), part, den, n_part, BLOCK_P=1024, num_warps=4)
    m, n = min(M, N), max(M, N)
    s_i, s_j = (1, m) if M > N else (n, 1)                                  # X0[i, j] = G[j, i] when tall
    tile = min(cfg.norm_tile, triton.next_power_of_2(n))
    grid = (triton.cdiv(m, tile) * triton.cdiv(n, tile), Bt)
    launch(_ns_normalize_kernel, grid, G if momentum is None else U, den, X, m, n, s_i, s_j, TILE=tile, num_warps=4)


def _launch_sym(X: torch.Tensor, out: torch.Tensor, alpha: float, beta: float, Bt: int, m: int, K: int,
                cfg: NewtonSchulzConfig, add_x: bool) -> None:
    block = fit_block(cfg.sym_block, m)
    nt = triton.cdiv(m, block)
    launch(_ns_sym_kernel, (nt * (nt + 1) // 2, Bt), X, out, float(alpha), float(beta),
           m, K, ADD_X=add_x, UPCAST=INTERPRET, BLOCK=block, BLOCK_K=fit_block(cfg.sym_block_k, K),
           num_warps=cfg.sym_num_warps, num_stages=cfg.sym_num_stages)


def _launch_gemm(B: torch.Tensor, X: torch.Tensor, out: torch.Tensor, a: float, Bt: int, m: int, n: int,
                 out_strides: tuple[int, int, int], cfg: NewtonSchulzConfig,
                 update: tuple[float, float] | None = None) -> None:
    # update = (decay, alpha): out is the parameter, out <- out * decay + alpha * (a X + B X)
    block_m, block_n = fit_block(cfg.block_m, m), fit_block(cfg.block_n, n)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n), Bt)
    so_i, so_j, so_b = out_strides
    decay, alpha = update or (1.0, 1.0)
    launch(_ns_gemm_kernel, grid, B, X, out, float(a), m, n, so_i, so_j, so_b, float(decay), float(alpha),
           UPDATE=update is not None, UPCAST=INTERPRET, BLOCK_M=block_m, BLOCK_N=block_n,
           BLOCK_K=fit_block(cfg.block_k, m), GROUP_M=cfg.group_m, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


# ================================================================================================
# Public function
# ================================================================================================

def newton_schulz(G: torch.Tensor, coefficients: list[float],
                  config: NewtonSchulzConfig | dict | str | None = None) -> torch.Tensor:
    """Orthogonalise every matrix of G [..., M, N] (float32 / bfloat16 / float16, contiguous) by
    Newton-Schulz; returns [..., M, N] in G's dtype.

    coefficients: flat a0, b0, c0, a1, b1, c1, ...: one (a, b, c) triple per step.
    X = bf16(G) / (||bf16(G)||_F + 1e-7) per matrix, transposed when M > N (X [m, n], m <= n); each
    step X <- a X + (b A + c A A) X with A = X X^T, bf16 operands and fp32 accumulation.
    Workspace: 2 [..., m, n] + 2 [..., m, m] bf16.
    """
    check_tensor("newton_schulz", "G", G, FLOAT_DTYPES, min_ndim=2)
    coefficients = _checked_coefficients("newton_schulz", coefficients)
    out = torch.empty_like(G)
    _run(G, out, coefficients, resolve_config(NewtonSchulzConfig, config, default_config, G.device))
    return out


def fused_muon_step(param: torch.Tensor, grad: torch.Tensor, momentum_buffer: torch.Tensor, coefficients: list[float],
                    *, momentum: float, nesterov: bool, decay: float, alpha: float,
                    config: NewtonSchulzConfig | dict | str | None = None) -> None:
    """One Muon step of a float32 parameter [..., M, N] (a matrix or a stack), in place, in Newton-Schulz's
    launch sequence; what model/muon.py's step does with `newton_schulz` above:

        momentum_buffer.lerp_(grad, 1 - momentum)
        U = grad.lerp(momentum_buffer, momentum) if nesterov else momentum_buffer
        param.mul_(decay); param.add_(newton_schulz(U, coefficients), alpha=alpha)

    The momentum and Nesterov mix run in the norm's first pass (U is kept only as bf16(U), all that
    Newton-Schulz reads of it) and the update in the last product's epilogue: 26 bytes of memory traffic
    an element instead of 58. param, grad, momentum_buffer: float32, contiguous, one shape. Agrees with
    the unfused step to float32 rounding (fused multiply-adds may differ by an ulp, which can move an
    element of U to its other bf16 neighbour).
    """
    check_tensor("fused_muon_step", "param", param, (torch.float32,), min_ndim=2)
    for name, t in (("grad", grad), ("momentum_buffer", momentum_buffer)):
        check_tensor("fused_muon_step", name, t, (torch.float32,), shape=param.shape, device=param.device)
    coefficients = _checked_coefficients("fused_muon_step", coefficients)
    _run(grad, param, coefficients, resolve_config(NewtonSchulzConfig, config, default_config, param.device),
         momentum=(momentum_buffer, float(momentum), bool(nesterov)), update=(float(decay), float(alpha)))


def _checked_coefficients(op: str, coefficients: list[float]) -> list[float]:
    coefficients = [float(c) for c in coefficients]
    check(len(coefficients) > 0 and len(coefficients) % 3 == 0,
          f"{op}: coefficients has {len(coefficients)} values; need one (a, b, c) triple per step")
    return coefficients


def _run(G: torch.Tensor, out: torch.Tensor, coefficients: list[float], cfg: NewtonSchulzConfig,
         momentum: tuple[torch.Tensor, float, bool] | None = None, update: tuple[float, float] | None = None) -> None:
    """The launch sequence: normalise G [..., M, N] (with Muon's momentum prologue), the steps, the last
    one into `out` (G's layout; with `update`, out is the parameter: see `_launch_gemm`)."""
    *lead, M, N = G.shape
    Bt = math.prod(lead)
    if Bt == 0 or M == 0 or N == 0:
        return
    m, n = min(M, N), max(M, N)
    dev = G.device
    X = torch.empty((Bt, m, n), dtype=torch.bfloat16, device=dev)
    X_next = torch.empty((Bt, m, n), dtype=torch.bfloat16, device=dev)
    A = torch.empty((Bt, m, m), dtype=torch.bfloat16, device=dev)
    B = torch.empty((Bt, m, m), dtype=torch.bfloat16, device=dev)
    _launch_normalize(G, X, Bt, M, N, cfg, momentum)
    n_steps = len(coefficients) // 3
    for step in range(n_steps):
        a, b, c = coefficients[3 * step: 3 * step + 3]
        _launch_sym(X, A, 0.0, 1.0, Bt, m, n, cfg, add_x=False)             # A = X X^T
        _launch_sym(A, B, b, c, Bt, m, m, cfg, add_x=True)                  # B = b A + c A A
        if step == n_steps - 1:
            strides = (1, m, M * N) if M > N else (n, 1, M * N)             # G's layout: X^T when tall
            _launch_gemm(B, X, out, a, Bt, m, n, strides, cfg, update)
        else:
            _launch_gemm(B, X, X_next, a, Bt, m, n, (n, 1, m * n), cfg)
            X, X_next = X_next, X


# ================================================================================================
# Torch op (torch.ops.dsv4_triton.newton_schulz): the dsv4 signature plus a config string
# ================================================================================================

@kernel_op("newton_schulz")
def _newton_schulz_op(G: torch.Tensor, coefficients: list[float], config: str = "") -> torch.Tensor:
    return newton_schulz(G, coefficients, config)
