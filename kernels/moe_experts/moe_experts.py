"""Routed experts of a MoE layer as two grouped GEMM launches over tokens sorted by expert
(`torch.ops.dsv4.moe_experts`, `moe_experts_fp8`, `moe_experts_fp8_w8a8`, `moe_experts_mxfp4`,
`moe_experts_mxfp4_w4a8` semantics, see model/moe_ops.py).

Layout (model.moe_ops.expert_blocks, plain torch ops on the device, no host sync; for decode sizes the
same integers from one Triton program, expert_blocks.py): the T*k assignments sorted by expert, each
expert's run padded to a multiple of block_m rows; slot [n_blocks, block_m]
holds the assignment t*k + j of each row (N = T*k in padding), block_expert [n_blocks] the expert of
each block (E past the last used block: those programs return at once). n_blocks is the static bound
max_expert_blocks(N, E, block_m), so the grids depend on the sizes only (CUDA graphs, export).

  1. `_gate_up_kernel`, one program per (block of rows, block_n columns of I): the rows' tokens of x
     gathered, times w1[e]^T and w3[e]^T in one K loop (two accumulators; W8A8: a loop each), SwiGLU
     with the clamps in the epilogue; act [n_blocks * block_m, I] in x's dtype (W8A8: FP8, below).
  2. `_down_kernel`, one program per (block of rows, down_block_n columns of D): act @ w2[e]^T, the
     routing weight of each row in the epilogue (W8A8: already in act), stored (fp32) into its
     assignment's row of slots [T * k, D] (each row written once: no atomics).
  3. `_sum_slots_kernel`: out[t] = sum over j = 0 .. k-1 of slots[t * k + j] (ids of -1 skipped), in
     that order, in fp32: the result does not depend on which program finished first (atomics into
     out[t] summed the k contributions in arrival order, so two runs could differ in the last bit
     and a greedy token at a near tie with them), and it is the naive twin's order.
The GEMMs sweep the column tiles of group_m row blocks before the next rows (L2 reuse of weight tiles).
Split-K at decode sizes (config split_k / down_split_k, run_splits: split_k // T ranges of whole K tiles,
at least 1, an expression of an engine's symbolic T): one token's gate/up launch is otherwise a few
programs an SM each walking all of D. Each gate/up range stores its fp32 partial sums of gate and up
([ranges * assignments, 2 I]); `_swiglu_splits_kernel` adds them in range order and applies the
epilogue above (W8A8 / W4A8: the weight and the rounding, in place of act_round's pass) over a grid of
the assignments, into an activation of a row per assignment that the down launch reads by slot (not
over routing blocks: a decode block of 16 rows holds one or two assignments); each
down range stores its partial slot rows ([ranges * T * k, D]) and the slot sum adds an assignment's
ranges in order before its j: deterministic, the same products summed in another order.
Chunks: slots alone take T * k * D * 4 bytes (12 GiB at 128K tokens, D 4096, k 6) and act T * k * I
more, so the three launches run once per chunk of tokens (chunk_plan: all T in one chunk where they fit
WORKSPACE_BYTES, as at decode), act and slots sized for one chunk and reused, the layout of every
chunk from one sort (model.moe_ops.chunked_expert_blocks: chunk c's rows are the layout of its tokens
alone). A row's products depend on its own token, expert and the config only (chosen once, from all
T * k assignments), and a token's k rows are summed in j order within its chunk: the chunked result
is the unchunked one bit for bit. A symbolic T (export) takes the chunk count of its upper bound, so
the launches stay static; a chunk past the actual T finds only padding blocks and returns at once.
Weights: float (bf16/fp16/fp32, as x), FP8 e4m3 codes with one scale per 128 x 128 tile, or MXFP4
(two e2m1 codes per byte, low nibble first, one scale per 1 x 32 along the reduction dim); scales
e8m0 bytes or float32. Quantized tiles are dequantized in registers and multiplied in x's dtype with
fp32 accumulation (W8A16 / W4A16; exact: every code times a power-of-two scale is a bf16 value):
FP8 codes converted by the hardware (the interpreter decodes their bits); MXFP4 loaded as 32-bit words
of eight codes, each code's bits shifted into a bf16 (each integer operation on two codes: _e2m1_bf16x2),
times 2^126 and the scale as bf16x2 multiplies on the words (config mxfp4_scaling "two"), or times their
product in one (bf16 holds it for scales up to 2: "one", the decode default), the K positions in the
order the words decode into (a permutation within each run of 8) and the activations loaded in the same
order (_mxfp4_order), so no weight moves between registers (bench/results/H200/moe_mxfp4_offline.md,
bench/results/H100/session30_moe_one_multiply_offline.md: the SASS per weight). float32 MXFP4 scales
(as base models ship scales; the model holds e8m0 bytes) take those routes too, their exponent fields
read as e8m0 bytes. Along the K loop each program checks what its route assumes (float32 scales:
normal powers of two, _not_pow2; "one": at most 2); one that fails runs its K loop again on the exact
route: two bf16 multiplies (e8m0: any byte, NaN and overflow as in fp32) or fp32 multiplies (float32
scales of any value).
W8A8 (`act="fp8"` with FP8 weights: the moe_experts_fp8_w8a8 op, D and I multiples of 128): x
quantized to e4m3 per row and 128-block with power-of-two scales (DeepSeek's act_quant) once, by
kernels/fp8_quantize, before the chunks; the gate/up launch runs one K loop per weight (_fp8_gemm) over
the gathered codes, and its epilogue multiplies the fp32 SwiGLU output by the row's routing weight and
quantizes it the same way (act: e4m3 codes + [rows, I/128] fp32 scales; DeepSeek's Expert weights the
activation before w2's act_quant too); the down launch reads those (config act_round "pass": the
epilogue stores the weighted activation in fp32 and a pass of its own, fp8_quantize, rounds it between
the launches, so that the gate/up column tiles need not hold whole 128-blocks: W4A8's decode default,
the same bits). Each K tile's FP8 product (QGMMA on
sm_90) is promoted to the fp32 accumulator times the row's activation scale and the weight tile's
scale, as fp8_linear does. W4A8 (`act="fp8"` with MXFP4 weights: the moe_experts_mxfp4_w4a8 op, as
DeepSeek runs the releases' MXFP4 experts): the same launches and activation quantization, the weight
tiles decoded from e2m1 to e4m3 (exact) for the same FP8 MMAs, their 1 x 32 scales folded into the
values or applied per 32-run (_mxfp4_e4m3_dot; the W4A8 note below), or with the operands swapped, the
weight rows the MMA's first operand (w4a8_mma "fp8_swap", _mxfp4_e4m3_swapped); on bf16 tensor cores (config
w4a8_mma, the default) W4A16's K loops over the rounded values themselves in x's dtype (exact: x's from
one pass, kernels/fp8_quantize.fp8_round; the activation's rounded in the epilogue or, act_round
"pass", by fp8_round between the launches). Which of W8A16 / W4A16 and W8A8 /
W4A8 runs is the op's (the launcher's `act`), never a config's: they are different numbers (~5e-2
relative RMS apart on Gaussian data).
Numbers: W8A16 and the float ops, against the plain op, multiply the routing weight into the fp32
product of w2 instead of the activation before its rounding to x's dtype (bf16: within the bf16
tolerance; fp32: equal up to summation order); W8A8 and W4A8 weight the activation where the plain op
does. Workspace: act [n_blocks * block_m, I] (split gate/up: a row per assignment) in x's dtype (on
FP8 tensor cores, W8A8 and W4A8 with w4a8_mma "fp8": 1 + 4/128 bytes a value) and slots [chunk * k, D]
float32 for one chunk of tokens (within WORKSPACE_BYTES), the routing layout of all T * k assignments
(about 40 bytes each); W8A8 and W4A8 also x's codes and scales (T * D * 33/32 bytes), W4A8 on bf16
tensor cores x's rounded values too; with act_round "pass" the unrounded activation
[n_blocks * block_m, I] float32 as well.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...model.moe_ops import chunked_expert_blocks
from .._common import (FLOAT_DTYPES, INTERPRET, check, check_tensor, device_name, kernel_op, largest_value,
                       launch, placeholder, split_chunks)
from .._jit_utils import (dot_acc, e4m3_bits, e4m3_dequantized, e4m3_value, quantize_rows_e4m3, round_bf16,
                          tile_ids)
from ..fp8_quantize import fp8_quantize, fp8_round
from . import expert_blocks as one_program_layout
from .config import ACT_BLOCK, MoeExpertsConfig, default_config, fit_block, run_splits

WEIGHT_FORMATS = ("float", "fp8", "mxfp4")
# How the activations meet the weights, a semantic of the op (not a tunable): "x" in x's dtype (the
# quantized weights decoded to it: W8A16 / W4A16); "fp8" quantized to FP8 (W8A8 / W4A8, FP8 or MXFP4 weights).
ACTS = ("x", "fp8")
SUM_BLOCK_T, SUM_BLOCK_D = 8, 256   # the slot sum reads T * k * D * 4 bytes once: any tile near 2K elements
SWIGLU_BLOCK_N = 128                # the split gate/up's SwiGLU pass: one activation scale block a program
# The workspace of a call (act and slots of one chunk of tokens) stays within this many bytes (chunk_plan).
# Each chunk reads every expert in use again (~2.7 ms for V4-Flash's 256 bf16 experts on an H200), so
# small chunks cost time: T = 128K, D 4096, I 2048, k 6 took 76 ms unchunked (15 GiB of workspace),
# 84 ms in 4 chunks at 4 GiB, 98 ms in 8 at 2 GiB, 125 ms in 18 at 1 GiB (one H200 run). 4 GiB: 34K
# tokens a chunk at those shapes, so the benchmarks' sizes up to 32K and every decode run unchunked.
WORKSPACE_BYTES = 4 << 30
_FMT = {"float": 0, "fp8": 1, "mxfp4": 2}
# The ops of act="fp8", by weight format: moe_experts_fp8_w8a8 (W8A8), moe_experts_mxfp4_w4a8 (W4A8).
_FP8_ACT_SUFFIX = {"fp8": "_w8a8", "mxfp4": "_w4a8"}
_SCALE_DTYPES = (torch.float8_e8m0fnu, torch.uint8, torch.float32)

# ================================================================================================
# Weight decoding (bit-exact, the same compiled and interpreted)
# ================================================================================================


@triton.jit
def _e8m0(u):
    """e8m0 bytes (int32 0..255) -> fp32 2^(u - 127); 0 -> 2^-127 (subnormal), 255 -> NaN."""
    v = (u << 23).to(tl.float32, bitcast=True)
    v = tl.where(u == 0, 5.877471754111438e-39, v)
    return tl.where(u == 255, float("nan"), v)


@triton.jit
def _e8m0_bf16_bits(u):
    """e8m0 bytes (int32 0..255) -> int32 bit patterns of bf16 2^(u - 127) (the same values as _e8m0:
    0 -> 2^-127, a bf16 subnormal; 255 -> NaN): u in the exponent field."""
    return tl.where(u == 0, 0x0040, tl.where(u == 255, 0x7FC0, u << 7))


@triton.jit
def _e2m1_bf16x2(word):
    """uint32 words of four packed bytes (eight e2m1 codes: byte j holds positions 2j, low nibble, and
    2j + 1) -> four uint32 words of two bf16 bit patterns each (low half, high half): positions (0, 4),
    (1, 5), (2, 6), (3, 7). Each code's sign, exponent and mantissa bits move into a bf16's sign, two
    lowest exponent bits and top mantissa bit: the bf16 is the code's value times 2^-126 (the code 0.5
    a bf16 subnormal). The two codes of an output word sit 16 bits apart in the input, so one pair of
    shifts and masks places both: two integer operations a value, no conversion."""
    mag, sign = 0x01C001C0, 0x80008000          # bf16 bits 6..8 and 15 of both halves
    return (((word << 6) & mag) | ((word << 12) & sign), ((word << 2) & mag) | ((word << 8) & sign),
            ((word >> 2) & mag) | ((word << 4) & sign), ((word >> 6) & mag) | (word & sign))


@triton.jit
def _halves(pair):
    """uint32 words -> [..., 2] uint16 (low half, high half)."""
    return tl.join((pair & 0xFFFF).to(tl.uint16), (pair >> 16).to(tl.uint16))


@triton.jit
def _mul_bf16x2(a, b):
    """uint32 words of two bf16 each, multiplied half by half (round to nearest): one instruction, an FMA
    adding -0 (the product's value and sign; sm_80 has bf16x2 FMAs, mul.bf16x2 needs sm_90)."""
    return tl.inline_asm_elementwise("{ .reg .b32 z; mov.b32 z, 0x80008000; fma.rn.bf16x2 $0, $1, $2, z; }",
                                     "=r,r,r", [a, b], dtype=tl.uint32, is_pure=True, pack=1)


@triton.jit
def _mxfp4_order(a, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Columns of a [BLOCK_M, BLOCK_K] tile in the order _mxfp4_tile's rows hold K: column 8r + 2p + h
    holds position 8r + p + 4h (p < 4, h < 2; a permutation within each run of 8)."""
    a = tl.reshape(a, [BLOCK_M, BLOCK_K // 8, 2, 2, 2])         # [m, r, h, p // 2, p % 2]
    return tl.reshape(tl.permute(a, (0, 1, 3, 4, 2)), [BLOCK_M, BLOCK_K])


@triton.jit
def _scale(p_s, offs, mask, SCALE_F32: tl.constexpr):
    if SCALE_F32:
        return tl.load(p_s + offs, mask=mask, other=1.0)
    else:
        return _e8m0(tl.load(p_s + offs, mask=mask, other=127).to(tl.int32))


@triton.jit
def _fp8_scale_index(e, n, k0, R, C):
    """Index of the scale of W[e][n, k0] in FP8 scales [E, ceil(R/128), ceil(C/128)] (n: a row or rows)."""
    s_cols = tl.cdiv(C, 128)
    return e.to(tl.int64) * tl.cdiv(R, 128) * s_cols + (n // 128) * s_cols + k0 // 128


@triton.jit
def _weight_tile(p_w, p_s, e, offs_n, k0, R, C, FMT: tl.constexpr, SCALE_F32: tl.constexpr,
                 NATIVE_FP8: tl.constexpr, BLOCK_K: tl.constexpr):
    """W[e][offs_n, k0 : k0 + BLOCK_K]^T as a [BLOCK_K, BLOCK_N] tile of W [E, R, C] (R output rows, C
    the reduction dim; 0 outside): the stored dtype for float weights, fp32 for FP8 (codes times
    their tile's scale: one scale per column here, as BLOCK_K divides 128 and k0 is a multiple of it)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask = (offs_k[:, None] < C) & (offs_n[None, :] < R)
    ptrs = p_w + e.to(tl.int64) * R * C + offs_n[None, :] * C + offs_k[:, None]
    if FMT == 0:
        w = tl.load(ptrs, mask=mask, other=0.0)
    else:  # FP8 codes [E, R, C], scales [E, ceil(R/128), ceil(C/128)]
        if NATIVE_FP8:  # float8_e4m3fn loads converted by the hardware
            w = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        else:  # the interpreter: uint8 codes decoded from their bits
            w = e4m3_value(tl.load(ptrs, mask=mask, other=0).to(tl.int32))
        s = _scale(p_s, _fp8_scale_index(e, offs_n, k0, R, C), offs_n < R, SCALE_F32)
        w = w * s[None, :]
    return w


@triton.jit
def _fp8_gemm(p_a, p_as, rows, row_ok, p_w, p_s, e, n0, R, C, k_lo, k_hi, FMT: tl.constexpr, SCALE_F32: tl.constexpr,
              NATIVE_FP8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """W8A8 / W4A8: [BLOCK_M, BLOCK_N] fp32 = A[rows, k_lo:k_hi] @ W[e][n0 : n0 + BLOCK_N, k_lo:k_hi]^T (k_lo a
    multiple of BLOCK_K) for activations A [*, C]
    e4m3 codes with scales [*, C/128] float32 (rows [BM] int64; rows not row_ok read as 0) and W [E, R, C]
    FP8 (FMT 1, scales as _weight_tile's) or MXFP4 (FMT 2: _mxfp4_e4m3_dot); C a multiple of 128.
    Per K tile (BLOCK_K divides 128: one activation scale per row and, for FP8, one weight scale per
    column), the FP8 product (exact per term: e4m3 x e4m3 has at most 8 significant bits) summed by the
    FP8 tensor cores (tl.dot of two e4m3 operands: QGMMA ... E4M3.E4M3 on sm_90; the interpreter
    multiplies the decoded values) is promoted to the fp32 accumulator times both power-of-two scales
    (exact), as fp8_linear and DeepSeek's DeepGEMM do."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if FMT == 2:  # one K loop per way of applying the runs' scales, so that each compiles lean
        if _mxfp4_foldable(p_s, e, offs_n, R, C, SCALE_F32, BLOCK_K, BLOCK_N):
            for k0 in range(k_lo, k_hi, BLOCK_K):
                a, s_a = _act_tile(p_a, p_as, rows, row_ok, k0, C, BLOCK_K)
                acc = _mxfp4_e4m3_dot(acc, a, s_a, p_w, p_s, e, offs_n, k0, R, C, True, SCALE_F32, NATIVE_FP8,
                                      BLOCK_K, BLOCK_N)
        else:
            for k0 in range(k_lo, k_hi, BLOCK_K):
                a, s_a = _act_tile(p_a, p_as, rows, row_ok, k0, C, BLOCK_K)
                acc = _mxfp4_e4m3_dot(acc, a, s_a, p_w, p_s, e, offs_n, k0, R, C, False, SCALE_F32, NATIVE_FP8,
                                      BLOCK_K, BLOCK_N)
    else:
        p_w_tile = p_w + e.to(tl.int64) * R * C + offs_n[None, :] * C
        for k0 in range(k_lo, k_hi, BLOCK_K):
            a, s_a = _act_tile(p_a, p_as, rows, row_ok, k0, C, BLOCK_K)
            offs_k = k0 + tl.arange(0, BLOCK_K)
            w = tl.load(p_w_tile + offs_k[:, None], mask=offs_n[None, :] < R, other=0.0)        # [BK, BN] e4m3
            if BLOCK_N <= 128:  # a power-of-two tile inside one 128-row weight tile: one scale, one FFMA a value
                s_w = _scale(p_s, _fp8_scale_index(e, n0, k0, R, C), n0 < R, SCALE_F32)
                acc += tl.dot(a, w) * (s_a * s_w)[:, None]
            else:
                s_w = _scale(p_s, _fp8_scale_index(e, offs_n, k0, R, C), offs_n < R, SCALE_F32)  # [BN]
                acc += tl.dot(a, w) * s_a[:, None] * s_w[None, :]
    return acc


@triton.jit
def _act_tile(p_a, p_as, rows, row_ok, k0, C, BLOCK_K: tl.constexpr):
    """A[rows, k0 : k0 + BLOCK_K] e4m3 codes [BM, BK] and their scales [BM] (rows not row_ok: 0) of
    activations A [*, C] with scales [*, C/128] float32 (BLOCK_K divides 128)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    a = tl.load(p_a + rows[:, None] * C + offs_k[None, :], mask=row_ok[:, None], other=0.0)
    return a, tl.load(p_as + rows * (C // 128) + k0 // 128, mask=row_ok, other=0.0)


@triton.jit
def _mxfp4_row_words(C):
    """uint32 words a row of MXFP4 bytes [E, R, C/2] holds: C / 8, written (C // 32) * 4 (C is a multiple of
    32: the launcher's check) so that Triton's divisibility analysis knows it as a multiple of 4 (of C it
    knows 16 at most): with K positions that are multiples of 32 too, a run's four words are one 16-byte
    copy, not two 8-byte ones (fewer registers and copies a K step). Plain arithmetic, not tl.multiple_of:
    torch 2.11's mutation analysis builds a kernel with its integer arguments as constants, where a hint on
    a constant does not compile, and the analysis then counts every argument as written (export would
    copy the expert weights every call)."""
    return C // 32 * 4


@triton.jit
def _mxfp4_words(p_w, e, offs_n, k0, R, C, BLOCK_K: tl.constexpr):
    """MXFP4 W[e][offs_n, k0 : k0 + BLOCK_K] as uint32 words [BLOCK_K/8, BLOCK_N] (eight codes each, byte j
    the positions 8r + 2j (low nibble) and 8r + 2j + 1; 0 outside) of bytes [E, R, C/2]: rows of
    _mxfp4_row_words words, k0 a multiple of the K tile, so words never straddle rows and come 16 bytes
    a copy."""
    row_words = _mxfp4_row_words(C)
    offs_w = tl.max_contiguous(tl.multiple_of(k0 // 8 + tl.arange(0, BLOCK_K // 8), 4), BLOCK_K // 8)
    p_words = p_w.to(tl.pointer_type(tl.uint32)) + e.to(tl.int64) * R * row_words
    return tl.load(p_words + offs_n[None, :] * row_words + offs_w[:, None],
                   mask=(offs_w[:, None] < row_words) & (offs_n[None, :] < R), other=0)


@triton.jit
def _mxfp4_scales(p_s, e, offs_n, k0, R, C, SCALE_F32: tl.constexpr, BLOCK_K: tl.constexpr):
    """The scales of W[e][offs_n, k0 : k0 + BLOCK_K] as [BLOCK_K/32, BLOCK_N] (scales [E, R, C/32]): e8m0
    bytes as int32 (127, i.e. 1, outside) or float32 values (1.0 outside)."""
    offs_g = k0 // 32 + tl.arange(0, BLOCK_K // 32)
    ps = p_s + e.to(tl.int64) * R * (C // 32) + offs_n[None, :] * (C // 32) + offs_g[:, None]
    mask = (offs_g[:, None] < C // 32) & (offs_n[None, :] < R)
    if SCALE_F32:
        return tl.load(ps, mask=mask, other=1.0)
    else:
        return tl.load(ps, mask=mask, other=127).to(tl.int32)


# MXFP4 scaling routes of _mxfp4_tile (ROUTE): EXACT (any scale; e8m0 bytes: 2^126, then the scale, two
# bf16 multiplies; float32 scales: fp32 multiplies), POW2 (float32 scales read as e8m0 bytes from their
# exponent fields, as EXACT's e8m0 route: the caller checks they are normal powers of two), ONE (one bf16
# multiply by 2^126 * scale, which bf16 holds for exponents up to 128: the caller checks those, and POW2's
# check for float32 scales). A program whose check fails runs its K loop again on EXACT.
ROUTE_EXACT, ROUTE_POW2, ROUTE_ONE = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def _mxfp4_tile(p_w, p_s, e, offs_n, k0, R, C, SCALE_F32: tl.constexpr, ROUTE: tl.constexpr, UPCAST: tl.constexpr,
                BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """W[e][offs_n, k0 : k0 + BLOCK_K]^T as a [BLOCK_K, BLOCK_N] tile with its rows in _mxfp4_order
    (row 8r + 2p + h holds position k0 + 8r + p + 4h; 0 outside), for MXFP4 W: bytes [E, R, C/2] (the
    low nibble the even element), scales [E, R, C/32]; and the scales' e8m0 exponents [BLOCK_K/32,
    BLOCK_N] int32 (ROUTE_ONE's caller checks them). Loaded as uint32 words
    (_mxfp4_words), decoded by _e2m1_bf16x2 in that order so that no value moves between registers (the
    caller loads the activations in the same order): a code's value times 2^-126, then times 2^126 and
    its scale (ROUTE, above), exact: a code times a power of two has at most two significant bits; bf16
    holds it, subnormals included, or it overflows as in fp32. Compiled, the bf16 multiplies act on the
    words as _e2m1_bf16x2 packs them (both codes of a word share a 32-run), two values an instruction;
    UPCAST (the interpreter, whose bf16 arithmetic works on the raw bits) multiplies in fp32, the same
    values."""
    G: tl.constexpr = BLOCK_K // 32
    p0, p1, p2, p3 = _e2m1_bf16x2(_mxfp4_words(p_w, e, offs_n, k0, R, C, BLOCK_K))         # [BK/8, BN] each
    u = _mxfp4_scales(p_s, e, offs_n, k0, R, C, SCALE_F32, BLOCK_K)                      # [G, BN]
    FP32: tl.constexpr = SCALE_F32 and ROUTE == ROUTE_EXACT                              # any float32 scale
    if SCALE_F32:
        exp = (u.to(tl.int32, bitcast=True) >> 23) & 0xFF
    else:
        exp = u
    if ROUTE == ROUTE_ONE:
        mult = (tl.minimum(exp, 128) + 126) << 7                                          # bf16 bits of 2^(u - 1)
    else:
        mult = _e8m0_bf16_bits(exp)                                                       # bf16 bits of 2^(u - 127)
    if UPCAST or FP32:
        w = (_mma_order(p0, p1, p2, p3, G, BLOCK_N).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
        if ROUTE == ROUTE_ONE:
            w = w * (mult << 16).to(tl.float32, bitcast=True)[:, None, :]
        else:
            w = w * 8.507059173023462e+37 * (u if FP32 else _e8m0(exp))[:, None, :]         # 2^126, the scale
    else:
        by_word = tl.reshape(tl.broadcast_to((mult * 0x10001).to(tl.uint32)[:, None, :], [G, 4, BLOCK_N]),
                             [BLOCK_K // 8, BLOCK_N])                                      # both halves
        if ROUTE != ROUTE_ONE:  # 2^126 first
            two_126 = tl.full([BLOCK_K // 8, BLOCK_N], 0x7E807E80, tl.uint32)
            p0, p1, p2, p3 = _mul_bf16x2(p0, two_126), _mul_bf16x2(p1, two_126), _mul_bf16x2(p2, two_126), \
                _mul_bf16x2(p3, two_126)
        p0, p1, p2, p3 = _mul_bf16x2(p0, by_word), _mul_bf16x2(p1, by_word), _mul_bf16x2(p2, by_word), \
            _mul_bf16x2(p3, by_word)
        w = _mma_order(p0, p1, p2, p3, G, BLOCK_N).to(tl.bfloat16, bitcast=True)
    return tl.reshape(w, [BLOCK_K, BLOCK_N]), exp


@triton.jit
def _mma_order(p0, p1, p2, p3, G: tl.constexpr, BLOCK_N: tl.constexpr):
    """_e2m1_bf16x2's four words [BK/8, BN] -> their halves [G, 32, BN] uint16 in _mxfp4_order."""
    bits = tl.join(tl.join(_halves(p0), _halves(p1)), tl.join(_halves(p2), _halves(p3)))   # [r, n, h, p % 2, p // 2]
    return tl.reshape(tl.permute(bits, (0, 4, 3, 2, 1)), [G, 32, BLOCK_N])              # [r, p // 2, p % 2, h, n]


@triton.jit
def _not_pow2(p_s, e, offs_n, k0, R, C, BLOCK_K: tl.constexpr):
    """[BLOCK_N] int32: 1 where a float32 scale of W[e][offs_n, k0 : k0 + BLOCK_K] is not a positive normal
    power of two (masked-out ones read 1.0). Checked along the K loop, on the scales _mxfp4_tile loads (10
    more SASS instructions an iteration at decode's tiles, bench/results/H200/moe_f32_scales_offline.md): a
    pass over the scales before the loop is a chain of dependent loads, 2-2.7x the decode time."""
    _, exact = _scale_exponent(_mxfp4_scales(p_s, e, offs_n, k0, R, C, True, BLOCK_K), True)
    return tl.max(tl.where(exact, 0, 1), axis=0)


# ---- W4A8 with w4a8_mma "fp8": MXFP4 weights on the FP8 tensor cores -----------------------------------
# An e2m1 value v times 2^-6 is an e4m3 value (its exponent and mantissa bits placed in the e4m3 ones:
# _e2m1_e4m3x4), so MXFP4 tiles decode to e4m3 with no rounding. The four 1 x 32 weight scales of a
# 128-deep K tile still differ per run, while an FP8 MMA step sums its whole depth before the fp32
# promotion. Two ways to apply them: (a) one MMA per 32-run, each promoted times its own scale
# (DeepSeek's fp4_gemm: block_K 32), four times the promotions (CUDA-core FFMAs) and MMA steps of a
# quarter depth; (b) fold the runs' scales relative to the tile column's largest, 2^-shift, into the
# e4m3 values (v * 2^(6 - shift)), one MMA and one promotion per 128 as W8A8. (b) is exact only while
# every v * 2^(6 - shift) is an e4m3 value: shift <= FOLD_MAX_SHIFT (0.5 * 2^(6 - 14) = 2^-9 is e4m3's
# smallest subnormal; 6 * 2^6 = 384 < 448), and the scales powers of two (float32 scales may be any
# value). We fold, and run (a) where a program's weight columns break that anywhere along K (a run
# 2^15 below its neighbours, e.g. an all-zero run's 2^-126 scale; non-power-of-two float32 scales):
# the same products either way (exact), summed in another order. The check reads the program's scales
# once before the K loop (one reduction a program, not one per K tile).
FOLD_MAX_SHIFT = tl.constexpr(14)


@triton.jit
def _e2m1_e4m3x4(word):
    """uint32 words of four packed bytes (byte j: positions 2j, low nibble, and 2j + 1) -> two uint32
    words of four e4m3 bit patterns each, (positions 0, 2, 4, 6), (1, 3, 5, 7), each the code's value
    times 2^-6: its exponent and mantissa bits become the e4m3's two lowest exponent bits and top
    mantissa bit (e2m1's subnormal 0.5 an e4m3 subnormal), its sign the sign."""
    lo = ((word & 0x07070707) << 2) | ((word & 0x08080808) << 4)
    hi = ((word >> 2) & 0x1C1C1C1C) | (word & 0x80808080)
    return lo, hi


@triton.jit
def _bytes(word):
    """uint32 words [...] -> [..., 2, 2] uint8, byte 2i + c at index [i, c]."""
    b0, b1 = (word & 0xFF).to(tl.uint8), ((word >> 8) & 0xFF).to(tl.uint8)
    b2, b3 = ((word >> 16) & 0xFF).to(tl.uint8), (word >> 24).to(tl.uint8)
    return tl.join(tl.join(b0, b2), tl.join(b1, b3))


@triton.jit
def _scale_exponent(u, SCALE_F32: tl.constexpr):
    """_mxfp4_scales' [G, BN] -> (biased exponent int32, whether the scale is 2^(that - 127) exactly):
    e8m0 bytes all are but 255 (NaN); float32 values the positive normal powers of two."""
    if SCALE_F32:
        bits = u.to(tl.int32, bitcast=True)
        exp = (bits >> 23) & 0xFF
        return exp, (bits >= 0) & ((bits & 0x7FFFFF) == 0) & (exp > 0) & (exp < 255)   # positive, normal
    else:
        return u, u < 255


@triton.jit
def _mxfp4_foldable(p_s, e, offs_n, R, C, SCALE_F32: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Whether every K tile of W[e][offs_n, :] folds exactly (the W4A8 note above): scalar bool."""
    bad = tl.zeros([BLOCK_K // 32, BLOCK_N], dtype=tl.int32)
    for k0 in range(0, C, BLOCK_K):
        exp, exact = _scale_exponent(_mxfp4_scales(p_s, e, offs_n, k0, R, C, SCALE_F32, BLOCK_K), SCALE_F32)
        shift = tl.max(exp, axis=0)[None, :] - exp
        bad |= tl.where(exact & (shift <= FOLD_MAX_SHIFT), 0, 1)
    return tl.max(tl.max(bad, axis=1), axis=0) == 0


@triton.jit
def _mxfp4_e4m3_dot(acc, a, s_a, p_w, p_s, e, offs_n, k0, R, C, FOLD: tl.constexpr, SCALE_F32: tl.constexpr,
                    NATIVE_FP8: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """acc [BM, BN] + (A * s_a) @ W[e][offs_n, k0 : k0 + BLOCK_K]^T for a [BM, BLOCK_K] e4m3 tile and its
    rows' scales s_a [BM], MXFP4 W (_mxfp4_words, _mxfp4_scales), on the FP8 tensor cores: folded
    (FOLD, one MMA; the caller checked _mxfp4_foldable) or one MMA per 32-run (the W4A8 note above)."""
    G: tl.constexpr = BLOCK_K // 32
    lo, hi = _e2m1_e4m3x4(_mxfp4_words(p_w, e, offs_n, k0, R, C, BLOCK_K))                 # [BK/8, BN] each
    codes = tl.join(_bytes(lo), _bytes(hi))                                 # [r, n, i, c, h]: position 8r + 4i + 2c + h
    codes = tl.reshape(tl.permute(codes, (0, 2, 3, 4, 1)), [G, 32, BLOCK_N])               # K in order, by 32-run
    u = _mxfp4_scales(p_s, e, offs_n, k0, R, C, SCALE_F32, BLOCK_K)                       # [G, BN]
    if FOLD:
        exp, _ = _scale_exponent(u, SCALE_F32)
        top = tl.max(exp, axis=0)                                                         # [BN]
        # v * 2^-6 times 2^(12 - shift): v * 2^(6 - shift), in fp16 (two values an instruction; exact: at
        # most 2 significant bits, 2^-9 .. 384) and (shift <= 14) in e4m3
        mult = ((27 - (top[None, :] - exp)) << 10).to(tl.int16).to(tl.float16, bitcast=True)   # [G, BN] 2^(12 - shift)
        y = codes.to(tl.float8e4nv, bitcast=True).to(tl.float16) * mult[:, None, :]
        if NATIVE_FP8:
            w = y.to(tl.float8e4nv)
        else:  # the interpreter's cast truncates (exact here, but its subnormals are not relied on)
            w = e4m3_bits(y.to(tl.float32)).to(tl.uint8).to(tl.float8e4nv, bitcast=True)
        s_w = _e8m0(top) * 0.015625                                                       # [BN] 2^(top - 127) * 2^-6
        acc += tl.dot(a, tl.reshape(w, [BLOCK_K, BLOCK_N])) * s_a[:, None] * s_w[None, :]
    else:
        s = u.to(tl.float32) if SCALE_F32 else _e8m0(u)                                   # [G, BN]
        run = tl.arange(0, G)
        for g in tl.static_range(G):
            w = tl.where((run == g)[:, None, None], codes, tl.zeros_like(codes)).to(tl.float8e4nv, bitcast=True)
            s_g = tl.sum(tl.where((run == g)[:, None], s, 0.0), axis=0) * 64.0              # [BN] its scale * 2^6
            acc += tl.dot(a, tl.reshape(w, [BLOCK_K, BLOCK_N])) * s_a[:, None] * s_g[None, :]
    return acc


@triton.jit
def _run_scale(p, mask, SCALE_F32: tl.constexpr, EXACT: tl.constexpr):
    """(the 32-runs' scales at p (masked: 1) times 2^6 [..] float32, their e8m0 bytes (float32 scales: 0)).
    From an e8m0 byte u, 2^(u - 121) by its bits: u 0 the subnormal 2^-127 times 2^6; u from 249 on wraps
    unless EXACT, which makes 2^128 inf, as 2^(u - 127) * 2^6 does, and 255 NaN (the caller reruns EXACT
    where a byte above 248 came)."""
    if SCALE_F32:
        return tl.load(p, mask=mask, other=1.0) * 64.0, tl.zeros(mask.shape, dtype=tl.int32)
    else:
        u = tl.load(p, mask=mask, other=127).to(tl.int32)
        if EXACT:
            f = ((tl.minimum(u, 249) + 6) << 23).to(tl.float32, bitcast=True)
            return tl.where(u == 255, float("nan"), f), u
        return ((u + 6) << 23).to(tl.float32, bitcast=True), u


@triton.jit
def _e4m3_operand(p_words, k, n_ok, BLOCK_N: tl.constexpr):
    """The 32-run at K position k of MXFP4 rows (p_words: [BN, 1] pointers to the rows' uint32 words) as the
    first operand of an FP8 MMA, [BN, 32] e4m3 (each code's value times 2^-6) with slot 16 h + 4q + t
    holding position 8q + 2t + h (_mxfp4_e4m3_swapped)."""
    lo, hi = _e2m1_e4m3x4(tl.load(p_words + k // 8 + tl.arange(0, 4)[None, :], mask=n_ok[:, None], other=0))
    w = tl.join(_bytes(lo), _bytes(hi))                                 # [n, q, i, c, h]: position 8q + 4i + 2c + h
    return tl.reshape(tl.permute(w, (0, 4, 1, 2, 3)), [BLOCK_N, 32]).to(tl.float8e4nv, bitcast=True)


@triton.jit
def _mxfp4_e4m3_swapped(p_a, p_as, rows, row_ok, p_w, p_s, p_w3, p_s3, e, offs_n, R, C, k_lo, k_hi,
                        SCALE_F32: tl.constexpr, PAIR: tl.constexpr, EXACT: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """W4A8 on the FP8 tensor cores with the operands swapped (w4a8_mma "fp8_swap"): [BM, BN] fp32 =
    (A * s_a)[rows, k_lo:k_hi] @ W[e][offs_n, k_lo:k_hi]^T (A e4m3 codes [*, C] with scales [*, C/128], W
    MXFP4 [E, R, C/2] with scales [E, R, C/32]), and with PAIR the same for W3 beside it (the gate/up
    launch: both share each activation tile; else zeros, unused), and whether an e8m0 scale above 248
    came (_run_scale: the caller then runs this again with EXACT, unpipelined, so that the rerun's loop
    does not raise the kernel's registers). Computed as the transpose: W's rows the MMA's first operand
    and the rows of A its second (on sm_90 a wgmma of 64 weight rows by BM tokens, its first operand read
    from registers), one MMA per 32-run promoted times the run's scale (route (a) of the W4A8 note: no
    fold check, no fp16 round trip). Each run's K positions are permuted into MMA slots so that each
    operand register is one _e2m1_e4m3x4 output as it stands (no byte moves between registers): the
    first operand gives thread q of a row the slots 4q .. 4q + 3 and 16 + 4q .. 16 + 4q + 3, and
    _e2m1_e4m3x4 makes the even and the odd codes of word q; so slot 16 h + 4q + t holds position
    8q + 2t + h (the words themselves may still reach their thread through shared memory: Triton 3.6 loads
    them coalesced, bench/results/H100/session32_moe_fp8_swap_offline.md), and A's run is loaded in
    position order and permuted the same way (in registers). Exact products, summed in another order than
    route (a)'s."""
    G: tl.constexpr = BLOCK_K // 32
    n_ok = offs_n < R
    row_words = _mxfp4_row_words(C)
    p_words = p_w.to(tl.pointer_type(tl.uint32)) + e.to(tl.int64) * R * row_words + offs_n[:, None] * row_words
    p_words3 = p_w3.to(tl.pointer_type(tl.uint32)) + e.to(tl.int64) * R * row_words + offs_n[:, None] * row_words
    p_scales = p_s + e.to(tl.int64) * R * (C // 32) + offs_n * (C // 32)                   # [BN]
    p_scales3 = p_s3 + e.to(tl.int64) * R * (C // 32) + offs_n * (C // 32)
    offs_p = tl.arange(0, 32)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)                                    # the products transposed
    acc3 = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    top = tl.zeros([BLOCK_N], dtype=tl.int32)                                               # the largest e8m0 byte
    for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=1 if EXACT else None):
        tile = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        tile3 = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for g in tl.static_range(G):
            k = k0 + 32 * g
            a = tl.load(p_a + rows[:, None] * C + (k + offs_p)[None, :], mask=row_ok[:, None], other=0.0)  # [BM, 32]
            a = tl.reshape(tl.permute(tl.reshape(a, [BLOCK_M, 4, 2, 2, 2]), (4, 1, 2, 3, 0)), [32, BLOCK_M])
            s, u = _run_scale(p_scales + k // 32, n_ok, SCALE_F32, EXACT)
            tile += tl.dot(_e4m3_operand(p_words, k, n_ok, BLOCK_N), a) * s[:, None]
            top = tl.maximum(top, u)
            if PAIR:
                s3, u3 = _run_scale(p_scales3 + k // 32, n_ok, SCALE_F32, EXACT)
                tile3 += tl.dot(_e4m3_operand(p_words3, k, n_ok, BLOCK_N), a) * s3[:, None]
                top = tl.maximum(top, u3)
        s_a = tl.load(p_as + rows * (C // 128) + k0 // 128, mask=row_ok, other=0.0)[None, :]   # (BLOCK_K divides 128)
        acc += tile * s_a
        if PAIR:
            acc3 += tile3 * s_a
    return tl.trans(acc), tl.trans(acc3), tl.max(top, axis=0) > 248


@triton.jit
def _gate_up_loop(p_x, token, row_ok, p_w1, p_s1, p_w3, p_s3, e, offs_n, I, D, k_lo, k_hi, FMT: tl.constexpr,
                  SCALE_F32: tl.constexpr, ROUTE: tl.constexpr, RERUN: tl.constexpr, NATIVE_FP8: tl.constexpr,
                  UPCAST: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """(x[token] @ W1[e][offs_n]^T, x[token] @ W3[e][offs_n]^T) [BM, BN] fp32 each over K = k_lo .. k_hi
    (k_lo a multiple of BLOCK_K), in x's dtype on the tensor cores (rows not row_ok: 0) for float, FP8
    (dequantized) or MXFP4 (_mxfp4_tile, on ROUTE) weights, and whether ROUTE's check failed (the products
    then void). RERUN (a failed check's second pass, rare): not software-pipelined, so that this loop
    compiled beside the first does not raise the kernel's registers."""
    acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    miss = tl.zeros([BLOCK_N], dtype=tl.int32)
    top = tl.zeros([BLOCK_K // 32, BLOCK_N], dtype=tl.int32)     # the largest exponent seen (ROUTE_ONE)
    for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=1 if RERUN else None):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(p_x + token[:, None] * D + offs_k[None, :], mask=row_ok[:, None] & (offs_k[None, :] < D),
                    other=0.0)
        if FMT == 2:
            a = _mxfp4_order(a, BLOCK_M, BLOCK_K)
            b1, exp1 = _mxfp4_tile(p_w1, p_s1, e, offs_n, k0, I, D, SCALE_F32, ROUTE, UPCAST, BLOCK_K, BLOCK_N)
            acc_gate = dot_acc(a, b1, acc_gate, UPCAST, IEEE)
            b3, exp3 = _mxfp4_tile(p_w3, p_s3, e, offs_n, k0, I, D, SCALE_F32, ROUTE, UPCAST, BLOCK_K, BLOCK_N)
            acc_up = dot_acc(a, b3, acc_up, UPCAST, IEEE)
            if ROUTE == ROUTE_ONE:
                top = tl.maximum(top, tl.maximum(exp1, exp3))
            if SCALE_F32 and ROUTE != ROUTE_EXACT:
                miss |= _not_pow2(p_s1, e, offs_n, k0, I, D, BLOCK_K) | _not_pow2(p_s3, e, offs_n, k0, I, D, BLOCK_K)
        else:
            b1 = _weight_tile(p_w1, p_s1, e, offs_n, k0, I, D, FMT, SCALE_F32, NATIVE_FP8, BLOCK_K)
            acc_gate = dot_acc(a, b1, acc_gate, UPCAST, IEEE)
            b3 = _weight_tile(p_w3, p_s3, e, offs_n, k0, I, D, FMT, SCALE_F32, NATIVE_FP8, BLOCK_K)
            acc_up = dot_acc(a, b3, acc_up, UPCAST, IEEE)
    return acc_gate, acc_up, (tl.max(miss, axis=0) > 0) | (tl.max(tl.max(top, axis=0), axis=0) > 128)


@triton.jit
def _down_loop(p_act, offs_m, p_w2, p_s2, e, offs_n, D, I, k_lo, k_hi, FMT: tl.constexpr, SCALE_F32: tl.constexpr,
               ROUTE: tl.constexpr, RERUN: tl.constexpr, NATIVE_FP8: tl.constexpr, UPCAST: tl.constexpr,
               IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """act[offs_m, k_lo:k_hi] @ W2[e][offs_n, k_lo:k_hi]^T [BM, BN] fp32 and whether ROUTE's check failed, as
    _gate_up_loop's."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    miss = tl.zeros([BLOCK_N], dtype=tl.int32)
    top = tl.zeros([BLOCK_K // 32, BLOCK_N], dtype=tl.int32)
    for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=1 if RERUN else None):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(p_act + offs_m[:, None] * I + offs_k[None, :], mask=offs_k[None, :] < I, other=0.0)
        if FMT == 2:
            b, exp = _mxfp4_tile(p_w2, p_s2, e, offs_n, k0, D, I, SCALE_F32, ROUTE, UPCAST, BLOCK_K, BLOCK_N)
            acc = dot_acc(_mxfp4_order(a, BLOCK_M, BLOCK_K), b, acc, UPCAST, IEEE)
            if ROUTE == ROUTE_ONE:
                top = tl.maximum(top, exp)
            if SCALE_F32 and ROUTE != ROUTE_EXACT:
                miss |= _not_pow2(p_s2, e, offs_n, k0, D, I, BLOCK_K)
        else:
            b = _weight_tile(p_w2, p_s2, e, offs_n, k0, D, I, FMT, SCALE_F32, NATIVE_FP8, BLOCK_K)
            acc = dot_acc(a, b, acc, UPCAST, IEEE)
    return acc, (tl.max(miss, axis=0) > 0) | (tl.max(tl.max(top, axis=0), axis=0) > 128)


# ================================================================================================
# Kernels
# ================================================================================================

@triton.jit
def _k_range(C, K_PER, SPLIT: tl.constexpr):
    """This program's reduction range k_lo .. k_hi of C: all of it, or with SPLIT range program_id(1),
    K_PER wide (a multiple of the K tile; past C: empty, its partial sums zeros)."""
    if SPLIT:
        k_lo = tl.program_id(1) * K_PER
        return k_lo, tl.minimum(k_lo + K_PER, C)
    return 0, C


@triton.jit
def _swiglu_store(acc_gate, acc_up, limit, slot, row_ok, offs_m, n0, p_weights, p_act, p_act_s, I,
                  ACT_FP8: tl.constexpr, FP8_MMA: tl.constexpr, ROUND_PASS: tl.constexpr, ROUND_BF16: tl.constexpr,
                  RECIP: tl.constexpr, NATIVE_FP8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """act[offs_m, n0 : n0 + BLOCK_N] = silu(clamp(gate)) * clamp(up) from the fp32 sums [BM, BN]
    (_gate_up_kernel's p_act / p_act_s forms; ACT_FP8 weighted by the rows' routing weights, then rounded
    here, or with ROUND_PASS stored in fp32 for a pass; ACT_FP8 rounding here needs BLOCK_N and n0
    multiples of 128: whole activation blocks)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    if limit > 0:  # NaN kept, as torch.clamp keeps it
        acc_gate = tl.minimum(acc_gate, limit, propagate_nan=tl.PropagateNan.ALL)
        acc_up = tl.clamp(acc_up, -limit, limit, propagate_nan=tl.PropagateNan.ALL)
    act = acc_gate / (1.0 + tl.exp(-acc_gate)) * acc_up                    # silu(gate) * up
    mask = offs_n[None, :] < I
    if ACT_FP8:  # weighted here (the fp32 act), then rounded once per value
        act = act * tl.load(p_weights + slot, mask=row_ok, other=0.0)[:, None]
    if ACT_FP8 and ROUND_PASS:  # by the pass after this launch
        tl.store(p_act + offs_m[:, None] * I + offs_n[None, :], act, mask=mask)
    elif ACT_FP8:  # here (BLOCK_N a multiple of 128)
        codes, s = quantize_rows_e4m3(tl.reshape(act, [BLOCK_M * (BLOCK_N // 128), 128]), RECIP, NATIVE_FP8)
        if FP8_MMA:
            tl.store(p_act + offs_m[:, None] * I + offs_n[None, :], tl.reshape(codes, [BLOCK_M, BLOCK_N]), mask=mask)
            offs_b = n0 // 128 + tl.arange(0, BLOCK_N // 128)
            tl.store(p_act_s + offs_m[:, None] * (I // 128) + offs_b[None, :],
                     tl.reshape(s, [BLOCK_M, BLOCK_N // 128]), mask=offs_b[None, :] < I // 128)
        else:  # the rounded values themselves
            q = tl.reshape(e4m3_dequantized(codes, s, NATIVE_FP8), [BLOCK_M, BLOCK_N])
            tl.store(p_act + offs_m[:, None] * I + offs_n[None, :], q.to(p_act.dtype.element_ty), mask=mask)
    else:
        if ROUND_BF16:  # the interpreter's bf16 cast truncates: round to nearest even first
            act = round_bf16(act)
        tl.store(p_act + offs_m[:, None] * I + offs_n[None, :], act.to(p_act.dtype.element_ty), mask=mask)


@triton.jit
def _gate_up_kernel(p_x, p_xs, p_slot, p_block_expert, p_w1, p_s1, p_w3, p_s3, p_weights, p_act, p_act_s, limit,
                    N, TOPK, D, I, E, n_blocks, first_slot, n_split, K_PER, rows_per_split,
                    FMT: tl.constexpr, SCALE_F32: tl.constexpr, NATIVE_FP8: tl.constexpr, UPCAST: tl.constexpr,
                    IEEE: tl.constexpr, ROUND_BF16: tl.constexpr, ACT_FP8: tl.constexpr, FP8_MMA: tl.constexpr,
                    ROUND_PASS: tl.constexpr, RECIP: tl.constexpr, SPLIT: tl.constexpr, ROUTE: tl.constexpr,
                    SWAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    GROUP_M: tl.constexpr):
    # p_x [T, D]; p_slot [n_blocks, BLOCK_M] int64; p_block_expert [n_blocks] int64;
    # p_w1, p_w3 [E, I, D] (or packed, see _weight_tile); p_act [n_blocks * BLOCK_M, I] in x's dtype.
    # ACT_FP8 (W8A8, W4A8): the weighted activation FP8-rounded here; p_weights [T * TOPK] float32. With
    # FP8_MMA, p_x [T, D] e4m3 codes with p_xs [T, D/128] float32 scales, p_act e4m3 codes with p_act_s
    # [n_blocks * BLOCK_M, I/128] float32 scales; without (W4A8 on bf16 tensor cores), p_x holds x's
    # FP8-rounded values and p_act the activation's, in x's dtype (exact: 4 significant bits). ROUND_PASS
    # (config act_round "pass"): p_act the weighted activation in fp32, rounded by a pass of its own.
    # SPLIT (config split_k): program axis 1 is the range of D (of n_split, K_PER wide) this program sums;
    # p_act the fp32 partial sums [n_split * rows_per_split, 2 * I] (gate, then up) at row
    # range * rows_per_split + slot - first_slot, for _swiglu_splits_kernel.
    # p_xs, p_weights, p_act_s unused where not named.
    limit = tl.cast(limit, tl.float32)  # float arguments are fp64 in AOTInductor's launch signature
    pid_m, pid_n = tile_ids(n_blocks, I, BLOCK_N, GROUP_M)
    e = tl.load(p_block_expert + pid_m)
    if e >= E or (SPLIT and tl.program_id(1) >= n_split):  # a spare block past the last expert in use; a spare range
        return
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.load(p_slot + offs_m)
    row_ok = slot < N
    token = tl.where(row_ok, slot // TOPK, 0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_lo, k_hi = _k_range(D, K_PER, SPLIT)
    if ACT_FP8 and FP8_MMA and SWAP:  # MXFP4 (the launcher's): both weights in one K loop
        acc_gate, acc_up, wraps = _mxfp4_e4m3_swapped(p_x, p_xs, token, row_ok, p_w1, p_s1, p_w3, p_s3, e, offs_n, I,
                                                      D, k_lo, k_hi, SCALE_F32, True, False, BLOCK_M, BLOCK_N, BLOCK_K)
        if wraps:
            acc_gate, acc_up, wraps = _mxfp4_e4m3_swapped(p_x, p_xs, token, row_ok, p_w1, p_s1, p_w3, p_s3, e, offs_n,
                                                          I, D, k_lo, k_hi, SCALE_F32, True, True, BLOCK_M, BLOCK_N,
                                                          BLOCK_K)
    elif ACT_FP8 and FP8_MMA:
        # One K loop per weight: in one loop both FP8 products of a step wait in registers for their
        # promotion beside the two accumulators, and 128 x 128 tiles over 8 warps spilled (sm_90 compile,
        # bench/results/H200/moe_w8a8_offline.md); x's codes are read twice instead (1 byte a value).
        acc_gate = _fp8_gemm(p_x, p_xs, token, row_ok, p_w1, p_s1, e, pid_n * BLOCK_N, I, D, k_lo, k_hi, FMT,
                             SCALE_F32, NATIVE_FP8, BLOCK_M, BLOCK_N, BLOCK_K)
        acc_up = _fp8_gemm(p_x, p_xs, token, row_ok, p_w3, p_s3, e, pid_n * BLOCK_N, I, D, k_lo, k_hi, FMT,
                           SCALE_F32, NATIVE_FP8, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        # MXFP4 on ROUTE (_mxfp4_tile), again on the exact route where its check failed
        acc_gate, acc_up, missed = _gate_up_loop(p_x, token, row_ok, p_w1, p_s1, p_w3, p_s3, e, offs_n, I, D, k_lo,
                                                 k_hi, FMT, SCALE_F32, ROUTE, False, NATIVE_FP8, UPCAST, IEEE,
                                                 BLOCK_M, BLOCK_N, BLOCK_K)
        if FMT == 2 and ROUTE != ROUTE_EXACT and missed:
            acc_gate, acc_up, _ = _gate_up_loop(p_x, token, row_ok, p_w1, p_s1, p_w3, p_s3, e, offs_n, I, D, k_lo,
                                                k_hi, FMT, SCALE_F32, ROUTE_EXACT, True, NATIVE_FP8, UPCAST, IEEE,
                                                BLOCK_M, BLOCK_N, BLOCK_K)
    if SPLIT:  # the partial sums of this range, for the SwiGLU pass
        row = tl.program_id(1) * rows_per_split + tl.where(row_ok, slot - first_slot, 0).to(tl.int64)
        p_row = p_act + row[:, None] * (2 * I) + offs_n[None, :]
        mask = row_ok[:, None] & (offs_n[None, :] < I)
        tl.store(p_row, acc_gate, mask=mask)
        tl.store(p_row + I, acc_up, mask=mask)
    else:
        _swiglu_store(acc_gate, acc_up, limit, slot, row_ok, offs_m, pid_n * BLOCK_N, p_weights, p_act, p_act_s, I,
                      ACT_FP8, FP8_MMA, ROUND_PASS, ROUND_BF16, RECIP, NATIVE_FP8, BLOCK_M, BLOCK_N)


@triton.jit
def _swiglu_splits_kernel(p_part, p_ids, p_weights, p_act, p_act_s, limit, I, first_slot, n_split, rows_per_split,
                          ACT_FP8: tl.constexpr, FP8_MMA: tl.constexpr, ROUND_BF16: tl.constexpr, RECIP: tl.constexpr,
                          NATIVE_FP8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # One program per (BLOCK_M assignments of the chunk, BLOCK_N columns of I; BLOCK_N a multiple of 128):
    # the split gate/up launch's partial sums p_part [n_split * rows_per_split, 2 * I] fp32 added in range
    # order, then _swiglu_store into p_act / p_act_s as the unsplit epilogue, at the assignment's own row
    # (slot - first_slot: p_act [BLOCK_M * cdiv(rows_per_split, BLOCK_M), I], _down_kernel's ACT_BY_SLOT).
    # Over assignments, not routing blocks: at decode a 16-row block holds one or two of them. Rows of a -1
    # id (p_ids [T * TOPK]; no partial sums) and past the chunk: zeros.
    limit = tl.cast(limit, tl.float32)
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = first_slot + offs_m
    row_ok = offs_m < rows_per_split
    row_ok &= tl.load(p_ids + slot, mask=row_ok, other=-1) >= 0
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = row_ok[:, None] & (offs_n[None, :] < I)
    p_row = p_part + offs_m[:, None] * (2 * I) + offs_n[None, :]
    acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for s in range(n_split):
        acc_gate += tl.load(p_row, mask=mask, other=0.0)
        acc_up += tl.load(p_row + I, mask=mask, other=0.0)
        p_row += rows_per_split * (2 * I)
    _swiglu_store(acc_gate, acc_up, limit, slot, row_ok, offs_m, tl.program_id(1) * BLOCK_N, p_weights, p_act,
                  p_act_s, I, ACT_FP8, FP8_MMA, False, ROUND_BF16, RECIP, NATIVE_FP8, BLOCK_M, BLOCK_N)


@triton.jit
def _down_kernel(p_act, p_act_s, p_slot, p_block_expert, p_w2, p_s2, p_weights, p_out,
                 N, first_slot, TOPK, D, I, E, n_blocks, n_split, K_PER, rows_per_split,
                 FMT: tl.constexpr, SCALE_F32: tl.constexpr, NATIVE_FP8: tl.constexpr, UPCAST: tl.constexpr,
                 IEEE: tl.constexpr, ACT_FP8: tl.constexpr, FP8_MMA: tl.constexpr, SPLIT: tl.constexpr,
                 ACT_BY_SLOT: tl.constexpr, ROUTE: tl.constexpr, SWAP: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # p_act [n_blocks * BLOCK_M, I] (FP8_MMA: e4m3 codes, p_act_s [n_blocks * BLOCK_M, I/128] float32
    # scales; every row of a used block written by the gate/up launch), or with ACT_BY_SLOT (split gate/up:
    # _swiglu_splits_kernel) one row per assignment of the chunk, at slot - first_slot; p_w2 [E, D, I] (or packed);
    # p_weights [T * TOPK] float32 (unused with ACT_FP8: act holds it);
    # p_out [n_split * rows_per_split, D] float32 (rows_per_split = chunk tokens * TOPK): row
    # range * rows_per_split + t * TOPK + j - first_slot of assignment (t, j) over this program's range of
    # I (SPLIT: program axis 1, of n_split, K_PER wide; else all of I), written once
    pid_m, pid_n = tile_ids(n_blocks, D, BLOCK_N, GROUP_M)
    e = tl.load(p_block_expert + pid_m)
    if e >= E or (SPLIT and tl.program_id(1) >= n_split):
        return
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.load(p_slot + offs_m)
    row_ok = slot < N
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_lo, k_hi = _k_range(I, K_PER, SPLIT)
    if ACT_BY_SLOT:  # rows not in use read the chunk's first (their products are not stored)
        act_rows = tl.where(row_ok, slot - first_slot, 0).to(tl.int64)
    else:
        act_rows = offs_m
    if ACT_FP8 and FP8_MMA and SWAP:
        acc, unused, wraps = _mxfp4_e4m3_swapped(p_act, p_act_s, act_rows, row_ok, p_w2, p_s2, p_w2, p_s2, e, offs_n,
                                                 D, I, k_lo, k_hi, SCALE_F32, False, False, BLOCK_M, BLOCK_N, BLOCK_K)
        if wraps:  # as the gate/up launch's
            acc, unused, wraps = _mxfp4_e4m3_swapped(p_act, p_act_s, act_rows, row_ok, p_w2, p_s2, p_w2, p_s2, e,
                                                     offs_n, D, I, k_lo, k_hi, SCALE_F32, False, True, BLOCK_M, BLOCK_N,
                                                     BLOCK_K)
    elif ACT_FP8 and FP8_MMA:
        acc = _fp8_gemm(p_act, p_act_s, act_rows, row_ok, p_w2, p_s2, e, pid_n * BLOCK_N, D, I, k_lo, k_hi, FMT,
                        SCALE_F32, NATIVE_FP8, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        acc, missed = _down_loop(p_act, act_rows, p_w2, p_s2, e, offs_n, D, I, k_lo, k_hi, FMT, SCALE_F32, ROUTE,
                                 False, NATIVE_FP8, UPCAST, IEEE, BLOCK_M, BLOCK_N, BLOCK_K)
        if FMT == 2 and ROUTE != ROUTE_EXACT and missed:  # as the gate/up launch's
            acc, _ = _down_loop(p_act, act_rows, p_w2, p_s2, e, offs_n, D, I, k_lo, k_hi, FMT, SCALE_F32, ROUTE_EXACT,
                                True, NATIVE_FP8, UPCAST, IEEE, BLOCK_M, BLOCK_N, BLOCK_K)
    if not ACT_FP8:  # W8A8's and W4A8's act holds its routing weight already
        acc = acc * tl.load(p_weights + slot, mask=row_ok, other=0.0)[:, None]
    row = tl.where(row_ok, slot - first_slot, 0).to(tl.int64)
    if SPLIT:
        row += tl.program_id(1) * rows_per_split
    tl.store(p_out + row[:, None] * D + offs_n[None, :], acc, mask=row_ok[:, None] & (offs_n[None, :] < D))


@triton.jit
def _sum_slots_kernel(p_slots, p_ids, p_out, first_token, end_token, TOPK, D, n_split, rows_per_split,
                      BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    # p_slots [n_split * rows_per_split, D] float32, rows_per_split = chunk tokens * TOPK: tokens
    # first_token .. end_token - 1, each assignment's row in every range (rows of -1 ids never written);
    # p_ids [T, TOPK]; p_out [T, D] float32, those tokens' rows written
    offs_t = first_token + tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t_ok, d_ok = offs_t < end_token, offs_d < D
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for j in range(TOPK):
        used = t_ok & (tl.load(p_ids + offs_t * TOPK + j, mask=t_ok, other=-1) >= 0)
        p_row = p_slots + ((offs_t - first_token) * TOPK + j)[:, None] * D + offs_d[None, :]
        slot = tl.load(p_row, mask=used[:, None] & d_ok[None, :], other=0.0)
        for s in range(1, n_split):  # an assignment's ranges first, in order: its whole product
            slot += tl.load(p_row + s * rows_per_split * D, mask=used[:, None] & d_ok[None, :], other=0.0)
        acc += slot
    tl.store(p_out + offs_t[:, None] * D + offs_d[None, :], acc, mask=t_ok[:, None] & d_ok[None, :])


# ================================================================================================
# Launcher
# ================================================================================================

def _op_name(weight_format: str, act: str = "x") -> str:
    name = "moe_experts" if weight_format == "float" else f"moe_experts_{weight_format}"
    return name + _FP8_ACT_SUFFIX.get(weight_format, "") if act == "fp8" else name


def _act_kind(weight_format: str) -> str:
    """The name of act="fp8" with these weights, for messages: W8A8, W4A8."""
    return _FP8_ACT_SUFFIX[weight_format][1:].upper()


def _check(x, topk_ids, topk_weights, w1, w2, w3, scales, weight_format: str, act: str = "x") -> tuple[int, int, int]:
    """-> (E, I, D) after the dtype/shape/device checks of one call."""
    op = _op_name(weight_format, act)
    check(weight_format in WEIGHT_FORMATS, f"{op}: weight_format {weight_format!r}; accepted: {', '.join(WEIGHT_FORMATS)}")
    check(act in ACTS, f"{op}: act {act!r}; accepted: {', '.join(ACTS)}")
    check(act == "x" or weight_format in _FP8_ACT_SUFFIX,
          f"{op}: act='fp8' (W8A8 / W4A8) needs FP8 or MXFP4 expert weights; with {weight_format} weights accepted: act='x'")
    check_tensor(op, "x", x, FLOAT_DTYPES, ndim=2)
    T, D = x.shape
    check_tensor(op, "topk_ids", topk_ids, (torch.int32, torch.int64), ndim=2, device=x.device)
    k = topk_ids.shape[1]
    check(topk_ids.shape[0] == T, f"{op}: topk_ids has shape {tuple(topk_ids.shape)}; need [T={T}, k]")
    check_tensor(op, "topk_weights", topk_weights, (torch.float32,), shape=(T, k), device=x.device)
    E, I = w1.shape[:2] if w1.dim() == 3 else (0, 0)
    if weight_format == "float":
        dtypes, d_cols, i_cols = (x.dtype,), D, I
    elif weight_format == "fp8":
        dtypes, d_cols, i_cols = (torch.float8_e4m3fn,), D, I
    else:
        check(D % 32 == 0 and I % 32 == 0, f"{op}: D = {D}, I = {I}; MXFP4 needs multiples of 32")
        dtypes, d_cols, i_cols = (torch.int8, torch.uint8), D // 2, I // 2
    for name, w, shape in (("w1", w1, (E, I, d_cols)), ("w2", w2, (E, D, i_cols)), ("w3", w3, (E, I, d_cols))):
        check_tensor(op, name, w, dtypes, shape=shape, device=x.device)
        check(weight_format != "mxfp4" or w.storage_offset() % 4 == 0,
              f"{op}: {name} starts at byte {w.storage_offset()} of its storage; MXFP4 weights are read as 32-bit "
              f"words: need a multiple of 4 (pass a copy)")
    if weight_format != "float":
        for name, s, w, rows, cols in (("w1_scale", scales[0], w1, I, D), ("w2_scale", scales[1], w2, D, I),
                                       ("w3_scale", scales[2], w3, I, D)):
            want = (E, -(-rows // 128), -(-cols // 128)) if weight_format == "fp8" else (E, rows, cols // 32)
            check_tensor(op, name, s, _SCALE_DTYPES, shape=want, device=x.device)
        check(len({s.dtype for s in scales}) == 1, f"{op}: scales have dtypes {[s.dtype for s in scales]}; need one")
    if act == "fp8":  # as fp8_linear's K: a partial block would need the masked amax DeepSeek's act_quant does not define
        check(D % ACT_BLOCK == 0 and I % ACT_BLOCK == 0,
              f"{op}: D = {D}, I = {I}; {_act_kind(weight_format)} needs multiples of {ACT_BLOCK} (the activation's scale block)")
    return E, I, D


def resolve(config, device, n_assignments, weight_format: str = "float", act: str = "x") -> MoeExpertsConfig:
    """None / '' -> the device's default for T * k (a symbolic T * k, as under export: that of its upper
    bound, the prefill regime's when unbounded) and the op (default_config's weight_format and act); a
    str -> fields over that default; a config -> itself."""
    if isinstance(config, MoeExpertsConfig):
        return config
    base = default_config(device_name(device), largest_value(n_assignments) or 1 << 30, weight_format, act)
    if not config:
        return base
    if isinstance(config, str):
        return MoeExpertsConfig.from_str(config, base)
    return base.replace(**config)


def chunk_tokens(k: int, D: int, I: int, E: int, block_m: int, act_bytes: float) -> int:
    """Tokens per chunk: the most whose workspace fits WORKSPACE_BYTES (at least 1). A chunk of n tokens
    holds slots [n * k, D] float32 and act [max_expert_blocks(n * k, E, block_m) * block_m, I] of
    act_bytes each (W8A8: 1 + 4 / 128, a code and its share of the block's fp32 scale), whose rows are
    at most n * k plus block_m - 1 padding rows for each expert."""
    padding = E * (block_m - 1) * I * act_bytes
    return max(1, int((WORKSPACE_BYTES - padding) // (k * (D * 4 + I * act_bytes))))


def chunk_plan(T, k: int, D: int, I: int, E: int, block_m: int, act_bytes: float) -> tuple:
    """(tokens per chunk, number of chunks) for T tokens (_common.split_chunks): one chunk of all T where
    they fit the workspace (decode, small prefills: the unchunked launches), else chunk_tokens(...)-token
    chunks; a symbolic T (export) takes the count its upper bound needs."""
    return split_chunks(T, chunk_tokens(k, D, I, E, block_m, act_bytes))


def moe_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w1: torch.Tensor,
                w2: torch.Tensor, w3: torch.Tensor, swiglu_limit: float,
                config: MoeExpertsConfig | dict | str | None = None, weight_format: str = "float",
                scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, act: str = "x") -> torch.Tensor:
    """x [T, D] (bf16/fp16/fp32, contiguous), topk_ids [T, k] int32, topk_weights [T, k] fp32, expert
    weights in `weight_format` ("float": [E, I, D], [E, D, I], [E, I, D] in x's dtype; "fp8": the same
    shapes in float8_e4m3fn with `scales` (w1, w2, w3) [E, ceil(rows/128), ceil(cols/128)]; "mxfp4":
    [E, I, D/2], [E, D, I/2], [E, I, D/2] int8, each starting at a multiple of 4 bytes (read as 32-bit
    words), with scales [E, rows, cols/32]; scales e8m0 or fp32)
    -> [T, D] float32. act (ACTS): "x", the semantics of moe_experts / _fp8 / _mxfp4; "fp8" (FP8 or MXFP4
    weights, D and I multiples of 128, config block_n a multiple of 128 unless act_round "pass"),
    moe_experts_fp8_w8a8's / moe_experts_mxfp4_w4a8's.
    Tokens go through in chunks (chunk_plan) with one config (that of all T * k assignments), so the
    result is the same bits whatever the chunking. Workspace: act and slots of one chunk
    (<= WORKSPACE_BYTES), the routing layout (about 40 bytes an assignment); W8A8 and W4A8: x's codes
    and scales too (T * D * 33/32 bytes; W4A8 on bf16 tensor cores, x's rounded values as well; act_round
    "pass", the unrounded activation in fp32)."""
    E, I, D = _check(x, topk_ids, topk_weights, w1, w2, w3, scales, weight_format, act)
    T, k = topk_ids.shape
    act_fp8 = act == "fp8"
    cfg = resolve(config, x.device, T * k, weight_format, act)
    bm = cfg.block_m
    # W4A8's FP8-rounded values on bf16 tensor cores (config.w4a8_mma), but in fp16, whose range does not
    # hold every one (an fp16 x near 65504 rounds up past it)
    fp8_mma = act_fp8 and (weight_format == "fp8" or cfg.w4a8_mma != "bf16" or x.dtype == torch.float16)
    swap = fp8_mma and weight_format == "mxfp4" and cfg.w4a8_mma == "fp8_swap"
    act_round_pass = act_fp8 and cfg.act_round == "pass"
    act_bytes = (1 + 4 / ACT_BLOCK if fp8_mma else x.element_size()) + 4 * act_round_pass  # + the pass's fp32 input
    chunk, n_chunks = chunk_plan(T, k, D, I, E, bm, act_bytes)
    # split-K where the tokens fit one chunk (the partial sums then take at most split_k * k rows of 2 I
    # and of D fp32 values: run_splits(split_k, T) * T <= split_k)
    split, down_split = (cfg.split_k, cfg.down_split_k) if n_chunks == 1 else (1, 1)
    n_split, n_down_split = run_splits(split, T), run_splits(down_split, T)
    # the SwiGLU output rounded by a pass of its own (split: the pass that sums the gate/up ranges rounds it)
    round_pass = act_round_pass and split == 1
    if act_fp8 and not act_round_pass and split == 1:
        check(cfg.block_n % ACT_BLOCK == 0,
              f"{_op_name(weight_format, act)}: config block_n = {cfg.block_n}; {_act_kind(weight_format)} rounding "
              f"in the gate/up epilogue (act_round gate_up) needs a multiple of {ACT_BLOCK} (whole activation "
              f"blocks); act_round=pass or split_k > 1 take any")
    out = torch.empty((T, D), dtype=torch.float32, device=x.device)
    if isinstance(T, int) and T == 0:
        return out
    if n_chunks == 1 and one_program_layout.fits(T * k, E):  # decode sizes: one launch, not ~30 small ones
        slot, block_expert = one_program_layout.expert_blocks(topk_ids, E, bm)     # [1, n_blocks, bm], [1, n_blocks]
    else:
        slot, block_expert = chunked_expert_blocks(topk_ids, E, bm, chunk, n_chunks)  # [C, n_blocks, bm], [C, n_blocks]
    n_blocks = block_expert.shape[1]
    chunk_rows = torch.sym_min(chunk, T) * k                                           # assignments of a chunk
    slots = torch.empty((n_down_split * chunk_rows, D), dtype=torch.float32, device=x.device)
    if fp8_mma:
        # x quantized once, in its own pass, rather than in every gate/up program: there each of the
        # I / block_n column tiles of a row block would quantize its rows again (16 times at I 2048,
        # block_n 128), CUDA-core work of the order of the FP8 MMAs' (fp8_linear's "separate" for many
        # rows); and the gathered rows are then read as 1-byte codes. The SwiGLU output is quantized in
        # the gate/up epilogue instead, where each value is made once: act codes [rows, I] + scales
        # [rows, I/128], half the bf16 workspace and its traffic (quantizing in the down launch would
        # repeat it for each of its D / down_block_n column tiles).
        xq, xs = fp8_quantize(x, ACT_BLOCK, True)                                     # [T, D] e4m3, [T, D/128]
    else:
        # W4A8 on bf16 tensor cores: x's FP8-rounded values, in x's dtype (exact), in one pass
        xq = fp8_round(x, ACT_BLOCK, True) if act_fp8 else x                          # [T, D]
        xs = placeholder(x.device, torch.float32)                                      # unused
    # the activation: a row per routing block row, or (split gate/up) a row per assignment of the chunk
    rows = bm * triton.cdiv(chunk_rows, bm) if split > 1 else n_blocks * bm
    hidden_scale = placeholder(x.device, torch.float32)                                # unused unless FP8 codes
    if round_pass:  # the gate/up launch's weighted activation, rounded by a pass into each chunk's hidden
        gate_up_out = torch.empty((rows, I), dtype=torch.float32, device=x.device)
    elif fp8_mma:
        hidden = torch.empty((rows, I), dtype=torch.float8_e4m3fn, device=x.device)
        hidden_scale = torch.empty((rows, I // ACT_BLOCK), dtype=torch.float32, device=x.device)
    else:
        hidden = torch.empty((rows, I), dtype=x.dtype, device=x.device)
    if split > 1:  # the gate/up ranges' partial sums (gate, up) of each assignment, summed by a pass into hidden
        gate_up_out = torch.empty((n_split * chunk_rows, 2 * I), dtype=torch.float32, device=x.device)
    elif not round_pass:  # the gate/up epilogue writes the activation itself
        gate_up_out = hidden
    fmt = _FMT[weight_format]
    if fmt:
        scale_f32 = scales[0].dtype == torch.float32
        s1, s2, s3 = (s if scale_f32 else s.view(torch.uint8) for s in scales)
        if weight_format == "mxfp4" or (INTERPRET and not act_fp8):  # raw bytes (the interpreter decodes FP8
            w1, w2, w3 = (w.view(torch.uint8) for w in (w1, w2, w3))       # from its bits; W8A8 multiplies codes)
    else:
        scale_f32 = False
        s1, s2, s3 = (placeholder(x.device, torch.float32) for _ in range(3))  # unused
    upcast = INTERPRET
    ieee = x.dtype == torch.float32
    # MXFP4's scaling (_mxfp4_tile; config mxfp4_scaling): float32 scales on "two" first read as e8m0 bytes
    route = (ROUTE_ONE if cfg.mxfp4_scaling == "one" else ROUTE_POW2 if scale_f32 else ROUTE_EXACT).value
    bn, bn2 = fit_block(cfg.block_n, I), fit_block(cfg.down_block_n, D)
    # each range whole K tiles (a range past the last K tile sums nothing: zeros)
    k_per = triton.cdiv(triton.cdiv(D, cfg.block_k), n_split) * cfg.block_k
    down_k_per = triton.cdiv(triton.cdiv(I, cfg.down_block_k), n_down_split) * cfg.down_block_k
    native, recip, round_bf16 = not INTERPRET, x.device.type == "cuda", INTERPRET and x.dtype == torch.bfloat16
    for c in range(n_chunks):  # hidden and slots reused: each launch reads what the one before wrote
        first = c * chunk
        launch(_gate_up_kernel, (n_blocks * triton.cdiv(I, bn), split), xq, xs, slot[c], block_expert[c], w1, s1, w3,
               s3, topk_weights, gate_up_out, hidden_scale, float(swiglu_limit),
               T * k, k, D, I, E, n_blocks, first * k, n_split, k_per, chunk_rows,
               FMT=fmt, SCALE_F32=scale_f32, NATIVE_FP8=native, UPCAST=upcast, IEEE=ieee, ROUND_BF16=round_bf16,
               ACT_FP8=act_fp8, FP8_MMA=fp8_mma, ROUND_PASS=round_pass, RECIP=recip, SPLIT=split > 1, ROUTE=route,
               SWAP=swap, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
               num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if split > 1:
            launch(_swiglu_splits_kernel, (rows // bm, triton.cdiv(I, SWIGLU_BLOCK_N)), gate_up_out, topk_ids,
                   topk_weights, hidden, hidden_scale, float(swiglu_limit), I, first * k, n_split, chunk_rows,
                   ACT_FP8=act_fp8, FP8_MMA=fp8_mma, ROUND_BF16=round_bf16, RECIP=recip, NATIVE_FP8=native,
                   BLOCK_M=bm, BLOCK_N=SWIGLU_BLOCK_N, num_warps=4)
        elif round_pass and fp8_mma:
            hidden, hidden_scale = fp8_quantize(gate_up_out, ACT_BLOCK, True)         # [rows, I] e4m3, [rows, I/128]
        elif round_pass:
            hidden = fp8_round(gate_up_out, ACT_BLOCK, True, x.dtype)                 # [rows, I]
        launch(_down_kernel, (n_blocks * triton.cdiv(D, bn2), down_split), hidden, hidden_scale, slot[c],
               block_expert[c], w2, s2, topk_weights, slots, T * k, first * k, k, D, I, E, n_blocks, n_down_split,
               down_k_per, chunk_rows,
               FMT=fmt, SCALE_F32=scale_f32, NATIVE_FP8=native, UPCAST=upcast, IEEE=ieee, ACT_FP8=act_fp8,
               FP8_MMA=fp8_mma, SPLIT=down_split > 1, ACT_BY_SLOT=split > 1, ROUTE=route, SWAP=swap, BLOCK_M=bm,
               BLOCK_N=bn2,
               BLOCK_K=cfg.down_block_k, GROUP_M=cfg.group_m, num_warps=cfg.down_num_warps,
               num_stages=cfg.down_num_stages)
        sum_slots(slots, topk_ids, out, first, torch.sym_min(first + chunk, T), n_down_split, chunk_rows)
    return out


def sum_slots(slots: torch.Tensor, topk_ids: torch.Tensor, out: torch.Tensor, first_token=0, end_token=None,
              n_split=1, rows_per_split=None) -> None:
    """out[t] [D] float32 = the sum of token t's assignments' rows of slots [n_split * n * k, D] float32
    (row s * n * k + (t - first_token) * k + j: range s of the assignment's product; rows_per_split = n * k,
    default all rows), each assignment's ranges added in order, then j = 0 .. k-1 in order, ids of -1
    skipped (their rows are not read), for t in first_token .. end_token - 1 (default: the n tokens from
    first_token); out [T, D]."""
    k = topk_ids.shape[1]
    rows_per_split = slots.shape[0] if rows_per_split is None else rows_per_split
    n, D = rows_per_split // k, out.shape[1]
    end_token = first_token + n if end_token is None else end_token
    launch(_sum_slots_kernel, (triton.cdiv(n, SUM_BLOCK_T), triton.cdiv(D, SUM_BLOCK_D)), slots, topk_ids, out,
           first_token, end_token, k, D, n_split, rows_per_split, BLOCK_T=SUM_BLOCK_T, BLOCK_D=SUM_BLOCK_D)


# ================================================================================================
# Torch ops (torch.ops.dsv4_triton.moe_experts / _fp8 / _fp8_w8a8 / _mxfp4 / _mxfp4_w4a8): the dsv4 signatures plus a
# config string
# ================================================================================================

@kernel_op("moe_experts")
def _moe_experts_op(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w1: torch.Tensor,
                    w2: torch.Tensor, w3: torch.Tensor, swiglu_limit: float, config: str = "") -> torch.Tensor:
    return moe_experts(x, topk_ids, topk_weights, w1, w2, w3, swiglu_limit, config)


@kernel_op("moe_experts_fp8")
def _moe_experts_fp8_op(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w1: torch.Tensor,
                        w2: torch.Tensor, w3: torch.Tensor, w1_scale: torch.Tensor, w2_scale: torch.Tensor,
                        w3_scale: torch.Tensor, swiglu_limit: float, config: str = "") -> torch.Tensor:
    return moe_experts(x, topk_ids, topk_weights, w1, w2, w3, swiglu_limit, config, "fp8", (w1_scale, w2_scale, w3_scale))


@kernel_op("moe_experts_fp8_w8a8")
def _moe_experts_fp8_w8a8_op(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w1: torch.Tensor,
                             w2: torch.Tensor, w3: torch.Tensor, w1_scale: torch.Tensor, w2_scale: torch.Tensor,
                             w3_scale: torch.Tensor, swiglu_limit: float, config: str = "") -> torch.Tensor:
    return moe_experts(x, topk_ids, topk_weights, w1, w2, w3, swiglu_limit, config, "fp8", (w1_scale, w2_scale, w3_scale),
                       act="fp8")


@kernel_op("moe_experts_mxfp4")
def _moe_experts_mxfp4_op(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w1: torch.Tensor,
                          w2: torch.Tensor, w3: torch.Tensor, w1_scale: torch.Tensor, w2_scale: torch.Tensor,
                          w3_scale: torch.Tensor, swiglu_limit: float, config: str = "") -> torch.Tensor:
    return moe_experts(x, topk_ids, topk_weights, w1, w2, w3, swiglu_limit, config, "mxfp4", (w1_scale, w2_scale, w3_scale))


@kernel_op("moe_experts_mxfp4_w4a8")
def _moe_experts_mxfp4_w4a8_op(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w1: torch.Tensor,
                               w2: torch.Tensor, w3: torch.Tensor, w1_scale: torch.Tensor, w2_scale: torch.Tensor,
                               w3_scale: torch.Tensor, swiglu_limit: float, config: str = "") -> torch.Tensor:
    return moe_experts(x, topk_ids, topk_weights, w1, w2, w3, swiglu_limit, config, "mxfp4",
                       (w1_scale, w2_scale, w3_scale), act="fp8")
