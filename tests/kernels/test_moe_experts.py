"""Grouped-expert MoE kernel against its naive twin and the plain ops (interpreter on the CPU).

Tolerances (relative RMS over the output):
- fp32 activations: 1e-5 (helpers' fp32): the same products summed in another order (K tiles, fp32
  atomics across a token's k slots); the quantized weights decode exactly, so FP8 and MXFP4 keep it.
- bf16 activations: 1e-2 (helpers' bf16): operands bf16, fp32 accumulation; the SwiGLU activation is
  rounded to bf16 once (kernel and naive at the same point, plain op after the routing weight), so
  sums in another order can land one bf16 ulp (2^-8 relative) apart on a few elements.
- W8A8 (act="fp8", the moe_experts_fp8_w8a8 op) against its naive twin and against the plain op: 1e-3
  for either x dtype (all three quantize the same x to the same codes): the FP8 products are exact,
  the fp32 sums differ in order (~1e-7 relative, as measured here), and where an fp32 activation
  lands within that of an e4m3 rounding midpoint two of them may pick neighbouring codes (2^-3 of that
  value: ~5e-4 relative RMS over a T = 300 output per flip); the output is fp32 (no bf16 rounding).
  Measured 7e-8 to 9e-6. A scale read from the wrong K block
  or weight tile moves the output by 0.9 to 2 (mutation checks of the activation, stored act and both weight scale
  paths, with run_w8a8's spread scales).
- W8A8 against its naive twin on Hopper's FP8 wgmma (block_m >= 64): W8A8_HOPPER_TOL = 1e-2. The
  FP8 MMA keeps ~14 bits of each 128-step's sum before the promotion (DeepSeek-V3 report, 3.3.2), so
  gate/up differ from the fp32 twin by up to ~1e-4..1e-3 relative, and activations near an e4m3
  midpoint (~1% of them at that distance) take the neighbouring code: a few 1e-3 expected; a wrong
  scale still moves the output by ~1.
- W4A8 (act="fp8" with MXFP4 weights, the moe_experts_mxfp4_w4a8 op): the W8A8 tolerances for the same
  reasons (on FP8 tensor cores, config w4a8_mma="fp8": e2m1 decodes to e4m3 exactly, the 1 x 32 runs'
  scales folded into the e4m3 values or one MMA per run, exact either way; on bf16 ones, the default:
  the FP8-rounded activations held in bf16, exact, times the W4A16 decode; W4A16 for W8A16); measured 0
  to 1e-7 in the interpreter. A wrong fold
  (past the limit, or a run's scale off by one power) moves the output by ~1 (mutation checks).
- W8A8 against the plain W8A16 op: W8A8_VS_W8A16 = 8e-2, the activation quantization itself: e4m3
  with power-of-two scales per 128 keeps 2^-4 relative per element at worst and 2.65e-2 relative RMS
  on Gaussian data; x's error passes through gate and up into the SwiGLU product, which is
  quantized again: 4.1e-2 to 5.7e-2 over these tests' outputs.
"""
import importlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel import (conftest does it too)

import pytest  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import dsv4_compile.model  # noqa: E402,F401  (registers torch.ops.dsv4.*)
from dsv4_compile.kernels._jit_utils import e4m3_value  # noqa: E402
from dsv4_compile.kernels.moe_experts import MoeExpertsConfig, moe_experts, naive  # noqa: E402
from dsv4_compile.kernels.moe_experts.config import default_config, w8a8_config  # noqa: E402
from dsv4_compile.kernels.moe_experts.moe_experts import (  # noqa: E402
    FOLD_MAX_SHIFT, _e8m0, _e8m0_bf16_bits, _mxfp4_foldable, _mxfp4_order, _mxfp4_tile, _not_pow2, launch, sum_slots)
from dsv4_compile.model import weight_formats  # noqa: E402
from helpers import assert_close, exported_op_args, rel_rms  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNEL = importlib.import_module("dsv4_compile.kernels.moe_experts.moe_experts")  # the module (the package's moe_experts is the function)
LIMIT = 10.0
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
W8A8_TOL, W8A8_VS_W8A16, W8A8_HOPPER_TOL = 1e-3, 8e-2, 1e-2
PLAIN = {"float": torch.ops.dsv4.moe_experts, "fp8": torch.ops.dsv4.moe_experts_fp8,
         "mxfp4": torch.ops.dsv4.moe_experts_mxfp4}


