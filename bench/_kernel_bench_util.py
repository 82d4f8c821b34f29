"""Shared helpers of the kernel benchmarks (bench_quant, bench_newton_schulz, bench_hc): timing,
the device's copy bandwidth, the environment line, and CSV / PNG / markdown writers.

Timing: triton.testing.do_bench (CUDA events, median of repeats after warm-up, L2 flushed between
repeats). Inputs are larger than L2 where the benchmark is about bandwidth.
"""
from __future__ import annotations

import datetime
import math
import os
import platform
from typing import Callable

import time

import torch

from dsv4_compile.kernels.gpus import canonical_gpu

# Benchmarks run on the GPU; on a CPU machine (TRITON_INTERPRET=1) only as a smoke test of the script.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def bench_ms(fn: Callable[[], object], warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median milliseconds of fn() on the current CUDA device (CPU: a few wall-clock runs)."""
    if DEVICE == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[1]


def parse_profile_args(parser, argv, script: str, configs_help: str, launches: int):
    """The options every profile_* script takes (gpu_session.sh's ncu_each_config passes --configs and
    --no-time) added to its parser, then parsed; None (after saying why) off a CUDA GPU."""
    parser.add_argument("--configs", default="", help=f"';'-separated config strings ('' = {configs_help})")
    parser.add_argument("--launches", type=int, default=launches, help="launches per config on one input set")
    parser.add_argument("--no-time", action="store_true", help="skip the CUDA-graph timing (under a profiler)")
    args = parser.parse_args(argv)
    if DEVICE != "cuda":
        print(f"{script}: needs a CUDA GPU")
        return None
    return args


# Bytes of weight copies a few-rows GEMM bench rotates over (> 2x the H200's 50 MB L2), so that W comes
# from HBM as in a decode step's many layers, not from an L2 that kept it from the previous call.
ROTATE_BYTES = 128 << 20


def gpu_ms(fns) -> float:
    """GPU milliseconds per call of `fns` (CUDA-graph replays, graph_time_ms, on a GPU; wall-clock runs of
    the first on a CPU smoke test)."""
    return graph_time_ms(fns) if DEVICE == "cuda" else bench_ms(fns[0])


def graph_time_ms(fns, reps: int = 20) -> float:
    """Median per-call ms of a CUDA graph that calls each of `fns` once (rotating input sets): GPU time
    only. do_bench times each Python call, launch cost included, which is comparable to a kernel of
    0.1 ms; compare implementations of sub-millisecond work this way (all of them, for fairness).
    Nothing is flushed between the calls of one replay: the L2 keeps what fits of the inputs."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / len(fns))
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second, GB/s) on nbytes buffers."""
    nbytes = nbytes if DEVICE == "cuda" else 1 << 20
    src = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * nbytes / ms / 1e6


def matmul_peak_tflops(n: int = 8192) -> float:
    """bf16 matmul rate (TFLOP/s) of an n x n x n torch.matmul: the peak the NS/Muon rates are compared with."""
    n = n if DEVICE == "cuda" else 256
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    a = torch.randn(n, n, device=DEVICE, dtype=dtype)
    b = torch.randn(n, n, device=DEVICE, dtype=dtype)
    return 2.0 * n ** 3 / bench_ms(lambda: a @ b) / 1e9


def try_compile(fn: Callable, enabled: bool = True, **kwargs) -> Callable | None:
    """torch.compile(fn), or None (and a printed reason) where compiling fails or is not wanted."""
    if not enabled:
        return None
    try:
        return torch.compile(fn, **kwargs)
    except Exception as exc:  # pragma: no cover - reported, not fatal
        print(f"torch.compile failed: {type(exc).__name__}: {exc}")
        return None


def environment() -> dict:
    import triton
    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda or "",
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def gpu_dir_name() -> str:
    return canonical_gpu(torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")


def write_csv(path: str, rows: list[dict]) -> None:
    if rows:
        from dsv4_compile.tuning.tables import write_csv as write_rows

        write_rows(path, rows)


def fmt(v) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.4g}"
    return str(v)


def print_table(rows: list[dict], keys: list[str]) -> str:
    lines = [" | ".join(keys), " | ".join("---" for _ in keys)]
    lines += [" | ".join(fmt(r.get(k, "")) for k in keys) for r in rows]
    text = "\n".join(lines)
    print(text)
    return text


def plot_rows(path: str, rows: list[dict]) -> None:
    """One horizontal bar chart per benchmark group: each variant's speed relative to the group's
    eager baseline (1.0 = eager torch; higher is faster)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # pragma: no cover
        print(f"no plot: {exc}")
        return
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("ms") and not math.isnan(r["ms"]):
            groups.setdefault(r["case"], []).append(r)
    if not groups:
        return
    fig, axes = plt.subplots(len(groups), 1, figsize=(8, 1.0 + 0.45 * sum(len(g) for g in groups.values()) + 0.4 * len(groups)))
    axes = axes if len(groups) > 1 else [axes]
    for ax, (case, rs) in zip(axes, groups.items()):
        eager = next((r["ms"] for r in rs if r["impl"].startswith("eager")), rs[0]["ms"])
        names = [r["impl"] for r in rs]
        speed = [eager / r["ms"] for r in rs]
        bars = ax.barh(names, speed, color=["tab:orange" if n.startswith("triton") else "tab:gray" for n in names])
        for b, r in zip(bars, rs):
            ax.text(b.get_width(), b.get_y() + b.get_height() / 2, f" {r['ms']:.3g} ms", va="center", fontsize=7)
        ax.set_title(case, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.invert_yaxis()
    axes[-1].set_xlabel("speed vs eager torch (x)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def log_log_plot(path: str, series: list[tuple], xlabel: str, ylabel: str, title: str,
                 size=(8, 5), legend: dict | None = None) -> None:
    """Lines on log2 x / log y axes; series: (label, xs, ys, style, linewidth) each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    for label, xs, ys, style, width in series:
        ax.plot(xs, ys, style, label=label, linewidth=width)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(**(legend or {"fontsize": 7}))
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def out_dir(default_subdir: str | None = None) -> str:
    """Where results go: $BENCH_OUT if set, else bench/results/<GPU>/."""
    path = os.environ.get("BENCH_OUT") or os.path.join(os.path.dirname(__file__), "results", default_subdir or gpu_dir_name())
    os.makedirs(path, exist_ok=True)
    return path
