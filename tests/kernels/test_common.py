"""kernels/_common.py's size bounds: what a launcher sees of a symbolic size (export, torch.compile)."""
from __future__ import annotations

import sys

import pytest
from torch._dynamo.source import ConstantSource
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv
from torch.utils._sympy.value_ranges import ValueRanges

from dsv4_compile.kernels._common import largest_value, split_chunks


def _size(env: ShapeEnv, name: str, hint: int, upper=None):
    symbol = env.create_symbol(hint, ConstantSource(name), dynamic_dim=DimDynamic.DYNAMIC)
    if upper is not None:
        env.var_to_range[symbol] = ValueRanges(2, upper)
    return env.create_symintnode(symbol, hint=hint)


@pytest.mark.parametrize("upper", [None, sys.maxsize - 1], ids=["int_oo", "maxsize-1"])
def test_an_unbounded_size_and_products_of_them_have_no_largest_value(upper):
    """torch bounds a dynamic size by int_oo or by sys.maxsize - 1 (torch.compile's sizes on torch 2.11:
    their product B * S once sized a chunk count past int64, and torch.zeros overflowed)."""
    env = ShapeEnv()
    b, s = _size(env, "b", 8, upper), _size(env, "s", 500, upper)
    assert largest_value(b) is None and largest_value(b * s) is None and largest_value(6 * b * s) is None
    assert split_chunks(b * s, 1000) == (b * s, 1)  # one chunk, sized at run time


def test_a_bounded_size_gives_its_bound():
    env = ShapeEnv()
    b, s = _size(env, "b", 2, 8), _size(env, "s", 500, 8192)
    assert largest_value(7) == 7 and largest_value(s) == 8192 and largest_value(b * s) == 65536
    assert split_chunks(b * s, 30000) == (30000, 3) and split_chunks(s, 30000) == (s, 1)


def test_a_launch_whose_tiles_do_not_fit_is_a_one_line_error_naming_them():
    """Triton's OutOfResources (seen on an H100: 240 KB of shared memory asked of 227 KB) becomes a
    ValueError naming the kernel, its tiles and stages; other failures pass through unchanged."""
    import torch
    from triton.runtime.errors import OutOfResources

    from dsv4_compile.kernels._common import launch

    class Kernel:
        __name__ = "_gate_up_kernel"

        def __init__(self, err):
            self.err = err

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                raise self.err
            return run

    x = torch.zeros(2)
    with pytest.raises(ValueError) as caught:
        launch(Kernel(OutOfResources(245760, 232448, "shared memory")), (1,), x, BLOCK_M=32, BLOCK_N=256, FMT=2,
               num_warps=4, num_stages=3)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("_gate_up_kernel: BLOCK_M=32, BLOCK_N=256, num_warps=4, num_stages=3")
    assert "240 KB of shared memory, this GPU has 227 KB" in message and "FMT" not in message
    with pytest.raises(RuntimeError, match="other"):
        launch(Kernel(RuntimeError("other")), (1,), x, BLOCK_M=32)


def test_a_launch_given_a_constant_inductor_cannot_write_is_refused_naming_it():
    """A tl.constexpr object reaches the kernel as its value, but Inductor writes a recorded launch's
    constants by repr (`'ROUTE': constexpr[2]`), and every engine holding the kernel failed to compile
    on the GPU; refused under the interpreter too, so that CPU tests see it. Tensors and plain scalars
    (symbolic sizes included) pass."""
    import numpy as np
    import torch
    import triton.language as tl
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from dsv4_compile.kernels._common import launch

    launched = []

    class Kernel:
        __name__ = "_down_kernel"

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append(kwargs)

    x = torch.zeros(2)
    with pytest.raises(TypeError, match=r"^_down_kernel: ROUTE \(triton\.language\.core\.constexpr\) not a plain "
                                        r"value; pass an int, float, bool or str \(e\.g\. a tl\.constexpr's \.value\)$"):
        launch(Kernel(), (1,), x, ROUTE=tl.constexpr(2), BLOCK_M=16)
    with pytest.raises(TypeError, match=r"^_down_kernel: argument 1 \(numpy\.int64\) not a plain value"):
        launch(Kernel(), (1,), x, np.int64(3), BLOCK_M=16)
    assert not launched
    size = ShapeEnv().create_unbacked_symint()
    launch(Kernel(), (1,), x, size, 0.5, None, ROUTE=2, FMT="e4m3", SPLIT=True)
    assert launched == [dict(ROUTE=2, FMT="e4m3", SPLIT=True)]
