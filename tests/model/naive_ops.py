"""Second, independent implementations of the ops in model/ops.py, for the tests only.

Each function here is slow and written as explicit loops over elements, rows, blocks or matrices, in
float64 (Python floats or float64 tensors), with a different algorithm from ops.py wherever one exists:

- FP8 / FP4 rounding: search the sorted grid of representable magnitudes for the nearest value, with an
  explicit tie rule (the even code wins), instead of a dtype cast / a ladder of boundary comparisons.
- Power-of-two scales: `math.frexp` (exact), instead of exp2(ceil(log2)).
- Hadamard: the matrix itself, built by Sylvester's construction, instead of the butterfly.
- Sparse attention: a Python loop over (b, s, h) with an explicit softmax whose denominator holds the sink.
- Sinkhorn: explicit loops over the n x n entries (vectorised only over the batch of matrices).
- Indexer: kernels/indexer_topk/naive.py's (a loop over queries, sorting by (NaN first, -score, index)).
- Compressor: explicit loops over blocks and over the rows of each block's softmax.

Where the op's contract fixes an intermediate precision (the FP8/FP4 quotient x / scale and the scale
itself are float32 values), the naive code rounds that intermediate to float32 explicitly (`f32`), so
that codes can be compared bit for bit.
"""
from __future__ import annotations

import bisect
import math
import struct

import torch

from dsv4_compile.kernels.fp8_quantize.naive import e4m3_value  # decodes a byte from its bit fields
from dsv4_compile.kernels.indexer_topk.naive import indexer_topk  # noqa: F401  (the one slow reference)

FP8_MAX = 448.0
FP4_MAX = 6.0
AMAX_FLOOR = 1e-4                   # FP8
FP4_AMAX_FLOOR = 6.0 * 2.0 ** -126  # FP4 (DeepSeek's)


def f32(v: float) -> float:
    """Round a Python float (binary64) to the nearest binary32, ties to even; keeps NaN and +-Inf."""
    if math.isnan(v) or math.isinf(v):
        return v
    return struct.unpack("<f", struct.pack("<f", v))[0]


def ceil_pow2(v: float) -> float:
    """The smallest power of two >= v > 0 (exact, by frexp); NaN and +Inf pass through."""
    if math.isnan(v) or math.isinf(v):
        return v
    m, e = math.frexp(v)  # v = m * 2**e, 0.5 <= m < 1
    return v if m == 0.5 else math.ldexp(1.0, e)


# ------------------------------------------------------------------------------------------------
# FP8 e4m3fn: decode all 256 codes from their bits, round by nearest-grid search
# ------------------------------------------------------------------------------------------------

_E4M3_POS = [e4m3_value(c) for c in range(0x7F)]  # codes 0..126: 0 .. 448, increasing
assert all(a < b for a, b in zip(_E4M3_POS, _E4M3_POS[1:])) and _E4M3_POS[-1] == 448.0


def _nearest_code(grid: list[float], mag: float) -> int:
    """Index of the grid value nearest to mag >= 0 (grid sorted, code = index); an exact tie goes to
    the even code; beyond the last value, the last code."""
    hi = bisect.bisect_left(grid, mag)
    if hi == 0:
        return 0
    if hi == len(grid):
        return len(grid) - 1
    lo = hi - 1
    d_lo, d_hi = mag - grid[lo], grid[hi] - mag
    if d_lo < d_hi:
        return lo
    if d_hi < d_lo:
        return hi
    return lo if lo % 2 == 0 else hi


def fp8_code(y: float) -> int:
    """A float32 value y (already divided by its scale) -> e4m3fn byte: saturate at 448, nearest value,
    ties to even, the sign bit kept (so -0.0 and tiny negatives give 0x80); NaN gives 0x7F."""
    if math.isnan(y):
        return 0x7F
    code = _nearest_code(_E4M3_POS, min(abs(y), FP8_MAX))
    return code | (0x80 if math.copysign(1.0, y) < 0 else 0)


