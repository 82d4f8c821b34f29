"""A whole decode step of the mini preset (model/presets/mini.yaml: V4-Flash's layer shapes, 4 layers),
eager vs captured in a CUDA graph, per step, at long context.

    python bench/bench_decode_step.py [--contexts 32k,128k] [--batches 64,1] [--weights bf16|as-shipped] [--out DIR]
                                      [--budget 420] [--profile]
    from bench_decode_step import main   # what `python -m dsv4_compile bench --ops decode_step` calls

Per context C (at most the preset's max_seq_len): the model is built on the GPU with max_seq_len = C
(seeded weights; `--weights as-shipped`: quantized as a release ships them, FP8 linears and MXFP4
experts, as users decode V4: flash-slice's 68 GB of bf16 weights become 20 GB), a prompt of C - 1
random tokens is prefilled at batch 1 into a KVCache (eager, plain ops), and that cache is copied into
every row of a batch-B cache. One step = `model.decode(tokens
[B, 1], positions [B] = C - 1, cache)`: it writes the same cache slots every time, so a replay repeats
the same work. Rows per (C, B):
  eager                       the plain ops, launched from Python
  eager, CUDA graph           the same step captured once (torch.cuda.CUDAGraph) and replayed
  compiled (passes)           dsv4_compile.compile(passes="all"): the Triton kernels substituted
  compiled (passes), CUDA graph   the compiled step captured and replayed
  AOTI decode engine, CUDA graph  the build's decode engine (torch.export + AOTInductor with the Triton
                              kernels, the cache updated in place), loaded and captured as the runtime
                              does (`--aoti`: one export + AOTInductor compile per context, minutes)
ms per step (median), tokens/s = B / step, and the rel. RMS of each variant's logits against eager.
The roofline of a step (`decode_step_bytes`: the weights it must read and every sequence's cache
entries attention reads, over the copy bandwidth measured in the same run) gives each row's % of it.
The compiled rows cost a compile each (about a minute); they are skipped past the time budget.
Outputs: decode_step.csv, decode_step.png (ms per step vs context), decode_step.md; with `--profile`,
decode_step_profile.md (the fastest variant's largest kernels per context and batch, the others and the
whole step, torch.profiler) and decode_step_profile.csv (every kernel); decode_step_as_shipped.* for
`--weights as-shipped`.
"""
from __future__ import annotations

import argparse
import ast
import functools
import math
import os
import sys
import time
import traceback
from collections.abc import Sequence

import torch
from torch import nn

from dsv4_compile.model.context import parse_contexts

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _kernel_bench_util import DEVICE, copy_bandwidth_gbs, environment, fmt, log_log_plot, out_dir, write_csv  # noqa: E402
from bench_layers import SLOW_MS, SLOW_REPS, _err, _table, run_and_write, time_ms  # noqa: E402

WEIGHTS = ("bf16", "as-shipped")  # the preset's float weights, or as a release ships them (FP8 + MXFP4)
COMPILE_RESERVE_S = 120.0   # a compiled variant starts only with this much of the budget left
GRAPH_REPLAYS = 20          # replays per timed batch of a CUDA graph


class DecodeStep(nn.Module):
    """model.decode over one cache, as a module with (tokens, positions) inputs to compile."""

    def __init__(self, model: nn.Module, cache):
        super().__init__()
        self.model = model
        self.cache = cache

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model.decode(tokens, positions, self.cache)


