"""GPU names, normalised in one place: 'NVIDIA H100 80GB HBM3' / 'h100' -> 'H100'.

Used by the kernels' per-GPU default configs, `--gpu` and the manifest (dsv4_compile.compile), the tuned
tables' file names (tuning) and the benchmarks' result folders. Plain Python: importing it loads
neither torch nor triton.
"""
from __future__ import annotations

# The GPUs with their own default configs, tuned tables and `--gpu` name.
KNOWN_GPUS = ("H100", "H200")


def canonical_gpu(name: str) -> str:
    """A known GPU's short name when `name` contains it (any case); 'cpu', 'interpreter' and 'generic'
    lower-cased; any other name with spaces and slashes as '_' (a file name)."""
    text = str(name).strip()
    upper = text.upper()
    for key in KNOWN_GPUS:
        if key in upper:
            return key
    if text.lower() in ("cpu", "interpreter", "generic"):
        return text.lower()
    return text.replace(" ", "_").replace("/", "_")