def block_scale(block: list[float], qmax: float, pow2: bool) -> float:
    if any(math.isnan(v) for v in block):
        return math.nan
    amax = max(abs(v) for v in block)
    if math.isinf(amax):
        return math.inf
    floor = FP4_AMAX_FLOOR if qmax == FP4_MAX else AMAX_FLOOR
    scale = f32(max(amax, f32(floor)) / qmax)  # a float32 division, as the op's contract says
    return ceil_pow2(scale) if pow2 else scale


def fp8_quantize(x: torch.Tensor, block_size: int, pow2_scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (codes [..., D] uint8 bytes of e4m3fn, scale [..., D/bs] float32), one element at a time."""
    rows = x.float().reshape(-1, x.shape[-1]).tolist()
    codes, scales = [], []
    for row in rows:
        row_codes, row_scales = [], []
        for start in range(0, len(row), block_size):
            block = row[start:start + block_size]
            s = block_scale(block, FP8_MAX, pow2_scale)
            row_scales.append(s)
            for v in block:
                y = f32(v / s) if not (math.isnan(s) or math.isnan(v)) else math.nan
                row_codes.append(fp8_code(y))
        codes.append(row_codes)
        scales.append(row_scales)
    shape = x.shape
    return (torch.tensor(codes, dtype=torch.uint8).reshape(shape),
            torch.tensor(scales, dtype=torch.float32).reshape(*shape[:-1], shape[-1] // block_size))


def fp8_dequantize(codes: torch.Tensor, scale: torch.Tensor, block_size: int) -> torch.Tensor:
    """codes [..., D] uint8 bytes, scale [..., D/bs] -> float64 [..., D]."""
    rows = codes.reshape(-1, codes.shape[-1]).tolist()
    srows = scale.double().reshape(-1, scale.shape[-1]).tolist()
    out = [[e4m3_value(c) * s[i // block_size] for i, c in enumerate(row)] for row, s in zip(rows, srows)]
    return torch.tensor(out, dtype=torch.float64).reshape(codes.shape)


def fp8_simulate(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Quantize-dequantize with power-of-two scales; float64 out. Backward is the identity (STE)."""
    codes, scale = fp8_quantize(x.detach(), block_size, True)
    sim = fp8_dequantize(codes, scale, block_size).to(x.device)
    return x + (sim - x).detach() if x.requires_grad else sim.to(x.dtype)


# ------------------------------------------------------------------------------------------------
# FP4 e2m1
# ------------------------------------------------------------------------------------------------

FP4_GRID = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]  # code k's magnitude; code | 8 is negative


def fp4_code(y: float) -> int:
    """y (already divided by its scale) -> code 0..15: nearest magnitude, ties to the even code, sign bit
    iff y < 0 (so -0.0 gives +0); NaN gives 0 (the op's documented rule)."""
    if math.isnan(y):
        return 0
    return _nearest_code(FP4_GRID, abs(y)) | (8 if y < 0 else 0)


def fp4_value(code: int) -> float:
    return -FP4_GRID[code & 7] if code & 8 else FP4_GRID[code & 7]