def decode_step_bytes(model: nn.Module, cache, context: int, batch: int) -> dict[str, float]:
    """The bytes one decode step at position context - 1 must read (a lower bound, the roofline's numerator).
    Weights: every parameter and buffer of the main layers, the final norm, mHC head and LM head once; of the
    embedding the batch's rows; of each layer's routed experts the share that batch x top-k uniform picks
    hit in expectation, 1 - (1 - k / E)^B (the MTP blocks do not run in a decode step). Cache, per
    sequence and main layer: the visible window entries, and by the layer's compress ratio: CSA its
    top-k compressed entries and every indexer key (the indexer scores them all), HCA every compressed
    entry. The compressor states (rewritten one slot a step, read in full once per ratio steps) are left
    out."""
    from dsv4_compile.model.moe import FP8Experts, MXFP4Experts, RoutedExperts

    config = model.config
    k, n_experts = config.n_activated_experts, config.n_routed_experts
    hit = 1.0 - (1.0 - k / n_experts) ** batch

    def nbytes(module: nn.Module) -> int:
        return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))

    experts = [m for m in model.layers.modules() if isinstance(m, (RoutedExperts, MXFP4Experts, FP8Experts))]
    expert_bytes = sum(nbytes(m) for m in experts)
    embed = model.embed.weight
    weights = (nbytes(model) - nbytes(model.mtp) - nbytes(model.embed) - expert_bytes
               + batch * embed.shape[1] * embed.element_size() + hit * expert_bytes)
    visible = context  # positions 0 .. context - 1
    cache_bytes = 0
    for ratio, layer in zip(config.compress_ratios, cache.layers):
        entry = layer.main.shape[-1]
        cache_bytes += min(visible, config.window_size) * entry
        if ratio == 4:
            n = visible // ratio
            cache_bytes += min(config.index_topk, n) * entry + n * layer.index.shape[-1]
        elif ratio > 0:
            cache_bytes += visible // ratio * entry
    return {"weights": float(weights), "cache": float(batch * cache_bytes), "experts_hit": hit * n_experts}


def step_row(config: str, weights: str, context: int, batch: int, impl: str, ms: float, check: float, bound: float,
             nbytes: float, floor_ms: float, note: str = "") -> dict:
    """One timed variant's row. A variant whose logits are further from eager's (`check`, rel RMS) than
    `bound` (verify's flip bound for an engine over these weights) computes something else: its time is
    no result, so it is marked wrong, with no share of the roofline (nor a speed-up: speedup_rows)."""
    wrong = check > bound
    if wrong:
        note = f"WRONG: rel RMS {check:.3g} > {bound} (verify's bound for {weights} weights)"
    return dict(config=config, weights=weights, context=context, batch=batch, impl=impl, ms_per_step=ms,
                tokens_per_s=batch / ms * 1e3 if ms == ms else math.nan, rel_rms_vs_eager=check,
                bytes_per_step=nbytes, roofline_ms=floor_ms, roofline_pct=math.nan if wrong else 100 * floor_ms / ms,
                wrong=wrong, note=note)


def replicate(src, dst) -> None:
    """Copy a batch-1 KVCache into every row of `dst` (same config and max_seq_len)."""
    for a, b in zip(src.layers, dst.layers):
        pairs = [(a.main, b.main), (a.index, b.index)]
        for sa, sb in ((a.compressor, b.compressor), (a.index_compressor, b.index_compressor)):
            if sa is not None:
                pairs += [(sa.kv, sb.kv), (sa.score, sb.score)]
        for x, y in pairs:
            if x is not None:
                y.copy_(x.expand_as(y))


def capture(fn):
    """(graph, output): fn warmed on a side stream, then captured (its output tensor is static)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    graph.replay()
    torch.cuda.synchronize()
    return graph, out


def graph_step_ms(graph, reps: int = 5) -> float:
    """Median over `reps` of (GRAPH_REPLAYS back-to-back replays / GRAPH_REPLAYS); a step slower than
    SLOW_MS (an eager graph at a large batch: seconds) the median of SLOW_REPS single replays."""
    def replays_ms(n: int) -> float:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(n):
            graph.replay()
        b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b) / n

    first = replays_ms(1)
    if first > SLOW_MS:
        times = sorted([first] + [replays_ms(1) for _ in range(SLOW_REPS - 1)])
    else:
        times = sorted(replays_ms(GRAPH_REPLAYS) for _ in range(reps))
    return times[len(times) // 2]


def engine_variant_name(inductor_configs: dict) -> str:
    """A decode engine's row name: the Inductor options it was exported with, if any."""
    options = ", ".join(f"{k}={v}" for k, v in inductor_configs.items())
    return "AOTI decode engine, CUDA graph" + (f" [{options}]" if options else "")


