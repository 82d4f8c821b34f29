"""Small @triton.jit helpers shared by several kernels: exact bit-level roundings that behave the
same compiled on a GPU and in the CPU interpreter (whose float8/bfloat16 casts do not round to
nearest even), the NaN-aware block scale of the FP8/FP4 quantizers, the per-row FP8 quantization
of the W8A8 GEMMs' activations (fp8_linear, moe_experts), a tl.dot that also holds in the
interpreter (whose bf16 tl.dot is wrong) and the GEMMs' grouped tile order and output tile store."""
import triton
import triton.language as tl


@triton.jit
def ceil_pow2(s):
    """Smallest power of two >= s, for s > 0 (fp32, exact); +Inf and NaN pass through."""
    bits = s.to(tl.int32, bitcast=True)
    up = (bits & 0x7F800000) + tl.where((bits & 0x007FFFFF) != 0, 0x00800000, 0)
    return tl.where(s != s, s, up.to(tl.float32, bitcast=True))


@triton.jit
def pow2_reciprocal(s):
    """1 / s for s a power of two in [2^-126, 2^126] (exact), 0 for +Inf, NaN for NaN."""
    bits = s.to(tl.int32, bitcast=True)
    r = ((254 << 23) - (bits & 0x7F800000)).to(tl.float32, bitcast=True)
    return tl.where(s != s, s, tl.where(s == float("inf"), 0.0, r))


@triton.jit
def block_scale(b_x, qmax, floor, POW2: tl.constexpr, RECIP: tl.constexpr):
    """b_x [BQ, BS] fp32, one quantization block per row (padding = 0) -> scale [BQ] =
    max(amax, floor) / qmax, rounded up to a power of two when POW2 (floor: 1e-4 for FP8,
    6 * 2^-126 for FP4, as model/ops.py). A block holding a NaN gets NaN
    (tl.max drops NaN, so it is tracked explicitly), one holding +-Inf gets +Inf.

    "/ qmax" as torch computes it for the plain op's device: true division (tl.div_rn) on the CPU;
    on CUDA torch divides by a Python scalar as a multiplication by its fp32 reciprocal
    (BinaryDivTrueKernel.cu), so RECIP computes amax * fp32(1 / qmax) instead."""
    amax = tl.max(tl.abs(b_x), axis=1)                                       # [BQ]
    has_nan = tl.max((b_x != b_x).to(tl.int32), axis=1) > 0
    amax = tl.where(has_nan, float("nan"), amax)
    amax = tl.where(amax < floor, floor, amax)                               # NaN stays NaN
    if RECIP:
        inv = tl.div_rn(tl.full(amax.shape, 1.0, tl.float32), tl.full(amax.shape, qmax, tl.float32))
        s = amax * inv
    else:
        s = tl.div_rn(amax, tl.full(amax.shape, qmax, tl.float32))
    if POW2:
        s = ceil_pow2(s)
    return s


@triton.jit
def divide_by_scale(b_x, s, POW2: tl.constexpr):
    """b_x [BQ, BS] / s [BQ] exactly as torch's fp32 division rounds it."""
    if POW2:
        return b_x * pow2_reciprocal(s)[:, None]                            # exact for powers of two
    else:
        return tl.div_rn(b_x, tl.broadcast_to(s[:, None], b_x.shape))


@triton.jit
def e4m3_bits(y):
    """fp32 y with |y| <= 448 or NaN -> float8_e4m3fn bit pattern (int32 0..255), round to nearest even.

    Normal range (|y| >= 2^-6): round the fp32 mantissa to 3 bits on the raw bits, then rebias the
    exponent (127 -> 7). Subnormals (step 2^-9): rint(|y| * 512) by the 2^23 magic-number trick. NaN
    -> 0x7F with y's sign bit (as torch's cast keeps it)."""
    bits = y.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    a = tl.where(y != y, 0, bits & 0x7FFFFFFF)                              # keep the adds below in range
    normal = ((a + 0x7FFFF + ((a >> 20) & 1)) >> 20) - (120 << 3)
    t = a.to(tl.float32, bitcast=True) * 512.0                              # |y| (0 for NaN)
    sub = ((t + 8388608.0) - 8388608.0).to(tl.int32)
    code = tl.where(a < 0x3C800000, sub, normal)                            # 0x3C800000 = 2^-6
    code = tl.where(y != y, 0x7F, code)
    return code | sign


