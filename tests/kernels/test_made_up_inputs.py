"""Every kernel launch stays in bounds on the inputs AOTInductor makes up when it tunes a CUDA package
at compile time (Inductor's `triton.autotune_at_compile_time`, its default for AOTInductor): each
kernel launched alone with each tensor argument replaced by a fresh buffer of the same sizes and
strides (exactly as large as they need: no slack a view had inside a larger tensor), zeros for integer,
unsigned and bool tensors, random normals for float ones; the scalars unchanged. A kernel that indexes
memory through values it reads (indices, lengths, positions, routing layouts) must not fault on zeros:
a mini build's prefill-cache package once died in that tuning with an illegal memory access (export
now compiles CUDA packages in two passes on the real example inputs, export.aoti_options; this test
keeps each of our kernels safe under the default too). Run on every tuning space's problem, small, in
each phase, with the H200's default config, under conftest's bounds check."""
from __future__ import annotations

import sys

import pytest
import torch
from torch._dynamo.testing import rand_strided

from dsv4_compile.kernels import _common
from dsv4_compile.model.config import ModelConfig
from dsv4_compile.tuning.spaces import SPACES
from dsv4_compile.tuning.tasks import TASKS

pytestmark = pytest.mark.skipif(not _common.INTERPRET, reason="the bounds check runs on the interpreter (CPU tests)")
FLASH = ModelConfig.load("flash")
GPU = "H200"  # its default configs (the H100's and the generic ones pass as well: checked once by hand)


def made_up(value):
    """What AOTInductor's compile-time tuning gives a kernel for `value`: Inductor's own rand_strided."""
    if not isinstance(value, torch.Tensor):
        return value
    with torch.random.fork_rng(devices=[]):  # the same values every run, the test's RNG untouched
        torch.manual_seed(0)
        return rand_strided(value.shape, value.stride(), value.dtype, value.device)


@pytest.mark.parametrize("name,phase", [(name, phase) for name, space in SPACES.items() for phase in space.phases])
def test_every_launch_stays_in_bounds_on_made_up_inputs(name, phase, monkeypatch):
    space, task = SPACES[name], TASKS[name]
    space.kernel_fn()  # imports the kernel's modules: their `launch` is patched below
    launched: list[str] = []

    def launch_made_up_too(launch):
        def both(kernel, grid, *args, **kwargs):
            launch(kernel, grid, *args, **kwargs)
            launched.append(getattr(kernel, "__name__", str(kernel)))
            launch(kernel, grid, *map(made_up, args), **{k: made_up(v) for k, v in kwargs.items()})
        return both

    # every kernel module's `launch`: _common's, or conftest's check around it where that came first
    for module_name, module in list(sys.modules.items()):
        if module_name.startswith("dsv4_compile.kernels.") and module is not _common and hasattr(module, "launch"):
            monkeypatch.setattr(module, "launch", launch_made_up_too(module.launch))
    problem = space.make_problem(FLASH, 8192, batch=2 if phase == "decode" else 1, phase=phase)
    args = task.inputs(problem, "cpu", small=True)
    task.run(space, args, space.default_config(GPU, phase))
    assert launched, f"{name}: no kernel launched"
