"""The sweep end to end through its Python API, on SQLite: stand-in cost, real spaces and storage."""
import re

import optuna
import yaml

import tuning_scenarios as sc
from dsv4_compile.tuning import tuned_config
from dsv4_compile.tuning.objective import STATUS_MEASURED
from dsv4_compile.tuning.sweep import format_summary, plan_studies, tune

TrialState = optuna.trial.TrialState


def test_end_to_end_resume_table_and_plots(sqlite_url, tmp_path):
    req = sc.request(sqlite_url, tmp_path, contexts=[8192, 32768], kernels=["fp8_quantize", "newton_schulz"],
                     trials=6, plots=True)
    result = tune(req)
    assert result.ok and not result.notes
    # Studies: fp8 per context, Newton-Schulz once (context-free); names carry kernel, GPU, bucket, version.
    assert [(p.kernel, p.problem.bucket) for p in result.plans] == [
        ("fp8_quantize", "8k"), ("fp8_quantize", "32k"), ("newton_schulz", "any")]
    for plan in result.plans:
        assert plan.study == f"{req.study_prefix}:{plan.kernel}:H100:{plan.problem.bucket}:{plan.code_version}"
    for plan, s in zip(result.plans, result.summaries):
        trials = sc.load(req, plan).get_trials(deepcopy=False)
        measured = [t for t in trials if t.user_attrs.get("status") == STATUS_MEASURED]
        assert s.measured == len(measured) == 6
        assert s.best_ms == min(t.value for t in measured)
        baseline = trials[0]                                   # the GPU's default, measured first
        assert baseline.user_attrs["baseline"] and baseline.user_attrs["status"] == STATUS_MEASURED
        assert s.default_ms == baseline.value and s.speedup >= 1.0
    # The table holds every best config; the reader returns it.
    table = yaml.safe_load(result.table_path.read_text())
    assert result.table_path == tmp_path / "tables" / "H100.yaml"
    for plan, s in zip(result.plans, result.summaries):
        e = table["kernels"][plan.kernel][s.bucket]
        assert e["config"] == s.best_params and e["latency_ms"] == round(s.best_ms, 6)
        assert e["study"] == plan.study and e["code_version"] == plan.code_version and "stand-in" in e["device"]
    cfg = tuned_config("fp8_quantize", "H100", 30000, tables_dir=req.tables_dir)
    assert cfg.block_elems == result.summaries[1].best_params["block_elems"]
    # Plots beside the table.
    names = {p.name for p in result.plots}
    assert {"fp8_quantize-8k-history.png", "fp8_quantize-8k-importance.png", "newton_schulz-any-history.png",
            "fp8_quantize-latency-vs-context.png"} <= names
    assert all(p.parent == tmp_path / "tables" / "H100" and p.stat().st_size > 1000 for p in result.plots)
    assert re.search(r"^fp8_quantize\s+8k\s+6\s", format_summary(result.summaries), re.M)

    # Re-running resumes: nothing left to do, no trial added, same answers.
    counts = [len(sc.load(req, p).trials) for p in result.plans]
    again = tune(sc.dataclass_replace(req, plots=False))
    assert [len(sc.load(req, p).trials) for p in result.plans] == counts
    assert [s.best_params for s in again.summaries] == [s.best_params for s in result.summaries]
    # A larger budget continues the same studies.
    more = tune(sc.dataclass_replace(req, trials=8, plots=False, kernels=["fp8_quantize"]))
    assert [s.measured for s in more.summaries] == [8, 8]
    assert [p.study for p in more.plans] == [p.study for p in result.plans[:2]]


def test_warm_start_measures_the_tables_current_entry_first(sqlite_url, tmp_path):
    """A re-tune (e.g. after the kernel changed: new studies) measures the config the table holds for the
    bucket right after the default, before the typical list, so its new entry is never a config slower
    than the one it replaces under the new code; a table entry for another bucket is not enqueued."""
    from dsv4_compile.tuning.spaces import get_space, gpu_spec
    from dsv4_compile.tuning.tables import write_entries

    space, gpu = get_space("fp8_quantize"), gpu_spec("H100")
    req = sc.request(sqlite_url, tmp_path, contexts=[8192], kernels=["fp8_quantize"], trials=6)
    (plan,), _ = plan_studies(req)
    default = space.default_params(plan.problem, gpu)
    listed = space.warm_start_params(plan.problem, gpu)
    choices = space.choices(plan.problem, gpu)
    held = next({**default, name: value} for name, values in choices.items() for value in values
                if {**default, name: value} not in [default, *listed])
    other = next({**default, name: value} for name, values in choices.items() for value in values
                 if {**default, name: value} not in [default, held, *listed])
    write_entries("H100", [("fp8_quantize", plan.problem.bucket, {"phase": "prefill", "context": 8192, "config": held}),
                           ("fp8_quantize", "128k", {"phase": "prefill", "context": 131072, "config": other})],
                  req.tables_dir)
    result = tune(req)
    trials = sc.load(req, result.plans[0]).get_trials(deepcopy=False)
    assert trials[0].user_attrs["baseline"] and trials[0].params == default
    assert trials[1].params == held and trials[1].user_attrs.get("warm_start")
    assert [t.params for t in trials[2:2 + len(listed)]] == [p for p in listed if p != default][:len(trials) - 2]
    assert all(t.params != other for t in trials if t.user_attrs.get("warm_start"))


def test_a_problem_the_context_does_not_change_is_one_study(sqlite_url, tmp_path):
    """The MoE experts' decode problem (a batch of tokens: the experts do not see the cache) is the same
    at every context: one study (its bucket the first context's), the prefill problems one per context."""
    req = sc.request(sqlite_url, tmp_path, contexts=[4096, 32768], kernels=["moe_experts"], trials=1)
    plans, _ = plan_studies(req)
    assert [p.problem.bucket for p in plans] == ["4k", "32k", "decode-4k-b64"]


