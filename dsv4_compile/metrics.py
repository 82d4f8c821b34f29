"""Error metrics shared by build, verify, tuning gates, benchmarks and tests."""
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
