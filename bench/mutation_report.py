"""Which arguments of each kernel launch torch's Triton mutation analysis counts as written (offline).

    python bench/mutation_report.py [--out bench/results/H200/mutation_report.md]

No GPU needed. When export or torch.compile traces a kernel (`wrap_triton`), torch reads the kernel's
TTIR and marks every argument a store's address can be traced back to as written; functionalization
then clones each such argument that it cannot let the kernel write in place (an input the graph still
uses afterwards: the shared positions, a KV cache, a weight). An argument the kernel only reads but
that is counted as written costs a copy per call in the exported engines (and, with torch 2.11, the
clone of some dynamic views fails outright: pytorch issue 181735, kernels/_common.placeholder).

The analysis walks a store's address back through every op except loads; a `@triton.jit` helper
call is one op, so a store address computed from a helper's result marks every argument of that
call as written (the helper only loaded them). This report runs each op's own launcher on small CPU
tensors with `launch` intercepted, asks torch's analysis (`identify_accessed_tensors`; torch 2.11's
`identify_mutated_tensors`) about each launch for a Hopper target (TTIR only: no GPU, no ptxas), and
lists per kernel the arguments counted as written that are the op's inputs (false positives: the op
never writes its inputs) and those it writes (its outputs and scratch).

torch 2.11 (the GPU machines') builds that TTIR with every integer argument a constant, torch 2.13 only
the constexpr ones. A kernel that does not compile so (e.g. `tl.multiple_of` on an expression of
integer arguments) is counted by torch 2.11 as writing every argument, with only a logged warning:
export then clones all its inputs on every call (weights included). The last column builds each launch
the torch 2.11 way on any torch ("ok", or the error).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
import os
import sys
from unittest import mock

os.environ.pop("TRITON_INTERPRET", None)  # the kernels' real (GPU) code paths, not the interpreter's

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from dsv4_compile.kernels import _common  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
RUN_ON = "H200"  # the launchers' defaults are the H200's (configs given explicitly where they differ)


def _cases() -> dict:
    """op name -> (function, args): small inputs that reach each launch of the op's GPU path."""
    from dsv4_compile.kernels.compress_kv import compress_kv
    from dsv4_compile.kernels.float32_linear import float32_linear
    from dsv4_compile.kernels.fp4_quantize import fp4_dequantize, fp4_quantize
    from dsv4_compile.kernels.fp8_linear import fp8_linear
    from dsv4_compile.kernels.fp8_quantize import fp8_dequantize, fp8_quantize, fp8_round
    from dsv4_compile.kernels.hc_sinkhorn import hc_pre
    from dsv4_compile.kernels.indexer_topk import indexer_topk
    from dsv4_compile.kernels.indexer_topk_cached import indexer_topk_cached
    from dsv4_compile.model.kv_layout import indexer_entry_bytes
    from dsv4_compile.kernels.moe_experts import moe_experts
    from dsv4_compile.kernels.newton_schulz import newton_schulz
    from dsv4_compile.kernels.sparse_attention import sparse_attention
    from dsv4_compile.kernels.sparse_attention_cached import sparse_attention_cached
    from dsv4_compile.kernels.sparse_attention_cached.config import entry_layout

    g = torch.Generator().manual_seed(0)

    def r(*shape, dtype=torch.bfloat16):
        return torch.randn(shape, generator=g).to(dtype)

    B, S, H, D, N = 1, 64, 8, 128, 16
    q, w, keys = r(B, S, H, D), r(B, S, H, dtype=torch.float32), r(B, N, D)
    pos = torch.arange(S).view(1, S)
    idx = torch.randint(-1, 32, (B, S, 24), generator=g, dtype=torch.int32)
    E, T, k = 8, 16, 2
    ids = torch.randint(0, E, (T, k), generator=g, dtype=torch.int32)
    w8 = r(256, 256, dtype=torch.float32).to(torch.float8_e4m3fn)
    cache = torch.randint(0, 255, (B, 32, entry_layout(128, 64)[1]), generator=g, dtype=torch.uint8)
    decode = (r(B, 1, 16, 128), cache, r(16, dtype=torch.float32), idx[:, :1], 0.1, 64)
    index_cache = {fmt: torch.randint(0, 255, (B, N, indexer_entry_bytes(D, fmt)), generator=g, dtype=torch.uint8)
                   for fmt in ("fp4", "fp8")}
    index_decode = (q[:, :1].contiguous(), w[:, :1].contiguous())
    cases = {
        "indexer_topk (threshold)": (indexer_topk, (q, w, keys, pos, 4, 8, "block_s=4,block_n=64")),
        "indexer_topk (radix)": (indexer_topk, (q, w, keys, pos, 4, 8, "block_s=4,block_n=64,selection=radix")),
        "indexer_topk (fp8 scores)": (indexer_topk, (q, w, keys, pos, 4, 8, "block_s=4,block_n=64,score_mma=fp8")),
        "indexer_topk_cached (threshold, fp4)": (indexer_topk_cached, (*index_decode, index_cache["fp4"], pos[:, -1:],
                                                                       4, 8, "fp4", "selection=threshold,block_n=64")),
        "indexer_topk_cached (radix, fp8)": (indexer_topk_cached, (*index_decode, index_cache["fp8"], pos[:, -1:], 4,
                                                                   8, "fp8", "block_n=64")),
        "sparse_attention": (sparse_attention, (r(B, S, 16, 128), r(B, 32, 128), r(16, dtype=torch.float32), idx, 0.1,
                                                "block_h=16,block_k=16")),
        "sparse_attention_cached (tile, split-K)": (sparse_attention_cached, (*decode, "block_h=16,block_k=16,num_splits=2")),
        "sparse_attention_cached (chunks)": (sparse_attention_cached, (*decode, "block_h=16,block_k=16,dequant=chunks")),
        "hc_pre (decode split)": (hc_pre, (r(B, 1, 4, 128), r(24, 512, dtype=torch.float32), r(3, dtype=torch.float32),
                                           r(24, dtype=torch.float32), 20, 1e-6, 1e-6, "num_splits=4")),
        "hc_pre": (hc_pre, (r(B, S, 4, 128), r(24, 512, dtype=torch.float32), r(3, dtype=torch.float32),
                            r(24, dtype=torch.float32), 20, 1e-6, 1e-6)),
        "moe_experts": (moe_experts, (r(T, 128), ids, r(T, k, dtype=torch.float32), r(E, 64, 128), r(E, 128, 64),
                                      r(E, 64, 128), 10.0, "block_m=16")),
        "moe_experts (W8A8)": (moe_experts, (r(T, 128), ids, r(T, k, dtype=torch.float32),
                                             *(r(E, 128, 128, dtype=torch.float32).to(torch.float8_e4m3fn) for _ in range(3)),
                                             10.0, "block_m=16,block_n=128", "fp8",
                                             tuple(torch.ones(E, 1, 1) for _ in range(3)), "fp8")),
        "moe_experts (MXFP4)": (moe_experts, (r(T, 128), ids, r(T, k, dtype=torch.float32),
                                              *(torch.randint(-128, 128, (E, 128, 64), generator=g, dtype=torch.int8)
                                                for _ in range(3)),
                                              10.0, "block_m=16,block_n=128", "mxfp4",
                                              tuple(torch.ones(E, 128, 4) for _ in range(3)))),
        "moe_experts (W4A8)": (moe_experts, (r(T, 128), ids, r(T, k, dtype=torch.float32),
                                             *(torch.randint(-128, 128, (E, 128, 64), generator=g, dtype=torch.int8)
                                               for _ in range(3)),
                                             10.0, "block_m=16,block_n=128", "mxfp4",
                                             tuple(torch.ones(E, 128, 4) for _ in range(3)), "fp8")),
        "fp8_linear": (fp8_linear, (r(4, 256), w8, torch.ones(2, 2), "gemm=triton,quant=fused")),
        "fp8_linear (separate quantization)": (fp8_linear, (r(4, 256), w8, torch.ones(2, 2),
                                                            "gemm=triton,quant=separate")),
        "fp8_linear (GEMV)": (fp8_linear, (r(4, 256), w8, torch.ones(2, 2), "gemm=gemv,block_n=16,block_k=256")),
        "float32_linear (split-K)": (float32_linear, (r(4, 256), r(64, 256, dtype=torch.float32), "swap_ab=yes,split_k=2")),
        "compress_kv (overlap, fp8)": (compress_kv, (r(B, 16, 256, dtype=torch.float32),
                                                     r(B, 16, 256, dtype=torch.float32),
                                                     r(4, 256, dtype=torch.float32), r(128, dtype=torch.float32),
                                                     r(4, 32, dtype=torch.float32), r(4, 32, dtype=torch.float32),
                                                     4, True, 1e-6, "fp8")),
        "compress_kv (hadamard_fp4)": (compress_kv, (r(B, 16, 128, dtype=torch.float32),
                                                     r(B, 16, 128, dtype=torch.float32),
                                                     r(4, 128, dtype=torch.float32), r(128, dtype=torch.float32),
                                                     r(4, 32, dtype=torch.float32), r(4, 32, dtype=torch.float32),
                                                     4, False, 1e-6, "hadamard_fp4")),
        "fp8_quantize": (fp8_quantize, (r(4, 256), 128, True)),
        "fp8_round": (fp8_round, (r(4, 256), 128, True)),
        "fp8_dequantize": (fp8_dequantize, (w8[:4], torch.ones(4, 2), 128)),
        "fp4_quantize": (fp4_quantize, (r(4, 256), 32, True)),
        "fp4_dequantize": (fp4_dequantize, (torch.randint(0, 255, (4, 128), generator=g, dtype=torch.uint8),
                                            torch.ones(4, 8), 32)),
        "newton_schulz": (newton_schulz, (r(2, 64, 128, dtype=torch.float32), [3.4445, -4.7750, 2.0315])),
    }
    return cases


