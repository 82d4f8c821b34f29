"""Offline compile report of the sparse attention, MoE, float32 linear and mHC pre kernels for Hopper:
registers, spills, shared memory, and the main loop's SASS.

    python bench/compile_report.py --kernel sparse_attention [--configs "block_k=64;block_k=64,split_d=2"]
    python bench/compile_report.py --kernel sparse_attention_cached --context 32k --batch 64 [--csv out.csv]
    python bench/compile_report.py --kernel moe_experts --weight-format mxfp4 --batch 64 [--configs "block_n=128"]
    python bench/compile_report.py --kernel moe_experts --weight-format fp8 --act fp8 --batch 4096 --configs "block_k=128,down_block_k=128"
    python bench/compile_report.py --kernel float32_linear --batch 1 [--configs "block_k=128"]   (M = batch rows)
    python bench/compile_report.py --kernel fp8_linear --batch 1 --configs ";gemm=gemv,block_n=16,block_k=512"   (wo_b)
    python bench/compile_report.py --kernel hc_pre --batch 1 --configs ";block_t=1,dot_precision=ieee"   (decode tokens)

No GPU needed, and no timings: compile data only. Each config goes through the kernel's own launcher
(`launch_sparse_attention`, its `launch` call intercepted), so the constexprs, grid arithmetic and
clamps (block_h, num_splits, split_d) are the ones a real launch uses; Triton's binder specialises the
arguments as a launch would (ints equal to 1 become constants, divisibility by 16), then
`triton.compile` builds the kernel for sm_90a (GPUTarget("cuda", 90, 32)) with the ptxas that ships
in the triton wheel. ptxas runs with -v in every Triton compile: its log (TRITON_DUMP_PTXAS_LOG) gives
registers a thread and spill bytes; the kernel's metadata gives its (dynamic) shared memory. The
problem shapes are the tuning spaces' (tuning/spaces/sparse_attention.py: the model's heads and head
dim, K = window + index_topk, prefill N = S + S/4, decode over the FP8 cache; moe_experts: T = batch
tokens over the preset's routed experts, routing random, configs over the default of T's regime:
decode up to 4096 / k tokens, prefill beyond), from the preset given. moe_experts' W8A8 (--act fp8, the
moe_experts_fp8_w8a8 op; configs over its default) quantizes x in kernels/fp8_quantize's pass first:
not reported here (a memory-bound pass).

Compile with the Triton the GPU runs (DEVICE_TRITON): layouts differ between versions. A venv of
`pip install torch==2.13.0 triton==3.6.0 pyyaml safetensors` and this package (`pip install --no-deps
-e .`) does: the CPU torch wheel needs no triton of its own. Triton 3.9 laid out the FP8 decode tile
well where 3.6, the devices', shuffled every byte through shared memory
(bench/results/H200/attention_compile_report.md, triton 3.6).

Main loop: the cubin disassembled by the nvdisasm in the triton wheel; the loop is the first
backward branch whose body holds a tensor-core instruction (HMMA / HGMMA / QGMMA), one iteration of the K loop
after Triton's software pipelining (later ones are fallbacks: moe_experts' fp32 route for float32 scales
that are no powers of two). loop_instr counts its SASS instructions; for moe_experts and fp8_linear,
instr_per_weight divides them by the weight elements a thread takes in one iteration (block_k x block_n
over the threads, twice for the gate/up launch: w1 and w3), the proxy of the dequantization's ALU cost
when no GPU is at hand (it is not a timing). mma names the loop's tensor-core instructions with their
count (e.g. HGMMA.64x128x32.F32.E4M3.E4M3 x 16: FP8 wgmma; .BF16: bf16), loop_instr_per_mma divides
the loop by their number. convert_layouts counts ttg.convert_layout ops in the TTGIR (each a shuffle,
through shared memory unless within a warp).

CTAs/SM: resident programs a Hopper SM can hold, min over registers (65536 a SM, allocated per warp
in units of 256), shared memory (228 KB a SM, 1 KB reserved per CTA, 227 KB per CTA at most) and warps
(64 a SM). Uses Triton's binder and `_pack_args` (triton 3.9 internals, as the launch path calls them).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import dataclasses
import importlib
import io
import re
import subprocess
import sys
from unittest import mock

import torch

# Hopper (compute capability 9.0) per-SM limits, as in the CUDA occupancy calculator.
REGS_PER_SM = 65536
REG_ALLOC_UNIT = 256          # registers, per warp
SMEM_PER_SM = 228 * 1024
SMEM_PER_CTA_MAX = 227 * 1024
SMEM_RESERVED_PER_CTA = 1024
WARPS_PER_SM = 64
CTAS_PER_SM = 32

KERNELS = ("sparse_attention", "sparse_attention_cached", "moe_experts", "float32_linear", "fp8_linear", "hc_pre")
DEVICE_TRITON = "3.6"   # what our H100 / H200 runs use (torch 2.11): bench/results/H100/session24_gpu_runs.md


@dataclasses.dataclass
class Row:
    kernel: str               # the op
    function: str             # the Triton kernel compiled
    config: str               # the config as given (to_str of the resolved one)
    grid: str                 # the launch grid at the problem's shape
    warps: int
    regs: int                 # registers a thread
    spill_stores: int         # bytes
    spill_loads: int          # bytes
    smem: int                 # shared memory bytes (dynamic)
    ctas_per_sm: int
    limit: str                # what bounds ctas_per_sm
    loop_instr: int = 0       # SASS instructions of one main-loop iteration (main_loop)
    instr_per_weight: float = 0.0   # moe_experts, fp8_linear: loop_instr / weights a thread takes an iteration
    convert_layouts: int = 0  # ttg.convert_layout ops in the TTGIR
    mma: str = ""             # the main loop's tensor-core instructions, with modifiers, and their counts
    instr_per_mma: float = 0.0      # loop_instr over the number of tensor-core instructions in the loop
    opcodes: str = ""         # the loop's most frequent opcodes (without modifiers) and their counts
    loop_copies: str = ""     # the loop's asynchronous global -> shared copies (LDGSTS) by width (loop_copies)


def ctas_per_sm(regs: int, warps: int, smem: int) -> tuple[int, str]:
    """Resident CTAs a Hopper SM holds for this kernel, and the resource that bounds it."""
    regs_per_warp = -(-regs * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by = {"registers": REGS_PER_SM // (regs_per_warp * warps) if regs else CTAS_PER_SM,
          "shared memory": SMEM_PER_SM // (smem + SMEM_RESERVED_PER_CTA) if smem <= SMEM_PER_CTA_MAX else 0,
          "warps": WARPS_PER_SM // warps}
    limit = min(by, key=by.get)
    return min(by[limit], CTAS_PER_SM), limit


def parse_ptxas(log: str) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from a `ptxas -v` log of one entry function."""
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None:
        raise RuntimeError(f"no register count in the ptxas log:\n{log}")
    return int(regs.group(1)), int(spill.group(1)) if spill else 0, int(spill.group(2)) if spill else 0


