"""The objective: rules, dedupe, the correctness gate (stand-in and real kernels), failures recorded."""
import optuna
import pytest
import torch

from dsv4_compile.model.config import ModelConfig
from dsv4_compile.tuning.objective import (STATUS_CONSTRAINT, STATUS_DUPLICATE, STATUS_ERROR, STATUS_MEASURED,
                                           STATUS_WRONG, CpuRunner, DeviceError, KernelFailure, Objective,
                                           StandInRunner, standin_cost)
from dsv4_compile.tuning.spaces import get_space, gpu_spec
from dsv4_compile.tuning.tasks import TASKS, close

FLASH = ModelConfig.load("flash")
H100 = gpu_spec("H100")
TrialState = optuna.trial.TrialState


def fresh_study(url, seed=0):
    return optuna.create_study(storage=url, sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=5))


def statuses(study):
    return [t.user_attrs.get("status") for t in study.trials]


def test_standin_cost_is_deterministic_and_scales_with_context():
    space = get_space("hc_pre")
    p8, p32 = space.make_problem(FLASH, 8192), space.make_problem(FLASH, 32768)
    params = space.default_params(p8, H100)
    assert standin_cost(space, params, p8, H100) == standin_cost(space, params, p8, H100)
    assert standin_cost(space, params, p32, H100) > 3 * standin_cost(space, params, p8, H100)


def test_rules_dedupe_and_failures(sqlite_url):
    space = get_space("fp8_quantize")
    problem = space.make_problem(FLASH, 8192)
    fail = [{"num_warps": 16}]
    objective = Objective(space, problem, H100, StandInRunner(space, problem, H100, fail=fail))
    study = fresh_study(sqlite_url)
    # Enqueued twice: the second run of the same params is a duplicate with the same value.
    base = space.default_params(problem, H100)
    study.enqueue_trial({**base, "block_elems": 4096, "num_warps": 4})
    study.enqueue_trial({**base, "block_elems": 4096, "num_warps": 4})
    study.enqueue_trial({**base, "block_elems": 32768, "num_warps": 1})   # 32768 values / 32 threads: hard rule
    study.enqueue_trial({**base, "block_elems": 4096, "num_warps": 16})   # injected failure: FAILED, no crash
    study.enqueue_trial({**base, "block_elems": 4096, "num_warps": 16})   # the same again: failed without running
    study.optimize(objective, n_trials=5, catch=(KernelFailure,))
    t = study.trials
    assert statuses(study) == [STATUS_MEASURED, STATUS_DUPLICATE, STATUS_CONSTRAINT, STATUS_ERROR, STATUS_ERROR]
    assert t[1].value == t[0].value and t[1].user_attrs["duplicate_of"] == 0
    assert t[2].state == TrialState.PRUNED and "values a thread" in t[2].user_attrs["reason"]
    assert t[3].state == TrialState.FAIL and "out of resources" in t[3].user_attrs["reason"]
    assert t[4].state == TrialState.FAIL and "same as trial 3" in t[4].user_attrs["reason"]
    assert t[0].user_attrs["config"].startswith("block_elems=4096,num_warps=4,num_stages=1")


def test_sticky_device_error_stops_the_worker(sqlite_url):
    space = get_space("hc_sinkhorn")
    problem = space.make_problem(FLASH, 8192)

    class Poisoned(StandInRunner):
        def check(self, config):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    study = fresh_study(sqlite_url)
    with pytest.raises(DeviceError, match="illegal memory access"):
        study.optimize(Objective(space, problem, H100, Poisoned(space, problem, H100)), n_trials=3, catch=(KernelFailure,))
    assert study.trials[-1].state == TrialState.FAIL and study.trials[-1].user_attrs["status"] == STATUS_ERROR


def test_wrong_config_is_pruned_never_chosen(sqlite_url):
    """The stand-in cost's best config is injected as wrong: every trial of it is pruned, the study's
    best is another config."""
    space = get_space("hc_sinkhorn")
    problem = space.make_problem(FLASH, 8192)
    choices = space.choices(problem, H100)
    valid = [{"sinkhorn_block_t": b, "sinkhorn_num_warps": w} for b in choices["sinkhorn_block_t"]
             for w in choices["sinkhorn_num_warps"]
             if space.check(space.make_config({"sinkhorn_block_t": b, "sinkhorn_num_warps": w}, "H100"), problem, H100) is None]
    fastest = min(valid, key=lambda p: standin_cost(space, p, problem, H100))
    objective = Objective(space, problem, H100, StandInRunner(space, problem, H100, wrong=[fastest]))
    study = fresh_study(sqlite_url)
    for params in valid:                                           # every valid config, the wrong one first
        study.enqueue_trial(params)
    study.enqueue_trial(valid[0])
    study.enqueue_trial(fastest)                                   # asked again: pruned again
    study.optimize(objective, n_trials=len(valid) + 2, catch=(KernelFailure,))
    wrong = [t for t in study.trials if t.params == fastest]
    assert len(wrong) == 2 and all(t.state == TrialState.PRUNED and t.user_attrs["status"] == STATUS_WRONG for t in wrong)
    assert "injected wrong config" in wrong[0].user_attrs["reason"] and "same as trial" in wrong[1].user_attrs["reason"]
    assert study.best_trial.params != fastest
    assert study.best_value == min(standin_cost(space, p, problem, H100) for p in valid if p != fastest)


