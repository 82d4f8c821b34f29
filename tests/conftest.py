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

# On a box of few cores (CI's 2) every test process and subprocess that compiles (a build, its export
# workers, torchrun's ranks) would start Inductor's pool of compile workers, each importing torch, for
# little parallelism on cores that are busy anyway (CI's whole run: 21:54 with the pools, 18:42 without,
# bench/results/cpu/session40_ci_time.md). Set before torch is imported (Inductor reads it then) and
# inherited by the subprocesses.
if (os.cpu_count() or 1) <= 4:
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import numpy as np  # noqa: E402
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


def _ordered_dot(interpreter):
    """The interpreter's tl.dot with every output element its own sum over K in K's order (float64, from
    products exact there, rounded once to the accumulator's dtype): as a GPU's MMA, an element's value
    depends on its row and column alone. numpy's matmul (BLAS) orders each sum by the matrix's shape and
    the CPU's kernels, so tiles that split the same sums differently need not agree there."""
    builder, dot = interpreter.InterpreterBuilder, interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, *precision):
        acc = np.asarray(d.data)
        if not np.issubdtype(acc.dtype, np.floating):
            return dot(self, a, b, d, *precision)
        a_data, b_data = a.data, b.data
        if (a.dtype.primitive_bitwidth == 8 and a.dtype.is_floating()) or \
                (b.dtype.primitive_bitwidth == 8 and b.dtype.is_floating()):  # FP8 via fp16, as the interpreter does
            a_data = interpreter._convert_float(a_data, a.dtype, interpreter.tl.float16, None).view(np.float16)
            b_data = interpreter._convert_float(b_data, b.dtype, interpreter.tl.float16, None).view(np.float16)
        a64, b64 = np.asarray(a_data, np.float64), np.asarray(b_data, np.float64)   # [M, K], [K, N]
        total = np.zeros(a64.shape[:-1] + b64.shape[-1:])
        for k in range(a64.shape[-1]):
            total += a64[..., :, k, None] * b64[..., None, k, :]
        return interpreter.TensorHandle(total.astype(acc.dtype) + acc, d.dtype.scalar)

    return builder, "create_dot", create_dot


@pytest.fixture(autouse=True)
def interpreted_dots_are_ordered(monkeypatch):
    """Under TRITON_INTERPRET, tl.dot as _ordered_dot: the kernel tests hold different tilings of the same
    sums (token chunks, column splits, split K) to equal bits, on whatever CPU runs them."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        from triton.runtime import interpreter

        monkeypatch.setattr(*_ordered_dot(interpreter))
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