def parse_inductor_configs(text: str) -> list[dict]:
    """'combo_kernels=True;' -> [dict(combo_kernels=True), {}]: ';'-separated variants ('' the build's own
    options), each ','-separated key=value with Python literal values."""
    variants = []
    for variant in text.split(";"):
        options = {}
        for item in filter(None, (i.strip() for i in variant.split(","))):
            key, sep, value = item.partition("=")
            try:
                if not sep or not key.strip():
                    raise ValueError
                options[key.strip()] = ast.literal_eval(value.strip())
            except (ValueError, SyntaxError):
                raise ValueError(f"inductor option {item!r}: accepted is key=value with a Python literal value "
                                 "(True, 4, 'name')") from None
        variants.append(options)
    return variants


def aoti_decode_engine(model: nn.Module, max_batch: int, folder: str, inductor_configs: dict | None = None):
    """The build's decode engine of `model` (its max_seq_len the bucket): torch.export with the Triton
    kernels, AOTInductor-packaged into `folder` as code only (a build's engines get their weights from
    its shared file: here the model's own tensors on the GPU, as flash-slice's weights would not fit
    the device's disk a second time), loaded as the runtime loads it. `inductor_configs`: Inductor options
    over the build's (aoti_options), e.g. dict(combo_kernels=True)."""
    from dsv4_compile.compile import resolve_gpu
    from dsv4_compile.engines import export_engine
    from dsv4_compile.export import export_aoti
    from dsv4_compile.libstdcxx import load_aoti_package
    from dsv4_compile.shared_weights import ProgramConstants

    exported = export_engine(model, "decode", max_batch, functional=False, gpu=resolve_gpu("auto"))
    path = export_aoti(exported.result, os.path.join(folder, f"decode-{model.config.max_seq_len}.pt2"),
                       inductor_configs=inductor_configs, with_constants=False)
    return load_aoti_package(path, cuda=True, single_threaded=True, weights=ProgramConstants(exported.result.program))


PROFILE_STEPS = 3   # calls of a step profiled
PROFILE_TOP = 15    # kernels listed a (context, batch)


