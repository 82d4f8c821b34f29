"""Every @triton.jit function of kernels/ reads only globals that compile on a GPU.

Triton's compiler accepts, among module globals, only `tl.constexpr` values (and functions, modules,
types); a plain Python number works under the CPU interpreter (TRITON_INTERPRET=1, our CI) and fails
to compile on a GPU ("Cannot access global variable ... from within @jit'ed function"). This walks
the names each kernel's code reads and refuses plain numbers, so that the CPU suite catches it."""
from __future__ import annotations

import importlib
import pkgutil

import pytest
import triton

import dsv4_compile.kernels as kernels


def _jit_functions():
    for info in pkgutil.walk_packages(kernels.__path__, prefix="dsv4_compile.kernels."):
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            # JITFunction, or InterpretedFunction under TRITON_INTERPRET=1: both wrap the Python function
            if isinstance(value, triton.runtime.jit.KernelInterface) and getattr(value, "fn", None) is not None \
                    and value.fn.__module__ == module.__name__:
                yield f"{info.name}.{name}", value


JIT_FUNCTIONS = dict(_jit_functions())


def test_the_walk_finds_the_kernels():
    assert any(name.endswith("fp4_quantize.fp4_quantize._e2m1_code") for name in JIT_FUNCTIONS), sorted(JIT_FUNCTIONS)[:5]
    assert len(JIT_FUNCTIONS) > 20


@pytest.mark.parametrize("name", sorted(JIT_FUNCTIONS))
def test_jit_globals_are_constexpr(name):
    fn = JIT_FUNCTIONS[name].fn
    plain = [g for g in fn.__code__.co_names
             if g in fn.__globals__ and isinstance(fn.__globals__[g], (bool, int, float))]
    assert not plain, f"{name} reads plain-number globals {plain}: wrap them in tl.constexpr(...)"