MMA_OPCODES = ("HMMA", "HGMMA", "QGMMA")   # QGMMA: Hopper's FP8 wgmma (E4M3 / E5M2 operands)


def main_loop(sass: str, modifiers: bool = False, markers: tuple[str, ...] = MMA_OPCODES) -> list[str]:
    """Opcodes of the first backward-branch loop (in code order) of nvdisasm output whose body holds a
    tensor-core instruction (MMA_OPCODES; or any of `markers`: hc_pre's few-token sweep is FFMAs); []
    if there is none. The first is the hot one: a kernel's later MMA loops are its fallbacks
    (moe_experts' fp32 route for float32 scales that are no powers of two). Without modifiers
    ('HGMMA'), or with them ('HGMMA.64x128x32.F32.E4M3.E4M3')."""
    labels, ops = {}, []
    for line in sass.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(ops)
            continue
        ins = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)(.*?);", line)
        if not ins:
            continue
        ops.append(ins.group(1))
        target = re.search(r"`\((\.L_x_\d+)\)", ins.group(2)) if ops[-1] == "BRA" else None
        if target and labels.get(target.group(1), len(ops)) < len(ops):
            body = ops[labels[target.group(1)]:]
            if any(op.split(".")[0] in markers for op in body):
                return body if modifiers else [op.split(".")[0] for op in body]
    return []


