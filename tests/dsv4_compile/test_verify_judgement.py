"""verify's per-bucket judgement without a build: the token-set retry (a chance flip passes on another
set, a fault fails every set), the verdict from the best set of each prompt shape, and the token sets
it plans for each engine."""
from __future__ import annotations

import random

import pytest

from dsv4_compile.token_check import GENERATE_TOKENS, TIGHT_STEPS
from dsv4_compile.verify import (CPU_CHECK_SEQ, CPU_CHECK_TOKENS, FLIP_BOUND, SHORT_ATTEMPTS, TOLERANCES, checked_tokens,
                                 judge, longest_checked_prompt, token_set_shapes, token_sets)

TOL, BOUND = TOLERANCES["aoti", "float32"], FLIP_BOUND["float32"]


def _sets(kind: str, errors: list[float]):
    """A compare() that returns the given errors in turn (and fails if called more often)."""
    pending = list(errors)

    def compare() -> dict:
        assert pending, f"{kind}: token_sets asked for more sets than {errors}"
        return {"kind": kind, "batch": 1, "seq": 4, "rel_rms": pending.pop(0), "max_abs": 0.0}

    return compare


def test_token_sets_stop_at_the_first_set_within_the_limit():
    cases = token_sets(_sets("full", [8.0e-2, 3.0e-4, 1e-7]), BOUND)
    assert [c["rel_rms"] for c in cases] == [8.0e-2, 3.0e-4]


def test_token_sets_try_every_attempt_of_a_fault():
    cases = token_sets(_sets("short", [0.3] * SHORT_ATTEMPTS), TOL)
    assert len(cases) == SHORT_ATTEMPTS


def _bucket(short: list[float], full: list[float], random: list[float]) -> list[dict]:
    return [*token_sets(_sets("short", short), TOL), *token_sets(_sets("full", full), BOUND),
            *token_sets(_sets("random", random), BOUND)]


def test_a_flip_cascade_on_one_long_set_passes():
    verdict = judge(_bucket([4e-7], [8.0e-2, 2e-5], [3e-7]), TOL, BOUND)
    assert verdict["ok"] and verdict["error"] is None
    assert verdict["rel_rms"] == 4e-7 and verdict["max_rel_rms"] == 2e-5


@pytest.mark.parametrize("short, full, random, message", [
    ([0.3] * 3, [0.3] * 3, [0.3] * 3, "short prompt rel RMS 3.00e-01 > 1e-05"),      # a wrong op: every set
    ([2e-3, 1e-3, 5e-3], [1e-3], [1e-3], "short prompt rel RMS 1.00e-03 > 1e-05"),  # best short set counts
    ([4e-7], [0.2, 0.3, 0.1], [3e-7], "rel RMS 1.00e-01 > 5e-02 (beyond quantization flips)"),
])
def test_a_fault_in_every_set_fails(short, full, random, message):
    verdict = judge(_bucket(short, full, random), TOL, BOUND)
    assert not verdict["ok"] and verdict["error"] == message


def test_nan_positions_that_differ_fail_whatever_the_error():
    cases = _bucket([4e-7], [2e-5], [3e-7])
    cases[1]["nan_mismatch"] = True
    verdict = judge(cases, TOL, BOUND)
    assert not verdict["ok"] and verdict["error"] == "NaN positions differ"


# ---- the token sets a build's verify plans (issue: a GPU build within its time budget) ----------------

def _cpu_only_onnxruntime(monkeypatch, providers=("CPUExecutionProvider",)):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: list(providers))


def test_a_gpu_builds_onnx_on_this_cpu_gets_prompts_up_to_the_cpu_cap(monkeypatch):
    _cpu_only_onnxruntime(monkeypatch)
    cuda = {"kind": "cuda", "name": "NVIDIA H200"}
    assert longest_checked_prompt("onnx", cuda, thorough=False) == CPU_CHECK_SEQ
    assert longest_checked_prompt("onnx", cuda, thorough=True) is None       # --thorough: the bucket's longest
    assert longest_checked_prompt("aoti", cuda, thorough=False) is None      # runs on the GPU
    assert longest_checked_prompt("onnx", {"kind": "cpu"}, thorough=False) is None  # a CPU build: its own device


