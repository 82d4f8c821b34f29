"""GPU builds package the Triton kernels: the .pt2 of a CUDA export runs our triton_ops compiled in by
AOTInductor, loads in a fresh process that imports nothing but torch, and matches eager.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from dsv4_compile import ModelConfig
from dsv4_compile.reference import eager_model
from dsv4_compile.steps import COMPILE_TOLERANCE
from dsv4_compile.compile import resolve_gpu
from dsv4_compile.export import example_tokens, export_aoti, export_prefill, leftover_custom_ops
from dsv4_compile.libstdcxx import child_env
from dsv4_compile.metrics import rel_rms
from dsv4_compile.verify import FLIP_BOUND, SHORT_ATTEMPTS, SHORT_SEQ

pytestmark = pytest.mark.gpu

# The kernels every layer type of the tiny preset reaches (window, CSA with indexer, HCA).
EXPECTED_KERNELS = {"sparse_attention.triton", "compress_kv.triton", "indexer_topk.triton", "hc_pre.triton"}


def test_cuda_pt2_holds_the_triton_kernels_and_runs_without_our_code(tmp_path):
    config = ModelConfig.load("tiny")
    model = eager_model(config, seed=0, state=None, cuda=True)
    result = export_prefill(model, gpu=resolve_gpu("auto"))
    assert EXPECTED_KERNELS <= set(result.kernels), result.kernels
    assert not [op for op in leftover_custom_ops(result.program) if op.startswith("dsv4.")]
    path = export_aoti(result, str(tmp_path / "prefill.pt2"))

    # The build's verify criterion (verify.py): short prompts against the tight bound (best of a few: an
    # FP8/FP4 activation code flip cascades), a longer batch against the flip bound.
    token_sets = [example_tokens(config, 1, SHORT_SEQ, seed=1 + i) for i in range(SHORT_ATTEMPTS)]
    token_sets.append(example_tokens(config, 2, 64, seed=3))
    torch.save(token_sets, tmp_path / "tokens.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        package = torch._inductor.aoti_load_package({path!r})
        outs = [package(tokens.cuda()).cpu() for tokens in torch.load({str(tmp_path / 'tokens.pt')!r})]
        torch.save(outs, {str(tmp_path / 'out.pt')!r})
        assert not any(name.startswith("dsv4_compile") for name in sys.modules), "model code was imported"
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path, env=child_env(cuda=True))
    assert proc.returncode == 0, proc.stderr[-3000:]
    with torch.no_grad():
        errors = [rel_rms(model(tokens.cuda()).float().cpu(), out)
                  for tokens, out in zip(token_sets, torch.load(tmp_path / "out.pt"))]
    print("packaged kernels vs eager, rel RMS per token set:", [f"{e:.2e}" for e in errors])
    # The kernels sum in another order than the plain code (fp32 here): the compile check's bound.
    assert min(errors[:-1]) <= COMPILE_TOLERANCE[config.dtype], f"short prompts: rel RMS {errors[:-1]}"
    assert errors[-1] <= FLIP_BOUND[config.dtype], f"[2, 64]: rel RMS {errors[-1]:.2e}"


def test_static_batch_prefill_packages(tmp_path):
    """mini's prefill engine has B = 1 (max_batch_size 1): its [1, S] operands once made AOTInductor's
    decompose_triton_kernel_wrapper_functional assert (pytorch#181735, through the indexer's shared
    positions: kernels/_common.placeholder). The same engine shape on the tiny preset packages and runs."""
    config = ModelConfig.load("tiny").replace(max_batch_size=1, max_seq_len=512)
    model = eager_model(config, seed=0, state=None, cuda=True)
    result = export_prefill(model, gpu=resolve_gpu("auto"))
    assert result.batch_range == (1, 1) and "indexer_topk.triton" in result.kernels, (result.batch_range, result.kernels)
    package = torch._inductor.aoti_load_package(export_aoti(result, str(tmp_path / "prefill.pt2")))
    tokens = example_tokens(config, 1, 300, seed=3).cuda()
    with torch.no_grad():
        err = rel_rms(model(tokens).float(), package(tokens).float())
    assert err <= COMPILE_TOLERANCE[config.dtype], f"packaged kernels vs eager: rel RMS {err:.2e}"


class _Lookup(torch.nn.Module):
    """Rows of a table picked by indices computed from a float input inside one fused kernel."""

    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.randn(1000, 8))

    def forward(self, u: torch.Tensor) -> torch.Tensor:                               # u [T] in [0, 1)
        return self.table[(u * self.table.shape[0]).long()] * 2.0


def test_cuda_packages_compile_on_the_real_example_inputs(tmp_path):
    """AOTInductor's default for CUDA tunes each kernel alone on made-up inputs (random floats): the
    lookup's indices then fall outside the table and the compile faults (pytorch issue 194018, the
    mini prefill-cache engine's illegal memory access). export.aoti_options compiles in two passes,
    the kernels on the export's example inputs."""
    from dsv4_compile.export import ExportResult

    model = _Lookup().cuda()
    u = torch.rand(4096, device="cuda")
    program = torch.export.export(model, (u,))
    package = torch._inductor.aoti_load_package(export_aoti(ExportResult(program, (1, 1), (1, 1), False, {}),
                                                            str(tmp_path / "lookup.pt2")))
    v = torch.rand(4096, device="cuda")
    assert torch.equal(package(v), model(v))