def mma_summary(loop: list[str]) -> tuple[str, int]:
    """('HGMMA.64x128x32.F32.E4M3.E4M3 x 8, ...', total) of a main_loop(..., modifiers=True)."""
    counts = collections.Counter(op for op in loop if op.split(".")[0] in MMA_OPCODES)
    return ", ".join(f"{op} x {n}" for op, n in sorted(counts.items())), sum(counts.values())


def loop_copies(loop: list[str]) -> str:
    """'128-bit x 4, 64-bit x 2': the loop's asynchronous copies (LDGSTS, what Triton's software pipeline
    issues stages ahead) by the bits each thread moves. A narrower copy than the tile allows means
    Triton could not prove the addresses aligned (e.g. a row stride known only as a multiple of 2)."""
    widths = collections.Counter()
    for op in loop:
        if op.split(".")[0] == "LDGSTS":
            bits = [int(m) for m in op.split(".")[1:] if m.isdigit()]
            widths[bits[0] if bits else 32] += 1
    return ", ".join(f"{bits}-bit x {n}" for bits, n in sorted(widths.items(), reverse=True))


def opcode_mix(loop: list[str], top: int = 12) -> str:
    """'FFMA 64, LDGSTS 12, ...': the `top` most frequent opcodes of a loop (modifiers dropped)."""
    counts = collections.Counter(op.split(".")[0] for op in loop)
    return ", ".join(f"{op} {n}" for op, n in counts.most_common(top))


def disassemble(cubin: bytes) -> str:
    """nvdisasm (from the triton wheel) of a cubin."""
    import tempfile

    from triton import knobs

    nvdisasm = knobs.nvidia.nvdisasm.path
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([nvdisasm, "-c", f.name], check=True, capture_output=True, text=True).stdout


def compile_for_hopper(kernel, args: tuple, kwargs: dict):
    """triton.compile `kernel` bound to (args, kwargs) as a launch would, for sm_90a, without a GPU.
    Returns (compiled kernel, ptxas log)."""
    if not hasattr(kernel, "params"):
        raise RuntimeError(f"{kernel.fn.__name__} is an interpreted function: run with TRITON_INTERPRET unset "
                           f"(it was set when the kernels were imported)")
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    log = io.StringIO()
    with knobs.compilation.scope(), knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        knobs.compilation.always_compile = True     # a cache hit would skip ptxas and its log
        knobs.nvidia.dump_ptxas_log = True
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
    return compiled, log.getvalue()


def _stand_in(shape, dtype) -> torch.Tensor:
    """A tensor of `shape` over one element (the launcher reads shapes, the binder dtypes and the
    pointer's alignment; nothing is read or written)."""
    return torch.empty(1, dtype=dtype).expand(*shape)