def test_real_gate_prunes_a_corrupted_kernel_output(sqlite_url):
    """The real gate: the Triton FP8 kernel (interpreter) against torch.ops.dsv4.fp8_quantize; one
    config's output is corrupted by one code step, and only that config is pruned."""
    space = get_space("fp8_quantize")
    problem = space.make_problem(FLASH, 8192)
    runner = CpuRunner(space, problem, H100)
    real_run = runner.task.run

    class Corrupting:
        def __init__(self, task):
            self.task = task

        def __getattr__(self, name):
            return getattr(self.task, name)

        def run(self, space_, args, config):
            codes, scale = real_run(space_, args, config)
            if config.block_elems == 128:
                bits = codes.view(torch.uint8).clone()
                bits[5, 3] ^= 1                                   # one code off by one step
                codes = bits.view(torch.float8_e4m3fn)
            return codes, scale

    runner.task = Corrupting(runner.task)
    study = fresh_study(sqlite_url)
    base = space.default_params(problem, H100)
    study.enqueue_trial({**base, "block_elems": 128, "num_warps": 4})
    study.enqueue_trial({**base, "block_elems": 256, "num_warps": 4})
    study.optimize(Objective(space, problem, H100, runner), n_trials=2, catch=(KernelFailure,))
    bad, good = study.trials
    assert bad.state == TrialState.PRUNED and bad.user_attrs["status"] == STATUS_WRONG
    assert "codes: 1 of" in bad.user_attrs["reason"]
    assert good.state == TrialState.COMPLETE and good.user_attrs["status"] == STATUS_MEASURED
    assert study.best_trial.number == good.number


@pytest.mark.parametrize("kernel", ["fp4_quantize", "newton_schulz", "hc_pre", "hc_sinkhorn", "sparse_attention",
                                    "sparse_attention_cached", "compress_kv", "indexer_topk", "moe_experts",
                                    "moe_experts_fp8", "moe_experts_fp8_w8a8", "moe_experts_mxfp4_w4a8"])
def test_real_gate_passes_the_default_config(kernel):
    space = get_space(kernel)
    phase = space.phases[0]
    problem = space.make_problem(FLASH, 8192, 64 if phase == "decode" else 1, phase)
    runner = CpuRunner(space, problem, H100)
    cfg = space.make_config(space.default_params(problem, H100), "H100", phase)
    assert runner.check(cfg) is None


def test_moe_experts_fp8_gates_hold_each_op_to_its_reference():
    """The W8A8 op's gate (against the naive W8A8 twin) and the W8A16 op's (against the plain FP8 op), on
    the same inputs: each refuses the other op's output, which differs by the activation quantization
    (~5e-2: neither tolerance admits it); test_real_gate_passes_the_default_config passes each default."""
    runners = {}
    for name in ("moe_experts_fp8", "moe_experts_fp8_w8a8"):
        space = get_space(name)
        runners[name] = CpuRunner(space, space.make_problem(FLASH, 8192), H100)
    w8a16, w8a8 = runners["moe_experts_fp8"].ref, runners["moe_experts_fp8_w8a8"].ref
    assert "W8A8" in TASKS["moe_experts_fp8_w8a8"].compare(w8a8, w8a16)
    assert TASKS["moe_experts_fp8"].compare(w8a16, w8a8) is not None
    # W4A8's gate against the W4A16 op on the same MXFP4 weights: refused (the activation quantization)
    task = TASKS["moe_experts_mxfp4_w4a8"]
    args = task.inputs(get_space("moe_experts_mxfp4_w4a8").make_problem(FLASH, 8192), "cpu", small=True)
    w4a16 = torch.ops.dsv4.moe_experts_mxfp4(*args[:6], *args[7], args[6])
    assert "W4A8" in task.compare(task.reference(args), w4a16)


def test_tolerances_catch_small_errors():
    ref = torch.randn(64, 64)
    assert close("x", ref, ref.clone(), 0.0) is None
    assert "relative RMS" in close("x", ref, ref * (1 + 1e-2), 1e-3)
    nan = ref.clone()
    nan[0, 0] = float("nan")
    assert "NaN positions" in close("x", ref, nan, 1e-2)
    args = TASKS["hc_sinkhorn"].inputs(get_space("hc_sinkhorn").make_problem(FLASH, 8192), "cpu", small=True)
    out = TASKS["hc_sinkhorn"].reference(args)
    assert TASKS["hc_sinkhorn"].compare(out, out * (1 + 1e-4)) is not None


def test_compress_kv_gate_allows_rare_flips_not_wrong_entries():
    """The compressor's gate: a rounding flip of one code passes, a wrong entry (a block pooled from
    the wrong rows) does not; every call of the layer pair is checked."""
    task, space = TASKS["compress_kv"], get_space("compress_kv")
    args = task.inputs(space.make_problem(FLASH, 8192), "cpu", small=True)
    assert [a[-1] for a in args] == ["fp8", "hadamard_fp4", "fp8"] and [a[6] for a in args] == [4, 4, 16]
    ref = task.reference(args)
    assert task.compare(ref, tuple(r.clone() for r in ref)) is None
    flipped = [r.clone() for r in ref]
    flipped[0][0, 3, 5] *= 1.125                                    # one FP8 code step
    assert task.compare(ref, tuple(flipped)) is None
    wrong = [r.clone() for r in ref]
    wrong[2][0, 1] = wrong[2][0, 0]                                 # HCA entry 1 = entry 0
    assert "call 2" in task.compare(ref, tuple(wrong))


def test_indexer_topk_gate_is_exact():
    task, space = TASKS["indexer_topk"], get_space("indexer_topk")
    args = task.inputs(space.make_problem(FLASH, 8192), "cpu", small=True)
    ref = task.reference(args)
    assert ref.shape == (1, 9, 13) and bool((ref == -1).any()) and bool((ref >= 16).any())   # padding; keys past one tile
    swapped = ref.clone()
    swapped[0, -1, [0, 1]] = swapped[0, -1, [1, 0]]                # the same set, another order
    assert "values differ" in task.compare(ref, swapped)