def kernel_profile(fn, steps: int = PROFILE_STEPS) -> list[dict]:
    """What `steps` launched calls of fn spend their time in (torch.profiler): on a GPU its kernels by
    GPU time, on the CPU its ops by CPU time (self times); every one, largest first, as dict(kernel,
    calls a step, us a step, share of the step's total)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = DEVICE == "cuda"
    fn()                                                           # compiled and cached before the window
    with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
        if cuda:
            torch.cuda.synchronize()
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    spent = [(e.key, e.count, getattr(e, attr)) for e in prof.key_averages() if getattr(e, attr) > 0]
    total = sum(t for _, _, t in spent) or 1.0
    spent.sort(key=lambda e: -e[2])
    return [dict(kernel=name[:90], calls_per_step=count / steps, us_per_step=t / steps, share=t / total)
            for name, count, t in spent]


def profile_summary(kernels: list[dict], top: int = PROFILE_TOP) -> list[dict]:
    """kernel_profile's rows of one (context, batch): the `top` largest, then one row for all the others
    together and one for the whole step (calls: launches a step, what a batch-1 step's fixed cost a
    launch multiplies)."""
    keys = ("calls_per_step", "us_per_step", "share")
    rows = [{k: v for k, v in p.items() if k == "kernel" or k in keys} for p in kernels[:top]]
    rest = kernels[top:]
    for name, part in ((f"(the other {len(rest)} kernels)", rest), ("(the whole step)", kernels)):
        rows.append(dict(kernel=name, **{k: sum(p[k] for p in part) for k in keys}))
    return rows


@torch.no_grad()
def run_decode_step(config: str = "mini", contexts=(32768, 131072), batches=(64, 1), compiled: bool = True,
                    budget_s: float = 420.0, log=print, aoti: bool = False, profile: list | None = None,
                    weights: str = "bf16", partial=None, engine_max_batch: int | None = None,
                    engine_inductor_configs: Sequence[dict] = ({},)) -> list[dict]:
    """Every row: dict(config, weights, context, batch, impl, ms_per_step, tokens_per_s, rel_rms_vs_eager,
    bytes_per_step, roofline_ms, roofline_pct, note). weights: one of WEIGHTS. `profile`: a list to receive,
    per (context, batch), the fastest variant's kernel_profile rows (with config, context, batch, impl).
    `partial(rows)`: called with the rows so far as each context ends (main writes the outputs).
    engine_max_batch: the AOTI engine's batch bound (default: the largest of `batches`), e.g. B 1 on the
    engine a server with up to 64 sequences runs. engine_inductor_configs: one AOTI engine per entry, each
    exported with those Inductor options over the build's ({} the build's own), timed side by side."""
    import shutil
    import tempfile

    import dsv4_compile
    from dsv4_compile import KVCache, ModelConfig, Transformer
    from dsv4_compile.checkpoint.shipped import quantize_as_shipped
    from dsv4_compile.metrics import rel_rms
    from dsv4_compile.verify import flip_bound

    if weights not in WEIGHTS:
        raise ValueError(f"weights {weights!r}; accepted: {', '.join(WEIGHTS)}")
    t0 = time.time()
    cuda = DEVICE == "cuda"
    for knob in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 64))
    base = ModelConfig.load(config)
    rows: list[dict] = []
    bandwidth_gbs = copy_bandwidth_gbs()
    log(f"copy bandwidth {bandwidth_gbs:.0f} GB/s (bytes read + written)")
    roofline = {}  # (C, B) -> (bytes, ms)
    bound = flip_bound(base.dtype, {"format": weights})  # a variant further from eager is wrong (step_row)

    def add(C, B, impl, ms, check=math.nan, note=""):
        """Records a row; False when the variant's logits are wrong (step_row)."""
        rows.append(step_row(config, weights, C, B, impl, ms, check, bound, *roofline.get((C, B), (math.nan,) * 2), note))
        log(f"  C={C:7d} B={B:3d} {impl:32s} {fmt(ms):>9s} ms/step  rel RMS {fmt(check)}  "
            f"{fmt(rows[-1]['roofline_pct'])} % of roofline  {rows[-1]['note']}")
        return not rows[-1]["wrong"]

    for C in contexts:
        try:
            if C > base.max_seq_len:
                for B in batches:
                    add(C, B, "(none run)", float("nan"), note=f"skipped: {config}'s max_seq_len is {base.max_seq_len}")
                continue
            cfg = base.replace(max_seq_len=C)
            model = cache1 = None
            try:
                with torch.device(DEVICE):
                    model = Transformer(cfg, seed=0).eval()
                if weights == "as-shipped":
                    quantize_as_shipped(model)
                prompt = torch.randint(0, cfg.vocab_size, (1, C - 1), device=DEVICE,
                                       generator=torch.Generator(DEVICE).manual_seed(0))
                cache1 = KVCache(cfg, 1, C, device=DEVICE)
                t = time.time()
                model.prefill(prompt, cache1)
                if cuda:
                    torch.cuda.synchronize()
                log(f"context {C}: prefill of {C - 1} tokens (eager, batch 1) {time.time() - t:.1f} s")
            except Exception as e:  # noqa: BLE001  (e.g. out of memory at 128K: report, go on)
                for B in batches:
                    add(C, B, "(none run)", float("nan"), note=f"prefill FAILED: {_err(e)}")
                del model, cache1
                if cuda:
                    torch.cuda.empty_cache()
                continue
            engines = {}  # variant name -> the loaded engine
            folder = tempfile.mkdtemp(prefix="dsv4-decode-engine-") if aoti and cuda else None
            for options in engine_inductor_configs if folder is not None else ():
                name = engine_variant_name(options)
                if budget_s - (time.time() - t0) <= COMPILE_RESERVE_S:
                    for B in batches:
                        add(C, B, name, float("nan"), note="skipped: past the time budget")
                    continue
                t = time.time()
                try:
                    engines[name] = aoti_decode_engine(model, engine_max_batch or max(batches),
                                                       tempfile.mkdtemp(dir=folder), options)
                    log(f"context {C}: {name} exported and compiled in {time.time() - t:.0f} s")
                except Exception as e:  # noqa: BLE001
                    log(f"context {C}: {name} export FAILED:\n{traceback.format_exc()}")
                    for B in batches:
                        add(C, B, name, float("nan"), note=f"export FAILED: {_err(e)}")
            for B in batches:
                cache = KVCache(cfg, B, C, device=DEVICE)
                replicate(cache1, cache)
                nbytes = decode_step_bytes(model, cache, C, B)
                total = nbytes["weights"] + nbytes["cache"]
                roofline[C, B] = (total, total / (bandwidth_gbs * 1e9) * 1e3)
                log(f"context {C}, batch {B}: a step reads >= {nbytes['weights'] / 1e9:.2f} GB of weights "
                    f"({nbytes['experts_hit']:.1f} experts a MoE layer) + {nbytes['cache'] / 1e9:.3f} GB of cache: "
                    f"roofline {roofline[C, B][1]:.3f} ms")
                step = DecodeStep(model, cache)
                tokens = torch.randint(0, cfg.vocab_size, (B, 1), device=DEVICE)
                positions = torch.full((B,), C - 1, device=DEVICE)
                eager = step(tokens, positions).clone()                                         # [B, V] fp32
                variants = [("eager", lambda: step(tokens, positions), False)]
                comp = None
                if compiled and cuda:
                    if budget_s - (time.time() - t0) > COMPILE_RESERVE_S:
                        comp = dsv4_compile.compile(step, gpu="auto", passes="all", dynamic=False)
                        variants.append(("compiled (passes)", lambda: comp(tokens, positions), False))
                    else:
                        add(C, B, "compiled (passes)", float("nan"), note="skipped: past the time budget")
                for name, fn, _ in list(variants):
                    if cuda:
                        variants.append((f"{name}, CUDA graph", fn, True))
                for name, engine in engines.items():
                    engine_cache = KVCache(cfg, B, C, device=DEVICE)  # its own copy: the engine updates it in place
                    replicate(cache1, engine_cache)
                    cache_tensors = [t for _, t in engine_cache.named_tensors()]
                    variants.append((name, functools.partial(engine, tokens, positions, *cache_tensors), True))  # [B, V]
                fastest = (float("inf"), None, None)
                for name, fn, graphed in variants:
                    try:
                        if graphed:
                            graph, out = capture(fn)
                            ms = graph_step_ms(graph)
                        else:
                            (ms, _), out = time_ms(fn, graph=False), fn()
                        if add(C, B, name, ms, rel_rms(eager, out)):
                            fastest = min(fastest, (ms, name, fn), key=lambda v: v[0])
                    except Exception as e:  # noqa: BLE001
                        add(C, B, name, float("nan"), note=f"FAILED: {_err(e)}")
                    graph = out = None
                if profile is not None and fastest[2] is not None:  # its kernels, launched (not replayed)
                    try:
                        profile += [dict(config=config, context=C, batch=B, impl=fastest[1], **k)
                                    for k in kernel_profile(fastest[2])]
                    except Exception as e:  # noqa: BLE001
                        log(f"context {C}, batch {B}: profile of {fastest[1]} FAILED: {_err(e)}")
                if not cuda:
                    add(C, B, "eager, CUDA graph", float("nan"), note="no CUDA here")
                del step, cache, variants, comp
                if cuda:
                    torch.cuda.empty_cache()
            del model, cache1, engines
            if folder is not None:  # the package (hundreds of MB at mini's shapes)
                shutil.rmtree(folder, ignore_errors=True)
            if cuda:
                torch.cuda.empty_cache()
        finally:  # each context's rows on disk as it ends: a run killed later keeps them
            if partial is not None:
                partial(rows)

    log(f"decode_step: {time.time() - t0:.0f} s")
    return rows


