"""Every kernel launch the kernel tests make is checked for arguments that share memory."""
from __future__ import annotations

import sys

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
