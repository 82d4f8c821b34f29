"""One decode engine, two kernel configs chosen by its batch at run time: a torch.cond on the symbolic
row count around two calls of the FP8 linear kernel op (a few-rows Triton config for <= 16 rows, the
many-rows one above), exported with the rows dynamic in [1, 64] and compiled by AOTInductor. A probe for
whether this torch's export and AOTInductor take a size-predicated cond around our kernel ops (a Triton
op on a GPU, the interpreter's custom op on the CPU) and run the branch of each batch: what a bound-64
decode engine needs to run batch 1 on batch-1 configs (bench/results/H100/session28_gpu_runs.md: the
FP8 linears' cuBLAS choice for 17..64 rows costs ~6 us a call at one row).

    python bench/probe_cond_dispatch.py     # one line per step; run it under each torch in use

Results: bench/results/cpu/cond_dispatch.md.
"""
from __future__ import annotations

import os
import tempfile
import time

import torch

import dsv4_compile.model  # noqa: F401  (registers torch.ops.dsv4.*)
from dsv4_compile.kernels._common import INTERPRET
from dsv4_compile.kernels.fp8_linear import fp8_linear  # noqa: F401  (registers torch.ops.dsv4_triton.fp8_linear)
from dsv4_compile.model.weight_formats import e8m0_to_float, quantize_fp8_weight

DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
FEW_ROWS = "gemm=triton,swap_ab=yes,block_m=16,block_n=32,quant=fused,split_k=4"
MANY_ROWS = "gemm=cublas,block_m=16,block_n=32,quant=fused"   # the Triton GEMM where cuBLAS is not offered


class ByRows(torch.nn.Module):
    def __init__(self, w, s):
        super().__init__()
        self.register_buffer("w", w)
        self.register_buffer("s", s)

    def forward(self, x):  # x [M, K]; the many-rows branch negated, so that the output tells which one ran
        return torch.cond(x.shape[0] <= 16,
                          lambda x, w, s: torch.ops.dsv4_triton.fp8_linear(x, w, s, FEW_ROWS),
                          lambda x, w, s: -torch.ops.dsv4_triton.fp8_linear(x, w, s, MANY_ROWS), (x, self.w, self.s))


def main() -> int:
    print(f"torch {torch.__version__}, {DEVICE}{' (Triton interpreter)' if INTERPRET else ''}", flush=True)
    g = torch.Generator().manual_seed(0)
    codes, scale = quantize_fp8_weight(torch.randn(96, 512, generator=g))
    model = ByRows(codes.to(DEVICE), e8m0_to_float(scale).to(DEVICE))
    rows = torch.export.Dim("rows", min=1, max=64)
    start = time.time()
    try:
        program = torch.export.export(model, (torch.randn(4, 512, device=DEVICE),), dynamic_shapes=({0: rows},))
    except Exception as exc:  # noqa: BLE001 (the probe's answer)
        print(f"export: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        return 1
    conds = sum(node.target is torch.ops.higher_order.cond for node in program.graph.nodes)
    print(f"export: {time.time() - start:.1f} s, {conds} cond node(s)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.time()
        try:
            path = torch._inductor.aoti_compile_and_package(program, package_path=os.path.join(tmp, "p.pt2"))
            engine = torch._inductor.aoti_load_package(path)
        except Exception as exc:  # noqa: BLE001
            print(f"aoti: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            return 1
        print(f"aoti: {time.time() - start:.1f} s", flush=True)
        for m in (1, 16, 17, 64):
            x = torch.randn(m, 512, generator=g).to(DEVICE)
            got, ref = engine(x), torch.ops.dsv4.fp8_linear(x, model.w, model.s)
            branch = "few" if (got * ref).sum() > 0 else "many"
            err = (((1 if branch == "few" else -1) * got - ref).norm() / ref.norm()).item()
            print(f"rows {m}: the {branch}-rows branch ran (want {'few' if m <= 16 else 'many'}), "
                  f"rel err vs the plain op {err:.1e}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
