"""One comparison helper for every test, with tolerances stated per dtype.

Tolerances (relative RMS error of `out` against an fp32-or-better reference):
- float32: 1e-5 for plain reorderings of the same math (summation order only).
- bfloat16: 1e-2; bf16 keeps 8 mantissa bits (unit roundoff 2^-9 = 2e-3) and a few roundings compound.
- float16: 2e-3; 11 mantissa bits (unit roundoff 4.9e-4), same reasoning.
Quantized outputs are judged by SQNR in dB (`sqnr_db`), as torchao does: FP8 e4m3 (3 mantissa bits)
gives about 30 dB on Gaussian data, FP4 e2m1 about 17 dB.
"""
from __future__ import annotations

import torch

from dsv4_compile.metrics import rel_rms, sqnr_db  # noqa: F401  (re-exported for the tests)

REL_RMS_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, tol: float | None = None) -> None:
    """Assert shapes match, NaNs sit in the same places, and the relative RMS error is within `tol`
    (default: REL_RMS_TOL of `out`'s dtype)."""
    assert ref.shape == out.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    tol = REL_RMS_TOL[out.dtype] if tol is None else tol
    ref_nan, out_nan = torch.isnan(ref), torch.isnan(out)
    assert torch.equal(ref_nan, out_nan), f"{name}: NaN positions differ ({int(ref_nan.sum())} vs {int(out_nan.sum())})"
    keep = ~ref_nan
    err = rel_rms(ref[keep], out[keep]) if keep.any() else 0.0
    assert err <= tol, f"{name}: relative RMS error {err:.3e} > tolerance {tol:.1e}"