# ================================================================================================
# Outputs
# ================================================================================================

def speedup_rows(rows: list[dict]) -> list[dict]:
    """Per (context, batch): each variant's ms per step and its speed-up over the eager step."""
    out = []
    for C, B in dict.fromkeys((r["context"], r["batch"]) for r in rows):
        rs = [r for r in rows if (r["context"], r["batch"]) == (C, B)]
        eager = next((r["ms_per_step"] for r in rs if r["impl"] == "eager"), float("nan"))
        row = dict(context=C, batch=B, **{"roofline ms": rs[0]["roofline_ms"]})
        for r in rs:
            row[f"{r['impl']} ms"] = r["ms_per_step"]
            if r["impl"] != "eager":
                row[f"{r['impl']} x"] = math.nan if r.get("wrong") else eager / r["ms_per_step"]
            row[f"{r['impl']} % roofline"] = r["roofline_pct"]
        out.append(row)
    return out


def markdown(env: dict, rows: list[dict]) -> str:
    config = rows[0]["config"] if rows else "mini"
    weights = rows[0]["weights"] if rows else "bf16"
    lines = [f"# Whole decode step, {config} preset ({weights} weights), on {env['gpu']}", "",
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, Python {env['python']}; "
             f"{env['date']}; one run. Produced by `bench/bench_decode_step.py`.", "",
             "One step = model.decode of one token per sequence at position context - 1 over a cache "
             "prefilled to that context (batch 1, copied into every row). x = eager ms / variant ms; "
             "roofline = the bytes a step must read (weights, the experts batch x top-k picks hit, the cache "
             "entries attention reads: `decode_step_bytes`) over the copy bandwidth measured in this run.", ""]
    lines += _table(speedup_rows(rows))
    lines += ["", "## All rows", ""] + _table(rows)
    return "\n".join(lines) + "\n"


