"""The tests' comparison helpers: assertions over the package's one comparison rule and tolerances
(dsv4_compile/metrics.py, which also states the tolerance per dtype and why)."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dsv4_compile.metrics import REL_RMS_TOL, few_flips, mismatch, rel_rms, sqnr_db  # noqa: F401  (re-exported)


def wide_tiny(**changes):
    """The tiny preset with 128-wide projections (and `changes`): as shipped, its wq_a, wq_b, wkv, wo_b,
    indexer wq_b and shared experts are FP8 linears (K = 128, one scale block), which tiny's are not."""
    from dsv4_compile.model import ModelConfig

    return ModelConfig.load("tiny").replace(dim=128, q_lora_rank=128, head_dim=128, rope_head_dim=64,
                                            o_lora_rank=128, index_head_dim=64, **changes)


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, tol: float | None = None) -> None:
    """Assert shapes match, NaN (and Inf) sit in the same places, and the relative RMS error is within
    `tol` (default: REL_RMS_TOL of `out`'s dtype)."""
    reason = mismatch(name, ref, out, tol)
    assert reason is None, reason


def assert_few_flips(name: str, ref: torch.Tensor, out: torch.Tensor, frac: float = 0.01, min_allowed: int = 4,
                     step: float = 0.5) -> None:
    """Assert `out` (float32 values of codes) equals `ref` but for a few one-code-step flips (metrics.few_flips)."""
    assert out.dtype == torch.float32, f"{name}: {out.dtype}; expected float32 code values"
    reason = few_flips(name, ref.cpu(), out.cpu(), frac, min_allowed, step)
    assert reason is None, reason


def assert_bits_equal(name: str, ref: torch.Tensor, out: torch.Tensor) -> None:
    """Bit-exact tensors: equal values and signs (NaN matched by position), or equal integers; FP8
    codes (no signbit or NaN kernels on CPU) byte for byte."""
    assert ref.shape == out.shape and ref.dtype == out.dtype, f"{name}: {ref.shape}/{ref.dtype} vs {out.shape}/{out.dtype}"
    if ref.is_floating_point() and ref.element_size() == 1:
        differ = ref.view(torch.uint8) != out.view(torch.uint8)
    elif ref.is_floating_point():
        ref_nan, out_nan = torch.isnan(ref), torch.isnan(out)
        assert torch.equal(ref_nan, out_nan), f"{name}: NaN positions differ"
        differ = ((ref != out) | (torch.signbit(ref) != torch.signbit(out))) & ~ref_nan
    else:
        differ = ref != out
    assert not differ.any(), f"{name}: {int(differ.sum())} of {ref.numel()} values differ"


def rerun_with_libstdcxx_preload(request) -> bool:
    """A test that loads a CUDA .pt2 in its own process: where this process cannot (the lent GPU image
    wants the system libstdc++ in LD_PRELOAD: dsv4_compile.libstdcxx), run the test alone in a child
    pytest with it preloaded and assert the child passed. Returns True when it did (the caller returns)."""
    import subprocess
    import sys

    from dsv4_compile.libstdcxx import child_env, cuda_preload_problem

    if cuda_preload_problem() is None:
        return False
    env = child_env(cuda=True)
    env.pop("PYTEST_XDIST_WORKER", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfE", "--tb=short", "--show-capture=no",
                           "-p", "no:cacheprovider", "-p", "no:xdist",
                           request.node.nodeid], capture_output=True, text=True, cwd=str(request.config.rootpath), env=env)
    assert proc.returncode == 0, f"the test under LD_PRELOAD={env['LD_PRELOAD']}:\n{(proc.stdout + proc.stderr)[-4000:]}"
    return True


class CountOp(TorchDispatchMode):
    """Counts calls of one op."""

    def __init__(self, op):
        super().__init__()
        self.op, self.calls = op, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func is self.op
        return func(*args, **(kwargs or {}))


def exported_op_args(fn, args: tuple, dynamic_shapes, op) -> list:
    """The arguments `op` (an OpOverload) is called with in torch.export of `fn(*args)` under
    `dynamic_shapes` (one spec per argument): fake tensors whose sizes are the export's symbols (with their Dim ranges), as a
    pass sees them. One call of `op` expected."""
    class _Module(torch.nn.Module):
        def forward(self, *inputs):
            return fn(*inputs)

    program = torch.export.export(_Module(), args, dynamic_shapes=(tuple(dynamic_shapes),))  # one spec a *input
    node, = (n for n in program.graph.nodes if n.target is op)
    return [a.meta["val"] if isinstance(a, torch.fx.Node) else a for a in node.args]
