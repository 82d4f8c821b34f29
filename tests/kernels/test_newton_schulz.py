"""Newton-Schulz kernel against its naive fp32 twin and the plain op (bf16 tolerances).

Tolerances (relative RMS): the kernel and the plain op both run bf16 operands with fp32 accumulation
but round at different points and sum in different orders; after 10 steps they differ by ~5e-3 of
the output's RMS (measured 3e-3 .. 6e-3 at these sizes), and each sits ~6e-3 from the fp32 naive
twin. 1e-2 (helpers' bf16 tolerance: a few compounded bf16 roundings) bounds both with ~2x margin.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel import (conftest does it too)

import pytest  # noqa: E402

import dsv4_compile.model.ops  # noqa: E402,F401  (registers torch.ops.dsv4.*)
from dsv4_compile.kernels.newton_schulz import fused_muon_step, naive, newton_schulz  # noqa: E402
from helpers import assert_bits_equal, assert_close  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NS_TOL = 1e-2
DEEPSEEK_V4 = [3.4445, -4.7750, 2.0315] * 8 + [2.0, -1.5, 0.5] * 2         # 10 steps
QUINTIC = [1.875, -1.25, 0.375] * 3                                          # classic quintic NS
CUBIC = [1.5, -0.5, 0.0] * 3                                                 # classic cubic NS, c = 0

# (shape, steps of the DeepSeek schedule): the interpreter runs ~0.1-0.4 s per step at these sizes.
SHAPES = [
    pytest.param((37, 53), 10, id="37x53-wide-10steps"),
    pytest.param((53, 37), 10, id="53x37-tall-10steps"),
    pytest.param((3, 1, 17, 17), 3, id="3x1x17x17-square-3steps"),
    pytest.param((2, 64, 96), 3, id="2x64x96-batched-3steps"),
    pytest.param((130, 70), 3, id="130x70-tall-multi-tile-3steps"),
]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16"),
          pytest.param(torch.float16, id="fp16")]


def make_input(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.02).to(dtype).to(DEVICE)


@pytest.mark.parametrize("shape,steps", SHAPES)
def test_deepseek_schedule_matches_plain_and_naive(shape, steps):
    G = make_input(shape, torch.float32)
    coefficients = DEEPSEEK_V4[-3 * steps:]
    out = newton_schulz(G, coefficients)
    assert out.shape == G.shape and out.dtype == G.dtype
    assert_close("vs plain", torch.ops.dsv4.newton_schulz(G, coefficients), out, NS_TOL)
    assert_close("vs naive", naive.newton_schulz(G.cpu(), coefficients), out.cpu(), NS_TOL)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [pytest.param((2, 40, 24), id="2x40x24-tall-batched")])
def test_dtypes_and_quintic_schedule(shape, dtype):
    G = make_input(shape, dtype, seed=1)
    out = newton_schulz(G, QUINTIC)
    assert out.dtype == dtype
    assert_close("vs plain", torch.ops.dsv4.newton_schulz(G, QUINTIC).float(), out.float(), NS_TOL)
    assert_close("vs naive", naive.newton_schulz(G.cpu().float(), QUINTIC), out.cpu().float(), NS_TOL)


def test_cubic_schedule_c_zero():
    """c = 0 (no A A term), 17+ rows: torch's bf16 baddbmm with alpha=0 returns wrong numbers there
    on the CPU (torch 2.13), which the plain op works around by skipping A A."""
    G = make_input((37, 53), torch.float32, seed=1)
    assert_close("vs naive", naive.newton_schulz(G.cpu(), CUBIC), newton_schulz(G, CUBIC).cpu(), NS_TOL)
    assert_close("vs plain", torch.ops.dsv4.newton_schulz(G, CUBIC).cpu(), newton_schulz(G, CUBIC).cpu(), NS_TOL)


def test_small_tiles_config():
    """A config with 16-wide tiles (several triangle tiles, the mirrored stores, masked edges) gives
    the same numbers up to summation order."""
    G = make_input((40, 50), torch.float32, seed=3)
    cfg = dict(block_m=16, block_n=32, block_k=16, sym_block=16, sym_block_k=32, norm_block=256, norm_tile=16)
    assert_close("16-tiles vs default", newton_schulz(G, QUINTIC[:3]), newton_schulz(G, QUINTIC[:3], config=cfg), 2e-3)


def test_orthogonalises():
    """After the DeepSeek schedule the singular values sit near 1 (0.6 .. 1.3: the quintic phase
    leaves them spread, the 2 cubic-like steps pull them in)."""
    G = make_input((37, 53), torch.float32, seed=4)
    s = torch.linalg.svdvals(newton_schulz(G, DEEPSEEK_V4).cpu().double())
    assert s.min() > 0.6 and s.max() < 1.3, (s.min().item(), s.max().item())


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_nan_inf_propagate_per_matrix():
    G = make_input((3, 24, 40), torch.float32, seed=5)  # (the shape of no other plain-op call here)
    G[0, 3, 7] = float("nan")
    G[2, 0, 0] = float("inf")
    out = newton_schulz(G, QUINTIC).cpu()
    ref = torch.ops.dsv4.newton_schulz(G, QUINTIC).cpu()
    assert torch.isnan(out[0]).all() and torch.isnan(out[2]).all() and torch.isfinite(out[1]).all()
    assert torch.equal(torch.isnan(ref), torch.isnan(out))
    assert_close("finite matrix", ref[1], out[1], NS_TOL)


def test_zero_matrix_gives_zero():
    out = newton_schulz(torch.zeros(20, 30, device=DEVICE), CUBIC)
    assert (out == 0).all()


def test_input_errors():
    G = make_input((20, 30), torch.float32)
    with pytest.raises(ValueError, match="triple"):
        newton_schulz(G, [1.0, 2.0])
    with pytest.raises(ValueError, match="dims"):
        newton_schulz(G[0], CUBIC)
    with pytest.raises(ValueError, match="not contiguous"):
        newton_schulz(G.t(), CUBIC)
    with pytest.raises(ValueError, match="accepted"):
        newton_schulz(G.double(), CUBIC)
    with pytest.raises(ValueError, match="tl.dot"):
        newton_schulz(G, CUBIC, config={"block_k": 8})


def _unfused_muon_step(param, grad, buf, coefficients, *, momentum, nesterov, decay, alpha):
    """model/muon.py's step with this kernel's newton_schulz: what fused_muon_step fuses."""
    buf.lerp_(grad, 1 - momentum)
    direction = grad.lerp(buf, momentum) if nesterov else buf
    param.mul_(decay).add_(newton_schulz(direction, coefficients), alpha=alpha)


def _muon_state(shape, seed, dyadic=False):
    """(param, grad, momentum buffer) float32. dyadic: multiples of 2^-8 below 2^-2, on which the
    momentum's lerps at momentum 0.75 and the update at decay 0.5, alpha -0.25 are exact whatever the
    rounding (with or without fused multiply-adds), and U is exactly a bf16 value."""
    g = torch.Generator().manual_seed(seed)
    if dyadic:
        return [(torch.randint(-63, 64, shape, generator=g) / 256).to(DEVICE) for _ in range(3)]
    return [(torch.randn(shape, generator=g) * scale).to(DEVICE) for scale in (0.02, 1.0, 0.5)]


MUON_SHAPES = [pytest.param((37, 53), id="37x53-wide"), pytest.param((53, 37), id="53x37-tall"),
               pytest.param((2, 24, 40), id="2x24x40-batched")]


@pytest.mark.parametrize("nesterov", [True, False], ids=["nesterov", "plain-momentum"])
@pytest.mark.parametrize("shape", MUON_SHAPES)
def test_fused_muon_step_is_the_unfused_step_bit_for_bit(shape, nesterov):
    """On dyadic inputs every rounding outside Newton-Schulz is exact, so fusing the momentum into the
    norm's pass and the update into the last product may change no bit of the buffer or the parameter."""
    args = dict(momentum=0.75, nesterov=nesterov, decay=0.5, alpha=-0.25)
    fused = _muon_state(shape, seed=6, dyadic=True)
    unfused = [t.clone() for t in fused]
    fused_muon_step(*fused, QUINTIC[:6], **args)
    _unfused_muon_step(*unfused, QUINTIC[:6], **args)
    assert_bits_equal("momentum buffer", unfused[2], fused[2])
    assert_bits_equal("parameter", unfused[0], fused[0])
    assert not torch.equal(fused[0], _muon_state(shape, seed=6, dyadic=True)[0])   # it did step