def plot(path: str, rows: list[dict], gpu: str) -> None:
    """ms per step vs context, one line per (variant, batch)."""
    series = []
    for impl, B in dict.fromkeys((r["impl"], r["batch"]) for r in rows):
        pts = sorted((r["context"], r["ms_per_step"]) for r in rows
                     if (r["impl"], r["batch"]) == (impl, B) and not math.isnan(r["ms_per_step"]))
        if pts:
            series.append((f"{impl}, B={B}", [p[0] for p in pts], [p[1] for p in pts],
                           "-o" if "graph" in impl else "--s", 1.5))
    log_log_plot(path, series, "context (tokens in the cache)", "ms per decode step (median)",
                 f"whole decode step, {rows[0]['config'] if rows else ''} preset ({gpu})")


def profile_markdown(env: dict, profile: list[dict]) -> str:
    """Per (context, batch): the fastest variant's largest kernels, the others and the whole step
    (profile_summary)."""
    lines = [f"# Where a decode step's time goes, {profile[0]['config'] if profile else ''} preset, on {env['gpu']}",
             "", f"torch {env['torch']}, triton {env['triton']}, {env['date']}; torch.profiler over "
             f"{PROFILE_STEPS} launched calls of the fastest variant of each (context, batch) (a CUDA graph "
             "replays the same kernels); self GPU time by kernel (on the CPU: by op, CPU time), its share of the total.", ""]
    for C, B, impl in dict.fromkeys((p["context"], p["batch"], p["impl"]) for p in profile):
        lines += [f"## context {C}, batch {B}: {impl}", ""]
        group = [p for p in profile if (p["context"], p["batch"], p["impl"]) == (C, B, impl)]
        lines += _table(profile_summary(group)) + [""]
    return "\n".join(lines)