def _written(kernel, kwargs: dict) -> list[str]:
    import torch._higher_order_ops.triton_kernel_wrap as wrap

    if hasattr(wrap, "identify_accessed_tensors"):   # torch 2.13: reads and writes
        names = [d.name for d in wrap.identify_accessed_tensors(kernel, kwargs, {}).read_writes.writes]
    else:                                             # torch 2.11 (the GPU machines'): the written ones
        names = wrap.identify_mutated_tensors(kernel, kwargs, {})
    return sorted(n for n in names if isinstance(kwargs.get(n), torch.Tensor))


def _built_as_torch_2_11(kernel, kwargs: dict) -> str:
    """"ok" if the kernel's TTIR builds with every non-tensor argument a constant, as torch 2.11's analysis
    builds it (its params marked constexpr for torch's own generate_ttir), else the error's last line."""
    import torch._higher_order_ops.triton_kernel_wrap as wrap

    params = [copy.copy(p) for p in kernel.params]
    for p in params:
        if not isinstance(kwargs.get(p.name), torch.Tensor):
            p.__dict__["is_constexpr"] = True          # KernelParam.is_constexpr is a cached_property
    try:
        with mock.patch.object(kernel, "params", params):
            wrap.generate_ttir(kernel, kwargs, {})
    except Exception as err:  # noqa: BLE001 (a kernel that does not build is the finding)
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        return (lines[-1] if lines else type(err).__name__).replace("|", "/")
    return "ok"