@pytest.mark.parametrize("shape", MUON_SHAPES)
def test_fused_muon_step_matches_naive(shape):
    """Gaussian state at torch.optim.Muon's defaults: the buffer to float32 rounding (the same lerp,
    fused multiply-adds or not: 1e-6 is a few float32 ulps), the parameter's change to bf16 accuracy."""
    param, grad, buf = _muon_state(shape, seed=7)
    args = dict(momentum=0.95, nesterov=True, decay=1 - 0.02 * 0.1, alpha=-0.02 * 0.2 * max(shape[-2:]) ** 0.5)
    ref = [t.cpu().clone() for t in (param, grad, buf)]
    start = param.cpu().clone()
    fused_muon_step(param, grad, buf, DEEPSEEK_V4, **args)
    naive.fused_muon_step(*ref, DEEPSEEK_V4, **args)
    assert_close("momentum buffer", ref[2], buf.cpu(), 1e-6)
    assert_close("parameter change", ref[0] - start, param.cpu() - start, NS_TOL)


def test_fused_muon_step_input_errors():
    param, grad, buf = _muon_state((20, 30), seed=8)
    args = dict(momentum=0.95, nesterov=True, decay=1.0, alpha=-0.01)
    with pytest.raises(ValueError, match=r"grad has shape \(30, 20\); need \(20, 30\)"):
        fused_muon_step(param, grad.reshape(30, 20), buf, CUBIC, **args)
    with pytest.raises(ValueError, match="param is torch.bfloat16; accepted: torch.float32"):
        fused_muon_step(param.bfloat16(), grad, buf, CUBIC, **args)
    with pytest.raises(ValueError, match="triple"):
        fused_muon_step(param, grad, buf, [1.0], **args)