def test_small_space_stops_when_exhausted(sqlite_url, tmp_path):
    req = sc.request(sqlite_url, tmp_path, kernels=["hc_sinkhorn"], trials=100, max_attempts=400)
    (plan,), _ = plan_studies(req)
    assert plan.valid is not None and plan.target == plan.valid < 100
    (s,) = tune(req).summaries
    assert s.measured == plan.valid


def test_failures_and_wrong_configs_are_recorded_not_fatal(sqlite_url, tmp_path):
    req = sc.request(sqlite_url, tmp_path, kernels=["hc_sinkhorn"], trials=10,
                     runner_options={"fail": [{"sinkhorn_num_warps": 1}], "wrong": [{"sinkhorn_num_warps": 2}]})
    result = tune(req)
    (s,) = result.summaries
    assert s.measured == 10 and not result.worker_errors
    study = sc.load(req, result.plans[0])
    for t in study.trials:
        warps = t.params["sinkhorn_num_warps"]
        if t.user_attrs.get("status") in ("constraint", "duplicate"):
            continue
        assert (warps, t.state) not in ((1, TrialState.COMPLETE), (2, TrialState.COMPLETE))
        if warps == 1:
            assert t.state == TrialState.FAIL and "out of resources" in t.user_attrs["reason"]
        if warps == 2:
            assert t.state == TrialState.PRUNED and t.user_attrs["status"] == "wrong"
    assert s.best_params["sinkhorn_num_warps"] not in (1, 2)


def test_kill_and_resume_sqlite(sqlite_url, tmp_path):
    sc.kill_and_resume(sqlite_url, tmp_path)


def test_trial_without_heartbeat_failed_and_retried_sqlite(sqlite_url, tmp_path):
    sc.trial_without_heartbeat(sqlite_url, tmp_path)


def test_three_workers_one_sqlite_study(sqlite_url, tmp_path):
    sc.three_workers(sqlite_url, tmp_path)


def test_timeout_stops_new_trials_and_keeps_the_finished(sqlite_url, tmp_path):
    """timeout_s: no trial starts after it; each study gets a share; the same request continues."""
    import datetime

    # 6 s: each of the two studies gets a 3 s share, several times one trial's first-call cost (imports,
    # the gate) on a slow CI core; with 2 s the first study's first trial could use both shares.
    req = sc.request(sqlite_url, tmp_path, contexts=[8192, 32768], kernels=["fp8_quantize"], trials=200,
                     runner_options={"delay": 0.2}, timeout_s=6.0)
    result = tune(req)
    assert [1 <= s.measured < 200 for s in result.summaries] == [True, True], [s.measured for s in result.summaries]
    assert any("--timeout 6 s reached" in n and "fp8_quantize 8k" in n for n in result.notes), result.notes
    before = [sc.load(req, p).get_trials(deepcopy=False) for p in result.plans]
    assert all(t.state.is_finished() for trials in before for t in trials)
    # What the timeout promises (not a wall-clock bound, which a loaded CI core can break: the trial in
    # flight, the summaries and the plots come after it): no trial started after it. tune's clock starts
    # before its first trial and after this test's own `now()` (imports, the gate: seconds on a loaded CI
    # core, where a deadline taken here flagged a trial tune had rightly started), so the first trial's
    # start + 6 s bounds tune's deadline from above. Optuna stamps a trial's start (local naive time)
    # when it is created; without the timeout, trials would go on for 200 x 0.2 s.
    deadline = min(t.datetime_start for trials in before for t in trials) + datetime.timedelta(seconds=6.0)
    late = [t.number for trials in before for t in trials if t.datetime_start > deadline]
    assert not late, f"trials {late} started after the timeout"
    again = tune(sc.dataclass_replace(req, runner_options={"delay": 0.0}, timeout_s=None, trials=12))
    assert [s.measured for s in again.summaries] == [max(12, s.measured) for s in result.summaries]
    for plan, trials in zip(result.plans, before):
        kept = {t.number: t.value for t in sc.load(req, plan).get_trials(deepcopy=False)}
        assert all(kept[t.number] == t.value for t in trials)


def test_warm_start_measures_the_typical_autotune_list_after_the_default(sqlite_url, tmp_path):
    from dsv4_compile.tuning.spaces import TYPICAL, get_space, gpu_spec

    req = sc.request(sqlite_url, tmp_path, contexts=[8192], kernels=["sparse_attention"], trials=12, plots=False)
    result = tune(req)
    (plan,) = result.plans
    space, gpu = get_space("sparse_attention"), gpu_spec("H100")
    warm = space.warm_start_params(plan.problem, gpu)
    # Every typical config fits the H100's choices here; the default's num_splits fills the field they leave out.
    assert len(warm) == len(TYPICAL["sparse_attention"])
    assert all(p["num_splits"] == space.default_params(plan.problem, gpu)["num_splits"] for p in warm)
    # The default is one of the list here: enqueued once, as the baseline.
    default = space.default_params(plan.problem, gpu)
    warm = [p for p in warm if p != default]
    trials = sc.load(req, plan).get_trials(deepcopy=False)
    assert trials[0].user_attrs["baseline"] and trials[0].params == default
    started = trials[1:1 + len(warm)]
    assert [t.params for t in started] == warm and all(t.user_attrs.get("warm_start") for t in started)
    # The tuned best is never worse than the list's best (both measured under the same protocol).
    listed = [t.value for t in started if t.user_attrs.get("status") == STATUS_MEASURED]
    assert result.summaries[0].best_ms <= min(listed)
