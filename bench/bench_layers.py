"""Whole-layer attention of V4-Flash: a CSA layer and an HCA layer with our Triton kernels, against
dense causal SDPA at the same sequence length and head count, plus the compressor and the indexer
against torch.compile of their plain ops.

    python bench/bench_layers.py [--contexts 8k,32k,128k] [--out bench/results/H100] [--budget 360]
    from bench_layers import main   # what `python -m dsv4_compile bench --ops layers` calls

B = 1, prefill of S tokens, V4-Flash's attention shapes (model/presets/flash.yaml): 64 query heads x
512 (64 rope dims) over one shared K=V head, window 128, indexer 64 heads x 128, top-512.
What a layer row times (the model's wiring, model/attention.py, from the projections on; the GEMMs
that make q, kv and the compressor projections are left out of both sides):
  CSA: compress_kv (ratio 4, overlapping, FP8) -> the indexer's compress_kv (Hadamard + FP4) ->
       indexer_topk (scores + top-512) -> window + selected indices -> sparse_attention
  HCA: compress_kv (ratio 128, FP8) -> window + every visible compressed entry -> sparse_attention
Dense baselines, same S and 64 heads, causal, bf16: SDPA with the FlashAttention-2 backend at head
dims 128 and 256 (FA2 takes no larger head), and SDPA at the real 512-dim head with K and V as 64
full heads (the shared head expanded; efficient / cuDNN backends), skipped where one call would take
too long (projected from a shorter context by S^2).
Components: compressor and indexer, Triton vs torch.compile of the plain op (model/ops.py), the
acceptance bar of issue 5 (Triton at least as fast); the indexer also with the FP8 score MMA
(INDEXER_CONFIGS: "triton fp8*" rows, score_mma=fp8; its queries are FP4-simulated as the model's,
so every path sees the model's operands) and with the radix selection ("triton *radix" rows,
selection=radix: chunks of scores to a workspace, then the radix select). Anything that would not fit in the GPU's free
memory (at most 78 GiB) is skipped with a row saying so.
Timing: below GRAPH_MS per call, the median replay of a CUDA graph of a few calls (GPU time only: at
~0.1 ms do_bench's per-call Python launch cost is comparable to the kernel, and differs between a
torch.compile'd callable and a kernel launcher); below SLOW_MS, do_bench (median, L2 flushed); above,
the median of a few CUDA-event-timed calls after one warm-up (128K). Each row's note says which.
Outputs: layers.csv, layers.png (ms vs context), layers.md (GPU, versions, date, ratios of this run).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
import traceback

import torch

from dsv4_compile.model.context import parse_contexts

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _kernel_bench_util import (DEVICE, bench_ms, environment, fmt, graph_time_ms, log_log_plot, out_dir,  # noqa: E402
                                write_csv)

GIB = 1 << 30
MAX_BYTES = 78 * GIB      # the H100's usable memory; the free memory bounds it further
SLOW_MS = 50.0            # above this per call: a few event-timed calls instead of do_bench
SLOW_REPS = 3
GRAPH_MS = 2.0            # below this per call: CUDA-graph replay of GRAPH_CALLS calls (GPU time only)
GRAPH_CALLS = 8
DENSE_CALL_LIMIT_MS = 4000.0   # SDPA at 512-dim heads: skip a context whose projected call is longer
TARGETS = {"csa": 10, "hca": 40}   # issue 5: layer <= 1/10 (CSA), 1/40 (HCA) of dense FA2 at 128K


@dataclasses.dataclass(frozen=True)
class Shapes:
    """Attention shapes of one model (flash.yaml's; `TINY` for the CPU smoke test)."""
    H: int = 64            # query heads
    D: int = 512           # shared K=V head dim
    R: int = 64            # rope dims
    window: int = 128
    topk: int = 512
    hi: int = 64           # indexer heads
    di: int = 128          # indexer head dim
    eps: float = 1e-6
    dense_dims: tuple[int, ...] = (128, 256)   # FA2 baselines' head dims (FA2 takes <= 256)
    dtype: torch.dtype = torch.bfloat16


FLASH = Shapes()
# CPU smoke: the interpreter at tiny sizes (fp32: bf16 CPU matmul is slow); the same code paths.
TINY = Shapes(H=4, D=96, R=32, window=8, topk=4, hi=4, di=32, dense_dims=(32,), dtype=torch.float32)
CSA_RATIO, HCA_RATIO = 4, 128


# ================================================================================================
# Inputs and the two layers
# ================================================================================================

def _compressor_inputs(S, ratio, width, overlap, sh: Shapes, g):
    """Projections kv, score [1, S, C] fp32, ape [ratio, C], norm weight [width], cos/sin [S/ratio, R/2]."""
    from dsv4_compile.model.layers import rope_angles, rope_inv_freq

    C = width * (2 if overlap else 1)
    kv = torch.randn(1, S, C, device=DEVICE, generator=g)
    score = torch.randn(1, S, C, device=DEVICE, generator=g)
    ape = torch.randn(ratio, C, device=DEVICE, generator=g) * 0.1
    w = torch.ones(width, device=DEVICE)
    inv_freq = rope_inv_freq(sh.R, 160000.0, 65536, 16.0).to(DEVICE)
    cos, sin = rope_angles(torch.arange(S // ratio, device=DEVICE) * ratio, inv_freq)
    return dict(kv=kv, score=score, ape=ape, norm_weight=w, cos=cos, sin=sin)


def make_inputs(S: int, sh: Shapes, kind: str, seed: int = 0) -> dict:
    """The layer's inputs at S tokens: kind 'csa' or 'hca'."""
    from dsv4_compile.model.ops import fp4_simulate, hadamard

    g = torch.Generator(device=DEVICE).manual_seed(seed)
    t = dict(q=torch.randn(1, S, sh.H, sh.D, device=DEVICE, generator=g, dtype=sh.dtype),  # [1, S, H, D]
             kv=torch.randn(1, S, sh.D, device=DEVICE, generator=g, dtype=sh.dtype),        # [1, S, D] window entries
             sink=torch.zeros(sh.H, device=DEVICE),
             positions=torch.arange(S, device=DEVICE).unsqueeze(0))                      # [1, S] int64
    if kind == "csa":
        t["comp"] = _compressor_inputs(S, CSA_RATIO, sh.D, True, sh, g)
        t["icomp"] = _compressor_inputs(S, CSA_RATIO, sh.di, True, sh, g)
        # the model's indexer queries: Hadamard-rotated, FP4-simulated (Indexer.queries), in the model dtype
        iq = torch.randn(1, S, sh.hi, sh.di, device=DEVICE, generator=g)
        t["iq"] = fp4_simulate(hadamard(iq), 32).to(sh.dtype)                                  # [1, S, Hi, di]
        del iq
        t["iw"] = (torch.randn(1, S, sh.hi, device=DEVICE, generator=g) * (sh.di * sh.hi) ** -0.5).to(sh.dtype)
    else:
        t["comp"] = _compressor_inputs(S, HCA_RATIO, sh.D, False, sh, g)
    return t


def _window_idx(positions: torch.Tensor, window: int) -> torch.Tensor:
    """[1, S] -> [1, S, window] int32: t - window + 1 .. t, -1 before 0 (layers.window_indices)."""
    idx = positions.unsqueeze(-1) - (window - 1) + torch.arange(window, device=positions.device)
    return torch.where(idx >= 0, idx, -1).to(torch.int32)


def compressor_fn(t: dict, kind: str, which: str, sh: Shapes, impl: str):
    """A no-argument callable: one compressor of the layer ('main' FP8 or 'index' Hadamard+FP4)."""
    c = t["comp"] if which == "main" else t["icomp"]
    ratio, overlap = (CSA_RATIO, True) if kind == "csa" else (HCA_RATIO, False)
    quant = "fp8" if which == "main" else "hadamard_fp4"
    args = (c["kv"], c["score"], c["ape"], c["norm_weight"], c["cos"], c["sin"], ratio, overlap, sh.eps, quant)
    if impl == "triton":
        from dsv4_compile.kernels.compress_kv import compress_kv
        return lambda: compress_kv(*args)
    import dsv4_compile
    # passes="decompose": the op's plain code traced in, its nested FP8/FP4 ops too, so that Inductor
    # fuses all of it (a bare torch.compile would call the nested custom ops eagerly).
    compiled = dsv4_compile.compile(_compress_kv_op, gpu="auto", passes="decompose", dynamic=False)
    return lambda: compiled(*args)


def _compress_kv_op(*args):
    return torch.ops.dsv4.compress_kv(*args)


# The indexer's Triton rows: the default config (the bf16 score MMA) and the FP8 score MMA at the
# default tiles and at block_n 64 (where its key loop compiles without spills: kernels/indexer_topk/DESIGN.md),
# each selection (the fused threshold selection by default; radix: score chunks + the radix select).
INDEXER_CONFIGS = {"triton": "", "triton fp8": "score_mma=fp8", "triton fp8 block_n=64": "score_mma=fp8,block_n=64",
                   "triton radix": "selection=radix", "triton fp8 radix": "score_mma=fp8,selection=radix"}


def indexer_fn(t: dict, keys: torch.Tensor, sh: Shapes, impl: str):
    """A no-argument callable: indexer scores + top-k. The compiled plain op compiles one query chunk
    of the plain op and loops over the chunks as the op does (compiling the whole op would unroll
    hundreds of chunks at 128K)."""
    if impl in INDEXER_CONFIGS:
        from dsv4_compile.kernels.indexer_topk import indexer_topk
        config = INDEXER_CONFIGS[impl]
        return lambda: indexer_topk(t["iq"], t["iw"], keys, t["positions"], CSA_RATIO, sh.topk, config)
    from dsv4_compile.model import ops
    chunk_fn = torch.compile(ops.indexer_topk_chunk, dynamic=False)
    q, w, pos = t["iq"], t["iw"], t["positions"]
    B, S, H, _ = q.shape
    chunk = ops._query_chunk(S, B * keys.shape[1] * (H + 2) * 4)

    def run():
        return torch.cat([chunk_fn(q[:, s:s + chunk], w[:, s:s + chunk], keys, pos[:, s:s + chunk], CSA_RATIO, sh.topk)
                          for s in range(0, S, chunk)], dim=1)
    return run


def attention_indices(t: dict, kind: str, sh: Shapes, picked: torch.Tensor | None) -> torch.Tensor:
    """[1, S, window + K] int32 into cat([S raw tokens, compressed entries]) (the model's prefill
    layout): the window, then the indexer's picks (CSA, `picked` [1, S, topk]) or every visible
    compressed entry, -1 padded (HCA)."""
    pos = t["positions"]
    S = pos.shape[1]
    if kind == "csa":
        comp = torch.where(picked >= 0, picked + S, -1)
    else:
        n = S // HCA_RATIO
        blocks = torch.arange(n, device=pos.device, dtype=torch.int32).expand(1, S, n)
        visible = blocks < torch.div(pos + 1, HCA_RATIO, rounding_mode="floor").unsqueeze(-1)
        comp = torch.where(visible, blocks + S, -1)
    return torch.cat([_window_idx(pos, sh.window), comp], dim=-1)


def layer_fn(t: dict, kind: str, sh: Shapes):
    """A no-argument callable: the whole attention of a CSA or HCA layer with the Triton kernels."""
    from dsv4_compile.kernels.compress_kv import compress_kv
    from dsv4_compile.kernels.indexer_topk import indexer_topk
    from dsv4_compile.kernels.sparse_attention import sparse_attention

    c, ic = t["comp"], t.get("icomp")
    ratio, overlap = (CSA_RATIO, True) if kind == "csa" else (HCA_RATIO, False)

    def run():
        entries = compress_kv(c["kv"], c["score"], c["ape"], c["norm_weight"], c["cos"], c["sin"],
                              ratio, overlap, sh.eps, "fp8")                              # [1, S/ratio, D] fp32
        picked = None
        if kind == "csa":
            keys = compress_kv(ic["kv"], ic["score"], ic["ape"], ic["norm_weight"], ic["cos"], ic["sin"],
                               CSA_RATIO, True, sh.eps, "hadamard_fp4")                   # [1, S/4, di] fp32
            picked = indexer_topk(t["iq"], t["iw"], keys, t["positions"], CSA_RATIO, sh.topk)  # [1, S, topk]
        idx = attention_indices(t, kind, sh, picked)
        attended = torch.cat([t["kv"], entries.to(t["kv"].dtype)], dim=1)                 # [1, S + S/ratio, D]
        return sparse_attention(t["q"], attended, t["sink"], idx, sh.D ** -0.5)
    return run


def sparse_attention_fn(t: dict, kind: str, sh: Shapes, picked: torch.Tensor | None):
    """The layer's sparse_attention call alone, its indices and entries built once outside."""
    from dsv4_compile.kernels.compress_kv import compress_kv
    from dsv4_compile.kernels.sparse_attention import sparse_attention

    c = t["comp"]
    ratio, overlap = (CSA_RATIO, True) if kind == "csa" else (HCA_RATIO, False)
    entries = compress_kv(c["kv"], c["score"], c["ape"], c["norm_weight"], c["cos"], c["sin"], ratio, overlap,
                          sh.eps, "fp8")
    idx = attention_indices(t, kind, sh, picked)
    attended = torch.cat([t["kv"], entries.to(t["kv"].dtype)], dim=1)
    return lambda: sparse_attention(t["q"], attended, t["sink"], idx, sh.D ** -0.5)


# ================================================================================================
# Dense baselines
# ================================================================================================

def dense_bytes(S: int, H: int, d: int) -> int:
    """q, k, v, out in bf16 (+ logsumexp)."""
    return 4 * S * H * d * 2 + S * H * 4


def dense_fn(S: int, H: int, d: int, backends):
    """SDPA causal on q, k, v [1, H, S, d] bf16 with the given backends."""
    from torch.nn.attention import sdpa_kernel

    q = torch.randn(1, H, S, d, device=DEVICE, dtype=torch.bfloat16)
    k = torch.randn(1, H, S, d, device=DEVICE, dtype=torch.bfloat16)
    v = torch.randn(1, H, S, d, device=DEVICE, dtype=torch.bfloat16)

    def run():
        with sdpa_kernel(backends):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    return run


# ================================================================================================
# Timing and the run
# ================================================================================================

def time_ms(fn, graph: bool = True) -> tuple[float, str]:
    """(median ms of fn() after a warm-up call (which compiles), how it was timed); `graph=False`
    keeps the Python launches in the time (as launched from Python)."""
    if DEVICE != "cuda":  # CPU smoke (the interpreter): the code path, not a time; one call, compile included
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3, "one call"
    fn()

    def once():
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b)

    first = once()
    if graph and first < GRAPH_MS:  # GPU time only, as for every implementation in this range (fair at ~0.1 ms)
        try:
            return graph_time_ms([fn] * GRAPH_CALLS), f"CUDA graph of {GRAPH_CALLS} calls"
        except Exception as e:  # noqa: BLE001
            torch.cuda.synchronize()
            return bench_ms(fn), f"do_bench, launch cost included (no CUDA graph: {_err(e)})"
    if first < SLOW_MS:
        return bench_ms(fn), "do_bench"
    times = sorted([first] + [once() for _ in range(SLOW_REPS - 1)])
    return times[len(times) // 2], f"median of {SLOW_REPS} calls"


def free_bytes() -> int:
    if DEVICE != "cuda":
        return MAX_BYTES
    torch.cuda.empty_cache()
    return min(MAX_BYTES, torch.cuda.mem_get_info()[0])


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]


def run_layers(contexts=(8192, 32768, 131072), sh: Shapes = FLASH, compile: bool = True, budget_s: float = 360.0,
               log=print) -> list[dict]:
    """Every row of the benchmark: dict(layer, part, impl, S, ms, note)."""
    from torch.nn.attention import SDPBackend

    for knob in ("cache_size_limit", "recompile_limit"):  # one compile per shape and context
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 64))
    t0 = time.time()
    rows: list[dict] = []

    def add(layer, part, impl, S, ms, note=""):
        rows.append(dict(layer=layer, part=part, impl=impl, S=S, ms=ms, note=note))
        log(f"  {layer:5s} {part:22s} {impl:30s} S={S:7d} {fmt(ms):>10s} ms  {note}")

    def measure(layer, part, impl, S, make, need_bytes=0):
        """Build the callable with make() and time it; a row with the reason where it cannot run."""
        free = free_bytes()
        if need_bytes > free * 0.9:
            add(layer, part, impl, S, float("nan"), f"skipped: needs ~{need_bytes / GIB:.0f} GiB, "
                f"{free / GIB:.0f} GiB free (of at most 78)")
            return float("nan")
        try:
            ms, how = time_ms(make())
        except Exception as e:  # noqa: BLE001  (record, keep the other rows)
            add(layer, part, impl, S, float("nan"), f"FAILED: {_err(e)}")
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
            return float("nan")
        add(layer, part, impl, S, ms, how)
        return ms

    def baseline(layer, part, S, make, need_bytes):
        """A torch.compile baseline, or a row saying it was skipped past the time budget."""
        if over:
            add(layer, part, "torch.compile (plain op)", S, float("nan"), "skipped: past the time budget (--budget)")
        else:
            measure(layer, part, "torch.compile (plain op)", S, make, need_bytes)

    over = False
    sdpa512_ms: dict[int, float] = {}
    for S in contexts:
        log(f"S={S}: {sh.H} heads x {sh.D}, B=1, {sh.dtype}")
        over = time.time() - t0 > budget_s
        for kind in ("csa", "hca"):
            t = make_inputs(S, sh, kind)
            measure(kind, "layer", "triton", S, lambda: layer_fn(t, kind, sh))
            for which in (("main", "index") if kind == "csa" else ("main",)):
                part = f"compressor ({which})"
                measure(kind, part, "triton", S, lambda: compressor_fn(t, kind, which, sh, "triton"))
                if compile:
                    inp = t["comp" if which == "main" else "icomp"]
                    need = 6 * inp["kv"].numel() * 4  # inputs, the [N, r, C] pooled view, weights, output
                    baseline(kind, part, S, lambda: compressor_fn(t, kind, which, sh, "compile"), need)
            picked = None
            if kind == "csa":
                from dsv4_compile.kernels.compress_kv import compress_kv
                from dsv4_compile.kernels.indexer_topk import indexer_topk

                ic = t["icomp"]
                keys = compress_kv(ic["kv"], ic["score"], ic["ape"], ic["norm_weight"], ic["cos"], ic["sin"],
                                   CSA_RATIO, True, sh.eps, "hadamard_fp4")
                for impl in INDEXER_CONFIGS:
                    measure(kind, "indexer (scores+top-k)", impl, S, lambda impl=impl: indexer_fn(t, keys, sh, impl))
                if compile:
                    baseline(kind, "indexer (scores+top-k)", S, lambda: indexer_fn(t, keys, sh, "compile"), 4 * GIB)
                picked = indexer_topk(t["iq"], t["iw"], keys, t["positions"], CSA_RATIO, sh.topk)
                del keys
            measure(kind, "sparse_attention", "triton", S, lambda: sparse_attention_fn(t, kind, sh, picked))
            del t, picked
        # Dense causal: FA2 at the head dims it takes, then the real 512-dim head where time allows.
        for d in sh.dense_dims:
            measure("dense", f"sdpa causal {sh.H}x{d}", "flash_attention_2", S,
                    lambda: dense_fn(S, sh.H, d, [SDPBackend.FLASH_ATTENTION]), dense_bytes(S, sh.H, d))
        projected = max((ms * (S / s) ** 2 for s, ms in sdpa512_ms.items() if ms == ms), default=0.0)
        name = f"sdpa causal {sh.H}x{sh.D}"
        if projected > DENSE_CALL_LIMIT_MS or over:
            add("dense", name, f"efficient/cudnn ({sh.H} kv heads)", S, float("nan"),
                f"skipped: ~{projected / 1e3:.0f} s per call projected (S^2 from a shorter context)"
                if projected > DENSE_CALL_LIMIT_MS else "skipped: past the time budget (--budget)")
        else:
            sdpa512_ms[S] = measure("dense", name, f"efficient/cudnn ({sh.H} kv heads)", S,
                                    lambda: dense_fn(S, sh.H, sh.D, [SDPBackend.EFFICIENT_ATTENTION,
                                                                     SDPBackend.CUDNN_ATTENTION]),
                                    dense_bytes(S, sh.H, sh.D))
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    log(f"layers: {time.time() - t0:.0f} s")
    return rows