@pytest.mark.gpu
def test_gpu_fused_muon_step_at_an_expert_stack():
    """V4-Flash-like experts [8, 1024, 2048] against the unfused step: 1e-3 relative RMS of the change
    (an ulp of a fused multiply-add can move an element of U to its other bf16 neighbour, a 2^-8
    change of one element among millions; the rest is the same kernels on the same bits)."""
    fused = _muon_state((8, 1024, 2048), seed=9)
    unfused = [t.clone() for t in fused]
    start = fused[0].clone()
    args = dict(momentum=0.95, nesterov=True, decay=0.998, alpha=-0.2)
    fused_muon_step(*fused, DEEPSEEK_V4, **args)
    _unfused_muon_step(*unfused, DEEPSEEK_V4, **args)
    assert_close("momentum buffer", unfused[2], fused[2], 1e-6)
    assert_close("parameter change", unfused[0] - start, fused[0] - start, 1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [pytest.param((4096, 4096), id="4096x4096"), pytest.param((14336, 4096), id="14336x4096-tall"),
                                   pytest.param((8, 1024, 2048), id="8x1024x2048-batched")])
def test_gpu_real_shapes(shape):
    G = torch.randn(shape, device="cuda")
    out = newton_schulz(G, DEEPSEEK_V4)
    assert_close("vs plain", torch.ops.dsv4.newton_schulz(G, DEEPSEEK_V4), out, NS_TOL)