def fp4_quantize(x: torch.Tensor, block_size: int, pow2_scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (packed [..., D/2] uint8, element 2i in the low nibble; scale [..., D/bs] float32)."""
    rows = x.float().reshape(-1, x.shape[-1]).tolist()
    packed, scales = [], []
    for row in rows:
        row_codes, row_scales = [], []
        for start in range(0, len(row), block_size):
            block = row[start:start + block_size]
            s = block_scale(block, FP4_MAX, pow2_scale)
            row_scales.append(s)
            for v in block:
                y = f32(v / s) if not (math.isnan(s) or math.isnan(v) or (math.isinf(v) and math.isinf(s))) else math.nan
                row_codes.append(fp4_code(y))
        packed.append([lo | (hi << 4) for lo, hi in zip(row_codes[0::2], row_codes[1::2])])
        scales.append(row_scales)
    shape = x.shape
    return (torch.tensor(packed, dtype=torch.uint8).reshape(*shape[:-1], shape[-1] // 2),
            torch.tensor(scales, dtype=torch.float32).reshape(*shape[:-1], shape[-1] // block_size))


def fp4_dequantize(packed: torch.Tensor, scale: torch.Tensor, block_size: int) -> torch.Tensor:
    rows = packed.reshape(-1, packed.shape[-1]).tolist()
    srows = scale.double().reshape(-1, scale.shape[-1]).tolist()
    out = []
    for row, s in zip(rows, srows):
        vals = []
        for byte in row:
            vals += [fp4_value(byte & 0xF), fp4_value(byte >> 4)]
        out.append([v * s[i // block_size] for i, v in enumerate(vals)])
    return torch.tensor(out, dtype=torch.float64).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def fp4_simulate(x: torch.Tensor, block_size: int) -> torch.Tensor:
    packed, scale = fp4_quantize(x.detach(), block_size, True)
    sim = fp4_dequantize(packed, scale, block_size).to(x.device)
    return x + (sim - x).detach() if x.requires_grad else sim.to(x.dtype)


# ------------------------------------------------------------------------------------------------
# Hadamard (Sylvester), RoPE, RMSNorm
# ------------------------------------------------------------------------------------------------

def sylvester(n: int) -> torch.Tensor:
    """The n x n Hadamard matrix (n a power of two) by Sylvester's construction, float64."""
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    assert H.shape[0] == n, f"{n} is not a power of two"
    return H


def hadamard(x: torch.Tensor) -> torch.Tensor:
    D = x.shape[-1]
    return x.double() @ sylvester(D) / math.sqrt(D)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """x [..., R] rotated pair by pair (x[2i], x[2i+1]) by the angle with cos[..., i], sin[..., i]."""
    out = x.double().clone()
    sgn = -1.0 if inverse else 1.0
    for i in range(x.shape[-1] // 2):
        re, im = x[..., 2 * i].double(), x[..., 2 * i + 1].double()
        c, s = cos[..., i].double(), sgn * sin[..., i].double()
        out[..., 2 * i] = re * c - im * s
        out[..., 2 * i + 1] = re * s + im * c
    return out


# ------------------------------------------------------------------------------------------------
# Sparse attention
# ------------------------------------------------------------------------------------------------

def sparse_attention(q, kv, attn_sink, topk_idxs, softmax_scale) -> torch.Tensor:
    """Loop over (b, s, h); explicit softmax over the listed entries with exp(sink) in the denominator.
    float64 out; differentiable (torch ops on float64 tensors) when the inputs require grad."""
    B, S, H, D = q.shape
    q64, kv64, sink64 = q.double(), kv.double(), attn_sink.double()
    rows = []
    for b in range(B):
        for s in range(S):
            idx = [int(i) for i in topk_idxs[b, s].tolist() if i >= 0]
            for h in range(H):
                if not idx:  # a row with no entries: zeros, whatever the sink
                    rows.append(torch.zeros(D, dtype=torch.float64))
                    continue
                logits = torch.stack([softmax_scale * torch.dot(q64[b, s, h], kv64[b, j]) for j in idx])
                m = torch.maximum(logits.max(), sink64[h]).detach()
                w = torch.exp(logits - m)
                denom = w.sum() + torch.exp(sink64[h] - m)
                rows.append(sum(w[k] * kv64[b, j] for k, j in enumerate(idx)) / denom)
    return torch.stack(rows).reshape(B, S, H, D)


# ------------------------------------------------------------------------------------------------
# mHC
# ------------------------------------------------------------------------------------------------

def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Explicit loops over the entries of each n x n matrix (vectorised over the batch only), float64:
    row softmax + eps, column normalisation, then iters - 1 rounds of row and column normalisation."""
    n = logits.shape[-1]
    L = logits.double().reshape(-1, n, n)
    c = [[None] * n for _ in range(n)]  # c[i][j]: a [M] float64 tensor
    for i in range(n):
        m = L[:, i, 0]
        for j in range(1, n):
            m = torch.maximum(m, L[:, i, j])
        e = [torch.exp(L[:, i, j] - m) for j in range(n)]
        z = e[0]
        for j in range(1, n):
            z = z + e[j]
        for j in range(n):
            c[i][j] = e[j] / z + eps

    def normalise_columns():
        for j in range(n):
            s = c[0][j]
            for i in range(1, n):
                s = s + c[i][j]
            for i in range(n):
                c[i][j] = c[i][j] / (s + eps)

    def normalise_rows():
        for i in range(n):
            s = c[i][0]
            for j in range(1, n):
                s = s + c[i][j]
            for j in range(n):
                c[i][j] = c[i][j] / (s + eps)

    normalise_columns()
    for _ in range(iters - 1):
        normalise_rows()
        normalise_columns()
    out = torch.stack([torch.stack(row, -1) for row in c], -2)  # [M, n, n]
    return out.reshape(logits.shape)


def hc_pre(x, fn, scale, base, iters: int, norm_eps: float, hc_eps: float):
    """Loop over (b, s): mixes from the RMS-normalised flattened streams, then pre / post / comb."""
    B, S, n, D = x.shape
    ys, posts, combs = [], [], []
    for b in range(B):
        for s in range(S):
            flat = x[b, s].double().reshape(n * D)
            mixes = (fn.double() @ flat) / torch.sqrt((flat * flat).mean() + norm_eps)
            sc, bs = scale.double(), base.double()
            pre = torch.sigmoid(mixes[:n] * sc[0] + bs[:n]) + hc_eps
            post = 2 * torch.sigmoid(mixes[n:2 * n] * sc[1] + bs[n:2 * n])
            comb = sinkhorn((mixes[2 * n:] * sc[2] + bs[2 * n:]).reshape(n, n), iters, hc_eps)
            y = sum(pre[i] * x[b, s, i].double() for i in range(n))
            ys.append(y)
            posts.append(post)
            combs.append(comb)
    return (torch.stack(ys).reshape(B, S, D), torch.stack(posts).reshape(B, S, n),
            torch.stack(combs).reshape(B, S, n, n))


# ------------------------------------------------------------------------------------------------
# Newton-Schulz
# ------------------------------------------------------------------------------------------------

def newton_schulz(G: torch.Tensor, coefficients: list[float]) -> torch.Tensor:
    """One matrix at a time, float64: X = G / (||G||_F + 1e-7), transposed if tall, then the steps."""
    M, N = G.shape[-2:]
    mats = G.double().reshape(-1, M, N)
    outs = []
    for G1 in mats:
        X = G1 / (torch.sqrt((G1 * G1).sum()) + 1e-7)
        if M > N:
            X = X.T
        for k in range(0, len(coefficients), 3):
            a, b, c = coefficients[k:k + 3]
            A = X @ X.T
            X = a * X + b * (A @ X) + c * (A @ (A @ X))
        outs.append(X.T if M > N else X)
    return torch.stack(outs).reshape(G.shape)


# ------------------------------------------------------------------------------------------------
# Compressor
# ------------------------------------------------------------------------------------------------

def compress_kv(kv, score, ape, norm_weight, cos, sin, ratio: int, overlap: bool, norm_eps: float, quant: str):
    """Per batch and per entry, an explicit loop over the rows of the entry's softmax (vectorised over
    channels). N = cos.shape[-2] entries; entry i's rows are the tokens [i*ratio, (i+1)*ratio) that exist
    (t < T); a row whose gate logit is -inf is absent; a channel with no present row pools 0. With
    `overlap`, output channel c pools rows (previous block, channel c) and (this block, channel d + c);
    block 0 has only its own rows. Then RMSNorm, RoPE, and the quantization. float64."""
    B, T, C = kv.shape
    d = C // 2 if overlap else C
    N = cos.shape[-2]
    rd = 2 * cos.shape[-1]
    kv64, sc64, ape64 = kv.double(), score.double(), ape.double()
    entries = []
    for b in range(B):
        for i in range(N):
            rows = []  # (gate logits [d], values [d])
            if overlap and i > 0:
                for j in range(ratio):
                    t = (i - 1) * ratio + j
                    if t < T:
                        rows.append((sc64[b, t, :d] + ape64[j, :d], kv64[b, t, :d]))
            lo = d if overlap else 0
            for j in range(ratio):
                t = i * ratio + j
                if t < T:
                    rows.append((sc64[b, t, lo:lo + d] + ape64[j, lo:lo + d], kv64[b, t, lo:lo + d]))
            neg_inf = torch.full((d,), -math.inf, dtype=torch.float64)
            m = neg_inf
            for g, _ in rows:
                m = torch.maximum(m, torch.where(g != -math.inf, g, neg_inf))  # NaN propagates
            z = torch.zeros(d, dtype=torch.float64)
            acc = torch.zeros(d, dtype=torch.float64)
            any_present = torch.zeros(d, dtype=torch.bool)
            for g, v in rows:
                present = g != -math.inf  # NaN counts as present, and poisons the channel
                w = torch.where(present, torch.exp(g - m), 0.0)
                z = z + w
                acc = acc + torch.where(present, w * v, 0.0)
                any_present = any_present | present
            pooled = torch.where(any_present, acc / torch.where(any_present, z, 1.0), 0.0)
            pooled = pooled / torch.sqrt((pooled * pooled).mean() + norm_eps) * norm_weight.double()
            c_i = cos[b, i] if cos.dim() == 3 else cos[i]
            s_i = sin[b, i] if sin.dim() == 3 else sin[i]
            entries.append(torch.cat([pooled[:d - rd], rope(pooled[d - rd:], c_i, s_i)]))
    out = torch.stack(entries).reshape(B, N, d) if entries else torch.zeros(B, N, d, dtype=torch.float64)
    out32 = out.float()  # the op's values are float32 before quantization
    if quant == "fp8":
        nope = fp8_simulate(out32[..., :d - rd], 64)
        return torch.cat([nope, out32[..., d - rd:].bfloat16().double()], dim=-1)
    return fp4_simulate(hadamard(out32).float(), 32)


# ------------------------------------------------------------------------------------------------
# KV layout: the bytes of one main entry, built by hand
# ------------------------------------------------------------------------------------------------

def bf16_bytes(v: float) -> tuple[int, int]:
    """Little-endian bytes of a value that is exactly a bfloat16: the top half of its float32 bits."""
    bits = struct.unpack("<I", struct.pack("<f", v))[0]
    assert bits & 0xFFFF == 0, f"{v} is not a bfloat16 value"
    return (bits >> 16) & 0xFF, bits >> 24


def pack_main_entry(values: list[float], rope_dim: int) -> list[int]:
    """One entry [D] -> its bytes: FP8 codes (block 64, pow2 scales) | BF16 rope dims | e8m0 scale bytes
    (exponent + 127) | zero padding to a multiple of 8."""
    nope = len(values) - rope_dim
    codes, scale_bytes = [], []
    for start in range(0, nope, 64):
        block = values[start:start + 64]
        s = block_scale(block, FP8_MAX, True)
        codes += [fp8_code(f32(v / s)) for v in block]
        scale_bytes.append(math.frexp(s)[1] - 1 + 127)
    rope_bytes = []
    for v in values[nope:]:
        rope_bytes += list(bf16_bytes(v))
    entry = codes + rope_bytes + scale_bytes
    return entry + [0] * (-len(entry) % 8)