# ================================================================================================
# Summaries and outputs
# ================================================================================================

def _ms(rows, **match) -> float:
    hit = [r["ms"] for r in rows if all(r[k] == v for k, v in match.items())]
    return hit[0] if hit else float("nan")


def ratio_rows(rows: list[dict], sh: Shapes = FLASH) -> list[dict]:
    """Per context: each layer's ms and its fraction of every dense baseline (1/x: the layer takes
    1/x of the dense time)."""
    out = []
    dense = [(r["part"], r["impl"]) for r in rows if r["layer"] == "dense"]
    dense = list(dict.fromkeys(dense))
    for S in sorted({r["S"] for r in rows}):
        for kind in ("csa", "hca"):
            ms = _ms(rows, layer=kind, part="layer", S=S)
            row = dict(S=S, layer=kind, layer_ms=ms)
            for part, impl in dense:
                d = _ms(rows, layer="dense", part=part, impl=impl, S=S)
                row[f"dense/layer vs {part} ({impl})"] = d / ms
            first = f"dense/layer vs sdpa causal {sh.H}x{sh.dense_dims[0]} (flash_attention_2)"
            row[f"target (dense/layer >= {TARGETS[kind]} at 128K)"] = (
                "" if S != 131072 else ("met" if row.get(first, 0) >= TARGETS[kind] else "not met"))
            out.append(row)
    return out


