"""`dsv4_compile.compile` under two vector ISAs sharing one Inductor cache (compile.inductor_options).

Inductor picks its CPU vector ISA from ATEN_CPU_CAPABILITY when cpp.simdlen is unset, and its FX graph
cache key does not hold that variable: a process forced to AVX2 on an AVX512 machine reused the
AVX512 graph and computed garbage. Our options pin the width, so the second process compiles its own.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from torch._inductor.cpu_vec_isa import valid_vec_isa_list

# The function's vector loops have tails at 8- and 16-float strides (1000 = 62 * 16 + 8).
_CHILD = """
import sys, torch
import dsv4_compile
x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
fn = lambda t: (t.sin() * 2 + t.exp()).sum(-1, keepdim=True) + t
out = dsv4_compile.compile(fn, gpu="cpu", passes="none")(x)
err = ((out - fn(x)).abs().max() / fn(x).abs().max()).item()
print(torch.backends.cpu.get_cpu_capability(), err)
"""


@pytest.mark.skipif(not any(isa.bit_width() == 512 for isa in valid_vec_isa_list()),
                    reason="needs a CPU with a 512-bit vector ISA beside AVX2 (the cache can only mix ISAs there)")
def test_an_avx2_process_does_not_reuse_an_avx512_graph(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DSV4_TEST_CPU_ISA", "ATEN_CPU_CAPABILITY")}
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "inductor")
    seen = []
    for isa in ("avx512", "avx2"):  # the AVX512 graph is cached first, then the AVX2 process looks it up
        proc = subprocess.run([sys.executable, "-c", _CHILD], env={**env, "ATEN_CPU_CAPABILITY": isa},
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        capability, err = proc.stdout.split()
        seen.append(capability)
        # fp32 sin/exp: Inductor's vectorised approximations vs ATen's, ~1e-7 relative
        assert float(err) < 1e-5, f"{capability}: compiled is {err} off eager (a graph of the other ISA?)"
    assert seen == ["AVX512", "AVX2"]
