"""rel_rms: NaN / Inf positions, and the slice-by-slice masking (no whole-tensor boolean index)."""
from __future__ import annotations

import math

import torch

from dsv4_compile import metrics
from dsv4_compile.metrics import rel_rms


def _masked(ref, out, keep):
    r, o = ref[keep].double(), out[keep].double()
    return math.sqrt(float(((o - r) ** 2).sum())) / math.sqrt(float((r ** 2).sum()))


def test_nan_and_inf_positions(monkeypatch):
    monkeypatch.setattr(metrics, "_CHUNK", 7)  # slices that cut through the tensor at odd places
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(5, 13, generator=gen)
    out = ref + 1e-3 * torch.randn(5, 13, generator=gen)
    ref[1, 2] = out[1, 2] = float("nan")
    ref[3, 4] = out[3, 4] = float("inf")
    ref[4, 12] = out[4, 12] = -float("inf")
    finite = torch.isfinite(ref)
    assert math.isclose(rel_rms(ref, out, finite_only=True), _masked(ref, out, finite), rel_tol=1e-12)
    # Without finite_only an Inf position counts (inf - inf is NaN): the caller must not rely on it.
    assert math.isnan(rel_rms(ref, out))
    ref[3, 4] = out[3, 4] = 0.0
    ref[4, 12] = out[4, 12] = 0.0
    assert math.isclose(rel_rms(ref, out), _masked(ref, out, ~torch.isnan(ref)), rel_tol=1e-12)


def test_identical_and_empty():
    x = torch.randn(100)
    assert rel_rms(x, x.clone()) == 0.0
    assert rel_rms(torch.full((4,), float("nan")), torch.zeros(4)) == 0.0
