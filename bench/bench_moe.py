"""One MoE layer's routed experts at V4-Flash shapes (D 4096, I 2048, E 256, top 6): our grouped-expert
Triton kernel (bf16, FP8 and MXFP4 weights; FP8 also W8A8, "fp8-w8a8": the moe_experts_fp8_w8a8 op's
launch, act="fp8", at its default config for T; MXFP4 also W4A8, "mxfp4-w4a8": the moe_experts_mxfp4_w4a8
op's, as DeepSeek runs the releases' experts) vs the dense-masked plain MoE, a loop over experts of
F.linear (DeepSeek's reference), torch._grouped_mm where this torch has it, and the plain op's own
grouped form; the plain routing layout alone (the launcher's beyond decode sizes); random and
skewed routing; TFLOP/s of the useful work (6 D I FLOPs per assignment) and
GB/s over the bytes of the experts actually touched (weights + scales as stored, x and the fp32
output), against the bf16 matmul peak and the copy bandwidth measured in the same run.

Timing: calls up to 512 tokens as CUDA-graph replays (GPU time only, what a graphed decode step
sees; the loop baseline syncs, so it is timed per call), larger ones with do_bench.

    python bench/bench_moe.py               # writes bench/results/<GPU>/moe.{csv,md} and moe-*.png
    python bench/bench_moe.py --smoke       # tiny shapes on the CPU interpreter: checks the script runs
    python bench/bench_moe.py --tokens 1,8,64 --decode-configs "block_n=32,down_block_n=32"   # other decode tiles
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from _kernel_bench_util import (DEVICE, bench_ms, copy_bandwidth_gbs, environment, graph_time_ms, log_log_plot,  # noqa: E402
                                matmul_peak_tflops, out_dir, print_table, write_csv)

TOKENS = (1, 8, 64, 512, 4096, 32768)
DENSE_MAX_T = 4096        # the dense form's [E, T, I] fp32 intermediates: 8.6 GB at 4096, 69 GB at 32768
PLAIN_MAX_T = 4096        # the plain grouped form gathers ~T/7 experts' weights: seconds beyond
SWEEP = [dict(block_m=16, block_n=32, block_k=128, num_warps=4, num_stages=4, down_block_n=32, down_block_k=128),
         dict(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=3, down_block_n=64, down_block_k=128),
         dict(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=3, down_block_n=128, down_block_k=64),
         dict(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3, down_block_n=128, down_block_k=64),
         dict(block_m=128, block_n=64, block_k=64, num_warps=8, num_stages=4, down_block_n=128, down_block_k=64),
         dict(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=4, down_block_n=128, down_block_k=64,
              down_num_warps=4, down_num_stages=4)]


def routing(T: int, k: int, E: int, kind: str, seed: int = 0):
    """topk_ids [T, k] int32 (distinct per token), weights [T, k] fp32 summing to 1.5 per token.
    'skewed': expert e drawn with probability ~ 1 / (e + 1): the first few experts are hot."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    if kind == "random":
        probs = torch.ones(T, E, device=DEVICE)
    else:
        probs = (1.0 / torch.arange(1, E + 1, device=DEVICE, dtype=torch.float32)).expand(T, E)
    ids = torch.multinomial(probs, k, replacement=False, generator=g).to(torch.int32)
    w = torch.rand(T, k, device=DEVICE, generator=g) + 0.1
    return ids, w / w.sum(-1, keepdim=True) * 1.5


def timed(fn, T: int, capturable: bool = True) -> float:
    if DEVICE == "cuda" and T <= 512 and capturable:
        return graph_time_ms([fn])
    return bench_ms(fn)


def loop_over_experts(x, ids, w, w1, w2, w3, limit):
    """DeepSeek's reference: tokens of each expert found on the host (one sync), F.linear per expert."""
    from dsv4_compile.model.moe_ops import swiglu

    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    counts = torch.bincount(ids.flatten().long(), minlength=w1.shape[0]).tolist()
    for e, n in enumerate(counts):
        if n == 0:
            continue
        t, j = torch.where(ids == e)
        h = swiglu(F.linear(x[t], w1[e]), F.linear(x[t], w3[e]), limit) * w[t, j, None]
        out.index_add_(0, t, F.linear(h.to(x.dtype), w2[e]).float())
    return out


