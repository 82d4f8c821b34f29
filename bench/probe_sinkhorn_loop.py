"""The mHC Sinkhorn rounds as one loop (torch's while_loop) instead of unrolled, in an exported graph:
nodes, AOTInductor compile time, ONNX export, and whether the loop gives the unrolled rounds' bits
eagerly. The plain op unrolls its 20 rounds: about a quarter of the tiny decode engine's graph (9 hc_pre
calls), which AOTInductor lowers one node at a time. A probe for whether this torch's export routes
(AOTInductor, torch.onnx) take the loop, which the CPU engines' export uses (passes/decompose.py).

    python bench/probe_sinkhorn_loop.py     # prints one line per form; run it under each torch in use

Results: bench/results/cpu/sinkhorn_loop.md.
"""
from __future__ import annotations

import os
import tempfile
import time

import torch

from dsv4_compile.model.ops import _sinkhorn_plain

ITERS, EPS, CALLS = 20, 1e-6, 9  # the tiny preset's rounds and hc_eps; hc_pre calls of its decode engine


def looped(logits: torch.Tensor, iters: int = ITERS, eps: float = EPS) -> torch.Tensor:
    """_sinkhorn_plain with its iters - 1 row/column rounds as one while_loop (the CPU engines' form)."""
    return _sinkhorn_plain(logits, iters, eps, as_loop=True)


class Chain(torch.nn.Module):
    """CALLS Sinkhorn calls in a row, as the engine's layers make them."""

    def __init__(self, sinkhorn):
        super().__init__()
        self.sinkhorn = sinkhorn

    def forward(self, x):  # x [B, S, n, n]
        out = x
        for _ in range(CALLS):
            out = self.sinkhorn(out) + x
        return out


def main() -> None:
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    unrolled = Chain(lambda t: _sinkhorn_plain(t, ITERS, EPS))
    same = torch.equal(Chain(looped)(x), unrolled(x))
    print(f"torch {torch.__version__}; eager loop == unrolled bit for bit: {same}")
    for name, module in (("unrolled", unrolled), ("while_loop", Chain(looped))):
        program = torch.export.export(module, (x,))
        nodes = sum(node.op == "call_function" for node in program.graph.nodes)
        start = time.perf_counter()
        try:
            path = os.path.join(tempfile.mkdtemp(), "m.pt2")
            package = torch._inductor.aoti_compile_and_package(program, package_path=path)
            out = torch._inductor.aoti_load_package(package)(x)
            diff = float((out - module(x)).abs().max())
            aoti = f"AOTInductor {time.perf_counter() - start:.1f} s, max |diff| vs eager {diff:.1e}"
        except Exception as exc:  # noqa: BLE001 (what this torch cannot do is the probe's answer)
            aoti = f"AOTInductor failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        try:
            torch.onnx.export(program, (x,), dynamo=True, verbose=False)
            onnx = "ONNX exported"
        except Exception as exc:  # noqa: BLE001
            onnx = f"ONNX failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        print(f"{name:10s}: {nodes} nodes; {aoti}; {onnx}", flush=True)


if __name__ == "__main__":
    main()
