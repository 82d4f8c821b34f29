"""Error metrics and the one comparison rule shared by build, verify, tuning gates, benchmarks and tests.

Tolerances (relative RMS error of `out` against an fp32-or-better reference), per `out` dtype:
- float32: 1e-5 for plain reorderings of the same math (summation order only).
- bfloat16: 1e-2; bf16 keeps 8 mantissa bits (unit roundoff 2^-9 = 2e-3) and a few roundings compound.
- float16: 2e-3; 11 mantissa bits (unit roundoff 4.9e-4), same reasoning.
Quantized outputs are judged by SQNR in dB (`sqnr_db`), as torchao does, or, where a kernel sums in
another order than the plain op before rounding to codes, by `few_flips` (a value on a rounding
boundary may land on the neighbouring code).
"""
from __future__ import annotations

import math

import torch

_CHUNK = 1 << 24  # elements per float64 slice: a 128K-context output is not copied whole


def rel_rms(ref: torch.Tensor, out: torch.Tensor, finite_only: bool = False) -> float:
    """Relative RMS error of `out` against `ref`, in float64, over the positions where ref is not NaN
    (NaN placement is for the caller to compare), or with `finite_only` where ref is finite (Inf
    placement compared by the caller too); 0 when nothing is left. Masks slice by slice: a boolean
    index of a whole 2^32-element output would build a 128 GiB index tensor."""
    ref, out = ref.reshape(-1), out.reshape(-1)
    num = den = 0.0
    for i in range(0, ref.numel(), _CHUNK):
        r, o = ref[i:i + _CHUNK].double(), out[i:i + _CHUNK].double()
        keep = torch.isfinite(r) if finite_only else ~torch.isnan(r)
        r, o = r[keep], o[keep]
        num += float(((o - r) ** 2).sum())
        den += float((r ** 2).sum())
    return math.sqrt(num) / max(math.sqrt(den), 1e-300)


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when out equals ref): how quantizers are judged."""
    ref, out = ref.double(), out.double()
    noise = float(((out - ref) ** 2).sum())
    return float("inf") if noise == 0 else 10 * math.log10(float((ref ** 2).sum()) / noise)


REL_RMS_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def mismatch(name: str, ref: torch.Tensor, out: torch.Tensor, tol: float | None = None,
             same_dtype: bool = False) -> str | None:
    """None when `out` matches `ref`, else one line saying how it does not: shapes equal (and dtypes,
    with `same_dtype`); non-float tensors, and float ones with tol 0, exactly equal; otherwise NaN and
    Inf in the same places and the relative RMS error over the finite values within `tol` (default:
    REL_RMS_TOL of `out`'s dtype)."""
    if tuple(ref.shape) != tuple(out.shape):
        return f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    if same_dtype and ref.dtype != out.dtype:
        return f"{name}: dtype {out.dtype} != reference {ref.dtype}"
    if not ref.is_floating_point():
        bad = int((ref != out).sum())
        return None if bad == 0 else f"{name}: {bad} of {ref.numel()} values differ (exact match required)"
    ref_nan, out_nan = torch.isnan(ref), torch.isnan(out)
    if not torch.equal(ref_nan, out_nan):
        return f"{name}: NaN positions differ ({int(ref_nan.sum())} vs {int(out_nan.sum())})"
    tol = REL_RMS_TOL[out.dtype] if tol is None else tol
    if tol == 0.0:
        bad = int(((ref != out) & ~ref_nan).sum())
        return None if bad == 0 else f"{name}: {bad} of {ref.numel()} values differ (exact match required)"
    if not torch.equal(torch.isinf(ref), torch.isinf(out)):
        return f"{name}: Inf positions differ"
    err = rel_rms(ref, out, finite_only=True)
    return None if err <= tol else f"{name}: relative RMS error {err:.3e} > tolerance {tol:.1e}"


def few_flips(name: str, ref: torch.Tensor, out: torch.Tensor, frac: float = 0.01, min_allowed: int = 4,
              step: float = 0.5) -> str | None:
    """None when shapes and NaN positions match and at most max(min_allowed, frac of the values) differ,
    each by at most one code step: `step` times the larger magnitude (0.5 covers FP8 / FP4 / BF16; an
    e4m3 step is at most 2^-3), or between 0 and a nonzero code. For codes computed in another
    summation order than the reference, where a value on a rounding boundary may land next door."""
    if tuple(ref.shape) != tuple(out.shape):
        return f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    if not torch.equal(torch.isnan(ref), torch.isnan(out)):
        return f"{name}: NaN positions differ"
    differ = (ref != out) & ~torch.isnan(ref)
    n, allowed = int(differ.sum()), max(min_allowed, int(frac * ref.numel()))
    if n > allowed:
        return f"{name}: {n} of {ref.numel()} values differ (allowed {allowed})"
    big = ((ref - out).abs() > step * torch.maximum(ref.abs(), out.abs())) & (ref != 0) & (out != 0)
    if bool((big & differ).any()):
        return f"{name}: a value differs by more than one code step"
    return None
