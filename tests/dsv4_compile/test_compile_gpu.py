"""The whole mini preset (4 layers + MTP, bf16, ~2.8B parameters) and the flash-slice preset (the same
layer kinds with V4-Flash's 256 experts, ~34B parameters, ~68 GB) compiled with every pass on the GPU
match eager, and the substitution report shows our Triton kernels in place of every dsv4 op.
"""
from __future__ import annotations

import pytest
import torch

import dsv4_compile
from dsv4_compile import ModelConfig
from dsv4_compile.reference import eager_model
from dsv4_compile.steps import COMPILE_TOLERANCE
from dsv4_compile.export import example_tokens
from dsv4_compile.metrics import rel_rms
from dsv4_compile.verify import FLIP_BOUND, SHORT_ATTEMPTS, SHORT_SEQ

pytestmark = pytest.mark.gpu

# Every layer type of mini (window, CSA with indexer, HCA) and the mHC mixing reach these kernels.
EXPECTED = {"dsv4.sparse_attention": "sparse_attention.triton", "dsv4.compress_kv": "compress_kv.triton",
            "dsv4.indexer_topk": "indexer_topk.triton", "dsv4.hc_pre": "hc_pre.triton",
            "dsv4.moe_experts": "moe_experts.triton"}


@pytest.mark.xdist_group("gpu-large")  # one worker: tests of tens of GiB must not overlap
@pytest.mark.parametrize("preset", ["mini", "flash-slice"])
def test_preset_compiled_with_the_kernels_matches_eager(preset):
    config = ModelConfig.load(preset)
    model = eager_model(config, seed=0, state=None, cuda=True)
    compiled = dsv4_compile.compile(model, gpu="auto", passes="all")
    tol = COMPILE_TOLERANCE[config.dtype]
    errors = []
    with torch.no_grad():
        # A short prompt against the tight bound (best of a few: an FP8/FP4 code flip, verify.py), a
        # long one against the flip bound.
        for attempt in range(SHORT_ATTEMPTS):
            tokens = example_tokens(config, 1, SHORT_SEQ, seed=1 + attempt).cuda()
            errors.append(rel_rms(model(tokens), compiled(tokens)))
            if errors[-1] <= tol:
                break
        long_tokens = example_tokens(config, 2, 1000, seed=7).cuda()
        long_err = rel_rms(model(long_tokens), compiled(long_tokens))
    assert min(errors) <= tol, f"short prompt rel RMS {errors} > {tol}"
    assert long_err <= FLIP_BOUND[config.dtype], f"[2, 1000] rel RMS {long_err:.2e}"

    report = compiled.dsv4_report
    assert not report.left_alone(), [str(r) for r in report.left_alone()]
    for op, substitution in EXPECTED.items():
        assert report.replaced(op=op, substitution=substitution) > 0, (op, report.to_dict()["ops"].get(op))


# The compiled bf16 model may be no less accurate than eager bf16, both against the float32 model of the
# same weights. The kernels round where the plain ops do, plus once more inside sparse attention (the
# probabilities to bf16 before the second dot, as FlashAttention: 2e-3 vs the plain op's 1.1e-3 per call,
# tests/kernels/test_sparse_attention.py); over a whole model that extra rounding is one of many, so the
# bound is 1.25x eager's own error, well below what a kernel computing in bf16 where the op keeps fp32 gives.
ACCURACY_RATIO = 1.25


@pytest.mark.xdist_group("gpu-large")
def test_compiled_bf16_is_as_close_to_float32_as_eager_bf16():
    """mini with the FP8/FP4 activation simulation off (its code flips cascade and would hide a kernel's
    precision: bench/results/cpu/compile_flips.md): prefill logits of eager bf16 and compiled bf16, each
    against the float32 twin of the same weights."""
    from dsv4_compile.reference import float32_twin

    config = ModelConfig.load("mini").replace(simulate_quantization=False)
    model = eager_model(config, seed=0, state=None, cuda=True)
    reference = float32_twin(model, cuda=True)
    compiled = dsv4_compile.compile(model, gpu="auto", passes="all")
    with torch.no_grad():
        tokens = example_tokens(config, 8, 500, seed=3).cuda()
        truth, eager, fused = reference(tokens), model(tokens), compiled(tokens)       # [8, V] each
    # Per sequence, then the median: the routing and the indexer's top-k are discrete even with the
    # simulation off, and a choice that flips in one sequence moves its logits far more than rounding.
    eager_err = torch.tensor([rel_rms(t, e) for t, e in zip(truth, eager)]).median().item()
    compiled_err = torch.tensor([rel_rms(t, c) for t, c in zip(truth, fused)]).median().item()
    print(f"vs float32, median of 8 sequences: eager bf16 {eager_err:.3e}, compiled bf16 {compiled_err:.3e}")
    assert compiled_err <= ACCURACY_RATIO * eager_err, (
        f"compiled bf16 {compiled_err:.3e} vs float32, eager bf16 {eager_err:.3e}: a kernel loses precision")