def report() -> list[tuple[str, str, list[str], list[str], str]]:
    """(op, kernel, inputs counted as written, other arguments counted as written, built as torch 2.11
    builds it) per launch."""
    rows = []
    triton.runtime.driver.set_active(mock.MagicMock(get_current_target=lambda: HOPPER))
    for op, (fn, args) in _cases().items():
        launches = []
        stand_ins = {"launch": lambda kernel, grid, *a, **kw: launches.append((kernel, a, kw)),
                     "device_name": lambda device=None: RUN_ON, "sm_count": lambda device=None: 132}
        with contextlib.ExitStack() as stack:
            for name, module in list(sys.modules.items()):
                if name.startswith("dsv4_compile.kernels.") and module is not _common:
                    for attr, stand_in in stand_ins.items():
                        if getattr(module, attr, None) is getattr(_common, attr):
                            stack.enter_context(mock.patch.object(module, attr, stand_in))
            # _common's own checks and config lookups: CPU tensors allowed, the H200's defaults
            stack.enter_context(mock.patch.object(_common, "INTERPRET", True))
            stack.enter_context(mock.patch.object(_common, "device_name", stand_ins["device_name"]))
            fn(*args)
        inputs = {t.untyped_storage().data_ptr() for t in args if isinstance(t, torch.Tensor) and t.numel()}
        for kernel, a, kw in launches:
            names = list(inspect.signature(kernel.fn).parameters)
            kwargs = {**dict(zip(names, a)), **{n: v for n, v in kw.items() if n not in ("num_warps", "num_stages")}}
            written = _written(kernel, kwargs)
            own = [n for n in written if kwargs[n].untyped_storage().data_ptr() in inputs]
            rows.append((op, kernel.fn.__name__, own, [n for n in written if n not in own],
                         _built_as_torch_2_11(kernel, kwargs)))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the table as markdown here (atomically)")
    args = parser.parse_args()
    rows = report()
    lines = ["| op | kernel | op inputs counted as written (false) | written arguments (outputs, scratch) "
             "| TTIR with integer arguments as constants (torch 2.11's analysis) |",
             "|---|---|---|---|---|"]
    lines += [f"| {op} | `{k}` | {', '.join(own) or '-'} | {', '.join(rest) or '-'} | {built} |"
              for op, k, own, rest, built in rows]
    text = "\n".join(lines)
    print(text)
    if args.out:
        from dsv4_compile.files import write_text_atomic
        write_text_atomic(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