def output_stem(weights: str) -> str:
    """The outputs' file name before the extension: one set per weights kind, side by side."""
    return "decode_step" if weights == "bf16" else "decode_step_as_shipped"


def write_outputs(rows: list[dict], out: str, profile: list[dict] | None = None) -> list[str]:
    os.makedirs(out, exist_ok=True)
    env = environment()
    stem = output_stem(rows[0]["weights"] if rows else "bf16")
    paths = [os.path.join(out, f"{stem}.{ext}") for ext in ("csv", "md", "png")]
    write_csv(paths[0], rows)
    with open(paths[1], "w") as f:
        f.write(markdown(env, rows))
    try:
        plot(paths[2], rows, env["gpu"])
    except Exception as e:  # noqa: BLE001  (no matplotlib: the CSV and markdown still stand)
        print(f"plot skipped: {_err(e)}")
        paths.pop()
    if profile:
        paths.append(os.path.join(out, f"{stem}_profile.md"))
        with open(paths[-1], "w") as f:
            f.write(profile_markdown(env, profile))
        paths.append(os.path.join(out, f"{stem}_profile.csv"))   # every kernel, not only the largest
        write_csv(paths[-1], profile)
    return paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="mini")
    parser.add_argument("--contexts", default="32k,128k")
    parser.add_argument("--batches", default="64,1")
    parser.add_argument("--weights", default="bf16", choices=WEIGHTS, help="the preset's float weights, or "
                        "quantized as a release ships them (FP8 linears, MXFP4 experts)")
    parser.add_argument("--out", default=None, help="output folder (default bench/results/<GPU>)")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds; compiled variants start only "
                        f"with {COMPILE_RESERVE_S:.0f} s of it left")
    parser.add_argument("--no-compile", action="store_true", help="eager and eager + CUDA graph only")
    parser.add_argument("--aoti", action="store_true", help="also the AOTInductor decode engine (one export + "
                        "AOTInductor compile per context; needs the LD_PRELOAD `dsv4_compile.load` names on the lent image)")
    parser.add_argument("--engine-max-batch", type=int, default=None, help="the AOTI engine's batch bound "
                        "(default: the largest of --batches)")
    parser.add_argument("--engine-inductor-configs", default="", help="AOTI engines timed side by side, "
                        "';'-separated, each ','-separated Inductor options over the build's (key=value; '' the "
                        "build's own), e.g. ';combo_kernels=True'")
    parser.add_argument("--profile", action="store_true", help="also decode_step_profile.md: the fastest variant's "
                        "largest kernels per (context, batch), by torch.profiler")
    args = parser.parse_args(argv)
    if DEVICE != "cuda":
        print("bench_decode_step: needs a CUDA GPU (the CPU test runs run_decode_step on the tiny preset)")
        return 2
    batches = [int(b) for b in args.batches.split(",")]
    profile = [] if args.profile else None
    out = args.out or out_dir()
    return run_and_write(lambda: run_decode_step(args.config, parse_contexts(args.contexts), batches, not args.no_compile,
                                                 args.budget, aoti=args.aoti, profile=profile, weights=args.weights,
                                                 partial=lambda rows: write_outputs(rows, out, profile),
                                                 engine_max_batch=args.engine_max_batch,
                                                 engine_inductor_configs=parse_inductor_configs(args.engine_inductor_configs)),
                         lambda rows, out: write_outputs(rows, out, profile), out, f"{output_stem(args.weights)}.md")


if __name__ == "__main__":
    sys.exit(main())