def test_a_gpu_builds_onnx_on_this_cpu_generates_fewer_tokens_in_its_token_check(monkeypatch):
    """The prefill-cache + decode pair's token check: the CPU-run ONNX engine of a GPU build generates
    CPU_CHECK_TOKENS a prompt (each onnxruntime call of mini ~5 s), still past the tightly held steps;
    --thorough and the engines on their own device the full GENERATE_TOKENS."""
    _cpu_only_onnxruntime(monkeypatch)
    cuda = {"kind": "cuda", "name": "NVIDIA H200"}
    assert checked_tokens(longest_checked_prompt("onnx", cuda, thorough=False)) == CPU_CHECK_TOKENS
    assert TIGHT_STEPS < CPU_CHECK_TOKENS < GENERATE_TOKENS
    assert checked_tokens(longest_checked_prompt("onnx", cuda, thorough=True)) == GENERATE_TOKENS
    assert checked_tokens(longest_checked_prompt("aoti", cuda, thorough=False)) == GENERATE_TOKENS


def test_onnx_with_a_cuda_provider_gets_the_buckets_longest_prompt(monkeypatch):
    _cpu_only_onnxruntime(monkeypatch, ("CUDAExecutionProvider", "CPUExecutionProvider"))
    assert longest_checked_prompt("onnx", {"kind": "cuda"}, thorough=False) is None


def test_the_mini_8k_gpu_build_plans_no_long_prompt_on_the_cpu(monkeypatch):
    """`build --gpu H200 --config mini --context 8k`: its prefill engines take [1..8, 2..8192]. What its
    verify gives the CPU-run ONNX engine is bounded by the plan (every set retried up to SHORT_ATTEMPTS
    times), whatever the clock: the long prompt that took over 2 minutes there is gone."""
    _cpu_only_onnxruntime(monkeypatch)
    seq_range, batch_range = (2, 8192), (1, 8)
    longest = longest_checked_prompt("onnx", {"kind": "cuda"}, thorough=False)
    planned = token_set_shapes(seq_range, batch_range, random.Random(0), longest)
    assert [kind for kind, _, _ in planned] == ["short", "full", "random"]
    assert max(seq for _, _, seq in planned) <= CPU_CHECK_SEQ
    assert planned[1] == ("full", 8, CPU_CHECK_SEQ)                          # the largest batch still runs
    cpu_tokens = SHORT_ATTEMPTS * sum(batch * seq for _, batch, seq in planned)
    assert cpu_tokens <= SHORT_ATTEMPTS * 10 * CPU_CHECK_SEQ                 # vs 8 x 8192 in one set before
    aoti = token_set_shapes(seq_range, batch_range, random.Random(0), longest_checked_prompt("aoti", {"kind": "cuda"}, False))
    assert aoti[1] == ("full", 8, 8192) and all(2 <= seq <= 8192 for _, _, seq in aoti)


def test_a_cap_never_goes_below_the_engines_shortest_prompt():
    planned = token_set_shapes((600, 1024), (1, 2), random.Random(1), longest=CPU_CHECK_SEQ)
    assert all(seq == 600 for _, _, seq in planned[1:]) and planned[0] == ("short", 1, 600)


def test_the_build_checkpoint_must_be_unchanged(tmp_path):
    """verify checks the checkpoint a build was made from by its identity (config.json, shard names,
    sizes and headers), as the build recorded it: gone, or a shard changed, is a one-line refusal."""
    import json
    import shutil
    import types

    from dsv4_compile import ArtifactError, ModelConfig, Transformer
    from dsv4_compile.checkpoint import write_checkpoint
    from dsv4_compile.plan import checkpoint_identity
    from dsv4_compile.verify import check_weights

    path = write_checkpoint(Transformer(ModelConfig.load("tiny"), seed=0), tmp_path / "ckpt")
    build = types.SimpleNamespace(weights={"source": "checkpoint", "path": str(path), "sha256": checkpoint_identity(path)})
    check_weights(build)
    text = (path / "config.json").read_text()
    config = json.loads(text)
    (path / "config.json").write_text(json.dumps({**config, "num_attention_heads": config["num_attention_heads"] * 2}))
    with pytest.raises(ArtifactError, match=f"the checkpoint {path} changed since the build"):
        check_weights(build)
    (path / "config.json").write_text(text)
    check_weights(build)
    shard = sorted(path.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-8])  # truncated
    with pytest.raises(ArtifactError, match="changed since the build"):
        check_weights(build)
    shutil.rmtree(path)
    with pytest.raises(ArtifactError, match=f"the checkpoint this build was made from is gone: {path}"):
        check_weights(build)
