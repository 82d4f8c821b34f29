"""All kernel benchmarks of one run (quant, Newton-Schulz, mHC) -> kernels.csv, kernels.png and
kernels.md (GPU, versions, date, ratios) under bench/results/<GPU>/ (or $BENCH_OUT).

    python bench/bench_kernels.py [--only quant,ns,hc]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(__file__))
from _kernel_bench_util import copy_bandwidth_gbs, environment, fmt, out_dir, plot_rows, write_csv  # noqa: E402

ANCHORS = {
    "fp8 quant b128": "torch.compile 2.91 TB/s, eager 0.23 TB/s (16384x7168 bf16)",
    "NS 10 steps 4096x4096": "plain bf16 10-step NS 7.13 ms eager, 6.70 ms compiled",
}


def ratios(rows: list[dict]) -> list[dict]:
    """Per case: the best Triton row against each baseline (x = baseline ms / ours ms)."""
    out = []
    cases = []
    for r in rows:
        if r["case"] not in cases and r["case"] != "copy":
            cases.append(r["case"])
    for case in cases:
        rs = [r for r in rows if r["case"] == case and not math.isnan(r["ms"])]
        ours = [r for r in rs if r["impl"].startswith("triton")]
        if not ours:
            continue
        best = min(ours, key=lambda r: r["ms"])
        row = dict(case=case, triton_ms=best["ms"], triton_impl=best["impl"])
        for r in rs:
            if not r["impl"].startswith("triton"):
                row[f"x vs {r['impl']}"] = r["ms"] / best["ms"]
        if "pct_copy" in best:
            row["triton % of copy"] = best["pct_copy"]
            row["triton GB/s"] = best["gbs"]
        if "tflops" in best:
            row["triton TFLOP/s (dense count)"] = best["tflops"]
        out.append(row)
    return out


def markdown(env: dict, copy_gbs: float, rows: list[dict], summary: list[dict]) -> str:
    lines = [f"# Kernel benchmarks on {env['gpu']}", "",
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, Python {env['python']}; {env['date']}; one run.",
             f"Device copy bandwidth measured in the same run: {copy_gbs / 1000:.2f} TB/s (read + write).", "",
             "## Ratios (best Triton config of the run vs each baseline; x > 1 means ours is faster)", ""]
    keys: list[str] = []
    for r in summary:
        keys += [k for k in r if k not in keys]
    lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in summary]
    lines += ["", "## Anchors (DESIGN.md section 4)", ""] + [f"- {k}: {v}" for k, v in ANCHORS.items()]
    lines += ["", "## All rows", ""]
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def run_all(only: tuple[str, ...] = ("quant", "ns", "hc"), out: str | None = None, smoke: bool = False) -> list[dict]:
    """Run the parts named in `only`; `smoke` = tiny sizes without torch.compile (a CPU check)."""
    from bench_hc import run_hc_bench
    from bench_newton_schulz import run_newton_schulz_bench
    from bench_quant import run_quant_bench

    out = out or out_dir()
    os.makedirs(out, exist_ok=True)
    env = environment()
    copy_gbs = copy_bandwidth_gbs()
    print(f"{env}\ncopy bandwidth {copy_gbs:.1f} GB/s", flush=True)
    rows: list[dict] = []
    if smoke:
        parts = {"quant": lambda: run_quant_bench(64, 256, copy_gbs=copy_gbs, sweep=False, compile=False),
                 "ns": lambda: run_newton_schulz_bench(shapes=((64, 96), (96, 64)), batched=(2, 32, 64), compile=False,
                                                       muon_layers=(("tiny MoE layer", "tiny", None),)),
                 "hc": lambda: run_hc_bench((64,), ((32, 64),), compile=False)}
    else:
        parts = {"quant": lambda: run_quant_bench(copy_gbs=copy_gbs), "ns": run_newton_schulz_bench, "hc": run_hc_bench}
    for name in only:
        try:
            rows += parts[name]()
        except Exception:  # keep the other parts' numbers
            traceback.print_exc()
        summary = ratios(rows)
        write_csv(os.path.join(out, "kernels.csv"), rows)
        with open(os.path.join(out, "kernels.md"), "w") as f:
            f.write(markdown(env, copy_gbs, rows, summary))
        plot_rows(os.path.join(out, "kernels.png"), rows)
    print(open(os.path.join(out, "kernels.md")).read().split("## Anchors")[0])
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", default="quant,ns,hc")
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, no torch.compile: check the scripts run")
    args = ap.parse_args()
    run_all(tuple(s for s in args.only.split(",") if s), args.out, args.smoke)


if __name__ == "__main__":
    main()