def launches(kernel_name: str, dims: dict, cfg) -> list[tuple]:
    """The (kernel, grid, args, kwargs) launches the op's launcher makes for this problem and config."""
    from dsv4_compile.kernels.sparse_attention_cached.config import entry_layout

    # the launcher's module (the package's name `sparse_attention` is the public function)
    module = importlib.import_module("dsv4_compile.kernels.sparse_attention.sparse_attention")

    B, S, H, D, N, K = (dims[k] for k in ("B", "S", "H", "D", "N", "K"))
    dtype = getattr(torch, dims["dtype"])
    q, out = _stand_in((B, S, H, D), dtype), _stand_in((B, S, H, D), dtype)
    idx, sink = _stand_in((B, S, K), torch.int32), _stand_in((H,), torch.float32)
    calls = []
    with mock.patch.object(module, "launch", lambda kernel, grid, *a, **kw: calls.append((kernel, grid, a, kw))):
        if kernel_name == "sparse_attention_cached":
            nope, entry = entry_layout(D, dims["rope_dim"])
            cache = _stand_in((B, N, entry), torch.uint8)
            module.launch_sparse_attention(q, cache, sink, idx, out, D ** -0.5, cfg, N=N, kv_fp8=True, nope=nope,
                                           entry_bytes=entry)
        else:
            module.launch_sparse_attention(q, _stand_in((B, N, D), dtype), sink, idx, out, D ** -0.5, cfg, N=N)
    return calls


# quantized weights' scales: as shipped (and as the model holds them), as base models ship them
SCALES = {"e8m0": torch.float8_e8m0fnu, "f32": torch.float32}


