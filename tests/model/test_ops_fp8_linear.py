"""torch.ops.dsv4.fp8_linear against a float64 reference of DeepSeek's semantics (act_quant with
power-of-two scales per 128 along K, then the block-scaled product), and FP8Linear.

Tolerance: the reference picks the same FP8 codes (x / a power-of-two scale is exact in float32 and
float64 alike); what differs is the float32 accumulation over K (<= 512 terms here): relative RMS
error well under float32's 1e-5. A bf16 input's output is rounded once to bf16 (1e-2).
"""
from __future__ import annotations

import math

import pytest
import torch

import dsv4_compile.model.ops  # noqa: F401  (registers torch.ops.dsv4.*)
from dsv4_compile.model.layers import FP8Linear
from dsv4_compile.model.weight_formats import dequantize_fp8_weight, e8m0_to_float, quantize_fp8_weight
from helpers import assert_close


def e4m3_grid() -> list[float]:
    """The finite non-negative e4m3fn values, ascending (index = code)."""
    return [m / 8 * 2.0 ** -6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
            for e in range(16) for m in range(8) if not (e == 15 and m == 7)]


GRID = e4m3_grid()


def e4m3_round(y: float) -> float:
    """Nearest e4m3 value of y (|y| <= 448), ties to the even code, in float64."""
    a = abs(y)
    i = min(range(len(GRID)), key=lambda j: (abs(GRID[j] - a), j % 2))
    return math.copysign(GRID[i], y)


def deepseek_fp8_linear(x: torch.Tensor, w_codes: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """float64, element by element: act_quant(x, 128, ue8m0) then fp8_gemm."""
    rows = x.double().reshape(-1, x.shape[-1])
    k = rows.shape[1]
    xq = torch.empty_like(rows)
    for r in range(rows.shape[0]):
        for b in range(0, k, 128):
            blk = rows[r, b:b + 128]
            s = 2.0 ** math.ceil(math.log2(max(float(blk.abs().max()), 1e-4) / 448))
            xq[r, b:b + 128] = torch.tensor([e4m3_round(float(v) / s) * s for v in blk], dtype=torch.float64)
    n = w_codes.shape[0]
    w = w_codes.double() * w_scale.double().repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
    return (xq @ w.T).reshape(*x.shape[:-1], n)


@pytest.mark.parametrize("lead,k,n", [((3, 5), 256, 200), ((1,), 128, 96), ((2, 1), 384, 130)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_matches_deepseek_reference(lead, k, n, dtype):
    g = torch.Generator().manual_seed(k + n)
    x = (torch.randn(*lead, k, generator=g) * torch.logspace(-2, 1, k)).to(dtype)
    w_codes, w_scale = quantize_fp8_weight(torch.randn(n, k, generator=g) * 0.05)
    w_scale = e8m0_to_float(w_scale)
    out = torch.ops.dsv4.fp8_linear(x, w_codes, w_scale)
    assert out.dtype == dtype and out.shape == (*lead, n)
    ref = deepseek_fp8_linear(x, w_codes, w_scale)
    assert_close("fp8_linear vs DeepSeek float64", ref.to(dtype).float(), out.float(),
                 1e-5 if dtype == torch.float32 else 1e-2)
    # and it is not the unquantized product: the FP8 activation rounding is visible
    plain = x.double() @ dequantize_fp8_weight(w_codes, w_scale).double().T
    assert (ref - plain).abs().max() > 1e-4 * plain.abs().max()


def test_fp8_linear_refuses_bad_shapes():
    w, s = quantize_fp8_weight(torch.randn(64, 100))
    with pytest.raises(ValueError, match="multiple of 128"):
        torch.ops.dsv4.fp8_linear(torch.randn(2, 100), w, e8m0_to_float(s))
    w, s = quantize_fp8_weight(torch.randn(64, 128))
    with pytest.raises(ValueError, match=r"scale shape \[2, 1\]; expected \[1, 1\]"):
        torch.ops.dsv4.fp8_linear(torch.randn(2, 128), w, torch.ones(2, 1))
    with pytest.raises(ValueError, match="K must match"):
        torch.ops.dsv4.fp8_linear(torch.randn(2, 256), w, e8m0_to_float(s))


def test_fp8_linear_fake_and_module():
    lin = FP8Linear(256, 130)
    codes, scale = quantize_fp8_weight(torch.randn(130, 256))
    lin.weight.copy_(codes)
    lin.scale.copy_(e8m0_to_float(scale))
    x = torch.randn(4, 256)
    assert torch.equal(lin(x), torch.ops.dsv4.fp8_linear(x, codes, e8m0_to_float(scale)))
    assert set(lin.state_dict()) == {"weight", "scale"} and not list(lin.parameters())
    with torch._subclasses.fake_tensor.FakeTensorMode():
        fx = torch.empty(3, 7, 256)
        assert torch.ops.dsv4.fp8_linear(fx, torch.empty(130, 256, dtype=torch.float8_e4m3fn),
                                         torch.empty(2, 2)).shape == (3, 7, 130)
