"""The interpreter's bounds check (conftest.kernel_accesses_stay_in_bounds) catches what it must: a
masked-in lane one element past a tensor argument, for loads, stores and atomics; masked-out lanes and
views into a larger storage pass."""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from dsv4_compile.kernels._common import INTERPRET

pytestmark = pytest.mark.skipif(not INTERPRET, reason="the check runs on the interpreter (CPU tests)")


@triton.jit
def _copy_kernel(p_x, p_y, n, extra, ATOMIC: tl.constexpr, BLOCK: tl.constexpr):
    # y[i] = x[i] for i < n + extra (extra > 0: one past the end of both)
    o = tl.arange(0, BLOCK)
    m = o < n + extra
    if ATOMIC:
        tl.atomic_add(p_y + o, tl.load(p_x + o, mask=o < n, other=0.0), mask=m)
    else:
        tl.store(p_y + o, tl.load(p_x + o, mask=m, other=0.0), mask=m)


@pytest.mark.parametrize("atomic", [False, True], ids=["load-store", "atomic"])
def test_a_lane_past_the_end_is_refused_and_masked_lanes_pass(atomic):
    x, y = torch.arange(10, dtype=torch.float32), torch.zeros(10)
    _copy_kernel[(1,)](x, y, 10, 0, ATOMIC=atomic, BLOCK=16)  # lanes 10..15 masked out
    assert torch.equal(y, x)
    with pytest.raises(Exception) as err:  # the interpreter wraps what a kernel raises (InterpreterError)
        _copy_kernel[(1,)](x, y, 10, 1, ATOMIC=atomic, BLOCK=16)
    chain = [err.value, err.value.__cause__]
    assert any(type(e).__name__ == "OutOfBounds" for e in chain), repr(err.value)  # conftest's
    assert "_copy_kernel" in str(err.value) and ("atomic" if atomic else "load") in str(err.value)


def test_a_view_reads_its_whole_storage():
    """A view's storage is the argument's memory: reading the base's elements beyond the view is in
    bounds (kernels take strided views of larger buffers)."""
    base = torch.arange(20, dtype=torch.float32)
    y = torch.zeros(11)
    _copy_kernel[(1,)](base[:10], y, 10, 1, ATOMIC=False, BLOCK=16)
    assert torch.equal(y, base[:11])