@triton.jit
def e4m3_value(c):
    """float8_e4m3fn codes (int32 0..255) -> fp32, exact; 0x7F / 0xFF -> NaN (the bits decoded: the
    interpreter's own float8 casts are not to be trusted). The sign goes on as a bit, so -0 stays -0
    (triton 3.6's interpreter negates by subtracting from +0)."""
    e = (c >> 3) & 15
    m = c & 7
    normal = ((e + 120) << 23) | (m << 20)
    sub = (m.to(tl.float32) * 0.001953125).to(tl.int32, bitcast=True)     # m * 2^-9, exact
    mag = tl.where(e == 0, sub, normal)
    mag = tl.where((c & 0x7F) == 0x7F, 0x7FC00000, mag)
    return (mag | ((c & 0x80) << 24)).to(tl.float32, bitcast=True)


@triton.jit
def e4m3_float(codes, NATIVE_CAST: tl.constexpr):
    """float8e4nv codes [...] -> their fp32 values (exact). NATIVE_CAST: the hardware's e4m3 conversion,
    else the codes' bits decoded (the interpreter)."""
    if NATIVE_CAST:
        return codes.to(tl.float32)
    else:
        return e4m3_value(codes.to(tl.uint8, bitcast=True).to(tl.int32))


@triton.jit
def e4m3_dequantized(codes, s, NATIVE_CAST: tl.constexpr):
    """codes [BQ, BS] float8e4nv times their rows' scales s [BQ] -> fp32 [BQ, BS] (the FP8-rounded
    values; exact)."""
    return e4m3_float(codes, NATIVE_CAST) * s[:, None]


@triton.jit
def round_bf16(x):
    """fp32 -> fp32 holding x rounded to bfloat16 precision, to nearest even (so that a following
    .to(tl.bfloat16) is exact everywhere; the interpreter's own cast truncates). NaN stays NaN."""
    bits = x.to(tl.int32, bitcast=True)
    r = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return tl.where(x != x, x, r.to(tl.float32, bitcast=True))


@triton.jit
def quantize_rows_e4m3(b_x, RECIP: tl.constexpr, NATIVE_CAST: tl.constexpr):
    """b_x [BM, 128] fp32 -> (codes [BM, 128] float8e4nv, scale [BM]): fp8_quantize(x, 128, pow2=True),
    DeepSeek's act_quant (the activations of the W8A8 GEMMs: fp8_linear, moe_experts' act="fp8").
    NATIVE_CAST: the hardware's e4m3 conversion (sm_89+), else e4m3_bits (the interpreter)."""
    s = block_scale(b_x, 448.0, 1e-4, True, RECIP)                               # [BM]
    q = divide_by_scale(b_x, s, True)
    q = tl.where(q > 448.0, 448.0, tl.where(q < -448.0, -448.0, q))
    if NATIVE_CAST:
        codes = q.to(tl.float8e4nv)
    else:
        codes = e4m3_bits(q).to(tl.uint8).to(tl.float8e4nv, bitcast=True)
    return codes, s


@triton.jit
def dot_acc(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """acc + a @ b with fp32 accumulation. UPCAST (interpreter): exact fp32 copies (its bf16 tl.dot is
    wrong); IEEE: fp32 operands without tf32; else a and b in a's dtype (tensor cores)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b.to(a.dtype), acc)


@triton.jit
def tile_ids(n_blocks, n_cols, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id -> (row block, column tile) of a GEMM over n_blocks row blocks and n_cols columns:
    GROUP_M row blocks sweep all column tiles together (neighbouring programs share W tiles in L2)."""
    pid = tl.program_id(0)
    n_pid_n = tl.cdiv(n_cols, BLOCK_N)
    group = GROUP_M * n_pid_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(n_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    return pid_m, pid_n


@triton.jit
def store_tile(p_y, acc, o_m, o_n, m_m, m_n, N, SWAP_AB: tl.constexpr, ADD: tl.constexpr):
    """A GEMM's fp32 tile acc, [BM, BN] (SWAP_AB: [BN, BM], computed transposed), into y [M, N] row-major
    at rows o_m and columns o_n (masks m_m, m_n): stored in y's dtype, or ADDed with fp32 atomics (split-K)."""
    if SWAP_AB:
        p_out = p_y + o_m[None, :].to(tl.int64) * N + o_n[:, None]
        m_out = m_n[:, None] & m_m[None, :]
    else:
        p_out = p_y + o_m[:, None].to(tl.int64) * N + o_n[None, :]
        m_out = m_m[:, None] & m_n[None, :]
    if ADD:
        tl.atomic_add(p_out, acc, mask=m_out)
    else:
        tl.store(p_out, acc.to(p_y.dtype.element_ty), mask=m_out)