def grouped_mm(x, ids, w, w1_t, w2_t, w3_t, limit):
    """torch._grouped_mm over tokens sorted by expert (w*_t: [E, in, out] views of the weights)."""
    from dsv4_compile.model.moe_ops import swiglu

    T, k = ids.shape
    flat = ids.flatten().long()
    order = torch.sort(flat, stable=True).indices
    counts = torch.zeros(w1_t.shape[0], dtype=torch.long, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
    offs = torch.cumsum(counts, 0).to(torch.int32)                      # no host sync: graph-capturable
    xs = x[order // k]
    h = swiglu(torch._grouped_mm(xs, w1_t, offs=offs), torch._grouped_mm(xs, w3_t, offs=offs), limit)
    y = torch._grouped_mm((h * w.flatten()[order, None]).to(x.dtype), w2_t, offs=offs)
    return torch.zeros(T, x.shape[1], dtype=torch.float32, device=x.device).index_add_(0, order // k, y.float())


def run(D=4096, I=2048, E=256, k=6, tokens=TOKENS, limit=10.0, sweep=True,
        decode_configs: tuple[str, ...] = ()) -> tuple[list[dict], dict]:
    from dsv4_compile.kernels.moe_experts import default_config, moe_experts
    from dsv4_compile.kernels.moe_experts.config import ACT_BLOCK, regime
    from dsv4_compile.model import moe_ops, weight_formats

    peak = matmul_peak_tflops()
    copy = copy_bandwidth_gbs()
    g = torch.Generator(device=DEVICE).manual_seed(0)
    bf16 = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    ws = [(torch.randn(E, I, D, device=DEVICE, generator=g) * D ** -0.5).to(bf16),
          (torch.randn(E, D, I, device=DEVICE, generator=g) * I ** -0.5).to(bf16),
          (torch.randn(E, I, D, device=DEVICE, generator=g) * D ** -0.5).to(bf16)]
    fp8 = [weight_formats.quantize_experts(weight_formats.quantize_fp8_weight, w) for w in ws]
    fp4 = [weight_formats.quantize_experts(weight_formats.quantize_mxfp4, w) for w in ws]
    fp8_weights = ([q for q, _ in fp8], "fp8", tuple(s for _, s in fp8), 1 + 1 / 128 ** 2)
    fp4_weights = ([q for q, _ in fp4], "mxfp4", tuple(s for _, s in fp4), 0.5 + 1 / 32)
    # format -> (weights, weight format, scales, bytes a weight, the launcher's act)
    formats = {"bf16": (ws, "float", None, 2.0, "x"), "fp8": (*fp8_weights, "x"), "fp8-w8a8": (*fp8_weights, "fp8"),
               "mxfp4": (*fp4_weights, "x"), "mxfp4-w4a8": (*fp4_weights, "fp8")}
    has_grouped_mm = DEVICE == "cuda" and hasattr(torch, "_grouped_mm")
    w_t = [w.transpose(1, 2) for w in ws] if has_grouped_mm else None
    rows = []
    for kind in ("random", "skewed"):
        for T in tokens:
            ids, w = routing(T, k, E, kind)
            x = torch.randn(T, D, device=DEVICE, generator=g).to(bf16)
            n_used = int(torch.unique(ids).numel())
            flops = 6.0 * T * k * D * I
            ref = moe_experts(x, ids, w, *ws, limit)

            def add(impl, fn, fmt="bf16", config="", capturable=True):
                try:
                    ms = timed(fn, T, capturable)
                except Exception as exc:  # noqa: BLE001 (a baseline this torch cannot run: recorded)
                    print(f"{kind:7s} T={T:6d} {impl:24s} failed: {type(exc).__name__}: {str(exc)[:150]}", flush=True)
                    return
                nbytes = n_used * 3 * I * D * formats[fmt][3] + T * D * (2 + 4)
                # the roofline: the longer of the MMAs at peak (FP8 activations: Hopper's FP8 rate, twice
                # bf16's) and the bytes at the copy bandwidth
                mma_peak = peak * (2 if formats[fmt][4] == "fp8" else 1)
                roofline_ms = max(flops / mma_peak / 1e9, nbytes / copy / 1e6)
                rows.append(dict(routing=kind, tokens=T, impl=impl, format=fmt, ms=ms, tflops=flops / ms / 1e9,
                                 pct_peak=100 * flops / ms / 1e9 / peak, gbs=nbytes / ms / 1e6,
                                 pct_copy=100 * nbytes / ms / 1e6 / copy, pct_roofline=100 * roofline_ms / ms,
                                 experts_used=n_used, config=config))
                r = rows[-1]
                print(f"{kind:7s} T={T:6d} {impl:24s} {fmt:8s} {ms:9.4f} ms {r['tflops']:7.1f} TFLOP/s "
                      f"({r['pct_peak']:5.1f}%) {r['gbs']:7.0f} GB/s ({r['pct_copy']:5.1f}%)", flush=True)

            for fmt, (wq, wf, scales, _, act) in formats.items():
                add("ours", lambda wq=wq, wf=wf, scales=scales, act=act: moe_experts(x, ids, w, *wq, limit, None, wf, scales, act),
                    fmt, default_config(None, T * k, wf, act).to_str() if act == "fp8" else "")
                if fmt != "bf16":  # the quantized kernels against the bf16 one on the same (dequantized) weights
                    deq = moe_experts(x, ids, w, *wq, limit, None, wf, scales, act)
                    err = float((deq - ref).norm() / ref.norm())
                    print(f"        {fmt} vs bf16 weights: relative error {err:.3e} (quantization)")
            if regime(T * k) == "decode":  # W4A8's decode default rounds the activation by a pass: the epilogue's route
                wq, wf, scales, _, act = formats["mxfp4-w4a8"]
                epilogue = default_config(None, T * k, wf, act).replace(act_round="gate_up", block_n=ACT_BLOCK)
                add("w4a8 epilogue rounding", lambda: moe_experts(x, ids, w, *wq, limit, epilogue, wf, scales, act),
                    "mxfp4-w4a8", epilogue.to_str())
                # the same scales as float32 (powers of two, as base models ship them): the e8m0 route,
                # checked per program
                f32 = tuple(map(weight_formats.e8m0_to_float, scales))
                add("w4a8 f32 scales", lambda: moe_experts(x, ids, w, *wq, limit, None, wf, f32, act), "mxfp4-w4a8")
                for fmt in ("mxfp4", "mxfp4-w4a8"):  # other tiles over the op's decode default (fields over it)
                    wq, wf, scales, _, act = formats[fmt]
                    for cfg in decode_configs:
                        add("ours (decode config)", lambda wq=wq, wf=wf, scales=scales, act=act, cfg=cfg:
                            moe_experts(x, ids, w, *wq, limit, cfg, wf, scales, act), fmt, cfg)
            # the plain routing layout (torch ops: a sort, scatter, cumsums, gathers), which the launcher runs
            # beyond decode sizes (kernels/moe_experts/expert_blocks.py makes decode sizes' in one program)
            block_m = default_config(None, T * k).block_m
            add("routing layout", lambda: moe_ops.chunked_expert_blocks(ids, E, block_m, T, 1))
            if sweep and kind == "random":
                for cfg in SWEEP:
                    add("ours (sweep)", lambda cfg=cfg: moe_experts(x, ids, w, *ws, limit, cfg), "bf16",
                        ",".join(f"{a}={b}" for a, b in cfg.items()))
            if T <= DENSE_MAX_T:
                add("dense masked (plain)", lambda: moe_ops._moe_dense(x, ids, w, lambda e: tuple(ws), E, limit))
            if T <= PLAIN_MAX_T:
                add("grouped (plain op)", lambda: moe_ops._moe_experts_plain(x, ids, w, *ws, limit))
            add("loop F.linear", lambda: loop_over_experts(x, ids, w, *ws, limit), capturable=False)
            if has_grouped_mm:
                add("torch._grouped_mm", lambda: grouped_mm(x, ids, w, *w_t, limit))
    return rows, dict(peak_tflops=peak, copy_gbs=copy)


def write_md(path: str, rows: list[dict], anchors: dict) -> None:
    env = environment()
    best = {}
    for r in rows:
        key = (r["routing"], r["tokens"], r["impl"].split(" (")[0] if r["impl"].startswith("ours") else r["impl"], r["format"])
        if key not in best or r["ms"] < best[key]["ms"]:
            best[key] = r
    lines = [f"# MoE experts (D 4096, I 2048, E 256, k 6): {env['gpu']}", "",
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, {env['date']}; "
             f"bf16 matmul peak {anchors['peak_tflops']:.0f} TFLOP/s, copy {anchors['copy_gbs']:.0f} GB/s (this run).", "",
             "Ratios of one run; 'ours' = the best of the default and the sweep for bf16.", "",
             "routing | T | ours bf16 ms | TFLOP/s (% peak) | GB/s (% copy) | % roofline | fp8 / bf16 | fp8 w8a8 / bf16 | mxfp4 / bf16 | "
             "mxfp4 w4a8 / bf16 | w4a8 epilogue / ours | w4a8 f32 scales / ours | layout / ours | dense / ours | loop / ours | grouped_mm / ours",
             "--- | " * 15 + "---"]
    for kind in ("random", "skewed"):
        for T in sorted({r["tokens"] for r in rows}):
            ours = best.get((kind, T, "ours", "bf16"))
            if not ours:
                continue

            def ratio(impl, fmt="bf16"):  # impl's time over ours in fmt
                r, base = best.get((kind, T, impl, fmt)), best.get((kind, T, "ours", fmt))
                return f"{r['ms'] / base['ms']:.2f}x" if r and base else "-"

            def speedup(fmt):  # ours in fmt over ours in bf16
                r = best.get((kind, T, "ours", fmt))
                return f"{ours['ms'] / r['ms']:.2f}x" if r else "-"
            lines.append(f"{kind} | {T} | {ours['ms']:.4f} | {ours['tflops']:.1f} ({ours['pct_peak']:.0f}%) | "
                         f"{ours['gbs']:.0f} ({ours['pct_copy']:.0f}%) | {ours['pct_roofline']:.0f}% | {speedup('fp8')} | "
                         f"{speedup('fp8-w8a8')} | {speedup('mxfp4')} | {speedup('mxfp4-w4a8')} | "
                         f"{ratio('w4a8 epilogue rounding', 'mxfp4-w4a8')} | {ratio('w4a8 f32 scales', 'mxfp4-w4a8')} | "
                         f"{ratio('routing layout')} | "
                         f"{ratio('dense masked (plain)')} | {ratio('loop F.linear')} | {ratio('torch._grouped_mm')}")
    tried = [r for r in rows if r["impl"] == "ours (decode config)"]
    if tried:
        lines += ["", "Decode configs (--decode-configs: fields over the op's decode default), time over the default's:", "",
                  "routing | T | format | config | ms | config / default", "--- | --- | --- | --- | --- | ---"]
        for r in tried:
            base = next((b for b in rows if (b["routing"], b["tokens"], b["impl"], b["format"]) ==
                         (r["routing"], r["tokens"], "ours", r["format"])), None)
            vs = f"{r['ms'] / base['ms']:.2f}x" if base else "-"
            lines.append(f"{r['routing']} | {r['tokens']} | {r['format']} | {r['config']} | {r['ms']:.4f} | {vs}")
    lines += ["", "% roofline: the longer of the FLOPs at the bf16 peak and the bytes at the copy bandwidth, over the time.",
              "", "fp8 / bf16, fp8 w8a8 / bf16, mxfp4 / bf16 and mxfp4 w4a8 / bf16: speed-up of the quantized weights "
              "(higher is faster; fp8: W8A16, mxfp4: W4A16, w8a8 / w4a8: the activations in FP8 too, on FP8 tensor "
              "cores); w4a8 epilogue / ours: at decode sizes, W4A8 with its activation rounded in the gate/up epilogue "
              "(128-wide column tiles) over its default (act_round pass: rounded by a pass of its own, W4A16's tiles; "
              "> 1: the default faster); w4a8 f32 scales / ours: W4A8 at decode sizes with the same scales as float32 "
              "(as base models ship them; the model holds e8m0 bytes) over e8m0 ones; layout / ours: the plain "
              "routing layout alone (model.moe_ops.chunked_expert_blocks, ~30 torch ops: "
              "the launcher's layout beyond decode sizes, where one Triton program makes it) over our bf16 call; the "
              "others: their time over ours (higher: ours faster). Every row is in moe.csv."]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(path_prefix: str, rows: list[dict]) -> None:
    for kind in ("random", "skewed"):
        series = []
        for impl, fmt, style in (("ours", "bf16", "o-"), ("ours", "fp8", "s-"), ("ours", "fp8-w8a8", "D-"),
                                 ("ours", "mxfp4", "^-"), ("ours", "mxfp4-w4a8", "v-"),
                                 ("dense masked (plain)", "bf16", "x--"), ("loop F.linear", "bf16", "d--"),
                                 ("torch._grouped_mm", "bf16", "v--"), ("grouped (plain op)", "bf16", "+:")):
            pts = sorted((r["tokens"], r["tflops"]) for r in rows
                         if r["routing"] == kind and r["impl"] == impl and r["format"] == fmt)
            if pts:
                series.append((f"{impl} {fmt}", [p[0] for p in pts], [p[1] for p in pts], style, 1.5))
        if series:
            log_log_plot(f"{path_prefix}-{kind}.png", series, "tokens T", "TFLOP/s (useful)",
                         f"MoE experts, V4-Flash shapes, {kind} routing")


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU interpreter): checks the script runs")
    parser.add_argument("--out", default=None, help="output folder (default bench/results/<GPU>, or $BENCH_OUT)")
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="token counts T, comma-separated")
    parser.add_argument("--decode-configs", default="", metavar="CFGS",
                        help="';'-separated config strings (fields over the op's decode default, e.g. "
                             "'block_n=32,down_block_n=32') timed at decode sizes for MXFP4 W4A16 and W4A8")
    args = parser.parse_args(argv)
    decode_configs = tuple(c.strip() for c in args.decode_configs.split(";") if c.strip())
    from dsv4_compile.kernels.moe_experts import MoeExpertsConfig

    for cfg in decode_configs:  # a bad field is the parser's one-line error, not a failed row at the end
        try:
            MoeExpertsConfig.from_str(cfg)
        except ValueError as exc:
            parser.error(f"--decode-configs {cfg!r}: {exc}")
    try:
        tokens = tuple(int(t) for t in args.tokens.split(","))
    except ValueError:
        tokens = ()
    if not tokens or min(tokens) < 1:
        parser.error(f"--tokens {args.tokens!r}; accepted: positive integers, comma-separated (e.g. 1,64)")
    if args.smoke:
        rows, anchors = run(D=128, I=128, E=9, k=3, tokens=(1, 20), sweep=False,   # 128: W8A8's / W4A8's whole blocks
                            decode_configs=decode_configs)
    else:
        rows, anchors = run(tokens=tokens, decode_configs=decode_configs)
    out = args.out or out_dir()
    os.makedirs(out, exist_ok=True)
    write_csv(os.path.join(out, "moe.csv"), rows)
    write_md(os.path.join(out, "moe.md"), rows, anchors)
    plot(os.path.join(out, "moe"), rows)
    print_table(rows, ["routing", "tokens", "impl", "format", "ms", "tflops", "pct_peak", "gbs", "pct_copy", "pct_roofline",
                       "config"])
    print(f"wrote {out}/moe.csv, moe.md, moe-*.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
