import os
import sys

# DSV4_TEST_CPU_ISA=avx2|avx512 runs the suite with eager's ATen kernels and Inductor's generated CPU
# code both forced to that vector ISA (the tests must hold on every x86 CPU). ATEN_CPU_CAPABILITY is
# read when torch loads, so it is set before the import.
CPU_ISAS = {"avx2": 256, "avx512": 512}
_isa = os.environ.get("DSV4_TEST_CPU_ISA")
if _isa is not None:
    if _isa not in CPU_ISAS:
        raise SystemExit(f"DSV4_TEST_CPU_ISA={_isa!r}: accepted: {', '.join(CPU_ISAS)}")
    os.environ["ATEN_CPU_CAPABILITY"] = _isa

import pytest  # noqa: E402
import torch  # noqa: E402

if _isa is not None:
    import torch._inductor.config

    torch._inductor.config.cpp.simdlen = CPU_ISAS[_isa]

_TESTS = os.path.dirname(os.path.abspath(__file__))
# The tests exercise the installed package (CI installs the wheel, developers an editable install):
# `python -m pytest` puts the checkout's root on sys.path, where dsv4_compile/ would shadow it.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(_TESTS)]

# Without a GPU, Triton kernels run on CPU tensors in its interpreter, which must be chosen before any
# kernel module is imported (tests/kernels); set here, before pytest imports the test modules.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # The CPU tests use small tensors, where one thread is as fast as two and is not stalled by
    # OpenMP spin-waits when other processes share the machine (a 30x slowdown seen here).
    torch.set_num_threads(1)

# Import the package now, with tests/ off sys.path: there tests/dsv4_compile/ would pass for a namespace
# package `dsv4_compile`, found before an editable install's finder is asked.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _TESTS]
import dsv4_compile  # noqa: E402

if getattr(dsv4_compile, "__file__", None) is None:
    raise ImportError("dsv4_compile is not installed: pip install torch==2.13.0 '.[test]' (README, Set up)")
sys.path.insert(0, _TESTS)  # tests/helpers.py


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