def component_rows(rows: list[dict]) -> list[dict]:
    """Compressor and indexer: Triton vs torch.compile of the plain op (x = compiled ms / Triton ms)."""
    out = []
    keys = list(dict.fromkeys((r["layer"], r["part"], r["S"]) for r in rows
                              if r["part"].startswith(("compressor", "indexer"))))
    for layer, part, S in keys:
        tri = _ms(rows, layer=layer, part=part, impl="triton", S=S)
        comp = _ms(rows, layer=layer, part=part, impl="torch.compile (plain op)", S=S)
        x = comp / tri
        out.append(dict(layer=layer, part=part, S=S, triton_ms=tri, compiled_plain_ms=comp, x=x,
                        bar="-" if math.isnan(x) else ("met" if x >= 1.0 else "NOT met")))
    return out


def _table(rows: list[dict]) -> list[str]:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)] + \
        ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]


def markdown(env: dict, rows: list[dict], sh: Shapes = FLASH) -> str:
    lines = [f"# Whole-layer attention on {env['gpu']}", "",
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, Python {env['python']}; "
             f"{env['date']}; one run. Produced by `bench/bench_layers.py`.", "",
             f"B = 1, {sh.H} query heads x {sh.D} ({sh.R} rope) over one shared K=V head, window {sh.window}, "
             f"indexer {sh.hi} x {sh.di}, top-{sh.topk}; from the projections on (no GEMMs on either side).",
             "", "## Layer vs dense causal attention (x = dense ms / layer ms; the targets ask x >= 10 for CSA "
             "and x >= 40 for HCA against FA2 at 128K)", ""]
    lines += _table(ratio_rows(rows, sh))
    lines += ["", f"FA2 takes head dims up to 256, not the layer's {sh.D}: the FA2 rows run {sh.H} heads at "
              f"{', '.join(map(str, sh.dense_dims))} dims (the target's ratio uses the first, the stricter); "
              f"the {sh.H}x{sh.D} row runs SDPA's other backends with K and V as {sh.H} full heads.", "",
              "## Compressor and indexer: Triton vs torch.compile of the plain op (issue 5's bar: x >= 1)", ""]
    lines += _table(component_rows(rows))
    lines += ["", "## All rows", ""] + _table(rows)
    return "\n".join(lines) + "\n"