def moe_launches(dims: dict, cfg, weight_format: str, act: str = "x", scales_dtype: str = "e8m0") -> list[tuple]:
    """The (kernel, grid, args, kwargs) launches of torch.ops.dsv4.moe_experts' kernels (at decode sizes the
    one-program routing layout, then gate/up and down; the slot sum has no loop worth reporting) for T =
    dims["T"] tokens routed at random (a fixed seed), quantized weights' scales in SCALES[scales_dtype]."""
    module = importlib.import_module("dsv4_compile.kernels.moe_experts.moe_experts")
    T, k, E, D, I = (dims[n] for n in ("T", "k", "E", "D", "I"))
    if weight_format not in module.WEIGHT_FORMATS:
        raise ValueError(f"weight format {weight_format!r}; accepted: {', '.join(module.WEIGHT_FORMATS)}")
    x = _stand_in((T, D), getattr(torch, dims["dtype"]))
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(torch.int32)  # the layout is real
    shapes = ((E, I, D), (E, D, I), (E, I, D))                                                 # w1, w2, w3
    if weight_format == "float":
        ws, scales = [_stand_in(s, x.dtype) for s in shapes], None
    elif weight_format == "fp8":
        ws = [_stand_in(s, torch.float8_e4m3fn) for s in shapes]
        scales = tuple(_stand_in((e, -(-r // 128), -(-c // 128)), SCALES[scales_dtype]) for e, r, c in shapes)
    else:
        ws = [_stand_in((e, r, c // 2), torch.uint8) for e, r, c in shapes]
        scales = tuple(_stand_in((e, r, c // 32), SCALES[scales_dtype]) for e, r, c in shapes)
    calls = []
    # _check skipped: the stand-ins are one element expanded (not contiguous), their shapes right by construction;
    # W8A8's and W4A8's roundings (kernels/fp8_quantize: x's, and the activation's with act_round "pass")
    # stood in by their outputs' shapes
    def quantized(t, *_):
        codes = _stand_in(tuple(t.shape), torch.float8_e4m3fn)
        return codes, _stand_in((*t.shape[:-1], t.shape[-1] // 128), torch.float32)

    def rounded(t, block, pow2, out_dtype=None):
        return _stand_in(tuple(t.shape), out_dtype or t.dtype)

    record = lambda kernel, grid, *a, **kw: calls.append((kernel, grid, a, kw))  # noqa: E731
    with mock.patch.object(module, "launch", record), mock.patch.object(module.one_program_layout, "launch", record), \
            mock.patch.object(module, "_check", lambda *_: (E, I, D)), \
            mock.patch.object(module, "fp8_quantize", quantized), mock.patch.object(module, "fp8_round", rounded):
        module.moe_experts(x, ids, torch.ones(T, k), *ws, 10.0, cfg, weight_format, scales, act)
    return [c for c in calls if c[0].fn.__name__ != "_sum_slots_kernel"]


def hc_pre_launches(dims: dict, cfg) -> list[tuple]:
    """The (kernel, grid, args, kwargs) launches of kernels/hc_sinkhorn's hc_pre for x [tokens, n, D] (split:
    the mixes sweep, then the sums / Sinkhorn / stream sum; else the one kernel)."""
    module = importlib.import_module("dsv4_compile.kernels.hc_sinkhorn.hc_sinkhorn")
    T, n, D = dims["tokens"], dims["n"], dims["D"]
    x = _stand_in((T, n, D), getattr(torch, dims["dtype"]))
    fn, scale, base = (_stand_in(s, torch.float32) for s in (((2 + n) * n, n * D), (3,), ((2 + n) * n,)))
    calls = []
    # check_tensor skipped: the stand-ins are one element expanded (not contiguous)
    with mock.patch.object(module, "launch", lambda kernel, grid, *a, **kw: calls.append((kernel, grid, a, kw))), \
            mock.patch.object(module, "check_tensor", lambda *a, **kw: None):
        module.hc_pre(x, fn, scale, base, dims["iters"], 1e-6, 1e-6, cfg)
    return calls


def float32_linear_launches(dims: dict, cfg) -> list[tuple]:
    """The (kernel, grid, args, kwargs) launch of kernels/float32_linear for x [m, k] bf16 against W [n, k]."""
    module = importlib.import_module("dsv4_compile.kernels.float32_linear.float32_linear")
    x, w = _stand_in((dims["m"], dims["k"]), torch.bfloat16), _stand_in((dims["n"], dims["k"]), torch.float32)
    calls = []
    # check_tensor skipped: the stand-ins are one element expanded (not contiguous)
    with mock.patch.object(module, "launch", lambda kernel, grid, *a, **kw: calls.append((kernel, grid, a, kw))), \
            mock.patch.object(module, "check_tensor", lambda *a, **kw: None):
        module.float32_linear(x, w, cfg)
    return calls


def fp8_linear_launches(dims: dict, cfg) -> list[tuple]:
    """The launches of kernels/fp8_linear for x [m, k] bf16 against FP8 W [n, k] (the tuning space's wo_b):
    the activation quantization pass (quant "separate"), then the GEMM, the tensor-core tile or the GEMV."""
    module = importlib.import_module("dsv4_compile.kernels.fp8_linear.fp8_linear")
    m, n, k = dims["m"], dims["n"], dims["k"]
    x, w = _stand_in((m, k), torch.bfloat16), _stand_in((n, k), torch.float8_e4m3fn)
    scale = _stand_in((-(-n // 128), k // 128), torch.float32)
    calls = []
    # check_tensor skipped: the stand-ins are one element expanded (not contiguous)
    with mock.patch.object(module, "launch", lambda kernel, grid, *a, **kw: calls.append((kernel, grid, a, kw))), \
            mock.patch.object(module, "check_tensor", lambda *a, **kw: None):
        module.fp8_linear(x, w, scale, cfg)
    return calls


def report(kernel_name: str, configs: list[str], preset: str = "flash", context: int = 8192, batch: int | None = None,
           gpu: str = "H200", combine: bool = False, weight_format: str = "mxfp4", act: str = "x", scales: str = "e8m0",
           log=print) -> list[Row]:
    """Compile each config of `kernel_name` at the preset's shapes; one Row per compiled kernel (the
    main kernel; with `combine`, the split-K combine kernel too; moe_experts: its gate/up and down
    kernels in `weight_format` and `act` ("fp8": W8A8), at the decode regime's T = batch tokens; float32_linear:
    M = batch rows against the CSA compressor's wkv, the tuning space's problem; hc_pre: a decode step's batch tokens
    over its decode default; its loop the MMA one, else, below 16 tokens a block, the FMA one)."""
    from dsv4_compile.model.config import ModelConfig
    from dsv4_compile.tuning.spaces import get_space

    if kernel_name not in KERNELS:
        raise ValueError(f"kernel {kernel_name!r}; accepted: {', '.join(KERNELS)}")
    decode = kernel_name != "sparse_attention"
    phase = "decode" if decode else "prefill"
    batch = batch if batch is not None else (64 if decode else 1)
    dims = get_space(kernel_name).make_problem(ModelConfig.load(preset), context, batch, phase).dims
    if kernel_name == "float32_linear":
        from dsv4_compile.kernels.float32_linear.config import Float32LinearConfig, default_config as f32_default
        config_class, base = Float32LinearConfig, f32_default(gpu, dims["m"], dims["n"], dims["k"])
    elif kernel_name == "fp8_linear":
        from dsv4_compile.kernels.fp8_linear.config import Fp8LinearConfig, default_config as fp8_default
        config_class, base = Fp8LinearConfig, fp8_default(gpu, dims["m"], dims["n"], dims["k"])
    elif kernel_name == "hc_pre":
        from dsv4_compile.kernels.hc_sinkhorn.config import HcConfig, decode_config as hc_decode_default
        config_class, base = HcConfig, hc_decode_default(gpu)
    elif kernel_name == "moe_experts":
        from dsv4_compile.kernels.moe_experts.config import MoeExpertsConfig, default_config as moe_default
        config_class, base = MoeExpertsConfig, moe_default(gpu, dims["T"] * dims["k"], weight_format, act)
    else:
        from dsv4_compile.kernels.sparse_attention.config import (SparseAttentionConfig, decode_default_config,
                                                                  default_config)
        config_class = SparseAttentionConfig
        base = decode_default_config(gpu) if decode else default_config(gpu, dims["D"])
    rows = []
    for text in configs:
        cfg = config_class.from_str(text, base)
        if kernel_name == "moe_experts":
            calls = moe_launches(dims, cfg, weight_format, act, scales)
        elif kernel_name == "float32_linear":
            calls = float32_linear_launches(dims, cfg)
        elif kernel_name == "fp8_linear":
            calls = [c for c in fp8_linear_launches(dims, cfg) if c[0].fn.__name__ != "_quantize_kernel"]
        elif kernel_name == "hc_pre":
            calls = hc_pre_launches(dims, cfg)
        else:
            calls = launches(kernel_name, dims, cfg)
        for kernel, grid, args, kwargs in calls:
            name = kernel.fn.__name__
            if "combine" in name and not combine:
                continue
            try:
                compiled, ptxas_log = compile_for_hopper(kernel, args, kwargs)
            except Exception as err:  # noqa: BLE001 (a config that does not compile is a result too)
                log(f"{text or 'default'} {name}: does not compile: {str(err).splitlines()[0]}")
                continue
            regs, spill_st, spill_ld = parse_ptxas(ptxas_log)
            warps, smem = compiled.metadata.num_warps, compiled.metadata.shared
            n_cta, limit = ctas_per_sm(regs, warps, smem)
            sass = disassemble(compiled.asm["cubin"])
            body = main_loop(sass, modifiers=True)
            if not body and kernel_name in ("hc_pre", "fp8_linear"):  # FFMA loops: hc_pre's sweep below 16
                body = main_loop(sass, modifiers=True, markers=("FFMA",))    # tokens a block, fp8_linear's GEMV
            loop = len(body)
            mma, n_mma = mma_summary(body)
            per_weight = 0.0
            if name in ("_gate_up_kernel", "_down_kernel"):  # BLOCK_K x BLOCK_N weights an iteration (w1 and w3
                # for gate/up, but a loop each on the FP8 tensor cores: W8A8, W4A8 with w4a8_mma "fp8"; not "fp8_swap")
                both = name == "_gate_up_kernel" and not (kwargs.get("ACT_FP8") and kwargs.get("FP8_MMA")
                                                          and not kwargs.get("SWAP"))
                weights = kwargs["BLOCK_K"] * kwargs["BLOCK_N"] * (2 if both else 1)
                per_weight = loop / (weights / (32 * warps))
            elif name in ("_fp8_linear_kernel", "_fp8_gemv_kernel"):  # W's [BLOCK_N, 128 or BLOCK_K] an iteration
                per_weight = loop / (kwargs["BLOCK_N"] * kwargs.get("BLOCK_K", 128) / (32 * warps))
            converts = compiled.asm["ttgir"].count("ttg.convert_layout")
            rows.append(Row(kernel_name, name, cfg.to_str(), "x".join(map(str, grid)), warps, regs, spill_st, spill_ld,
                            smem, n_cta, limit, loop, round(per_weight, 2), converts, mma,
                            round(loop / n_mma, 2) if n_mma else 0.0, opcode_mix(body), loop_copies(body)))
            log(format_row(rows[-1]))
    return rows


HEADER = ("| config | kernel | grid | warps | regs/thread | spill st / ld (B) | shared (KB) | CTAs/SM (bound) "
          "| loop instr | instr / weight | convert_layout | loop MMAs | instr / MMA | loop copies |"
          "\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def format_row(r: Row) -> str:
    return (f"| {r.config} | {r.function} | {r.grid} | {r.warps} | {r.regs} | {r.spill_stores} / {r.spill_loads} | "
            f"{r.smem / 1024:.1f} | {r.ctas_per_sm} ({r.limit}) | {r.loop_instr} | {r.instr_per_weight or '-'} | "
            f"{r.convert_layouts} | {r.mma or '-'} | {r.instr_per_mma or '-'} | {r.loop_copies or '-'} |")


def write_csv(rows: list[Row], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[fl.name for fl in dataclasses.fields(Row)])
        w.writeheader()
        for r in rows:
            w.writerow(dataclasses.asdict(r))


def main(argv=None) -> int:
    from dsv4_compile.kernels.moe_experts.moe_experts import ACTS, WEIGHT_FORMATS
    from dsv4_compile.model.context import parse_contexts

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", default="sparse_attention", choices=KERNELS)
    parser.add_argument("--configs", default="",
                        help="';'-separated config strings over the GPU's default (e.g. 'block_k=64;split_d=2'); "
                             "'' = the default")
    parser.add_argument("--preset", default="flash", help="model preset whose heads / head dim are compiled for")
    parser.add_argument("--context", default="8k", help="context length (sets N and, for prefill, S)")
    parser.add_argument("--batch", type=int, default=None, help="default: 1 prefill, 64 decode")
    parser.add_argument("--gpu", default="H200", help="whose default config the config strings change")
    parser.add_argument("--combine", action="store_true", help="also report the split-K combine kernel")
    parser.add_argument("--weight-format", default="mxfp4", choices=WEIGHT_FORMATS, help="moe_experts' weights")
    parser.add_argument("--act", default="x", choices=ACTS,
                        help="moe_experts' activations: x (in x's dtype) or fp8 (W8A8 / W4A8: the moe_experts_fp8_w8a8 / _mxfp4_w4a8 op)")
    parser.add_argument("--scales", default="e8m0", choices=list(SCALES),
                        help="moe_experts' weight scales: e8m0 (as shipped and held) or f32 (base models)")
    parser.add_argument("--csv", default=None, help="write the rows to this CSV file")
    args = parser.parse_args(argv)
    configs = [c.strip() for c in args.configs.split(";")] if args.configs else [""]
    import triton

    print(f"triton {triton.__version__} (its own ptxas and nvdisasm), sm_90a; the GPU machines run triton "
          f"{DEVICE_TRITON}{'' if triton.__version__.startswith(DEVICE_TRITON) else ': layouts can differ'}\n")
    print(HEADER)
    rows = report(args.kernel, configs, args.preset, parse_contexts(args.context)[0], args.batch, args.gpu,
                  args.combine, args.weight_format, args.act, args.scales)
    if args.csv:
        write_csv(rows, args.csv)
    return 0 if len(rows) >= len(configs) else 1


if __name__ == "__main__":
    sys.exit(main())
