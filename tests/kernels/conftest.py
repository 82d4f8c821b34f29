"""Every kernel launch the kernel tests make is checked for arguments that share memory, and under the
interpreter every memory access of every kernel for staying inside the launch's tensor arguments."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from dsv4_compile.kernels import _common


def _no_shared_arguments(launch):
    def checked(kernel, grid, *args, **kwargs):
        if _common.is_traced((*args, *kwargs.values())):  # fake / functional tensors: no memory to compare
            return launch(kernel, grid, *args, **kwargs)
        seen: dict[int, str] = {}
        for name, value in [*enumerate(args), *kwargs.items()]:
            if isinstance(value, torch.Tensor) and value.numel():
                base = value.untyped_storage().data_ptr()
                assert base not in seen, (
                    f"{getattr(kernel, '__name__', kernel)}: arguments {seen[base]} and {name} share memory: a pointer "
                    "argument the launch does not use takes _common.placeholder(), never another operand")
                seen[base] = str(name)
        return launch(kernel, grid, *args, **kwargs)
    return checked


@pytest.fixture(autouse=True)
def kernel_arguments_never_alias(monkeypatch):
    """torch's Triton mutation analysis may count any pointer argument as written; an operand passed
    twice is then cloned by export, and torch 2.11 cannot clone some views of dynamic sizes (see
    _common.placeholder): no launch passes one tensor's memory twice."""
    launch = _common.launch
    checked = _no_shared_arguments(launch)
    for name, module in list(sys.modules.items()):
        if name.startswith("dsv4_compile.kernels.") and module is not _common and getattr(module, "launch", None) is launch:
            monkeypatch.setattr(module, "launch", checked)
    yield


class OutOfBounds(AssertionError):
    """A kernel's access (a lane its mask lets through) outside every tensor argument of its launch: on a
    GPU an illegal memory access, or a silent read of another buffer."""


def _in_bounds(interpreter):
    """Patches of the interpreter's GridExecutor and builder: the launch records the host storages of
    its tensor arguments, and every masked-in load, store and atomic must lie within one of them."""
    executor, builder = interpreter.GridExecutor, interpreter.InterpreterBuilder
    state = {"kernel": None, "ranges": []}
    init_args, call = executor._init_args_hst, executor.__call__

    def record(self, args_dev, kwargs):
        args_hst, kwargs_hst = init_args(self, args_dev, kwargs)
        ranges = []
        for arg in [*args_hst, *kwargs_hst.values()]:
            tensor = getattr(arg, "base", arg)  # a TensorWrapper (dtype view) holds the tensor as .base
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                ranges.append((storage.data_ptr(), storage.data_ptr() + storage.nbytes()))
        state["kernel"], state["ranges"] = self.fn.__name__, ranges
        return args_hst, kwargs_hst

    def check(ptrs, mask, itemsize: int, what: str) -> None:
        addresses = np.asarray(ptrs.data)[np.broadcast_to(np.asarray(mask.data, dtype=bool), np.shape(ptrs.data))]
        if addresses.size == 0:
            return
        lo, hi = int(addresses.min()), int(addresses.max()) + itemsize
        if not any(start <= lo and hi <= end for start, end in state["ranges"]):
            near = min(state["ranges"], key=lambda r: min(abs(lo - r[0]), abs(hi - r[1])), default=None)
            where = "" if near is None else f" (nearest argument [{near[0]:#x}, {near[1]:#x}))"
            raise OutOfBounds(f"{state['kernel']}: {what} of bytes [{lo:#x}, {hi:#x}) outside every tensor "
                              f"argument{where}")

    # The cache and eviction arguments after the mask pass through as given: their number differs between
    # triton releases (3.6, torch 2.11's: cache_modifier and eviction_policy; 3.9: one cache_policy).
    load, store, rmw = builder.create_masked_load, builder.create_masked_store, builder.create_atomic_rmw

    def masked_load(self, ptrs, mask, other, *policies):
        check(ptrs, mask, np.dtype(interpreter._get_np_dtype(ptrs.get_element_ty())).itemsize, "load")
        return load(self, ptrs, mask, other, *policies)

    def masked_store(self, ptrs, value, mask, *policies):
        check(ptrs, mask, np.asarray(value.data).dtype.itemsize, "store")
        return store(self, ptrs, value, mask, *policies)

    def atomic_rmw(self, rmw_op, ptr, val, mask, *order):
        check(ptr, mask, np.asarray(val.data).dtype.itemsize, "atomic")
        return rmw(self, rmw_op, ptr, val, mask, *order)

    return [(executor, "_init_args_hst", record), (builder, "create_masked_load", masked_load),
            (builder, "create_masked_store", masked_store), (builder, "create_atomic_rmw", atomic_rmw)]


@pytest.fixture(autouse=True)
def kernel_accesses_stay_in_bounds(monkeypatch):
    """Under TRITON_INTERPRET every load, store and atomic a kernel's mask lets through lies inside one
    tensor argument of its launch (a GPU would fault or read another buffer): checked on every launch
    of every kernel test, at the tests' odd shapes, holes and padding."""
    if not _common.INTERPRET:
        yield
        return
    from triton.runtime import interpreter

    for owner, name, patched in _in_bounds(interpreter):
        monkeypatch.setattr(owner, name, patched)
    yield