def routing(T, k, E, kind, seed):
    """topk_ids [T, k] int32, weights [T, k] float32 (positive)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "random":  # distinct experts per token where k <= E
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if k <= E else \
            torch.randint(0, E, (T, k), generator=g)
    elif kind == "one-expert":  # every assignment to the last expert, duplicates included
        ids = torch.full((T, k), E - 1)
    elif kind == "holes":  # -1 ids, duplicates, experts 0 and 1 with zero tokens
        ids = torch.randint(2, E, (T, k), generator=g)
        ids[torch.rand(T, k, generator=g) < 0.3] = -1
    else:
        raise ValueError(kind)
    return ids.to(torch.int32), torch.rand(T, k, generator=g) + 0.1


def experts(E, I, D, dtype, fmt, scale_dtype=torch.float8_e8m0fnu, seed=0, tile_spread=False):
    """(w1, w2, w3, scales or None) in the format the kernel takes. tile_spread: each 128 x 128 tile
    times its own power of two in 2^-3 .. 2^3, so that the FP8 tiles' scales differ (a scale read from
    the wrong tile shows)."""
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(E, I, D, generator=g) * D ** -0.5, torch.randn(E, D, I, generator=g) * I ** -0.5,
          torch.randn(E, I, D, generator=g) * D ** -0.5]
    if tile_spread:
        ws = [w * 2.0 ** torch.randint(-3, 4, (E, -(-w.shape[1] // 128), -(-w.shape[2] // 128)), generator=g)
              .repeat_interleave(128, 1).repeat_interleave(128, 2)[:, :w.shape[1], :w.shape[2]] for w in ws]
    if fmt == "float":
        return (*(w.to(dtype) for w in ws), None)
    quantize = weight_formats.quantize_fp8_weight if fmt == "fp8" else weight_formats.quantize_mxfp4
    packed = [quantize(w, scale_dtype=scale_dtype) for w in ws]
    return (*(q for q, _ in packed), tuple(s for _, s in packed))


# (T, k, E, routing, block): T = 1, 7, 300, one more than the sort's power of two (T 3 x k 3 = 9), and
# 682 x 6 = 4092 assignments (the most the one program takes); E not a power of two and E = 256
# (V4-Flash); -1 ids, duplicates, experts with zero tokens; int64 ids.
LAYOUTS = [(1, 6, 256, "random", 16), (1, 1, 5, "holes", 16), (3, 3, 7, "one-expert", 4), (7, 6, 5, "holes", 16),
           (7, 6, 12, "random", 32), (300, 1, 5, "one-expert", 128), (682, 6, 256, "holes", 16)]


@pytest.mark.parametrize("T,k,E,kind,block", LAYOUTS, ids=[f"T{c[0]}-k{c[1]}-E{c[2]}-{c[3]}-b{c[4]}" for c in LAYOUTS])
def test_one_program_layout_is_expert_blocks(T, k, E, kind, block):
    """The decode-sized routing layout in one Triton program equals model.moe_ops.expert_blocks (the
    launcher's reference layout) integer for integer, int32 and int64 ids (the largest layout, 4092
    assignments, with the model's int32 ids only: ~9 s an interpreted launch)."""
    from dsv4_compile.kernels.moe_experts import expert_blocks as one_program
    from dsv4_compile.model.moe_ops import expert_blocks

    ids, _ = routing(T, k, E, kind, seed=T + k + E)
    assert one_program.fits(T * k, E)
    ref_slot, ref_expert = expert_blocks(ids, E, block)
    largest = T * k > 2048
    for dtype in (torch.int32,) if largest else (torch.int32, torch.int64):
        slot, block_expert = one_program.expert_blocks(ids.to(dtype).to(DEVICE), E, block)
        assert torch.equal(slot[0].cpu(), ref_slot) and torch.equal(block_expert[0].cpu(), ref_expert), dtype
    if kind == "holes" and not largest:  # int64 ids past int32 are no assignment too (not wrapped into an expert)
        far = torch.where(ids < 0, torch.full_like(ids, 2 ** 32 + 2, dtype=torch.int64), ids.long())
        slot, block_expert = one_program.expert_blocks(far.to(DEVICE), E, block)
        assert torch.equal(slot[0].cpu(), ref_slot) and torch.equal(block_expert[0].cpu(), ref_expert)


def test_one_program_layout_limits():
    """Past the decode regime's assignments or with sort keys past int32, the launcher keeps the plain layout
    (an unbounded symbolic T: test_export_with_a_symbolic_token_count_plans_static_chunks)."""
    from dsv4_compile.kernels.moe_experts import expert_blocks as one_program
    from dsv4_compile.kernels.moe_experts.config import DECODE_MAX_ASSIGNMENTS

    assert one_program.fits(DECODE_MAX_ASSIGNMENTS, 256) and not one_program.fits(DECODE_MAX_ASSIGNMENTS + 1, 256)
    assert not one_program.fits(4096, 2 ** 20)


def run_all(T, k, E, D, I, dtype, fmt, kind, scale_dtype=torch.float8_e8m0fnu, config=None):
    x = (torch.randn(T, D, generator=torch.Generator().manual_seed(T + E)) * 2).to(dtype)
    ids, w = routing(T, k, E, kind, seed=T * k + E)
    w1, w2, w3, scales = experts(E, I, D, dtype, fmt, scale_dtype, seed=E)
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    dev_scales = None if scales is None else tuple(map(dev, scales))
    out = moe_experts(dev(x), dev(ids), dev(w), dev(w1), dev(w2), dev(w3), LIMIT, config, fmt, dev_scales).cpu()
    assert out.shape == (T, D) and out.dtype == torch.float32
    assert_close("kernel vs naive", naive.moe_experts(x, ids, w, w1, w2, w3, LIMIT, None, fmt, scales), out, TOL[dtype])
    plain = PLAIN[fmt](x, ids, w, w1, w2, w3, *(scales or ()), LIMIT)
    assert_close("kernel vs plain op", plain, out, TOL[dtype])
    return out


# T = 1, 7, 300; E = 5, 12 (not powers of two); k = 1 and 6 (6 > 5 forces duplicates).
SHAPES = [(1, 6, 12, "random"), (7, 1, 5, "random"), (7, 6, 5, "one-expert"), (300, 6, 12, "holes"),
          (300, 1, 5, "random")]


@pytest.mark.parametrize("T,k,E,kind", SHAPES, ids=[f"T{s[0]}-k{s[1]}-E{s[2]}-{s[3]}" for s in SHAPES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_float_weights(T, k, E, kind, dtype):
    run_all(T, k, E, 48, 40, dtype, "float", kind)


# T = 300 in bf16 only: the interpreter decodes every weight element in Python-speed numpy (~20 s).
QUANT = [(7, 6, 5, "holes", torch.float32), (7, 6, 5, "holes", torch.bfloat16), (1, 1, 5, "random", torch.float32),
         (1, 1, 5, "random", torch.bfloat16), (300, 6, 12, "random", torch.bfloat16)]


@pytest.mark.parametrize("T,k,E,kind,dtype", QUANT,
                         ids=[f"T{s[0]}-k{s[1]}-E{s[2]}-{s[3]}-{str(s[4])[6:]}" for s in QUANT])
@pytest.mark.parametrize("fmt", ["fp8", "mxfp4"])
def test_quantized_weights(T, k, E, kind, dtype, fmt):
    """FP8 at D = 160, I = 96: partial 128 x 128 tiles along both dims (T = 300: D = 64); MXFP4 at
    D = 64, I = 96."""
    D = 160 if fmt == "fp8" and T < 300 else 64
    run_all(T, k, E, D, 96, dtype, fmt, kind)


@pytest.mark.parametrize("fmt", ["fp8", "mxfp4"])
def test_float32_scales(fmt):
    """Base models ship float32 scales (power-of-two values): same numbers as e8m0."""
    run_all(7, 2, 5, 64, 64, torch.float32, fmt, "holes", scale_dtype=torch.float32)


@pytest.mark.parametrize("scaling", ["one", "two"])
def test_mxfp4_float32_scales_of_any_value(scaling):
    """MXFP4 float32 scales that are not all powers of two (expert 1's times 3/2, expert 3's one run 2^-130, a
    subnormal) take the fp32 route in those experts' programs, the e8m0 route elsewhere (_not_pow2), with
    either mxfp4_scaling: each against the twin, which multiplies the same values."""
    T, k, E, D, I = 7, 2, 5, 64, 64
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    ids, w = routing(T, k, E, "random", seed=1)
    w1, w2, w3, scales = experts(E, I, D, torch.bfloat16, "mxfp4", torch.float32, seed=E)
    scales = tuple(s.clone() for s in scales)
    for s in scales:
        s[1] *= 1.5
        s[3, 0, 0] = 2.0 ** -130
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    out = moe_experts(dev(x), dev(ids), dev(w), dev(w1), dev(w2), dev(w3), LIMIT, f"mxfp4_scaling={scaling}", "mxfp4",
                      tuple(map(dev, scales))).cpu()
    assert_close("kernel vs naive", naive.moe_experts(x, ids, w, w1, w2, w3, LIMIT, None, "mxfp4", scales), out,
                 TOL[torch.bfloat16])


@triton.jit
def _pow2_of_each_column_tile(p_s, p_out, R, C, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    miss = tl.zeros([BLOCK_N], dtype=tl.int32)
    for k0 in range(0, C, BLOCK_K):
        miss |= _not_pow2(p_s, tl.program_id(1), offs_n, k0, R, C, BLOCK_K)     # expert 0
    tl.store(p_out + tl.program_id(0), tl.max(miss, axis=0))


@pytest.mark.parametrize("value,pow2", [(2.0 ** -126, True), (2.0 ** 127, True), (1.0, True), (1.5, False),
                                        (2.0 ** -127, False), (-2.0, False), (0.0, False), (float("inf"), False),
                                        (float("nan"), False)])
def test_not_pow2_finds_each_scale_not_a_normal_power_of_two(value, pow2):
    """_not_pow2 along a program's K loop over its columns (rows 0..15, 16..24 of 25: the second tile partial, its
    masked-out rows ignored) and every K tile (C 256, BLOCK_K 64): one scale set to `value` (in the last K
    tile of the second column tile), the rest powers of two."""
    R, C = 25, 256
    scales = torch.exp2(torch.randint(-20, 20, (1, R, C // 32), generator=torch.Generator().manual_seed(0)).float())
    scales[0, 24, C // 32 - 1] = value
    out = torch.full((2,), 7, dtype=torch.int32, device=DEVICE)
    _pow2_of_each_column_tile[(2, 1)](scales.to(DEVICE), out, R, C, BLOCK_K=64, BLOCK_N=16)
    assert out.cpu().tolist() == [0, int(not pow2)]


@triton.jit
def _decode_every_byte(p_in, p_e4m3, p_e8m0, p_e8m0_bf16):
    o = tl.arange(0, 256)
    b = tl.load(p_in + o).to(tl.int32)
    tl.store(p_e4m3 + o, e4m3_value(b))
    tl.store(p_e8m0 + o, _e8m0(b))
    tl.store(p_e8m0_bf16 + o, _e8m0_bf16_bits(b).to(tl.int16))


def test_decoders_match_weight_formats_on_every_byte():
    """The kernel's in-register decoders against model/weight_formats: all 256 e4m3 codes and all 256
    e8m0 scale bytes (as fp32, and as bf16 bit patterns: 0 the subnormal 2^-127, 255 NaN), bit for bit
    (e2m1: test_mxfp4_tile_is_dequantize_mxfp4_on_every_code)."""
    b = torch.arange(256, dtype=torch.uint8)
    e4m3, e8m0 = (torch.empty(256, device=DEVICE) for _ in range(2))
    e8m0_bf16 = torch.empty(256, dtype=torch.int16, device=DEVICE)
    _decode_every_byte[(1,)](b.to(DEVICE), e4m3, e8m0, e8m0_bf16)
    scales = weight_formats.e8m0_to_float(b)
    for name, ref, out in (("e4m3", b.view(torch.float8_e4m3fn).float(), e4m3.cpu()), ("e8m0", scales, e8m0.cpu())):
        same = (ref == out) | (ref.isnan() & out.isnan())
        assert same.all() and torch.equal(ref.signbit()[~ref.isnan()], out.signbit()[~ref.isnan()]), name
    as_bf16 = e8m0_bf16.cpu().view(torch.bfloat16).float()     # bf16 -> fp32 on the CPU: exact, subnormals kept
    assert torch.equal(as_bf16[:255], scales[:255]) and as_bf16[255].isnan(), "e8m0 as bf16"


@triton.jit
def _mxfp4_tile_in_k_order(p_w, p_s, p_e, p_out, p_exp, R, C, SCALE_F32: tl.constexpr, ROUTE: tl.constexpr,
                           UPCAST: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    # p_out [R, C] float32: the tile's rows stored at the positions _mxfp4_order gives the activations;
    # p_exp [R, C / 32] int32: the exponents the tile reports
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    e = tl.load(p_e)
    for k0 in range(0, C, BLOCK_K):
        w, exp = _mxfp4_tile(p_w, p_s, e, offs_n, k0, R, C, SCALE_F32, ROUTE, UPCAST, BLOCK_K, BLOCK_N)  # [BK, BN]
        k = tl.reshape(_mxfp4_order((k0 + tl.arange(0, BLOCK_K))[None, :], 1, BLOCK_K), [BLOCK_K])
        tl.store(p_out + offs_n[None, :] * C + k[:, None], w.to(tl.float32), mask=offs_n[None, :] < R)
        g = k0 // 32 + tl.arange(0, BLOCK_K // 32)
        tl.store(p_exp + offs_n[None, :] * (C // 32) + g[:, None], exp, mask=offs_n[None, :] < R)


# bf16 multiplies only compiled (marked gpu: the GPU session's `-m gpu` runs them), the fp32 path everywhere
UPCASTS = [pytest.param(True, id="fp32")] + \
    ([] if DEVICE == "cpu" else [pytest.param(False, id="bf16", marks=pytest.mark.gpu)])
EXTREME_SCALES = [0, 1, 2, 126, 127, 128, 129, 200, 253, 254, 255]


@pytest.mark.parametrize("upcast", UPCASTS)
@pytest.mark.parametrize("scale_f32,route", [(False, 0), (True, 0), (True, 1), (False, 2), (True, 2)],
                         ids=["e8m0-exact", "f32-exact", "f32-pow2", "e8m0-one", "f32-one"])
def test_mxfp4_tile_is_dequantize_mxfp4_on_every_code(upcast, scale_f32, route):
    """_mxfp4_tile (uint32 word loads, _e2m1_bf16x2's bit placement, the scale multiplies) with its rows
    put back at the positions _mxfp4_order gives the activations, against model/weight_formats bit for
    bit: every byte (both nibbles, -0 included) in every row, e8m0 scale bytes 0 (2^-127, subnormal
    products), 254 (overflow to inf), 255 (NaN) and between, on expert 1 of 2; 9 rows (a partial column
    tile), 256 columns (four K tiles of 64). Compiled (a GPU run) the e8m0 path multiplies in bf16, the
    interpreter in fp32 (its bf16 arithmetic works on raw bits). Routes (ROUTE_EXACT 0, ROUTE_POW2 1,
    ROUTE_ONE 2): exact, float32 scales of any value (fp32 multiplies); POW2, float32 normal powers of
    two (bytes 1..254) read as e8m0 bytes from their exponent fields; ONE (one multiply by 2^(u - 1)):
    exponents up to 128 (float32 scales: normal powers of two), the exponents reported; above 128
    clamped (the caller's rerun: test_mxfp4_scales_above_two_rerun_exactly), their reports still right."""
    fast = route == 2
    R, C = 9, 512
    g = torch.Generator().manual_seed(0)
    packed = torch.stack([torch.randperm(256, generator=g) for _ in range(2 * R)]).to(torch.uint8).view(2, R, C // 2)
    pick = torch.randint(0, len(EXTREME_SCALES), (2, R, C // 32), generator=g)
    raw = torch.tensor(EXTREME_SCALES, dtype=torch.uint8)[pick]
    if fast:  # the route's range; the bytes above it stay in expert 0 (reported, not checked for values)
        extremes = torch.tensor([b for b in EXTREME_SCALES if 0 < b <= 128], dtype=torch.uint8)
        raw[1] = extremes[pick[1] % len(extremes)]
        raw[1, 0] = 0 if not scale_f32 else raw[1, 0]     # byte 0 (no float32 power of two) in the e8m0 range
    elif route == 1:  # float32 normal powers of two
        extremes = torch.tensor([b for b in EXTREME_SCALES if 0 < b < 255], dtype=torch.uint8)
        raw = extremes[pick % len(extremes)]
    scales = weight_formats.e8m0_to_float(raw) if scale_f32 else raw
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    for expert in (1, 0) if fast else (1,):
        out = torch.full((R, C), 7.0, device=DEVICE)
        exp = torch.full((R, C // 32), -1, dtype=torch.int32, device=DEVICE)
        _mxfp4_tile_in_k_order[(triton.cdiv(R, 16),)](dev(packed), dev(scales), torch.tensor([expert], device=DEVICE),
                                                      out, exp, R, C, SCALE_F32=scale_f32, ROUTE=route, UPCAST=upcast,
                                                      BLOCK_K=64, BLOCK_N=16)
        if fast:
            assert torch.equal(exp.cpu(), raw[expert].int()), "the exponents reported"
        if expert == 0:
            continue
        out, expected = out.cpu(), weight_formats.dequantize_mxfp4(packed[1], scales[1])
        same = (out == expected) | (out.isnan() & expected.isnan())
        assert same.all(), f"{(~same).sum().item()} of {same.numel()} differ, first at {(~same).nonzero()[0].tolist()}"
        assert torch.equal(out.signbit()[~out.isnan()], expected.signbit()[~out.isnan()])
        if fast:
            assert (expected.abs() == 2.0 ** -125).any() and (expected.abs() == 12.0).any()   # byte 1; 6 x byte 128
        else:
            assert expected.isinf().any() and (expected.abs() == 2.0 ** -125).any()        # byte 254 overflows; byte 1
        assert scale_f32 or (expected.abs() == 2.0 ** -128).any()                          # byte 0
        assert fast or route == 1 or expected.isnan().any()                               # byte 255


@pytest.mark.parametrize("config", ["mxfp4_scaling=one", "mxfp4_scaling=two", "w4a8_mma=fp8_swap"])
def test_mxfp4_scales_above_two_rerun_exactly(config):
    """e8m0 scales above 2 (bytes 129 .. 254, past mxfp4_scaling "one"'s bf16 multiplier) in some runs of
    expert 1, and a NaN scale (255) in expert 3: on "one" those experts' programs rerun on the exact route
    (both launches, W4A16 and W4A8's bf16 route), "two" is exact at once; W4A8's "fp8_swap" makes its
    scales from the bytes' bits up to 248 and reruns exactly past them (255 here); against the twin, NaN
    outputs where the twin has them."""
    T, k, E, D, I = 7, 2, 5, 128, 128
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    ids, w = routing(T, k, E, "random", seed=1)
    w1, w2, w3, scales = experts(E, I, D, torch.bfloat16, "mxfp4", seed=E)
    scales = tuple(s.view(torch.uint8).clone() for s in scales)
    for s in scales:   # 4 .. 2^12 (the routing weights and the clamped SwiGLU keep the outputs finite)
        s[1, :, 0] = torch.randint(129, 140, s[1, :, 0].shape, generator=torch.Generator().manual_seed(2),
                                   dtype=torch.uint8)
        s[3, 0, 1] = 255
    scales = tuple(s.view(torch.float8_e8m0fnu) for s in scales)
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    for act in ("x", "fp8"):
        out = moe_experts(dev(x), dev(ids), dev(w), dev(w1), dev(w2), dev(w3), LIMIT, config, "mxfp4",
                          tuple(map(dev, scales)), act).cpu()
        ref = naive.moe_experts(x, ids, w, w1, w2, w3, LIMIT, None, "mxfp4", scales, act)
        assert ref.isnan().any() and ref.isfinite().any(), "the case: a NaN scale's outputs beside finite ones"
        assert_close(f"act {act}: kernel vs naive", ref, out, TOL[torch.bfloat16])


def test_small_tiles_and_group_swizzle():
    """16-row blocks, 16-wide column tiles (tl.dot's narrowest) and group_m 2 over many blocks and column
    tiles, 32-deep K: float weights, MXFP4 (W4A16) and W4A8 with its activation rounded by a pass (the
    decode route, whose column tile is free)."""
    cfg = MoeExpertsConfig(block_m=16, block_n=16, block_k=32, group_m=2, down_block_n=16, down_block_k=32)
    run_all(40, 3, 7, 72, 40, torch.float32, "float", "holes", config=cfg)
    run_all(7, 6, 5, 64, 96, torch.bfloat16, "mxfp4", "holes", config=cfg)
    run_w4a8(7, 6, 5, "holes", torch.bfloat16, cfg.replace(act_round="pass"), 128, 128)


# ---- split-K at decode sizes (config split_k / down_split_k) ------------------------------------------

# 32-deep K tiles. T = 1 with 4 gate/up and 2 down ranges: D = 64 is two K tiles (two ranges empty), FP8's
# D = 160 five (ranges of 2, 2, 1 tiles, the last one partial, and one empty), I = 96 three (down ranges of
# 2 and 1). T = 7 with split_k 16, down_split_k 24: 16 // 7 = 2 and 24 // 7 = 3 ranges (run_splits).
SPLIT = MoeExpertsConfig(block_m=16, block_n=32, block_k=32, down_block_n=32, down_block_k=32, split_k=4,
                         down_split_k=2)
SPLIT_CASES = [(1, 6, 12, "random", SPLIT), (7, 6, 5, "holes", SPLIT.replace(split_k=16, down_split_k=24))]


def _split_launches(monkeypatch, T, k, I, cfg, run):
    """run() with the launches recorded, checking that the ranges ran: the gate/up grid has cfg.split_k
    ranges on axis 1 of which the partial sums hold run_splits(split_k, T) a row, the SwiGLU pass sums
    them over a grid of the assignments (not the routing blocks) into an activation of a row each, which
    the down launch reads by slot; the down grid has down_split_k ranges, the slots run_splits(down_split_k,
    T) a row -> run()."""
    calls = {}

    def recording_launch(kernel, grid, *args, **kwargs):
        calls[kernel] = (grid, args, kwargs)
        launch(kernel, grid, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(KERNEL, "launch", recording_launch)
        out = run()
    n_split, n_down = KERNEL.run_splits(cfg.split_k, T), KERNEL.run_splits(cfg.down_split_k, T)
    assert n_split > 1 and n_down > 1, "the case runs no split: the test could not fail"
    grid, args, _ = calls[KERNEL._gate_up_kernel]
    assert grid[1] == cfg.split_k and args[9].shape == (n_split * T * k, 2 * I)
    swiglu_grid, swiglu_args, _ = calls[KERNEL._swiglu_splits_kernel]
    act = swiglu_args[3]
    assert swiglu_args[0] is args[9] and swiglu_grid[0] == triton.cdiv(T * k, cfg.block_m)
    assert act.shape[0] == swiglu_grid[0] * cfg.block_m
    grid, args, kwargs = calls[KERNEL._down_kernel]
    assert args[0] is act and kwargs["ACT_BY_SLOT"]
    assert grid[1] == cfg.down_split_k and args[7].shape[0] == n_down * T * k
    return out


@pytest.mark.parametrize("T,k,E,kind,cfg", SPLIT_CASES, ids=["T1", "T7"])
@pytest.mark.parametrize("fmt,dtype", [("float", torch.float32), ("float", torch.bfloat16), ("fp8", torch.float32),
                                       ("mxfp4", torch.bfloat16)], ids=["fp32", "bf16", "fp8", "mxfp4"])
def test_split_k_against_naive_and_plain(T, k, E, kind, cfg, fmt, dtype, monkeypatch):
    """Split gate/up and down reductions: the naive twin's and the plain op's numbers (the same products
    summed range by range, in range order), -1 ids and experts without tokens included."""
    D = 160 if fmt == "fp8" else 64
    _split_launches(monkeypatch, T, k, 96, cfg, lambda: run_all(T, k, E, D, 96, dtype, fmt, kind, config=cfg))


# W4A8 on bf16 tensor cores (the default) and "fp8_swap" (its own K loop); "fp8" (never a default, the
# interpreter's slowest route: 40 s here) runs _fp8_gemm's K loop over a range as W8A8 does, and is
# tested whole at odd shapes (W4A8_CASES) and rounding by a pass.
@pytest.mark.parametrize("T,k,E,kind,cfg", SPLIT_CASES, ids=["T1", "T7"])
@pytest.mark.parametrize("fmt,mma", [("fp8", "fp8"), ("mxfp4", "bf16"), ("mxfp4", "fp8_swap")],
                         ids=["w8a8", "w4a8", "w4a8-fp8swap"])
def test_split_k_fp8_activations(T, k, E, kind, cfg, fmt, mma, monkeypatch):
    """W8A8 and W4A8 split: the SwiGLU pass weights and rounds the summed activation (in place of the
    epilogue or act_round's pass; 32-wide gate/up tiles need no whole activation block), within the
    W8A8 tolerance of the twins. W8A8 at D = I = 256 (128-deep K tiles: 2, one range empty at T = 1);
    W4A8 at D = I = 128 (4 K tiles of 32: ranges of 1 or 2 tiles, one of the 3 down ranges empty at
    T = 7; the interpreter decodes each MXFP4 weight in numpy)."""
    config = (w8a8_config(cfg) if fmt == "fp8" else cfg).replace(w4a8_mma=mma)
    run, D = (run_w8a8, 256) if fmt == "fp8" else (run_w4a8, 128)
    _split_launches(monkeypatch, T, k, D, config, lambda: run(T, k, E, kind, torch.bfloat16, config, D, D))


def test_split_k_exports_with_a_symbolic_token_count():
    """An engine's T is symbolic: the ranges to run are split_k // T evaluated at run time (no guard on
    T), so the exported program at T = 3 (2 ranges) and T = 50 (1) is eager's bits at those T."""
    k, E, D, I = 2, 5, 64, 96
    w1, w2, w3 = (t.to(DEVICE) for t in experts(E, I, D, torch.float32, "float")[:3])
    config = SPLIT.replace(split_k=8, down_split_k=8).to_str()

    class Experts(torch.nn.Module):
        def forward(self, x, ids, w):
            return torch.ops.dsv4_triton.moe_experts(x, ids, w, w1, w2, w3, LIMIT, config)

    x = torch.randn(9, D, device=DEVICE)
    ids, w = (t.to(DEVICE) for t in routing(9, k, E, "holes", seed=9))
    T = torch.export.Dim("T", min=2, max=64)
    ep = torch.export.export(Experts(), (x, ids, w), dynamic_shapes=({0: T}, {0: T}, {0: T}))
    for n in (3, 50):
        xn = torch.randn(n, D, device=DEVICE)
        idn, wn = (t.to(DEVICE) for t in routing(n, k, E, "holes", seed=n))
        assert torch.equal(ep.module()(xn, idn, wn), moe_experts(xn, idn, wn, w1, w2, w3, LIMIT, config))


def test_run_splits():
    """split_k // T ranges, at least 1; 1 for split_k 1 whatever T; refused below 1."""
    assert [KERNEL.run_splits(8, t) for t in (1, 2, 3, 8, 9, 64)] == [8, 4, 2, 1, 1, 1]
    assert KERNEL.run_splits(1, 1) == 1
    with pytest.raises(ValueError, match="split_k = 0"):
        MoeExpertsConfig(split_k=0)


def test_slot_sum_adds_a_tokens_assignments_in_order():
    """out[t] = slots[t*k] + slots[t*k + 1] + ... in j order (fp32), -1 ids skipped unread. 1 + 2^24 - 2^24
    is 0 in that order and 1 in the experts' order (2, 1, 0: how atomics landing by expert would add);
    300 columns: two column tiles."""
    ids = torch.tensor([[2, 1, 0], [0, -1, 1]], dtype=torch.int32)
    slots = torch.tensor([1.0, 2.0 ** 24, -2.0 ** 24, 3.0, float("nan"), 0.5]).unsqueeze(1).repeat(1, 300)
    out = torch.full((2, 300), 7.0)
    sum_slots(slots.to(DEVICE), ids.to(DEVICE), out := out.to(DEVICE))
    assert torch.equal(out.cpu(), torch.tensor([[0.0], [3.5]]).expand(2, 300))


def test_no_clamp_and_no_tokens():
    """swiglu_limit 0 turns the clamps off (large activations pass); all ids -1 give zeros."""
    x = torch.randn(5, 32) * 20
    ids, w = routing(5, 2, 3, "random", seed=1)
    w1, w2, w3, _ = experts(3, 32, 32, torch.float32, "float")
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    out = moe_experts(dev(x), dev(ids), dev(w), dev(w1), dev(w2), dev(w3), 0.0).cpu()
    assert_close("limit 0", torch.ops.dsv4.moe_experts(x, ids, w, w1, w2, w3, 0.0), out)
    none = torch.full_like(ids, -1).to(DEVICE)
    assert torch.equal(moe_experts(dev(x), none, dev(w), dev(w1), dev(w2), dev(w3), LIMIT).cpu(), torch.zeros(5, 32))


def test_bad_input_is_one_line():
    w1, w2, w3, _ = experts(3, 32, 64, torch.float32, "float")
    x = torch.randn(4, 64, device=DEVICE)
    ids, w = (t.to(DEVICE) for t in routing(4, 2, 3, "random", seed=0))
    with pytest.raises(ValueError, match="w2 has shape"):
        moe_experts(x, ids, w, w1.to(DEVICE), w1.to(DEVICE), w3.to(DEVICE), LIMIT)
    with pytest.raises(ValueError, match="MXFP4 needs multiples of 32"):
        moe_experts(torch.randn(4, 48, device=DEVICE), ids, w, w1.to(DEVICE), w2.to(DEVICE), w3.to(DEVICE), LIMIT,
                    weight_format="mxfp4", scales=(w1, w1, w1))
    p1, p2, p3, scales = experts(3, 32, 64, torch.float32, "mxfp4")
    shifted = torch.cat([torch.zeros(2, dtype=torch.int8), p1.flatten()]).to(DEVICE)[2:].view(p1.shape)  # at byte 2
    with pytest.raises(ValueError, match="w1 starts at byte 2 of its storage"):
        moe_experts(x, ids, w, shifted, p2.to(DEVICE), p3.to(DEVICE), LIMIT, weight_format="mxfp4",
                    scales=tuple(s.to(DEVICE) for s in scales))
    with pytest.raises(ValueError, match="tl.dot needs >= 16"):
        MoeExpertsConfig(block_m=8)


# ---- W8A8: FP8 activations on FP8 tensor cores (act="fp8", the moe_experts_fp8_w8a8 op) -----------

# Scale indexing covered: A, K tiles of 64 and 32 within a 128-block (two and four promotions per
# scale), 64-wide down tiles (one weight scale a step); B, 256-wide tiles in both launches (two
# activation blocks quantized per gate/up tile, a weight scale per column), a partial last tile at
# I = D = 384.
W8A8_CONFIGS = {"A": MoeExpertsConfig(block_m=16, block_n=128, block_k=64, down_block_n=64, down_block_k=32),
                "B": MoeExpertsConfig(block_m=32, block_n=256, block_k=128, down_block_n=256, down_block_k=128)}
# Each case in fp32 and bf16 activations, but the T = 300 ones in the interpreter in one each (~14 s a case).
W8A8_SHAPES = [(1, 6, 12, "random", "A"), (7, 1, 5, "random", "B"), (7, 6, 5, "one-expert", "A"),
               (300, 6, 12, "holes", "B"), (300, 1, 5, "random", "A")]
W8A8_CASES = [(*case, dtype) for case in W8A8_SHAPES for dtype in (torch.float32, torch.bfloat16)
              if DEVICE == "cuda" or case[0] < 300 or (case[4] == "B") == (dtype == torch.float32)]


def run_w8a8(T, k, E, kind, dtype, config, D, I, scale_dtype=torch.float8_e8m0fnu):
    """check_fp8_act over FP8 weights (W8A8) whose tiles' scales differ (tile_spread): with uniform scales,
    a scale read from the wrong K block or tile would go unnoticed (a mutation check found so)."""
    w1, w2, w3, scales = experts(E, I, D, dtype, "fp8", scale_dtype, seed=E, tile_spread=True)
    return check_fp8_act(T, k, E, kind, dtype, config, "fp8", w1, w2, w3, scales)


# act="fp8" by weight format: (the op, its name in messages, the same weights' op without FP8 activations)
FP8_ACT = {"fp8": (torch.ops.dsv4.moe_experts_fp8_w8a8, "W8A8", "W8A16"),
           "mxfp4": (torch.ops.dsv4.moe_experts_mxfp4_w4a8, "W4A8", "W4A16")}


def check_fp8_act(T, k, E, kind, dtype, config, fmt, w1, w2, w3, scales):
    """The act="fp8" kernel over these `fmt` weights against its naive twin and its plain op (W8A8_TOL), the
    plain op against the twin (W8A8_TOL), and the kernel against the plain op without FP8 activations
    (W8A8_VS_W8A16) -> (out, the latter's relative RMS); x [T, D] with columns spanning 2^-3 .. 2^3 (each
    128-block of a row gets its own scale)."""
    op, name, unquantized = FP8_ACT[fmt]
    D = w2.shape[1]
    x = (torch.randn(T, D, generator=torch.Generator().manual_seed(T + E)) * torch.logspace(-3, 3, D, base=2)).to(dtype)
    ids, w = routing(T, k, E, kind, seed=T * k + E)
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    args = (dev(x), dev(ids), dev(w), dev(w1), dev(w2), dev(w3), LIMIT, config, fmt, tuple(map(dev, scales)))
    out = moe_experts(*args, act="fp8").cpu()
    assert out.shape == (T, D) and out.dtype == torch.float32
    # the twin on the kernel's device: "/ 448" in the activation scale is a reciprocal multiply on CUDA
    # (as the kernels do there), a division on the CPU; a power-of-two ceiling can land apart at a tie
    twin = naive.moe_experts(*args, act="fp8").cpu()
    assert_close(f"{name} kernel vs {name} naive", twin, out, W8A8_TOL)
    plain = op(x, ids, w, w1, w2, w3, *scales, LIMIT)
    assert_close(f"plain {name} op vs {name} naive", twin, plain, W8A8_TOL)
    assert_close(f"{name} kernel vs plain {name} op", plain, out, W8A8_TOL)
    other = PLAIN[fmt](x, ids, w, w1, w2, w3, *scales, LIMIT)
    assert_close(f"{name} kernel vs plain {unquantized} op", other, out, W8A8_VS_W8A16)
    return out, rel_rms(other, out)


@pytest.mark.parametrize("T,k,E,kind,cfg,dtype", W8A8_CASES,
                         ids=[f"T{c[0]}-k{c[1]}-E{c[2]}-{c[3]}-{c[4]}-{str(c[5])[6:]}" for c in W8A8_CASES])
def test_w8a8_against_its_naive_twin_and_w8a16(T, k, E, kind, cfg, dtype):
    """T = 1, 7, 300; E = 5, 12; k = 1 and 6 (duplicates where 6 > 5); experts 0 and 1 without tokens and -1
    ids ("holes"); every assignment to one expert; D = I = 256 (A) or 384 (B). The W8A8 result is really
    quantized: it differs from W8A16 by more than the bf16 tolerance (a launch that ignored act would not),
    and so does the plain W8A8 op (run_w8a8 holds it to the twin)."""
    D = I = 256 if cfg == "A" else 384
    _, vs_w8a16 = run_w8a8(T, k, E, kind, dtype, W8A8_CONFIGS[cfg], D, I)
    assert vs_w8a16 > 2e-2, f"W8A8 within {vs_w8a16:.1e} of W8A16: the activations were not quantized"


def test_w8a8_float32_scales_and_chunks(monkeypatch):
    """float32 weight scales (as base models ship) give the e8m0 numbers; a workspace bound of 3 tokens
    (chunks, act_bytes 1 + 4/128) gives the unchunked bits."""
    cfg = W8A8_CONFIGS["A"]
    e8m0, _ = run_w8a8(7, 6, 5, "holes", torch.bfloat16, cfg, 256, 256)
    f32, _ = run_w8a8(7, 6, 5, "holes", torch.bfloat16, cfg, 256, 256, scale_dtype=torch.float32)
    assert torch.equal(e8m0, f32)
    monkeypatch.setattr(KERNEL, "WORKSPACE_BYTES", _bound_for(3, 6, 256, 256, 5, cfg.block_m, 1 + 4 / 128))
    assert KERNEL.chunk_plan(7, 6, 256, 256, 5, cfg.block_m, 1 + 4 / 128) == (3, 3)
    chunked, _ = run_w8a8(7, 6, 5, "holes", torch.bfloat16, cfg, 256, 256)
    assert torch.equal(chunked, e8m0)


def test_w8a8_is_refused_where_it_cannot_run():
    """act="fp8" needs FP8 or MXFP4 weights (float refused, one line naming the value and what is
    accepted), D and I multiples of 128 (partial activation blocks are not DeepSeek's act_quant) and
    gate/up column tiles of whole 128-blocks where the epilogue rounds (the W8A8 defaults widen the decode
    ones); act takes "x" or "fp8", and a config has no say in it."""
    ids, w = (t.to(DEVICE) for t in routing(4, 2, 3, "random", seed=0))
    dev = lambda *ts: [t.to(DEVICE) for t in ts]  # noqa: E731
    w1, w2, w3, _ = experts(3, 128, 128, torch.float32, "float")
    with pytest.raises(ValueError, match="moe_experts: act='fp8' \\(W8A8 / W4A8\\) needs FP8 or MXFP4 expert weights; "
                                         "with float weights accepted: act='x'"):
        moe_experts(torch.randn(4, 128, device=DEVICE), ids, w, *dev(w1, w2, w3), LIMIT, None, "float", act="fp8")
    for fmt, op, kind in (("fp8", "moe_experts_fp8_w8a8", "W8A8"), ("mxfp4", "moe_experts_mxfp4_w4a8", "W4A8")):
        w1, w2, w3, scales = experts(3, 128, 160, torch.float32, fmt)
        with pytest.raises(ValueError, match=f"{op}: D = 160, I = 128; {kind} needs multiples of 128"):
            moe_experts(torch.randn(4, 160, device=DEVICE), ids, w, *dev(w1, w2, w3), LIMIT, None, fmt, dev(*scales),
                        act="fp8")
    w1, w2, w3, scales = experts(3, 128, 128, torch.float32, "fp8")
    with pytest.raises(ValueError, match="moe_experts_fp8_w8a8: config block_n = 64; W8A8 rounding in the gate/up "
                                         "epilogue \\(act_round gate_up\\) needs a multiple of 128"):
        moe_experts(torch.randn(4, 128, device=DEVICE), ids, w, *dev(w1, w2, w3), LIMIT, "block_n=64", "fp8",
                    dev(*scales), act="fp8")
    with pytest.raises(ValueError, match="act 'int8'; accepted: x, fp8"):
        moe_experts(torch.randn(4, 128, device=DEVICE), ids, w, *dev(w1, w2, w3), LIMIT, None, "fp8", dev(*scales),
                    act="int8")
    with pytest.raises(ValueError, match="act"):
        MoeExpertsConfig.from_str("act=fp8")                                    # not a config field
    assert (default_config("H200", 1).block_n, default_config("H200", 1, "fp8", "fp8").block_n) == (64, 128)
    q1, q2, q3, q_scales = experts(3, 96, 128, torch.float32, "fp8")                 # the plain op refuses I = 96
    with pytest.raises(ValueError, match="moe_experts_fp8_w8a8: D = 128, I = 96; W8A8 needs multiples of 128"):
        torch.ops.dsv4.moe_experts_fp8_w8a8(torch.randn(4, 128), *routing(4, 2, 3, "random", seed=0), q1, q2, q3,
                                            *q_scales, LIMIT)
    p1, p2, p3, p_scales = experts(3, 96, 128, torch.float32, "mxfp4")
    with pytest.raises(ValueError, match="moe_experts_mxfp4_w4a8: D = 128, I = 96; W4A8 needs multiples of 128"):
        torch.ops.dsv4.moe_experts_mxfp4_w4a8(torch.randn(4, 128), *routing(4, 2, 3, "random", seed=0), p1, p2, p3,
                                              *p_scales, LIMIT)


# ---- W4A8: MXFP4 weights on FP8 tensor cores (act="fp8", the moe_experts_mxfp4_w4a8 op) ----------

def _run_spread(w, g):
    """w [E, N, K] times a power of two in 2^-3 .. 2^3 per 1 x 32 run: MXFP4 scales that differ within a
    128-block (shifts up to 6: the fold), so that a scale read from the wrong run or column shows."""
    spread = 2.0 ** torch.randint(-3, 4, (*w.shape[:-1], w.shape[-1] // 32), generator=g)
    return w * spread.repeat_interleave(32, -1)


def run_w4a8(T, k, E, kind, dtype, config, D, I, scales_as=None):
    """check_fp8_act over MXFP4 weights (W4A8; W8A8_TOL: the same e4m3 and e2m1 codes, exact products,
    fp32 sums in another order) whose 1 x 32 runs' scales differ (_run_spread); scales_as(scale) -> the
    scales passed (default e8m0)."""
    g = torch.Generator().manual_seed(E)
    ws = [_run_spread(torch.randn(E, n, c, generator=g) * c ** -0.5, g) for n, c in ((I, D), (D, I), (I, D))]
    packed = [weight_formats.quantize_mxfp4(t) for t in ws]
    (w1, s1), (w2, s2), (w3, s3) = ((q, s if scales_as is None else scales_as(s)) for q, s in packed)
    return check_fp8_act(T, k, E, kind, dtype, config, "mxfp4", w1, w2, w3, (s1, s2, s3))


# T = 1, 7, 300; E = 5, 12; k = 1 and 6; -1 ids and experts without tokens ("holes"); configs A and B
# (K tiles of 64 and 32 in a 128-block: two and one runs folded a step; 256-wide tiles, 128-deep);
# D = I = 128 but for one case at 384 (three K tiles, a partial last column tile of B); each tensor-core
# route (config w4a8_mma; "fp8_swap" over one and two 32-runs a K tile) with both dtypes: the interpreter
# decodes every weight in numpy, so the cases stay small (~1 s each, T = 300 ~4 s).
# act_round "pass" (the SwiGLU output rounded by a pass between the launches) in config C's 32-wide gate/up
# column tiles (no whole activation block), on bf16 tensor cores and on FP8 ones.
W4A8_CASES = [(1, 6, 12, "random", "A", torch.bfloat16, 128, "fp8"), (7, 6, 5, "holes", "B", torch.float32, 384, "fp8"),
              (7, 1, 5, "one-expert", "A", torch.float32, 128, "bf16"),
              (300, 1, 5, "holes", "B", torch.bfloat16, 128, "bf16"), (7, 6, 5, "holes", "B", torch.bfloat16, 384, "bf16"),
              (1, 6, 12, "random", "C", torch.bfloat16, 128, "bf16"), (7, 6, 5, "holes", "C", torch.float32, 256, "bf16"),
              (7, 1, 5, "one-expert", "C", torch.bfloat16, 256, "fp8"),
              (1, 6, 12, "random", "A", torch.bfloat16, 128, "fp8_swap"),
              (7, 6, 5, "holes", "B", torch.float32, 384, "fp8_swap"),
              (300, 1, 5, "holes", "A", torch.bfloat16, 128, "fp8_swap"),
              (7, 1, 5, "one-expert", "C", torch.bfloat16, 256, "fp8_swap")]
W4A8_PASS = MoeExpertsConfig(block_m=16, block_n=32, block_k=64, down_block_n=64, down_block_k=32, act_round="pass")


@pytest.mark.parametrize("T,k,E,kind,cfg,dtype,D,mma", W4A8_CASES,
                         ids=[f"T{c[0]}-k{c[1]}-E{c[2]}-{c[3]}-{c[4]}-{str(c[5])[6:]}-D{c[6]}-{c[7]}" for c in W4A8_CASES])
def test_w4a8_against_its_naive_twin_and_w4a16(T, k, E, kind, cfg, dtype, D, mma):
    """The W4A8 result is really quantized: it differs from W4A16 by more than the bf16 tolerance."""
    config = {**W8A8_CONFIGS, "C": W4A8_PASS}[cfg].replace(w4a8_mma=mma)
    _, vs_w4a16 = run_w4a8(T, k, E, kind, dtype, config, D, D)
    assert vs_w4a16 > 2e-2, f"W4A8 within {vs_w4a16:.1e} of W4A16: the activations were not quantized"


@pytest.mark.parametrize("fmt,mma,dtype", [("mxfp4", "bf16", torch.bfloat16), ("mxfp4", "bf16", torch.float32),
                                           ("mxfp4", "fp8", torch.bfloat16), ("mxfp4", "fp8_swap", torch.bfloat16),
                                           ("fp8", "bf16", torch.bfloat16)],
                         ids=["w4a8-bf16", "w4a8-fp32", "w4a8-fp8mma", "w4a8-fp8swap", "w8a8"])
def test_rounding_by_a_pass_is_rounding_in_the_epilogue_bit_for_bit(fmt, mma, dtype):
    """act_round "pass" rounds the same values as "gate_up" (the fp32 weighted SwiGLU output, by
    fp8_round / fp8_quantize between the launches instead of in the gate/up epilogue): with the same
    tiles, the same bits, for W4A8 on either tensor cores and W8A8 (T = 7, D = I = 384, -1 ids and
    experts without tokens)."""
    config = W8A8_CONFIGS["B"].replace(w4a8_mma=mma)
    if dtype == torch.float32:  # fp32 x and bf16-decoded weights at B's 256-wide column tiles ask for 240 KB of
        config = config.replace(block_n=128)  # shared memory, past an H100's 227 KB
    run = run_w4a8 if fmt == "mxfp4" else run_w8a8
    by_pass, _ = run(7, 6, 5, "holes", dtype, config.replace(act_round="pass"), 384, 384)
    in_epilogue, _ = run(7, 6, 5, "holes", dtype, config, 384, 384)
    assert torch.equal(by_pass, in_epilogue)


def test_w4a8_float32_scales_fold_or_not():
    """float32 scales: powers of two (as base models ship them) fold as e8m0 do, the same bits; scales times 3/2
    (no power of two) cannot fold: the per-run MMAs, against the twin (which multiplies the same values)."""
    cfg = W8A8_CONFIGS["A"].replace(w4a8_mma="fp8")
    e8m0, _ = run_w4a8(7, 6, 5, "holes", torch.float32, cfg, 128, 128)
    f32, _ = run_w4a8(7, 6, 5, "holes", torch.float32, cfg, 128, 128, scales_as=weight_formats.e8m0_to_float)
    assert torch.equal(e8m0, f32)
    run_w4a8(7, 6, 5, "holes", torch.float32, cfg, 128, 128, scales_as=lambda s: weight_formats.e8m0_to_float(s) * 1.5)


def test_w4a8_runs_on_bf16_tensor_cores_unless_told(monkeypatch):
    """W4A8's default route (w4a8_mma "bf16": the FP8-rounded activations in x's dtype, W4A16's K loop);
    "fp8" in the config, or fp16 x (whose range does not hold every rounded value), the FP8 tensor cores.
    x is rounded by one pass (fp8_round: bf16 tensor cores; fp8_quantize: FP8 ones), the SwiGLU output
    in the gate/up epilogue (column tiles of whole activation blocks) or, with act_round "pass", by a
    second pass of the same kind between the launches, under any column tile. The routes give the same
    numbers, so the launches' flags, block_n and the passes show them."""
    routes, passes = [], []
    real = {name: getattr(KERNEL, name) for name in ("fp8_round", "fp8_quantize")}

    def recording_launch(kernel, grid, *args, **kwargs):
        if "FP8_MMA" in kwargs:  # the gate/up and down launches (not the passes, not the slot sum)
            routes.append((kwargs["FP8_MMA"], kwargs.get("ROUND_PASS"), kwargs["BLOCK_N"]))
        launch(kernel, grid, *args, **kwargs)

    def recording(name):
        def call(t, *args, **kwargs):
            passes.append((name, t.dtype))
            return real[name](t, *args, **kwargs)
        return call

    monkeypatch.setattr(KERNEL, "launch", recording_launch)
    for name in real:
        monkeypatch.setattr(KERNEL, name, recording(name))
    g = torch.Generator().manual_seed(3)
    (w1, s1), (w2, s2), (w3, s3) = (weight_formats.quantize_mxfp4(torch.randn(3, 128, 128, generator=g)) for _ in range(3))
    ids, w = routing(2, 2, 3, "random", seed=3)
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    bf16, f32, f16 = torch.bfloat16, torch.float32, torch.float16
    # down_block_n pinned: the device's default config would set it (32 in the H100 table)
    epilogue, by_pass = "act_round=gate_up,block_n=128,down_block_n=64", "act_round=pass,block_n=32,down_block_n=64"
    cases = ((bf16, epilogue, [(False, False, 128), (False, None, 64)], [("fp8_round", bf16)]),
             (bf16, epilogue + ",w4a8_mma=fp8", [(True, False, 128), (True, None, 64)], [("fp8_quantize", bf16)]),
             (f16, epilogue, [(True, False, 128), (True, None, 64)], [("fp8_quantize", f16)]),
             (bf16, by_pass, [(False, True, 32), (False, None, 64)], [("fp8_round", bf16), ("fp8_round", f32)]),
             (f16, by_pass, [(True, True, 32), (True, None, 64)], [("fp8_quantize", f16), ("fp8_quantize", f32)]))
    for dtype, config, launches, rounded in cases:
        routes.clear(), passes.clear()
        x = torch.randn(2, 128, generator=g).to(dtype)
        moe_experts(dev(x), dev(ids), dev(w), dev(w1), dev(w2), dev(w3), LIMIT, config, "mxfp4",
                    (dev(s1), dev(s2), dev(s3)), act="fp8")
        assert (routes, passes) == (launches, rounded), (dtype, config)


def test_w4a8_defaults_round_by_a_pass_at_decode_sizes():
    """The W4A8 op's defaults: at decode sizes W4A16's tiles with the SwiGLU output rounded by a pass
    (act_round "pass"); at prefill rounded in the gate/up epilogue, whose column tiles hold whole
    activation blocks. W8A8 rounds in the epilogue at both."""
    for gpu in ("H200", "H100", "generic"):
        assert default_config(gpu, 6, "mxfp4", "fp8") == default_config(gpu, 6, "mxfp4").replace(act_round="pass"), gpu
        prefill = default_config(gpu, 1 << 20, "mxfp4", "fp8")
        assert (prefill.act_round, prefill.block_n) == ("gate_up", 128), gpu
        for n in (6, 1 << 20):
            assert default_config(gpu, n, "fp8", "fp8").act_round == "gate_up"


def test_mxfp4_decode_config_on_the_hoppers():
    """MXFP4's decode kernels are instruction-bound: on the H100 and H200 its decode tiles are at least as
    wide as the other formats' and one token splits K in two ranges (MXFP4_DECODE_FIELDS); W4A16 and W4A8
    alike, prefill and the generic defaults unchanged. MXFP4 decodes scale with one multiply on every
    GPU, prefill with two (mxfp4_scaling, measured)."""
    for gpu, float_tiles in (("H100", (32, 32)), ("H200", (64, 64))):
        float_decode = default_config(gpu, 6)
        assert (float_decode.block_n, float_decode.down_block_n, float_decode.split_k) == (*float_tiles, 1)
        assert default_config(gpu, 6, "fp8") == float_decode
        for act in ("x", "fp8"):
            cfg = default_config(gpu, 6, "mxfp4", act)
            assert (cfg.block_n, cfg.down_block_n, cfg.split_k, cfg.down_split_k) == (64, 128, 2, 2), (gpu, act)
            assert cfg.replace(block_n=float_tiles[0], down_block_n=float_tiles[1], act_round="gate_up", split_k=1,
                               down_split_k=1, mxfp4_scaling="two") == float_decode
        assert default_config(gpu, 1 << 20, "mxfp4") == default_config(gpu, 1 << 20)
    assert default_config("generic", 6, "mxfp4") == default_config("generic", 6).replace(mxfp4_scaling="one")
    assert default_config("H100", 6, "mxfp4").mxfp4_scaling == default_config("generic", 6, "mxfp4").mxfp4_scaling == "one"
    assert default_config("H100", 6, "fp8").mxfp4_scaling == default_config("H200", 1 << 20, "mxfp4").mxfp4_scaling == "two"


@triton.jit
def _foldable(p_s, p_out, R, C, SCALE_F32: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    e = tl.program_id(1)                                                          # expert 0 (grid [n, 1])
    tl.store(p_out + tl.program_id(0), _mxfp4_foldable(p_s, e, offs_n, R, C, SCALE_F32, BLOCK_K, BLOCK_N).to(tl.int32))


@pytest.mark.parametrize("shift", [FOLD_MAX_SHIFT.value, FOLD_MAX_SHIFT.value + 1])
def test_w4a8_runs_far_below_their_neighbours(shift):
    """Where a weight column's 1 x 32 runs lie `shift` powers of two apart within a K tile: at the fold's
    limit (14) the small runs' values fold into e4m3 exactly (0.5 * 2^-8 is e4m3's smallest subnormal);
    one past it they would not (0.5 * 2^-9), and the kernel takes the per-run MMAs. In rows [16, 32) of
    w2 (I = 128: one K tile) the first run holds zero codes under the large scale, so those output
    columns come from the small runs alone: a fold past the limit would lose or round them (the twin
    has them). _mxfp4_foldable decides per program (16 columns): only the second program's differ."""
    T, k, E, D, I = 5, 2, 3, 128, 128
    ids, w = routing(T, k, E, "random", seed=5)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(6)
    packed = [weight_formats.quantize_mxfp4(torch.randn(E, n, c, generator=g)) for n, c in ((I, D), (D, I), (I, D))]
    (w1, s1), (w2, s2), (w3, s3) = packed
    codes = weight_formats.unpack_fp4_codes(w2)                                   # [E, D, I]: one K tile of 4 runs
    codes[:, 16:32, :32] = 0
    w2 = weight_formats.pack_fp4_codes(codes)
    s2 = s2.view(torch.uint8).clone()                                             # [E, D, 4] e8m0 bytes
    s2[:, 16:32, 0] = 127 + 7                                                     # the zero run: 2^7
    s2[:, 16:32, 1:] = 127 + 7 - shift                                            # the others: 2^(7 - shift)
    scales = (s1, s2.view(torch.float8_e8m0fnu), s3)
    folds = torch.zeros(D // 16, dtype=torch.int32, device=DEVICE)
    _foldable[(D // 16, 1)](s2[1].to(DEVICE), folds, D, I, SCALE_F32=False, BLOCK_K=128, BLOCK_N=16)
    assert folds.cpu().tolist() == [1] + [int(shift <= FOLD_MAX_SHIFT.value)] + [1] * (D // 16 - 2)
    cfg = MoeExpertsConfig(block_m=16, block_n=128, block_k=128, down_block_n=16, down_block_k=128, w4a8_mma="fp8")
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    args = (dev(x), dev(ids), dev(w), dev(w1), dev(w2), dev(w3), LIMIT, cfg, "mxfp4", tuple(map(dev, scales)))
    out = moe_experts(*args, act="fp8").cpu()
    twin = naive.moe_experts(*args, act="fp8").cpu()
    assert twin[:, 16:32].abs().amax() > 0
    assert_close("W4A8 kernel vs W4A8 naive", twin, out, W8A8_TOL)
    assert_close("W4A8 kernel vs W4A8 naive, the spread columns", twin[:, 16:32], out[:, 16:32], W8A8_TOL)


# ---- the substitution ------------------------------------------------------------------------------

def _four_ops(x, ids, w, f1, f2, f3, q1, q2, q3, s1, s2, s3, p1, p2, p3, t1, t2, t3, x128, r1, r2, r3, u1, u2, u3):
    return (torch.ops.dsv4.moe_experts(x, ids, w, f1, f2, f3, LIMIT),
            torch.ops.dsv4.moe_experts_fp8(x, ids, w, q1, q2, q3, s1, s2, s3, LIMIT),
            torch.ops.dsv4.moe_experts_mxfp4(x, ids, w, p1, p2, p3, t1, t2, t3, LIMIT),
            torch.ops.dsv4.moe_experts_fp8_w8a8(x128, ids, w, r1, r2, r3, u1, u2, u3, LIMIT))


FOUR_OPS = ("moe_experts", "moe_experts_fp8", "moe_experts_mxfp4", "moe_experts_fp8_w8a8")


def _four_inputs():
    """x [9, 64] and the experts (D 64, I 32) of the first three ops, then x [9, 128] and the W8A8 op's FP8
    experts (D = I = 128: whole activation blocks)."""
    g = torch.Generator().manual_seed(3)
    x, x128 = torch.randn(9, 64, generator=g), torch.randn(9, 128, generator=g)
    ids, w = routing(9, 3, 5, "holes", seed=4)
    f = experts(5, 32, 64, torch.float32, "float")[:3]
    q1, q2, q3, (s1, s2, s3) = experts(5, 32, 64, torch.float32, "fp8")
    p1, p2, p3, (t1, t2, t3) = experts(5, 32, 64, torch.float32, "mxfp4")
    r1, r2, r3, (u1, u2, u3) = experts(5, 128, 128, torch.float32, "fp8", tile_spread=True)
    return tuple(t.to(DEVICE) for t in (x, ids, w, *f, q1, q2, q3, s1, s2, s3, p1, p2, p3, t1, t2, t3,
                                         x128, r1, r2, r3, u1, u2, u3))


def test_substitution_replaces_every_moe_op():
    """On a fake-traced graph the pass replaces the four ops, each by its own kernel op (counts
    before/after, report: the FP8 op by the W8A16 launch, the W8A8 op by the W8A8 one), the numbers
    hold (fp32; W8A8 to W8A8_TOL), the config is a string the kernel parses, and the registered
    substitutions decline CPU tensors with their reason."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from dsv4_compile.passes import PassManager, Target
    from dsv4_compile.passes.kernel_substitutions import moe_experts as sub

    args = _four_inputs()
    gm = make_fx(_four_ops, tracing_mode="fake")(*args)
    subs = sub.interpreter_substitutions() if DEVICE == "cpu" else [sub.FLOAT, sub.FP8, sub.MXFP4, sub.FP8_W8A8]
    manager = PassManager(subs, gpu="H200" if DEVICE == "cuda" else "cpu")
    manager(gm.graph)
    gm.recompile()
    before, after = manager.graph_ops[0]["before"], manager.graph_ops[0]["after"]
    for op in FOUR_OPS:
        assert before[f"dsv4.{op}.default"] == 1 and f"dsv4.{op}.default" not in after, op
        assert after[f"dsv4_triton.{op}.default"] == 1 and manager.report.replaced(f"dsv4.{op}") == 1, op
    for name, ref, out in zip(FOUR_OPS, _four_ops(*args), gm(*args)):
        assert_close(f"substituted {name}", ref.cpu(), out.cpu(), W8A8_TOL if name.endswith("w8a8") else None)
    config = sub.FLOAT.config(Target(gpu="H200"), *args[:6], LIMIT)["config"]
    assert MoeExpertsConfig.from_str(config).block_m == 16                   # 9 tokens: the decode regime
    # A tuned table: decode entries by batch, prefill entries by token count; neither leaks into the other.
    table = {"by_context": {"8192": "block_m=64,block_n=256"},
             "entries": {"decode-8k-b64": {"phase": "decode", "context": 8192, "batch": 64, "config": {"block_n": 128}},
                         "8k": {"phase": "prefill", "context": 8192, "batch": 1, "config": {"block_m": 64}}}}
    tuned = Target(gpu="H200", table=table)
    cfg = MoeExpertsConfig.from_str(sub.FLOAT.config(tuned, *args[:6], LIMIT)["config"])
    assert (cfg.block_m, cfg.block_n) == (16, 128)                           # the decode entry over the decode default
    big = torch.zeros(1000, 3, dtype=torch.int32)                              # 3000 assignments: still decode
    assert MoeExpertsConfig.from_str(sub.FLOAT.config(tuned, args[0], big, *args[2:6], LIMIT)["config"]).block_n == 128
    huge = torch.zeros(5000, 3, dtype=torch.int32)                             # prefill: the 8192-token entry
    assert MoeExpertsConfig.from_str(sub.FLOAT.config(tuned, args[0], huge, *args[2:6], LIMIT)["config"]).block_m == 64
    # The W8A8 op's untuned config: the decode default widened to whole activation blocks (H200: 64 -> 128).
    w8a8_args = (args[18], *args[1:3], *args[19:], LIMIT)
    assert MoeExpertsConfig.from_str(sub.FP8_W8A8.config(Target(gpu="H200"), *w8a8_args)["config"]).block_n == 128
    if DEVICE == "cpu":
        manager = PassManager([sub.FLOAT, sub.FP8, sub.MXFP4, sub.FP8_W8A8], gpu="cpu")
        gm = make_fx(_four_ops, tracing_mode="fake")(*args)
        manager(gm.graph)
        left = manager.report.left_alone()
        assert len(left) == 4 and all("needs CUDA tensors" in rec.reason for rec in left)
    assert "multiples of 32" in sub._mxfp4_reason(torch.empty(2, 48, device=DEVICE), *args[1:3], *args[12:18], LIMIT,
                                                  allow_cpu=True)
    # W8A8 on D = 64, I = 32 (the FP8 op's experts): declined with the reason, left to the plain op.
    assert "W8A8 needs multiples of 128" in sub._fp8_w8a8_reason(*args[:3], *args[6:12], LIMIT, allow_cpu=True)
    assert sub._fp8_w8a8_reason(*w8a8_args, allow_cpu=True) is None


def test_a_symbolic_token_count_bounded_within_decode_gets_the_decode_config():
    """An exported decode engine's T (= B <= max_batch) is symbolic, and every value it can take is
    decode-sized: the substitution configures it by its bound (the decode regime's 16-row blocks, a tuned
    decode entry by batch), as does the launcher's own default, not by the prefill regime's; a symbolic T
    that reaches the prefill regime keeps the table's default or the launcher's ("")."""
    from dsv4_compile.passes import Target
    from dsv4_compile.passes.kernel_substitutions import moe_experts as sub

    k, E, D, I = 6, 12, 64, 32
    w1, w2, w3 = (t.to(DEVICE) for t in experts(E, I, D, torch.float32, "float")[:3])
    x = torch.randn(3, D, device=DEVICE)
    ids, w = (t.to(DEVICE) for t in routing(3, k, E, "random", seed=3))

    def op_args(max_tokens):
        T = torch.export.Dim("T", min=2, max=max_tokens)
        return exported_op_args(lambda *a: torch.ops.dsv4.moe_experts(*a, w1, w2, w3, LIMIT), (x, ids, w),
                                ({0: T},) * 3, torch.ops.dsv4.moe_experts.default)

    gpu = "H200" if DEVICE == "cuda" else "interpreter"
    decode_sized, prefill_sized = op_args(64), op_args(8192)
    assert not isinstance(decode_sized[0].shape[0], int), "the export did not keep T symbolic"
    got = MoeExpertsConfig.from_str(sub.FLOAT.config(Target(gpu="H200"), *decode_sized)["config"])
    assert got == default_config(gpu, 64 * k) and got.block_m == 16 != default_config(gpu, 8192 * k).block_m
    entries = {"b8": {"phase": "decode", "batch": 8, "config": {"block_n": 32}},
               "b64": {"phase": "decode", "batch": 64, "config": {"block_n": 128}}}
    tuned = Target(gpu="H200", table={"entries": entries, "default": "block_m=64"})
    assert MoeExpertsConfig.from_str(sub.FLOAT.config(tuned, *decode_sized)["config"]).block_n == 128
    assert sub.FLOAT.config(Target(gpu="H200"), *prefill_sized)["config"] == ""
    assert sub.FLOAT.config(tuned, *prefill_sized)["config"] == "block_m=64"
    assert KERNEL.resolve(None, x.device, decode_sized[1].shape[0] * k).block_m == 16
    assert KERNEL.resolve(None, x.device, prefill_sized[1].shape[0] * k) == default_config(gpu, 8192 * k)


def _w4a8_op(x, ids, w, p1, p2, p3, t1, t2, t3):
    return torch.ops.dsv4.moe_experts_mxfp4_w4a8(x, ids, w, p1, p2, p3, t1, t2, t3, LIMIT)


def test_substitution_replaces_the_w4a8_op():
    """The W4A8 op (D = I = 128) on a fake-traced graph: replaced by its own kernel op (counts before/after,
    the report), the numbers within W8A8_TOL of eager (the plain op), its untuned config the W8A8
    defaults (H200 decode: W4A16's block_n 64, the activation rounded by a pass), and declined with the
    reason where D or I is not a multiple of 128 or the tensors are on the CPU."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from dsv4_compile.passes import PassManager, Target
    from dsv4_compile.passes.kernel_substitutions import moe_experts as sub

    g = torch.Generator().manual_seed(7)
    x = torch.randn(9, 128, generator=g)
    ids, w = routing(9, 3, 5, "holes", seed=8)
    p1, p2, p3, scales = experts(5, 128, 128, torch.float32, "mxfp4")
    args = tuple(t.to(DEVICE) for t in (x, ids, w, p1, p2, p3, *scales))
    gm = make_fx(_w4a8_op, tracing_mode="fake")(*args)
    subs = sub.interpreter_substitutions() if DEVICE == "cpu" else [sub.MXFP4_W4A8]
    manager = PassManager(subs, gpu="H200" if DEVICE == "cuda" else "cpu")
    manager(gm.graph)
    gm.recompile()
    before, after = manager.graph_ops[0]["before"], manager.graph_ops[0]["after"]
    assert before["dsv4.moe_experts_mxfp4_w4a8.default"] == 1 and "dsv4.moe_experts_mxfp4_w4a8.default" not in after
    assert after["dsv4_triton.moe_experts_mxfp4_w4a8.default"] == 1
    assert manager.report.replaced("dsv4.moe_experts_mxfp4_w4a8") == 1
    assert_close("substituted moe_experts_mxfp4_w4a8", _w4a8_op(*args).cpu(), gm(*args).cpu(), W8A8_TOL)
    decode = MoeExpertsConfig.from_str(sub.MXFP4_W4A8.config(Target(gpu="H200"), *args, LIMIT)["config"])
    assert (decode.block_n, decode.act_round) == (64, "pass")
    q1, q2, q3, q_scales = experts(5, 96, 128, torch.float32, "mxfp4")
    assert "W4A8 needs multiples of 128" in sub._mxfp4_w4a8_reason(*args[:3], q1, q2, q3, *q_scales, LIMIT,
                                                                    allow_cpu=True)
    assert sub._mxfp4_w4a8_reason(*args, LIMIT, allow_cpu=True) is None
    if DEVICE == "cpu":
        assert "needs CUDA tensors" in sub._mxfp4_w4a8_reason(*args, LIMIT)


# ---- GPU: V4-Flash shapes -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def flash_experts():
    """V4-Flash's routed experts (E 256, I 2048, D 4096) in bf16, FP8 and MXFP4, on the GPU: 21 GiB, built
    once, quantized 32 experts at a time (whole-tensor quantization's temporaries took 40 GiB more)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    E, I, D = 256, 2048, 4096
    ws = [torch.randn(E, I, D, device="cuda", generator=g, dtype=torch.bfloat16) * D ** -0.5,
          torch.randn(E, D, I, device="cuda", generator=g, dtype=torch.bfloat16) * I ** -0.5,
          torch.randn(E, I, D, device="cuda", generator=g, dtype=torch.bfloat16) * D ** -0.5]
    fp8 = [weight_formats.quantize_experts(weight_formats.quantize_fp8_weight, w) for w in ws]
    fp4 = [weight_formats.quantize_experts(weight_formats.quantize_mxfp4, w) for w in ws]
    return {"float": (ws, None), "fp8": ([q for q, _ in fp8], tuple(s for _, s in fp8)),
            "mxfp4": ([q for q, _ in fp4], tuple(s for _, s in fp4))}


@pytest.mark.gpu
@pytest.mark.xdist_group("gpu-large")  # one worker: tests of tens of GiB must not overlap
@pytest.mark.parametrize("T", [1, 64, 4096, 32768])
@pytest.mark.parametrize("fmt", ["float", "fp8", "mxfp4"])
def test_flash_shapes_against_the_plain_op(flash_experts, fmt, T):
    """k = 6 of 256 experts, bf16 activations, the kernel's per-GPU default config for T: bf16
    tolerance against the plain op (grouped form) on the same weights."""
    if fmt != "float" and T == 32768:
        pytest.skip("the quantized plain op dequantizes ~T/7 gathered experts per call: minutes at 32K")
    g = torch.Generator(device="cuda").manual_seed(T)
    x = torch.randn(T, 4096, device="cuda", generator=g, dtype=torch.bfloat16)
    ids = torch.multinomial(torch.ones(T, 256, device="cuda"), 6, generator=g).to(torch.int32)
    w = torch.rand(T, 6, device="cuda", generator=g) + 0.1
    ws, scales = flash_experts[fmt]
    out = moe_experts(x, ids, w, *ws, LIMIT, None, fmt, scales)
    ref = PLAIN[fmt](x, ids, w, *ws, *(scales or ()), LIMIT)
    assert_close(f"{fmt} T={T}", ref, out, TOL[torch.bfloat16])


@pytest.mark.gpu
@pytest.mark.xdist_group("gpu-large")
def test_flash_shapes_are_bit_reproducible(flash_experts):
    """Two calls on the same inputs give the same bits (the k contributions of a token summed in a fixed
    order, not by atomics in arrival order), at a prefill size where many programs write each token."""
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(4096, 4096, device="cuda", generator=g, dtype=torch.bfloat16)
    ids = torch.multinomial(torch.ones(4096, 256, device="cuda"), 6, generator=g).to(torch.int32)
    w = torch.rand(4096, 6, device="cuda", generator=g) + 0.1
    ws, _ = flash_experts["float"]
    first = moe_experts(x, ids, w, *ws, LIMIT)
    assert all(torch.equal(first, moe_experts(x, ids, w, *ws, LIMIT)) for _ in range(3))


@pytest.mark.gpu
@pytest.mark.xdist_group("gpu-large")
@pytest.mark.parametrize("fmt", ["fp8", "mxfp4"], ids=["w8a8", "w4a8"])
def test_flash_shapes_fp8_activations(flash_experts, fmt):
    """T = 4096 (k 6 of 256, D 4096, I 2048, bf16 x), the act="fp8" launch over FP8 weights (W8A8, the
    moe_experts_fp8_w8a8 op) and MXFP4 ones (W4A8, moe_experts_mxfp4_w4a8: its default on bf16 tensor
    cores, and on FP8 ones, e2m1 decoded to e4m3, the runs' scales folded) at its prefill default (what
    bench_moe's "fp8 w8a8" and "mxfp4 w4a8" columns run): against its naive twin on the GPU and its plain
    op (W8A8_HOPPER_TOL), the plain op against the
    twin (W8A8_TOL: both fp32), the same weights' kernel without FP8 activations (W8A8_VS_W8A16, and
    beyond the bf16 tolerance: really quantized); float32 scales (as base models ship them) give the e8m0
    bits. The distances are printed."""
    T = 4096
    op, name, unquantized = FP8_ACT[fmt]
    g = torch.Generator(device="cuda").manual_seed(T)
    x = torch.randn(T, 4096, device="cuda", generator=g, dtype=torch.bfloat16)
    ids = torch.multinomial(torch.ones(T, 256, device="cuda"), 6, generator=g).to(torch.int32)
    w = torch.rand(T, 6, device="cuda", generator=g) + 0.1
    ws, scales = flash_experts[fmt]
    out = moe_experts(x, ids, w, *ws, LIMIT, None, fmt, scales, act="fp8")
    twin = naive.moe_experts(x, ids, w, *ws, LIMIT, None, fmt, scales, act="fp8")
    plain = op(x, ids, w, *ws, *scales, LIMIT)
    other = moe_experts(x, ids, w, *ws, LIMIT, None, fmt, scales)
    f32 = moe_experts(x, ids, w, *ws, LIMIT, None, fmt, tuple(map(weight_formats.e8m0_to_float, scales)), act="fp8")
    print(f"T = {T}: {name} vs its naive twin {rel_rms(twin, out):.3e}, vs the plain {name} op {rel_rms(plain, out):.3e}, "
          f"plain vs twin {rel_rms(twin, plain):.3e}, {name} vs {unquantized} {rel_rms(other, out):.3e} (relative RMS)")
    assert_close(f"{name} vs naive {name}", twin, out, W8A8_HOPPER_TOL)
    assert_close(f"{name} vs plain {name} op", plain, out, W8A8_HOPPER_TOL)
    assert_close(f"plain {name} op vs naive {name}", twin, plain, W8A8_TOL)
    assert_close(f"{name} vs {unquantized}", other, out, W8A8_VS_W8A16)
    assert rel_rms(other, out) > 2e-2, f"{name} within the bf16 tolerance of {unquantized}: the activations were not quantized"
    assert torch.equal(out, f32)
    if fmt == "mxfp4":
        fp8_route = moe_experts(x, ids, w, *ws, LIMIT, w8a8_config(default_config(None, T * 6)).replace(w4a8_mma="fp8"),
                                fmt, scales, act="fp8")
        print(f"W4A8 on FP8 tensor cores vs its naive twin {rel_rms(twin, fp8_route):.3e}")
        assert_close("W4A8 on FP8 tensor cores vs naive W4A8", twin, fp8_route, W8A8_HOPPER_TOL)


@pytest.mark.gpu
@pytest.mark.xdist_group("gpu-large")
@pytest.mark.parametrize("T", [1, 64])
@pytest.mark.parametrize("block_n", [64, 128])
def test_flash_shapes_w4a8_swapped_operands_at_decode(flash_experts, block_n, T):
    """W4A8 at decode sizes (k 6 of 256, D 4096, I 2048, bf16 x) on w4a8_mma "fp8_swap" (the MXFP4 rows the
    wgmma's register operand, one MMA per 32-run) under the decode default's other fields: within
    W8A8_HOPPER_TOL (FP8 MMAs) of the naive twin and of the default bf16 route."""
    g = torch.Generator(device="cuda").manual_seed(T)
    x = torch.randn(T, 4096, device="cuda", generator=g, dtype=torch.bfloat16)
    ids = torch.multinomial(torch.ones(T, 256, device="cuda"), 6, generator=g).to(torch.int32)
    w = torch.rand(T, 6, device="cuda", generator=g) + 0.1
    ws, scales = flash_experts["mxfp4"]
    default = default_config(None, T * 6, "mxfp4", "fp8")
    out = moe_experts(x, ids, w, *ws, LIMIT, default.replace(w4a8_mma="fp8_swap", block_n=block_n), "mxfp4", scales,
                      act="fp8")
    bf16_route = moe_experts(x, ids, w, *ws, LIMIT, default, "mxfp4", scales, act="fp8")
    twin = naive.moe_experts(x, ids, w, *ws, LIMIT, None, "mxfp4", scales, act="fp8")
    print(f"T = {T}, block_n {block_n}: fp8_swap vs its naive twin {rel_rms(twin, out):.3e}, vs the bf16 route "
          f"{rel_rms(bf16_route, out):.3e} (relative RMS)")
    assert_close("fp8_swap vs naive W4A8", twin, out, W8A8_HOPPER_TOL)
    assert_close("fp8_swap vs the bf16 route", bf16_route, out, W8A8_HOPPER_TOL)


@pytest.mark.gpu
@pytest.mark.xdist_group("gpu-large")
@pytest.mark.parametrize("T", [1, 64])
@pytest.mark.parametrize("fmt", ["mxfp4", "fp8"], ids=["w4a8", "w8a8"])
def test_flash_shapes_decode_rounding_by_a_pass(flash_experts, fmt, T):
    """Decode sizes (k 6 of 256, D 4096, I 2048, bf16 x), the activation rounded by a pass (act_round
    "pass": W4A8's default there, with W4A16's column tiles; W8A8 at 64-wide tiles, its tuning choice):
    the bits of the epilogue route (128-wide column tiles) compiled, and within W8A8_TOL of the naive
    twin (W4A8: exact products on bf16 tensor cores, fp32 sums in another order) or W8A8_HOPPER_TOL
    (W8A8: FP8 MMAs, per-128 promotion)."""
    g = torch.Generator(device="cuda").manual_seed(T)
    x = torch.randn(T, 4096, device="cuda", generator=g, dtype=torch.bfloat16)
    ids = torch.multinomial(torch.ones(T, 256, device="cuda"), 6, generator=g).to(torch.int32)
    w = torch.rand(T, 6, device="cuda", generator=g) + 0.1
    ws, scales = flash_experts[fmt]
    default = default_config(None, T * 6, fmt, "fp8")
    if fmt == "mxfp4":
        assert default.act_round == "pass" and default.block_n < 128
        by_pass = default
    else:
        by_pass = default.replace(act_round="pass", block_n=64)
    out = moe_experts(x, ids, w, *ws, LIMIT, by_pass, fmt, scales, act="fp8")
    epilogue = moe_experts(x, ids, w, *ws, LIMIT, by_pass.replace(act_round="gate_up", block_n=128), fmt, scales,
                           act="fp8")
    twin = naive.moe_experts(x, ids, w, *ws, LIMIT, None, fmt, scales, act="fp8")
    print(f"T = {T}: {FP8_ACT[fmt][1]} by a pass vs its naive twin {rel_rms(twin, out):.3e} (relative RMS)")
    assert torch.equal(out, epilogue)
    assert_close(f"{FP8_ACT[fmt][1]} by a pass vs its naive twin", twin, out,
                 W8A8_TOL if fmt == "mxfp4" else W8A8_HOPPER_TOL)


# ---- chunks of tokens: a bounded workspace, the same bits --------------------------------------------

def _bound_for(tokens, k, D, I, E, block_m, act_bytes):
    """The WORKSPACE_BYTES at which chunk_tokens plans chunks of `tokens` tokens."""
    return E * (block_m - 1) * I * act_bytes + tokens * k * (4 * D + I * act_bytes)


def _run_recording(monkeypatch, bound, x, ids, w, w1, w2, w3, config=None):
    """moe_experts with WORKSPACE_BYTES = bound -> (out, kernels launched, bytes of the float tensors the
    launches wrote or read other than the inputs and the output: act and slots)."""
    launched, storages = [], {}

    def recording_launch(kernel, grid, *args, **kwargs):
        launched.append(kernel)
        for a in args:
            if isinstance(a, torch.Tensor) and a.is_floating_point():
                storages[a.untyped_storage().data_ptr()] = a.untyped_storage().nbytes()
        launch(kernel, grid, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(KERNEL, "WORKSPACE_BYTES", bound)
        patch.setattr(KERNEL, "launch", recording_launch)
        patch.setattr(KERNEL.one_program_layout, "launch", recording_launch)
        out = moe_experts(x, ids, w, w1, w2, w3, LIMIT, config)
    for t in (x, w, w1, w2, w3, out):
        storages.pop(t.untyped_storage().data_ptr(), None)
    return out, launched, sum(storages.values())


# (T, k, E, routing, tokens per chunk, dtype): T = 1, 7, 300; -1 ids and repeated experts ("holes",
# "one-expert"); chunks of 1 token, of 2 (the last one short), 64 and 7. T = 300 in one dtype each
# (two interpreted runs of ~4 s).
_F32, _BF16 = torch.float32, torch.bfloat16
CHUNKS = [(1, 6, 5, "holes", 1, _F32), (1, 6, 5, "holes", 1, _BF16), (7, 6, 5, "one-expert", 2, _F32),
          (7, 6, 5, "one-expert", 2, _BF16), (7, 3, 12, "holes", 1, _BF16), (300, 6, 12, "holes", 64, _BF16),
          (300, 1, 5, "random", 7, _F32)]


@pytest.mark.parametrize("T,k,E,kind,tokens,dtype", CHUNKS,
                         ids=[f"T{c[0]}-k{c[1]}-E{c[2]}-{c[3]}-chunk{c[4]}-{str(c[5])[6:]}" for c in CHUNKS])
def test_chunks_give_the_unchunked_bits_within_the_workspace_bound(T, k, E, kind, tokens, dtype, monkeypatch):
    """WORKSPACE_BYTES lowered to `tokens`-token chunks: the same bits as one chunk (a token's k rows summed
    in j order either way, one config for all chunks), three launches a chunk (T = 1: the three of the
    unchunked path, whose layout is one more: the one-program layout of decode sizes; chunks take the plain
    layout), and the workspace the launches touched within the bound where one chunk's exceeds it."""
    D, I = 48, 40
    x = (torch.randn(T, D, generator=torch.Generator().manual_seed(T)) * 2).to(dtype).to(DEVICE)
    ids, w = (t.to(DEVICE) for t in routing(T, k, E, kind, seed=T + k))
    w1, w2, w3 = (t.to(DEVICE) for t in experts(E, I, D, dtype, "float")[:3])
    block_m = KERNEL.resolve(None, x.device, T * k).block_m
    bound = _bound_for(tokens, k, D, I, E, block_m, x.element_size())
    assert KERNEL.chunk_plan(T, k, D, I, E, block_m, x.element_size()) == (T, 1)    # the default bound: one chunk
    whole, launched, whole_bytes = _run_recording(monkeypatch, 1 << 40, x, ids, w, w1, w2, w3)
    assert launched[0] is KERNEL.one_program_layout._expert_blocks_kernel and len(launched) == 4
    chunked, launched, chunked_bytes = _run_recording(monkeypatch, bound, x, ids, w, w1, w2, w3)
    assert torch.equal(chunked, whole)
    n_chunks = -(-T // tokens)
    assert len(launched) == (3 * n_chunks if n_chunks > 1 else 4)   # one chunk: the one-program layout too
    assert chunked_bytes <= bound
    if n_chunks > 1:
        assert whole_bytes > bound, "the unchunked workspace fits the bound: the test could not fail"
    assert_close("chunked kernel vs naive", naive.moe_experts(x.cpu(), ids.cpu(), w.cpu(), w1.cpu(), w2.cpu(), w3.cpu(),
                                                              LIMIT), chunked.cpu(), TOL[dtype])


def test_export_with_a_symbolic_token_count_plans_static_chunks(monkeypatch):
    """torch.export with T dynamic (up to 64) traces the launcher with a symbolic T: as many chunks as T's
    upper bound needs (static launches), the chunked layout traced without specialising T (an unbounded T:
    one chunk); the exported program then runs the op at other T (one chunk at T = 3, three at T = 50),
    equal to eager bit for bit. With one chunk, the one-program layout traced at T's bound."""
    k, E, D, I = 2, 5, 32, 32
    w1, w2, w3 = (t.to(DEVICE) for t in experts(E, I, D, torch.float32, "float")[:3])
    monkeypatch.setattr(KERNEL, "WORKSPACE_BYTES", _bound_for(20, k, D, I, E, 16, 4))   # 20-token chunks
    launched = []
    monkeypatch.setattr(KERNEL, "launch", lambda kernel, grid, *a, **kw: (launched.append(kernel), launch(kernel, grid, *a, **kw)))

    class Experts(torch.nn.Module):
        def forward(self, x, ids, w):
            return torch.ops.dsv4_triton.moe_experts(x, ids, w, w1, w2, w3, LIMIT, "block_m=16")

    x = torch.randn(9, D, device=DEVICE)
    ids, w = (t.to(DEVICE) for t in routing(9, k, E, "holes", seed=9))
    T = torch.export.Dim("T", min=2, max=64)
    ep = torch.export.export(Experts(), (x, ids, w), dynamic_shapes=({0: T}, {0: T}, {0: T}))
    if DEVICE == "cpu":  # the interpreter's op is opaque to export: its fake (the launcher) ran at symbolic T
        assert len(launched) == 3 * 4, "T <= 64 in 20-token chunks: 4 chunks of 3 launches"
        launched.clear()
        torch.export.export(Experts(), (x, ids, w), dynamic_shapes=({0: torch.export.Dim("T", min=2)},) * 3)
        assert len(launched) == 3, "an unbounded T: one chunk"
    for n in (3, 50):
        xn = torch.randn(n, D, device=DEVICE)
        idn, wn = (t.to(DEVICE) for t in routing(n, k, E, "holes", seed=n))
        launched.clear()
        out = ep.module()(xn, idn, wn)
        assert torch.equal(out, Experts()(xn, idn, wn))
        assert torch.equal(out, moe_experts(xn, idn, wn, w1, w2, w3, LIMIT, "block_m=16"))
    # One chunk (the default workspace): the one-program layout, traced at T's bound (NP 128 for 64 x 2)
    monkeypatch.undo()
    layouts = []
    monkeypatch.setattr(KERNEL.one_program_layout, "launch",
                        lambda kernel, grid, *a, **kw: (layouts.append(kw["NP"]), launch(kernel, grid, *a, **kw)))
    ep = torch.export.export(Experts(), (x, ids, w), dynamic_shapes=({0: T}, {0: T}, {0: T}))
    if DEVICE == "cpu":
        assert layouts == [128]
    xn = torch.randn(50, D, device=DEVICE)
    idn, wn = (t.to(DEVICE) for t in routing(50, k, E, "holes", seed=50))
    assert torch.equal(ep.module()(xn, idn, wn), moe_experts(xn, idn, wn, w1, w2, w3, LIMIT, "block_m=16"))


def test_w4a8_exports_with_a_symbolic_token_count():
    """The W4A8 op at decode sizes (act_round "pass": x and the activation each rounded by a pass of
    their own, shapes symbolic in T) exports with T dynamic up to 64 (a decode engine's B <= max_batch)
    and runs at other T equal to eager bit for bit."""
    k, E, D = 2, 3, 128
    g = torch.Generator().manual_seed(7)
    (w1, s1), (w2, s2), (w3, s3) = ([t.to(DEVICE) for t in weight_formats.quantize_mxfp4(torch.randn(E, D, D, generator=g))]
                                    for _ in range(3))

    class Experts(torch.nn.Module):
        def forward(self, x, ids, w):
            return torch.ops.dsv4_triton.moe_experts_mxfp4_w4a8(x, ids, w, w1, w2, w3, s1, s2, s3, LIMIT, "act_round=pass")

    x = torch.randn(9, D, generator=g).to(DEVICE)
    ids, w = (t.to(DEVICE) for t in routing(9, k, E, "holes", seed=9))
    T = torch.export.Dim("T", min=2, max=64)
    ep = torch.export.export(Experts(), (x, ids, w), dynamic_shapes=({0: T}, {0: T}, {0: T}))
    for n in (3, 50):
        xn = torch.randn(n, D, generator=g).to(DEVICE)
        idn, wn = (t.to(DEVICE) for t in routing(n, k, E, "holes", seed=n))
        assert torch.equal(ep.module()(xn, idn, wn), Experts()(xn, idn, wn))


@pytest.mark.gpu
@pytest.mark.xdist_group("gpu-large")
def test_flash_shapes_chunked_equal_unchunked_within_the_bound(flash_experts, monkeypatch):
    """T = 32768 (k 6 of 256, D 4096, I 2048, bf16) with WORKSPACE_BYTES at 1 GiB (five chunks at the
    prefill default's 128-row blocks): the unchunked bits, and the memory the call allocated beyond its
    output within the bound plus the routing layout (80 bytes an assignment covers the sort's
    temporaries), where unchunked it takes about 4 GiB."""
    T = 32768
    g = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(T, 4096, device="cuda", generator=g, dtype=torch.bfloat16)
    ids = torch.multinomial(torch.ones(T, 256, device="cuda"), 6, generator=g).to(torch.int32)
    w = torch.rand(T, 6, device="cuda", generator=g) + 0.1
    ws, _ = flash_experts["float"]
    whole = moe_experts(x, ids, w, *ws, LIMIT)
    monkeypatch.setattr(KERNEL, "WORKSPACE_BYTES", 1 << 30)
    assert KERNEL.chunk_plan(T, 6, 4096, 2048, 256, 128, 2)[1] == 5
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    chunked = moe_experts(x, ids, w, *ws, LIMIT)
    torch.cuda.synchronize()
    assert torch.equal(chunked, whole)
    extra = torch.cuda.max_memory_allocated() - before - chunked.numel() * 4
    assert extra <= (1 << 30) + 80 * T * 6, f"{extra / 2**30:.2f} GiB"