def plot(path: str, rows: list[dict], gpu: str) -> None:
    """ms vs context (log-log): the two layers, their parts, the dense baselines."""
    series = []
    for layer, part, impl in dict.fromkeys((r["layer"], r["part"], r["impl"]) for r in rows):
        pts = sorted((r["S"], r["ms"]) for r in rows
                     if (r["layer"], r["part"], r["impl"]) == (layer, part, impl) and r["ms"] == r["ms"])
        if pts:
            style = "-o" if part == "layer" else ("-s" if layer == "dense" else ":.")
            series.append((f"{layer} {part} [{impl}]", [p[0] for p in pts], [p[1] for p in pts], style,
                           2.2 if part == "layer" else 1.0))
    log_log_plot(path, series, "context S (tokens)", "ms (median)",
                 f"whole-layer attention vs dense causal SDPA, B=1 ({gpu})", size=(9, 5.5),
                 legend={"fontsize": 6, "loc": "upper left"})


def write_outputs(rows: list[dict], out: str, sh: Shapes = FLASH) -> list[str]:
    os.makedirs(out, exist_ok=True)
    env = environment()
    paths = [os.path.join(out, "layers.csv"), os.path.join(out, "layers.md"), os.path.join(out, "layers.png")]
    write_csv(paths[0], rows)
    with open(paths[1], "w") as f:
        f.write(markdown(env, rows, sh))
    try:
        plot(paths[2], rows, env["gpu"])
    except Exception as e:  # noqa: BLE001  (no matplotlib: the CSV and markdown still stand)
        print(f"plot skipped: {_err(e)}")
        paths.pop()
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="8k,32k,128k")
    parser.add_argument("--out", default=None, help="output folder (default bench/results/<GPU>)")
    parser.add_argument("--budget", type=float, default=360.0,
                        help="seconds; past it, a new context runs only the Triton rows and FA2")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    args = parser.parse_args(argv)
    if DEVICE != "cuda":
        print("bench_layers: needs a CUDA GPU (the CPU test runs run_layers at tiny shapes)")
        return 2
    return run_and_write(lambda: run_layers(parse_contexts(args.contexts), FLASH, not args.no_compile, args.budget),
                         write_outputs, args.out, "layers.md")


def run_and_write(run, write, out: str | None, summary_md: str) -> int:
    """A bench's main(): rows = run(); write(rows, out) the CSV / PNG / markdown (out defaults to
    bench/results/<GPU>); print the markdown's summary (up to "## All rows"). 1 with the traceback
    when the run fails."""
    try:
        rows = run()
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        return 1
    out = out or out_dir()
    for p in write(rows, out):
        print("wrote", p)
    print(open(os.path.join(out, summary_md)).read().split("## All rows")[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
