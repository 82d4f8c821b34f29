"""Side-by-side benchmark of the hybrid sparse attention kernels (prefill and FP8-cache decode).

    python bench/bench_attention.py [--contexts 8k,32k] [--out bench/results/H100] [--budget 300]
    python bench/bench_attention.py --no-prefill --decode-configs "block_k=32,num_splits=2;..."  # decode rows only
    from bench_attention import run, write_outputs   # what `python -m dsv4_compile bench --ops attention` calls

Prefill, B = 1, bf16, V4-Flash heads (64 query heads x 512, one shared K=V head), per context S:
  window  K = 128 (window-only layers)          kv = the S raw tokens
  csa     K = 128 + 512 (window + top-512 of the S/4 compressed entries, random distinct visible picks)
  hca     K = 128 + S/128 (window + every visible compressed entry, -1 padded)
  methods: ours (dsv4_triton.sparse_attention, a small config sweep at the first context, its best
  config reused at the others); flex_attention with the identical index set as a block mask (window:
  arithmetic mask_mod; csa: mask_mod reading a dense [S, S/4] selection table) at 512-dim heads where
  it compiles; at a 128-dim-head config (32 heads, flex's own ground): ours and flex on the csa index
  set, and SDPA dense causal (FlashAttention-2 backend).
Decode, batch 64, one token per sequence over the FP8 cache (584-byte entries, 128 window slots + S/4
  compressed entries per sequence), K = 640 valid indices: GB/s of cache entries read (+ q and out),
  timed as a CUDA graph of calls over rotating input sets (so neither launch gaps nor L2 hits count).
Indexer decode (--indexer-batches, default 1 and 64): one CSA layer's top-512 selection for one token a
  sequence over the packed FP4 indexer cache (68-byte keys, S/4 of them, every one visible), 64 index
  heads x 128, bf16 FP4-simulated queries: ours (dsv4_triton.indexer_topk_cached, reading the packed
  keys; a few configs) against what decode did before it (unpack_indexer_keys of the whole cache to
  float32, then the indexer_topk kernel, eager and under dsv4_compile.compile), and the plain op; GB/s
  of packed keys read, timed as CUDA graphs over rotating input sets.
Ceilings measured in the same run: device copy bandwidth (bytes read + written) and a bf16 matmul.
Per row: ms (median), useful TFLOP/s (4 H D per valid (query, index) pair: the work the op needs, the
same count for every method), the roofline floor max(FLOPs / matmul peak, bytes / copy bandwidth) with
bytes = q + out + kv + indices once each, and the fraction of that floor reached.
Outputs: attention.csv, attention.png, attention.md (GPU, versions, date, ratios from this one run).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import sys
import time
import traceback

import torch

from _kernel_bench_util import graph_time_ms  # noqa: E402  (bench/ is on sys.path: script or `bench` CLI)
from dsv4_compile.metrics import rel_rms
from dsv4_compile.model.context import parse_contexts

WINDOW, TOPK, CSA_RATIO, HCA_RATIO = 128, 512, 4, 128
FLASH_H, HEAD_D, ROPE_D = 64, 512, 64
SMALL_H, SMALL_D = 32, 128
DECODE_B = 64

# split_d=2 (each program half the output columns), unmeasured: from the sm_90a compile report
# (bench/results/H200/attention_compile_report.md) block_k 32 (no spill), block_k 64 with 1 stage (the
# least spill of the 64-row steps that fit shared memory), block_k 16 over 4 warps (no spill, 2 CTAs/SM).
SWEEP_512 = ["block_h=64,block_k=64,num_warps=8,num_stages=2",
             "block_h=64,block_k=32,num_warps=8,num_stages=2",
             "block_h=64,block_k=128,num_warps=8,num_stages=1",
             "block_h=32,block_k=32,num_warps=4,num_stages=2",
             "block_h=64,block_k=32,num_warps=8,num_stages=2,split_d=2",
             "block_h=64,block_k=64,num_warps=8,num_stages=1,split_d=2",
             "block_h=64,block_k=16,num_warps=4,num_stages=2,split_d=2"]
SWEEP_128 = ["block_h=32,block_k=64,num_warps=4,num_stages=2",
             "block_h=32,block_k=128,num_warps=4,num_stages=2"]
# Decode over the FP8 cache: the default (auto splits) and the configs the sm_90a build of the tile kernel
# (triton 3.6) compiles without spills or that fit 2 programs an SM, stages 1 vs 2, split_d, 4 warps, and the
# chunks kernel (H100 2026-12-06: bench/results/H100/session24_gpu_runs.md)
DECODE_CONFIGS = ["", "block_k=16,num_splits=4", "block_k=16,num_splits=4,num_stages=1", "block_k=16,num_splits=8",
                  "block_k=32,num_splits=4", "block_k=32,num_splits=2,num_stages=1", "block_k=16,num_splits=4,split_d=2",
                  "block_k=16,num_splits=2,split_d=2,num_warps=4", "block_k=16,num_splits=4,split_d=2,num_warps=4",
                  "block_k=32,num_splits=4,split_d=2,num_stages=1", "block_k=64,num_splits=4,dequant=chunks"]
# indexer_topk_cached at decode: the default (radix, block_n 64), the fused threshold kernel (one program a
# sequence), and the other key tiles the sm_90a compile allows without spills (kernels/indexer_topk_cached/config.py)
INDEXER_DECODE_CONFIGS = ["", "selection=threshold", "selection=threshold,block_n=128", "block_n=128",
                          "block_n=64,num_warps=4", "block_n=64,score_rows=heads"]
INDEX_H, INDEX_D = 64, 128
INDEXER_BATCHES = (1, 64)


# ================================================================================================
# Index sets (the model's prefill layout: compressed entries stored after the S raw tokens)
# ================================================================================================

def window_indices(S: int, device, window: int = WINDOW) -> torch.Tensor:
    """[1, S, window] int32: t-window+1..t, -1 before the start."""
    t = torch.arange(S, device=device)
    win = t[:, None] - window + 1 + torch.arange(window, device=device)[None, :]
    return torch.where(win >= 0, win, -1).to(torch.int32).unsqueeze(0).contiguous()


def csa_indices(S: int, device, topk: int = TOPK, seed: int = 0) -> torch.Tensor:
    """[1, S, WINDOW + topk]: window + up to topk distinct random visible compressed entries (+ S)."""
    n_c = S // CSA_RATIO
    g = torch.Generator(device=device).manual_seed(seed)
    t = torch.arange(S, device=device)
    visible = (t + 1) // CSA_RATIO
    score = torch.rand(S, n_c, generator=g, device=device)
    score = torch.where(torch.arange(n_c, device=device)[None, :] < visible[:, None], score, -1.0)
    top = score.topk(min(topk, n_c), dim=-1)
    comp = torch.where(top.values >= 0, top.indices + S, -1).to(torch.int32)
    del score
    return torch.cat([window_indices(S, device)[0], comp], dim=-1).unsqueeze(0).contiguous()


def hca_indices(S: int, device) -> torch.Tensor:
    """[1, S, WINDOW + S/128]: window + every visible compressed entry (i < (t+1)//128), -1 padded."""
    n_c = S // HCA_RATIO
    t = torch.arange(S, device=device)
    c = torch.arange(n_c, device=device)
    comp = torch.where(c[None, :] < ((t + 1) // HCA_RATIO)[:, None], c[None, :] + S, -1).to(torch.int32)
    return torch.cat([window_indices(S, device)[0], comp], dim=-1).unsqueeze(0).contiguous()


def decode_inputs(S: int, B: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decode step of a CSA layer at context S over the FP8 cache: (q [B, 1, 64, 512] bf16, cache
    [B, WINDOW + S / 4, 584] uint8, idx [B, 1, WINDOW + TOPK] int32: the window, then a random top-512 of the
    compressed entries). Random bytes are valid e4m3 codes except the NaN pattern; scale bytes near 127."""
    from dsv4_compile.model.kv_layout import main_entry_bytes

    n_cache = WINDOW + S // CSA_RATIO
    cache = torch.randint(0, 256, (B, n_cache, main_entry_bytes(HEAD_D, ROPE_D)), device=device, dtype=torch.uint8)
    cache[..., :HEAD_D - ROPE_D] &= 0x77                                     # no NaN codes, moderate values
    cache[..., HEAD_D - ROPE_D: HEAD_D + ROPE_D] = torch.randn(
        B, n_cache, ROPE_D, device=device).bfloat16().view(torch.uint8).view(B, n_cache, -1)
    cache[..., HEAD_D + ROPE_D:] = 120
    win = torch.arange(WINDOW, device=device, dtype=torch.int32).expand(B, 1, WINDOW)
    comp = torch.rand(B, S // CSA_RATIO, device=device).topk(TOPK, dim=-1).indices.to(torch.int32) + WINDOW
    idx = torch.cat([win, comp.unsqueeze(1)], dim=-1).contiguous()
    q = torch.randn(B, 1, FLASH_H, HEAD_D, device=device, dtype=torch.bfloat16)
    return q, cache, idx


def selection_table(idx: torch.Tensor, S: int, n_kv: int) -> torch.Tensor:
    """[S, n_kv - S] bool: compressed entry c selected by query t (for flex's mask_mod)."""
    comp = idx[0, :, WINDOW:].long() - S
    table = torch.zeros(S, n_kv - S, dtype=torch.bool, device=idx.device)
    rows = torch.arange(S, device=idx.device)[:, None].expand_as(comp)
    ok = comp >= 0
    table[rows[ok], comp[ok]] = True
    return table


# ================================================================================================
# Timing and accounting
# ================================================================================================

def _bench(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _graph_or_bench(fns) -> tuple[float, str]:
    """(ms, how): CUDA-graph replay over the input sets, as our decode rows are timed; do_bench of the
    first where the callable cannot be captured (the note says so: then it includes launch cost)."""
    try:
        return graph_time_ms(fns), f"CUDA graph over {len(fns)} input sets"
    except Exception as e:  # noqa: BLE001
        torch.cuda.synchronize()
        return _bench(fns[0]), f"do_bench, launch cost included (no CUDA graph: {_err(e)})"


def measure_ceilings(device) -> dict:
    """Copy bandwidth (TB/s, read + write) and bf16 matmul rate (TFLOP/s), random data."""
    n = 1 << 29                                                              # 1 GiB of bf16
    x = torch.randn(n, device=device, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    ms = _bench(lambda: y.copy_(x))
    copy_tbps = 2 * x.numel() * 2 / (ms * 1e-3) / 1e12
    del x, y
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ms = _bench(lambda: a @ b)
    return {"copy_TBps": copy_tbps, "matmul_TFLOPs": 2 * 8192 ** 3 / (ms * 1e-3) / 1e12}


def valid_pairs(idx: torch.Tensor) -> int:
    return int((idx >= 0).sum())


class Recorder:
    def __init__(self, ceilings: dict, log=print):
        self.rows: list[dict] = []
        self.ceil = ceilings
        self.log = log

    def add(self, section, workload, method, S, H, D, K, ms, flops, nbytes, config="", note=""):
        floor = max(flops / (self.ceil["matmul_TFLOPs"] * 1e12), nbytes / (self.ceil["copy_TBps"] * 1e12)) * 1e3
        row = dict(section=section, workload=workload, method=method, S=S, H=H, D=D, K=K, ms=ms,
                   useful_TFLOPs=flops / (ms * 1e-3) / 1e12 if ms == ms else float("nan"),
                   GBps=nbytes / (ms * 1e-3) / 1e9 if ms == ms else float("nan"),
                   floor_ms=floor, frac_roofline=floor / ms if ms == ms else float("nan"),
                   bound="matmul" if flops / self.ceil["matmul_TFLOPs"] > nbytes / self.ceil["copy_TBps"] else "memory",
                   config=config, note=note)
        self.rows.append(row)
        self.log(f"  {section:7s} {workload:7s} {method:22s} S={S:6d} H={H:3d} D={D:3d} K={K:4d} "
                 f"{ms:9.3f} ms {row['useful_TFLOPs']:7.1f} TFLOP/s {row['GBps']:7.0f} GB/s "
                 f"roof {row['frac_roofline']:5.1%} {config} {note}")
        return row

    def fail(self, section, workload, method, S, H, D, K, err, config=""):
        self.log(f"  {section} {workload} {method} S={S} FAILED: {err}")
        self.rows.append(dict(section=section, workload=workload, method=method, S=S, H=H, D=D, K=K, ms=float("nan"),
                              useful_TFLOPs=float("nan"), GBps=float("nan"), floor_ms=float("nan"),
                              frac_roofline=float("nan"), bound="", config=config, note=f"FAILED: {err}"[:300]))


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:240]


# ================================================================================================
# The benchmark
# ================================================================================================

def run(contexts=(8192, 32768), budget_s: float = 300.0, sweep: bool = True, flex: bool = True,
        decode: bool = True, log=print, prefill: bool = True, decode_configs=DECODE_CONFIGS,
        indexer_batches=INDEXER_BATCHES, indexer_configs=INDEXER_DECODE_CONFIGS) -> dict:
    """Run everything that fits in `budget_s` seconds; returns {"meta", "ceilings", "rows", "checks"}.
    prefill False: the decode rows only (the prefill and 128-dim sections skipped). indexer_batches:
    the batch sizes of the indexer decode section (() skips it)."""
    import triton

    from dsv4_compile.kernels.sparse_attention import sparse_attention
    from dsv4_compile.kernels.sparse_attention_cached import sparse_attention_cached

    # Flex recompiles per mask and head shape: keep Dynamo from falling back to eager after 8.
    for knob in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 256))
    t_start = time.time()
    left = lambda: budget_s - (time.time() - t_start)  # noqa: E731
    device = torch.device("cuda")
    torch.manual_seed(0)
    meta = dict(gpu=torch.cuda.get_device_name(0), torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda, python=sys.version.split()[0],
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    log(f"{meta}")
    ceil = measure_ceilings(device)
    log(f"ceilings: copy {ceil['copy_TBps']:.2f} TB/s, bf16 matmul {ceil['matmul_TFLOPs']:.0f} TFLOP/s")
    rec = Recorder(ceil, log)
    checks: dict[str, float] = {}
    best: dict[str, str] = {}

    def ours(section, workload, S, H, D, q, kv, sink, idx, configs):
        flops = 4 * H * D * valid_pairs(idx)
        nbytes = 2 * q.numel() * q.element_size() + kv.numel() * kv.element_size() + idx.numel() * 4
        results = []
        for cfg in configs:
            if left() < 20 and results:
                break
            try:
                ms = _bench(lambda: sparse_attention(q, kv, sink, idx, D ** -0.5, cfg))
                results.append((ms, cfg))
                rec.add(section, workload, "ours", S, H, D, idx.shape[-1], ms, flops, nbytes, cfg)
            except Exception as e:  # noqa: BLE001  (a config may not fit: record and go on)
                rec.fail(section, workload, "ours", S, H, D, idx.shape[-1], _err(e), cfg)
        return min(results) if results else (float("nan"), "")

    def flex_run(section, workload, S, H, D, q, kv, idx, mask_kind, table=None):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        n_kv = kv.shape[1]
        flops = 4 * H * D * valid_pairs(idx)
        nbytes = 2 * q.numel() * q.element_size() + kv.numel() * kv.element_size()
        if mask_kind == "window":
            def mask_mod(b, h, q_idx, kv_idx):
                return (q_idx >= kv_idx) & (q_idx - kv_idx < WINDOW)
        else:
            def mask_mod(b, h, q_idx, kv_idx):
                in_win = (kv_idx < S) & (q_idx >= kv_idx) & (q_idx - kv_idx < WINDOW)
                c = torch.clamp(kv_idx - S, min=0)
                return in_win | ((kv_idx >= S) & table[q_idx, c])
        try:
            block_mask = create_block_mask(mask_mod, None, None, S, n_kv, device=device, _compile=True)
        except TypeError:
            block_mask = create_block_mask(mask_mod, None, None, S, n_kv, device=device)
        qf = q.transpose(1, 2)                                               # [1, H, S, D]
        kf = kv.unsqueeze(1)                                                 # [1, 1, N, D]
        compiled = torch.compile(flex_attention, dynamic=False)
        last = None
        for options in (None, {"BLOCK_M": 32, "BLOCK_N": 32, "num_stages": 1, "num_warps": 4}):
            try:
                fn = lambda: compiled(qf, kf, kf, block_mask=block_mask, scale=D ** -0.5, enable_gqa=True,  # noqa: E731
                                      kernel_options=options)
                out = fn()
                ms = _bench(fn)
                rec.add(section, workload, "flex_attention", S, H, D, idx.shape[-1], ms, flops, nbytes,
                        str(options or "default"), f"block sparsity {block_mask.sparsity():.1f}%")
                return ms, out.transpose(1, 2)
            except Exception as e:  # noqa: BLE001
                last = e
        rec.fail(section, workload, "flex_attention", S, H, D, idx.shape[-1], _err(last))
        return float("nan"), None

    # ---- decode over the FP8 cache, batch 64 -----------------------------------------------------
    if decode:
        from dsv4_compile.model.kv_layout import main_entry_bytes

        entry = main_entry_bytes(HEAD_D, ROPE_D)
        for S in contexts:
            if left() < 25:
                log(f"budget: skipping decode at S={S}")
                break
            K = WINDOW + TOPK
            n_rot = 6
            sets = [decode_inputs(S, DECODE_B, device) for _ in range(n_rot)]
            sink = torch.randn(FLASH_H, device=device)
            q0, cache0, idx0 = sets[0]
            flops = 4 * FLASH_H * HEAD_D * DECODE_B * K
            nbytes = DECODE_B * K * entry + 2 * q0.numel() * 2 + idx0.numel() * 4
            best_dec = (float("inf"), "")
            for cfg in decode_configs:
                if left() < 15:
                    break
                try:
                    fns = [lambda q=q, c=c, i=i: sparse_attention_cached(q, c, sink, i, HEAD_D ** -0.5, ROPE_D, cfg)
                           for q, c, i in sets]
                    ms = graph_time_ms(fns)
                    rec.add("decode", "csa", "ours", S, FLASH_H, HEAD_D, K, ms, flops, nbytes, cfg or "default(auto splits)",
                            f"B={DECODE_B}, CUDA graph over {n_rot} input sets")
                    best_dec = min(best_dec, (ms, cfg))
                except Exception as e:  # noqa: BLE001
                    rec.fail("decode", "csa", "ours", S, FLASH_H, HEAD_D, K, _err(e), cfg)
            try:  # the plain op (unpacks the whole cache, then attends), eager; CUDA graphs as ours
                plain = [lambda q=q, c=c, i=i: torch.ops.dsv4.sparse_attention_cached(q, c, sink, i, HEAD_D ** -0.5, ROPE_D)
                         for q, c, i in sets]
                ms, how = _graph_or_bench(plain)
                rec.add("decode", "csa", "plain_op_eager", S, FLASH_H, HEAD_D, K, ms, flops, nbytes, note=how)
                ref = torch.ops.dsv4.sparse_attention_cached(q0.float(), cache0, sink, idx0, HEAD_D ** -0.5, ROPE_D)
                checks[f"decode ours vs plain fp32, S={S}, rel RMS"] = rel_rms(
                    ref, sparse_attention_cached(q0, cache0, sink, idx0, HEAD_D ** -0.5, ROPE_D, best_dec[1]))
            except Exception as e:  # noqa: BLE001
                rec.fail("decode", "csa", "plain_op_eager", S, FLASH_H, HEAD_D, K, _err(e))
            try:  # torch.compile of the plain op: its code traced in (passes="decompose") for Inductor to fuse
                import dsv4_compile

                compiled = dsv4_compile.compile(_decode_plain_op, gpu="auto", passes="decompose", dynamic=False)
                ms, how = _graph_or_bench([lambda q=q, c=c, i=i: compiled(q, c, sink, i) for q, c, i in sets])
                rec.add("decode", "csa", "plain_op_compiled", S, FLASH_H, HEAD_D, K, ms, flops, nbytes, note=how)
            except Exception as e:  # noqa: BLE001
                rec.fail("decode", "csa", "plain_op_compiled", S, FLASH_H, HEAD_D, K, _err(e))
            del sets
            torch.cuda.empty_cache()

    # ---- indexer decode over the packed FP4 key cache ---------------------------------------------
    for S in contexts if indexer_batches else ():
        for B in indexer_batches:
            if left() < 25:
                log(f"budget: skipping the indexer decode at S={S}, B={B}")
                break
            indexer_decode(rec, checks, S, B, indexer_configs, device, left, log)
            torch.cuda.empty_cache()

    # ---- prefill at the real heads (64 x 512) ---------------------------------------------------
    for ci, S in enumerate(contexts if prefill else ()):
        if left() < 30:
            log(f"budget: skipping prefill at S={S}")
            break
        log(f"prefill S={S}, H={FLASH_H}, D={HEAD_D}")
        q = torch.randn(1, S, FLASH_H, HEAD_D, device=device, dtype=torch.bfloat16)
        kv = torch.randn(1, S + S // CSA_RATIO, HEAD_D, device=device, dtype=torch.bfloat16)
        sink = torch.randn(FLASH_H, device=device)
        no_sink = torch.full((FLASH_H,), -math.inf, device=device)
        sets = {"window": window_indices(S, device), "csa": csa_indices(S, device), "hca": hca_indices(S, device)}
        for workload, idx in sets.items():
            kv_w = kv[:, :S] if workload == "window" else kv
            configs = SWEEP_512 if (sweep and ci == 0 and workload != "hca") else [best.get(workload, best.get("csa", SWEEP_512[0]))]
            ms, cfg = ours("prefill", workload, S, FLASH_H, HEAD_D, q, kv_w, sink, idx, configs)
            if cfg and workload not in best:
                best[workload] = cfg
            if flex and workload == "window" and left() > 60:
                f_ms, f_out = flex_run("prefill", workload, S, FLASH_H, HEAD_D, q, kv_w, idx, "window")
                if f_out is not None:
                    checks[f"ours vs flex, window, S={S}, rel RMS"] = rel_rms(
                        f_out, sparse_attention(q, kv_w, no_sink, idx, HEAD_D ** -0.5, best.get("window", "")))
                    del f_out
            if flex and workload == "csa" and S <= 8192 and left() > 150:
                table = selection_table(idx, S, kv.shape[1])
                f_ms, f_out = flex_run("prefill", workload, S, FLASH_H, HEAD_D, q, kv, idx, "csa", table)
                if f_out is not None:
                    checks[f"ours vs flex, csa 512-dim, S={S}, rel RMS"] = rel_rms(
                        f_out, sparse_attention(q, kv, no_sink, idx, HEAD_D ** -0.5, best.get("csa", "")))
                    del f_out
                del table
        del q, kv, sets
        torch.cuda.empty_cache()

    # ---- 128-dim heads: ours vs flex (same csa index set) vs SDPA dense causal (FA2) ------------
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for ci, S in enumerate(contexts if prefill else ()):
        if left() < 30:
            log(f"budget: skipping the 128-dim comparison at S={S}")
            break
        log(f"128-dim heads S={S}, H={SMALL_H}, D={SMALL_D}")
        q = torch.randn(1, S, SMALL_H, SMALL_D, device=device, dtype=torch.bfloat16)
        kv = torch.randn(1, S + S // CSA_RATIO, SMALL_D, device=device, dtype=torch.bfloat16)
        sink = torch.randn(SMALL_H, device=device)
        idx = csa_indices(S, device)
        configs = SWEEP_128 if (sweep and ci == 0) else [best.get("csa128", SWEEP_128[0])]
        ms, cfg = ours("d128", "csa", S, SMALL_H, SMALL_D, q, kv, sink, idx, configs)
        best.setdefault("csa128", cfg)
        if flex and left() > 45:
            table = selection_table(idx, S, kv.shape[1])
            f_ms, f_out = flex_run("d128", "csa", S, SMALL_H, SMALL_D, q, kv, idx, "csa", table)
            if f_out is not None:
                no_sink = torch.full((SMALL_H,), -math.inf, device=device)
                checks[f"ours vs flex, csa 128-dim, S={S}, rel RMS"] = rel_rms(
                    f_out, sparse_attention(q, kv, no_sink, idx, SMALL_D ** -0.5, best.get("csa128", "")))
                del f_out
            del table
        try:
            qs = q.transpose(1, 2).contiguous()
            ks = torch.randn_like(qs)
            vs = torch.randn_like(qs)
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                fn = lambda: torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True)  # noqa: E731
                fn()
                sd_ms = _bench(fn)
            flops = 2 * S * S * SMALL_H * SMALL_D                           # causal half of 4 S^2 H D
            rec.add("d128", "dense", "sdpa_flash_causal", S, SMALL_H, SMALL_D, S, sd_ms, flops, 4 * qs.numel() * 2)
            del qs, ks, vs
        except Exception as e:  # noqa: BLE001
            rec.fail("d128", "dense", "sdpa_flash_causal", S, SMALL_H, SMALL_D, S, _err(e))
        del q, kv, idx
        torch.cuda.empty_cache()

    meta["elapsed_s"] = round(time.time() - t_start, 1)
    meta["best_configs"] = best
    return {"meta": meta, "ceilings": ceil, "rows": rec.rows, "checks": checks}


def _indexer_decode_sets(S: int, B: int, n_rot: int, device) -> list[tuple]:
    """n_rot input sets (q [B, 1, 64, 128] bf16, weights [B, 1, 64] bf16, FP4 cache [B, S/4, 68] uint8,
    positions [B, 1] = S - 1: every key visible), FP4-simulated as the model's indexer makes them."""
    from dsv4_compile.model.kv_layout import pack_indexer_keys
    from dsv4_compile.model.ops import fp4_simulate, hadamard

    N = S // CSA_RATIO
    sets = []
    for _ in range(n_rot):
        rows = [fp4_simulate(hadamard(torch.randn(1, N, INDEX_D, device=device)), 32) for _ in range(B)]
        cache = torch.cat([pack_indexer_keys(keys, "fp4") for keys in rows])
        q = fp4_simulate(hadamard(torch.randn(B, 1, INDEX_H, INDEX_D, device=device)), 32).bfloat16()
        w = (torch.randn(B, 1, INDEX_H, device=device) * INDEX_H ** -0.5).bfloat16()
        sets.append((q, w, cache, torch.full((B, 1), S - 1, device=device, dtype=torch.int64)))
    return sets


def _unpack_then_indexer_topk(q, w, cache, pos):
    """What decode ran before indexer_topk_cached: the whole cache unpacked to float32, then indexer_topk."""
    from dsv4_compile.model.kv_layout import unpack_indexer_keys

    return torch.ops.dsv4.indexer_topk(q, w, unpack_indexer_keys(cache, q.shape[-1], "fp4"), pos, CSA_RATIO, TOPK)


def indexer_decode(rec: Recorder, checks: dict, S: int, B: int, configs, device, left, log) -> None:
    """The indexer decode rows at context S, batch B (see the module docstring)."""
    import dsv4_compile
    from dsv4_compile.kernels.indexer_topk import indexer_topk
    from dsv4_compile.kernels.indexer_topk_cached import indexer_topk_cached
    from dsv4_compile.model.kv_layout import unpack_indexer_keys

    N = S // CSA_RATIO
    log(f"indexer decode S={S} (N={N} keys), B={B}")
    sets = _indexer_decode_sets(S, B, 4, device)
    q0, w0, cache0, pos0 = sets[0]
    flops = 2 * INDEX_H * INDEX_D * B * N
    nbytes = cache0.numel() + q0.numel() * 2 + w0.numel() * 2 + B * TOPK * 4     # packed keys read once
    workload = f"fp4-B{B}"
    best = (float("inf"), "")
    for cfg in configs:
        if left() < 15:
            break
        try:
            fns = [lambda q=q, w=w, c=c, p=p: indexer_topk_cached(q, w, c, p, CSA_RATIO, TOPK, "fp4", cfg)
                   for q, w, c, p in sets]
            ms = graph_time_ms(fns)
            rec.add("idx_dec", workload, "ours", S, INDEX_H, INDEX_D, TOPK, ms, flops, nbytes, cfg or "default",
                    f"B={B}, CUDA graph over {len(sets)} input sets")
            best = min(best, (ms, cfg))
        except Exception as e:  # noqa: BLE001
            rec.fail("idx_dec", workload, "ours", S, INDEX_H, INDEX_D, TOPK, _err(e), cfg)
    before = {"unpack+indexer_topk": lambda q, w, c, p: indexer_topk(q, w, unpack_indexer_keys(c, INDEX_D, "fp4"), p,
                                                                       CSA_RATIO, TOPK),
              "plain_op_eager": lambda q, w, c, p: torch.ops.dsv4.indexer_topk_cached(q, w, c, p, CSA_RATIO, TOPK,
                                                                                       "fp4")}
    try:  # the former decode path compiled as the model is: Inductor's unpack, the indexer kernel substituted
        before["unpack+indexer_topk_compiled"] = dsv4_compile.compile(_unpack_then_indexer_topk, gpu="auto",
                                                                      passes="all", dynamic=False)
    except Exception as e:  # noqa: BLE001
        rec.fail("idx_dec", workload, "unpack+indexer_topk_compiled", S, INDEX_H, INDEX_D, TOPK, _err(e))
    for method, fn in before.items():
        if left() < 10:
            break
        try:
            ms, how = _graph_or_bench([lambda q=q, w=w, c=c, p=p, fn=fn: fn(q, w, c, p) for q, w, c, p in sets])
            rec.add("idx_dec", workload, method, S, INDEX_H, INDEX_D, TOPK, ms, flops, nbytes, note=how)
        except Exception as e:  # noqa: BLE001
            rec.fail("idx_dec", workload, method, S, INDEX_H, INDEX_D, TOPK, _err(e))
    try:  # picks against the plain op's (FP4 q and keys: exact products; a near-tie may go either way)
        ours = indexer_topk_cached(q0, w0, cache0, pos0, CSA_RATIO, TOPK, "fp4", best[1])
        ref = torch.ops.dsv4.indexer_topk_cached(q0, w0, cache0, pos0, CSA_RATIO, TOPK, "fp4")
        checks[f"indexer decode S={S} B={B}: picks not in the plain op's set (fraction)"] = float(
            (~(ours.unsqueeze(-1) == ref.unsqueeze(-2)).any(-1)).float().mean())
    except Exception as e:  # noqa: BLE001
        log(f"  indexer decode check failed: {_err(e)}")
    del sets


# ================================================================================================
# Outputs
# ================================================================================================

def _best(rows, **match):
    hits = [r for r in rows if all(r[k] == v for k, v in match.items()) and r["ms"] == r["ms"]]
    return min(hits, key=lambda r: r["ms"]) if hits else None


def summary_lines(result: dict) -> list[str]:
    rows, meta, ceil = result["rows"], result["meta"], result["ceilings"]
    out = [f"# Sparse attention benchmark: {meta['gpu']}", "",
           f"torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, Python {meta['python']}, "
           f"{meta['date']}; one run ({meta.get('elapsed_s', '?')} s). Produced by `bench/bench_attention.py`.", "",
           f"Ceilings measured in this run: device copy {ceil['copy_TBps']:.2f} TB/s (read + write), "
           f"bf16 matmul {ceil['matmul_TFLOPs']:.0f} TFLOP/s (8192^3, random data).", "",
           "Useful TFLOP/s = 4 H D per valid (query, index) pair over the time (the same count for every method); "
           "roofline floor = max(FLOPs / matmul peak, bytes / copy bandwidth), bytes = q + out + kv + indices once.",
           "", "## Best per (section, workload, method, S)", "",
           "| section | workload | method | S | H x D | K | ms | useful TFLOP/s | GB/s | floor ms | % of roofline | bound | config |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    keys = []
    for r in rows:
        k = (r["section"], r["workload"], r["method"], r["S"])
        if k not in keys:
            keys.append(k)
    for k in keys:
        r = _best(rows, section=k[0], workload=k[1], method=k[2], S=k[3])
        if r is None:
            fails = [x for x in rows if (x["section"], x["workload"], x["method"], x["S"]) == k]
            out.append(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | | | failed | | | | | | {fails[0]['note'][:80]} |")
            continue
        out.append(f"| {r['section']} | {r['workload']} | {r['method']} | {r['S']} | {r['H']} x {r['D']} | {r['K']} | "
                   f"{r['ms']:.3f} | {r['useful_TFLOPs']:.1f} | {r['GBps']:.0f} | {r['floor_ms']:.3f} | "
                   f"{100 * r['frac_roofline']:.1f} | {r['bound']} | {r['config']} |")
    out += ["", "## Ratios (this run)", ""]
    contexts = sorted({r["S"] for r in rows if r["section"] == "prefill"})
    anchors = {8192: 3.66, 32768: 15.0}
    for S in contexts:
        o = _best(rows, section="prefill", workload="window", method="ours", S=S)
        f = _best(rows, section="prefill", workload="window", method="flex_attention", S=S)
        if o:
            line = f"- window-128, 64x512, S={S}: ours {o['ms']:.3f} ms"
            if f:
                line += f", flex {f['ms']:.3f} ms: **{f['ms'] / o['ms']:.1f}x faster than flex**"
            if S in anchors:
                line += f" (DESIGN anchor for flex: {anchors[S]} ms)"
            line += f"; {100 * o['frac_roofline']:.0f}% of the memory floor {o['floor_ms']:.3f} ms"
            out.append(line)
        for wl in ("csa", "hca"):
            o = _best(rows, section="prefill", workload=wl, method="ours", S=S)
            f = _best(rows, section="prefill", workload=wl, method="flex_attention", S=S)
            if o:
                line = (f"- {wl}, 64x512, S={S}, K={o['K']}: ours {o['ms']:.3f} ms, {o['useful_TFLOPs']:.0f} TFLOP/s "
                        f"({100 * o['frac_roofline']:.0f}% of the {o['bound']} floor {o['floor_ms']:.3f} ms)")
                if f:
                    line += f"; flex {f['ms']:.3f} ms: **{f['ms'] / o['ms']:.1f}x**"
                out.append(line)
    for S in sorted({r["S"] for r in rows if r["section"] == "d128"}):
        o = _best(rows, section="d128", workload="csa", method="ours", S=S)
        f = _best(rows, section="d128", workload="csa", method="flex_attention", S=S)
        d = _best(rows, section="d128", workload="dense", method="sdpa_flash_causal", S=S)
        if o:
            line = f"- 32x128, csa index set, S={S}: ours {o['ms']:.3f} ms ({o['useful_TFLOPs']:.0f} TFLOP/s)"
            if f:
                line += f"; flex same set {f['ms']:.3f} ms: **{f['ms'] / o['ms']:.1f}x**"
            if d:
                line += (f"; SDPA dense causal (FA2) {d['ms']:.3f} ms ({d['useful_TFLOPs']:.0f} TFLOP/s): "
                         f"**{d['ms'] / o['ms']:.1f}x** less time than dense")
            out.append(line)
    for S in sorted({r["S"] for r in rows if r["section"] == "decode"}):
        o = _best(rows, section="decode", method="ours", S=S)
        p = _best(rows, section="decode", method="plain_op_eager", S=S)
        if o:
            line = (f"- decode B={DECODE_B}, 64x512, K=640 over the FP8 cache (context {S}): ours {o['ms'] * 1e3:.1f} us, "
                    f"{o['GBps']:.0f} GB/s = {100 * o['GBps'] / (ceil['copy_TBps'] * 1e3):.0f}% of copy bandwidth, "
                    f"{o['useful_TFLOPs']:.0f} TFLOP/s ({o['config']})")
            if p:
                line += f"; plain op eager {p['ms']:.3f} ms: **{p['ms'] / o['ms']:.0f}x**"
            c = _best(rows, section="decode", method="plain_op_compiled", S=S)
            if c:
                line += f"; torch.compile of the plain op {c['ms']:.3f} ms: **{c['ms'] / o['ms']:.1f}x**"
            out.append(line)
    for S in sorted({r["S"] for r in rows if r["section"] == "idx_dec"}):
        for workload in sorted({r["workload"] for r in rows if r["section"] == "idx_dec" and r["S"] == S}):
            o = _best(rows, section="idx_dec", workload=workload, method="ours", S=S)
            if not o:
                continue
            line = (f"- indexer decode {workload}, top-{TOPK} of {S // CSA_RATIO} packed FP4 keys (context {S}): ours "
                    f"{o['ms'] * 1e3:.1f} us, {o['GBps']:.0f} GB/s of packed keys ({o['config']})")
            for method in ("unpack+indexer_topk", "unpack+indexer_topk_compiled", "plain_op_eager"):
                p = _best(rows, section="idx_dec", workload=workload, method=method, S=S)
                if p:
                    line += f"; {method} {p['ms'] * 1e3:.1f} us: **{p['ms'] / o['ms']:.1f}x**"
            out.append(line)
    if result["checks"]:
        out += ["", "## Agreement checks (this run)", ""]
        out += [f"- {k}: {v:.2e}" for k, v in result["checks"].items()]
    fails = [r for r in rows if r["note"].startswith("FAILED")]
    if fails:
        out += ["", "## Failures", ""]
        out += [f"- {r['section']} {r['workload']} {r['method']} S={r['S']} {r['config']}: {r['note']}" for r in fails]
    out += ["", f"Best configs: {meta.get('best_configs')}", "", "All rows: attention.csv; figure: attention.png."]
    return out


def write_outputs(result: dict, out_dir: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    csv_path = os.path.join(out_dir, "attention.csv")
    fields = ["section", "workload", "method", "S", "H", "D", "K", "ms", "useful_TFLOPs", "GBps", "floor_ms",
              "frac_roofline", "bound", "config", "note"]
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in result["rows"]:
            w.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in fields})
    paths.append(csv_path)
    md_path = os.path.join(out_dir, "attention.md")
    with open(md_path, "w") as f:
        f.write("\n".join(summary_lines(result)) + "\n")
    paths.append(md_path)
    try:
        paths.append(_plot(result, os.path.join(out_dir, "attention.png")))
    except Exception as e:  # noqa: BLE001  (no matplotlib: the CSV and markdown still stand)
        print(f"plot skipped: {_err(e)}")
    return paths


def _plot(result: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    keys = []
    for r in rows:
        if r["section"] in ("prefill", "d128"):
            k = (r["section"], r["workload"], r["method"])
            if k not in keys:
                keys.append(k)
    contexts = sorted({r["S"] for r in rows if r["section"] == "prefill"})
    width = 0.8 / max(1, len(keys))
    for i, k in enumerate(keys):
        ys = []
        for S in contexts:
            b = _best(rows, section=k[0], workload=k[1], method=k[2], S=S)
            ys.append(b["ms"] if b else float("nan"))
        axes[0].bar([c + i * width for c in range(len(contexts))], ys, width, label=f"{k[0]}/{k[1]}/{k[2]}")
    axes[0].set_yscale("log")
    axes[0].set_xticks([c + 0.4 - width / 2 for c in range(len(contexts))], [f"S={S}" for S in contexts])
    axes[0].set_ylabel("ms (median, log)")
    axes[0].set_title(f"prefill, B=1, bf16 ({result['meta']['gpu']})")
    axes[0].legend(fontsize=7)
    dec = [r for r in rows if r["section"] == "decode" and r["ms"] == r["ms"] and r["method"] == "ours"]
    labels = [f"S={r['S']}\n{r['config']}" for r in dec]
    axes[1].bar(range(len(dec)), [r["GBps"] for r in dec])
    axes[1].axhline(result["ceilings"]["copy_TBps"] * 1e3, color="r", linestyle="--", label="copy bandwidth")
    axes[1].set_xticks(range(len(dec)), labels, fontsize=6, rotation=60)
    axes[1].set_ylabel("GB/s")
    axes[1].set_title(f"decode over the FP8 cache, B={DECODE_B}, 64x512, K=640")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _decode_plain_op(q, cache, sink, idx):
    return torch.ops.dsv4.sparse_attention_cached(q, cache, sink, idx, HEAD_D ** -0.5, ROPE_D)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="8k,32k", help="prefill/decode context lengths, e.g. 8k,32k,128k")
    parser.add_argument("--out", default=None, help="output folder (default bench/results/<GPU short name>)")
    parser.add_argument("--budget", type=float, default=300.0, help="seconds; optional parts are skipped past it")
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--no-flex", action="store_true")
    parser.add_argument("--no-decode", action="store_true")
    parser.add_argument("--no-prefill", action="store_true", help="the decode rows only")
    parser.add_argument("--decode-configs", default=None,
                        help="';'-separated decode config strings ('' = the default, auto splits); "
                             "default: DECODE_CONFIGS")
    parser.add_argument("--indexer-batches", default=",".join(map(str, INDEXER_BATCHES)),
                        help="batch sizes of the indexer decode rows ('' skips them)")
    parser.add_argument("--indexer-configs", default=None,
                        help="';'-separated indexer_topk_cached config strings ('' = its default); "
                             "default: INDEXER_DECODE_CONFIGS")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_attention: needs a CUDA GPU")
        return 2
    name = torch.cuda.get_device_name(0)
    short = next((g for g in ("H100", "H200") if g in name.upper()), name.replace(" ", "_"))
    out_dir = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", short)
    result = {"rows": []}
    try:
        decode_configs = (DECODE_CONFIGS if args.decode_configs is None
                          else [c.strip() for c in args.decode_configs.split(";")])
        indexer_configs = (INDEXER_DECODE_CONFIGS if args.indexer_configs is None
                           else [c.strip() for c in args.indexer_configs.split(";")])
        result = run(parse_contexts(args.contexts), args.budget, not args.no_sweep, not args.no_flex,
                     not args.no_decode, prefill=not args.no_prefill, decode_configs=decode_configs,
                     indexer_batches=tuple(int(b) for b in args.indexer_batches.split(",") if b.strip()),
                     indexer_configs=indexer_configs)
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        return 1
    for p in write_outputs(result, out_dir):
        print("wrote", p)
    print("\n".join(summary_lines(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
