"""Sweep scenarios shared by the SQLite tests (test_sweep.py) and the PostgreSQL tests (test_postgres.py):
the same checks over any storage URL. Each scenario uses its own study prefix, so several runs can
share one database."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import optuna

from dsv4_compile.tuning.objective import STATUS_ERROR, STATUS_MEASURED
from dsv4_compile.tuning.storage import make_storage
from dsv4_compile.tuning.sweep import TuneRequest, plan_studies, tune

TrialState = optuna.trial.TrialState
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def request(storage: str, tmp_path, **changes) -> TuneRequest:
    base = dict(gpu="H100", contexts=[8192], kernels=["fp8_quantize"], trials=8, storage=storage, runner="standin",
                tables_dir=str(tmp_path / "tables"), study_prefix=f"test-{uuid.uuid4().hex[:8]}", plots=False,
                heartbeat_interval=2, grace_period=20)
    base.update(changes)
    return TuneRequest(**base)


_STORAGES: dict = {}


def load(req: TuneRequest, plan):
    """The study, through one cached storage per URL (no heartbeats: a reader)."""
    if req.storage not in _STORAGES:
        _STORAGES[req.storage] = make_storage(req.storage, heartbeat_interval=None)
    return optuna.load_study(study_name=plan.study, storage=_STORAGES[req.storage])


def close_storages() -> None:
    for storage in _STORAGES.values():
        storage.engine.dispose()
    _STORAGES.clear()


def delete_studies(req: TuneRequest) -> None:
    storage = make_storage(req.storage, heartbeat_interval=None)
    for plan in plan_studies(req)[0]:
        try:
            optuna.delete_study(study_name=plan.study, storage=storage)
        except KeyError:
            pass
    storage.engine.dispose()


def _child_env() -> dict:
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH", "")]))
    return env


def kill_and_resume(storage: str, tmp_path) -> None:
    """A worker process is SIGKILLed in the middle of a trial; after the grace period a resumed sweep
    fails that trial (heartbeat), retries it with the same params, keeps every finished trial, and
    reaches the measured target."""
    req = request(storage, tmp_path, trials=8, runner_options={"delay": 0.6}, heartbeat_interval=1, grace_period=2)
    try:
        _kill_and_resume(req, tmp_path)
    finally:
        close_storages()
        delete_studies(req)


def _kill_and_resume(req: TuneRequest, tmp_path) -> None:
    (plan,), _ = plan_studies(req)
    fields = {k: getattr(req, k) for k in ("gpu", "contexts", "kernels", "trials", "storage", "runner", "runner_options",
                                           "tables_dir", "study_prefix", "plots", "heartbeat_interval", "grace_period")}
    code = textwrap.dedent(f"""
        from dsv4_compile.tuning.sweep import TuneRequest, tune
        tune(TuneRequest(**{fields!r}))
    """)
    # If this process stalls for a second between seeing a trial in its "timing" and the kill (a loaded
    # machine), the kill may land between trials: then the attempt does not count, and the sweep is
    # resumed and killed again.
    for attempt in range(3):
        _start_and_kill(code, req, plan)
        before = {t.number: t for t in load(req, plan).get_trials(deepcopy=False)}
        killed = [t for t in before.values() if t.state == TrialState.RUNNING]
        if killed:
            break
    assert len(killed) == 1, f"expected one trial left RUNNING by the kill, got {[t.number for t in killed]}"
    killed_number = killed[0].number
    finished = {n: t for n, t in before.items() if t.state.is_finished()}
    assert sum(t.user_attrs.get("status") == STATUS_MEASURED for t in finished.values()) >= 3

    time.sleep(req.grace_period + 1.5)                # the killed trial's heartbeat is now stale
    result = tune(dataclass_replace(req, runner_options={"delay": 0.0}))
    assert not result.worker_errors, result.worker_errors

    after = {t.number: t for t in load(req, plan).get_trials(deepcopy=False)}
    for number, t in finished.items():                # every finished trial kept, unchanged
        a = after[number]
        assert (a.state, a.value, a.params, a.user_attrs.get("status")) == (
            t.state, t.value, t.params, t.user_attrs.get("status")), f"trial {number} changed on resume"
    k = after[killed_number]
    assert k.state == TrialState.FAIL and k.user_attrs.get("status") != STATUS_ERROR, (
        f"killed trial {killed_number} not failed by heartbeat: {k.state.name}, status {k.user_attrs.get('status')}")
    retries = [t for t in after.values() if t.system_attrs.get("failed_trial") == killed_number]
    assert len(retries) == 1, f"expected one retry of trial {killed_number}, got {[t.number for t in retries]}"
    assert retries[0].state == TrialState.COMPLETE and retries[0].params == k.params
    assert not [t for t in after.values() if not t.state.is_finished()], "trials left unfinished"
    (summary,) = result.summaries
    assert summary.measured == req.trials and summary.killed == 1 and summary.retried == 1
    assert summary.best_ms == min(t.value for t in after.values() if t.user_attrs.get("status") == STATUS_MEASURED)


def trial_without_heartbeat(storage: str, tmp_path) -> None:
    """A RUNNING trial that never wrote a heartbeat (its worker died between creating it and the heartbeat
    thread's first write; `ask` makes one) is failed and retried by a sweep started after the grace period,
    and the sweep finishes with nothing left RUNNING."""
    req = request(storage, tmp_path, trials=3, heartbeat_interval=1, grace_period=1)
    try:
        (plan,), _ = plan_studies(req)
        tune(req)
        orphan = load(req, plan).ask()                   # RUNNING, no heartbeat row
        time.sleep(req.grace_period + 1.5)
        result = tune(dataclass_replace(req, trials=4))
        assert not result.worker_errors, result.worker_errors
        after = {t.number: t for t in load(req, plan).get_trials(deepcopy=False)}
        assert after[orphan.number].state == TrialState.FAIL, after[orphan.number].state
        assert [t.number for t in after.values() if t.system_attrs.get("failed_trial") == orphan.number], \
            "the orphaned trial was not retried"
        assert all(t.state.is_finished() for t in after.values()), "trials left unfinished"
    finally:
        close_storages()
        delete_studies(req)


def _start_and_kill(code: str, req: TuneRequest, plan) -> None:
    """Run the sweep in a child process; SIGKILL it while a trial is in its timing step."""
    child = subprocess.Popen([sys.executable, "-c", code], env=_child_env(), cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and child.poll() is None:
            try:
                trials = load(req, plan).get_trials(deepcopy=False)
            except Exception:  # noqa: BLE001 (the child may not have created the study yet)
                time.sleep(0.1)
                continue
            measured = [t for t in trials if t.state == TrialState.COMPLETE and t.user_attrs.get("status") == STATUS_MEASURED]
            # A trial that has just entered its 0.6 s of "timing" (no outcome yet): it cannot finish before the kill.
            running = [t for t in trials if t.state == TrialState.RUNNING and t.user_attrs.get("stage") == "timing"
                       and "status" not in t.user_attrs]
            if len(measured) >= 3 and running:
                os.kill(child.pid, signal.SIGKILL)
                child.wait(timeout=30)
                break
            time.sleep(0.02)
        assert child.returncode == -signal.SIGKILL, (
            f"the worker was not killed mid-sweep (rc {child.returncode}): {child.stdout.read().decode()[-2000:]}")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()


def dataclass_replace(req: TuneRequest, **changes) -> TuneRequest:
    import dataclasses

    return dataclasses.replace(req, **changes)


def three_workers(storage: str, tmp_path) -> None:
    """Three worker processes on one study: every trial accounted for by a worker (by exactly one, but
    for an enqueued trial two workers popped together), none left unfinished, numbers contiguous, the
    target reached (at most two in-flight trials over it), and the work shared."""
    req = request(storage, tmp_path, trials=12, workers=3, runner_options={"delay": 0.1})
    try:
        _three_workers(req)
    finally:
        close_storages()
        delete_studies(req)


def _three_workers(req: TuneRequest) -> None:
    result = tune(req)
    assert not result.worker_errors, result.worker_errors
    (plan,) = result.plans
    trials = load(req, plan).get_trials(deepcopy=False)
    numbers = [t.number for t in trials]
    assert sorted(numbers) == list(range(len(trials)))
    assert all(t.state.is_finished() for t in trials), [(t.number, t.state) for t in trials if not t.state.is_finished()]
    ran = [set(result.worker_trials[w][plan.study]) for w in range(3)]
    assert set().union(*ran) == set(numbers), "a trial in the storage is missing from the workers' reports"
    # Only an enqueued (WAITING) trial can be run by two workers: SQLite lets two workers pop it at once
    # (Optuna's pop reads, then writes) and, finishing together, both tell it (sweep._optimize).
    twice = {n for n in numbers if sum(n in r for r in ran) > 1}
    enqueued = {t.number for t in trials if "fixed_params" in t.system_attrs}
    assert twice <= enqueued, f"trials {sorted(twice - enqueued)} were run by two workers though never enqueued"
    measured = [t for t in trials if t.user_attrs.get("status") == STATUS_MEASURED]
    assert req.trials <= len(measured) <= req.trials + 2
    by_worker = [sum(1 for t in measured if t.number in r) for r in ran]
    assert sum(1 for n in by_worker if n > 0) >= 2, f"the work was not shared: {by_worker}"
    (summary,) = result.summaries
    assert summary.best_ms == min(t.value for t in measured)
    assert result.table_path is not None and result.table_path.exists()
