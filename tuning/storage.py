"""Optuna RDB storage for tuning studies: SQLite by default, any SQLAlchemy URL (PostgreSQL) to share.

- `make_storage(url)`: an `optuna.storages.RDBStorage` with
  * a busy timeout for SQLite (connect_args timeout=60 s, unless the URL sets `?timeout=`), WAL
    journal for file databases (readers do not block the writer), the parent folder created;
  * `pool_pre_ping` for server databases (a worker survives a restarted server between trials);
  * heartbeats: each running trial's worker writes a heartbeat every `heartbeat_interval` s; a trial
    whose heartbeat is older than `grace_period` s (its worker was SIGKILLed, its machine lost) is
    failed by the next worker that starts a trial, and `RetryHeartbeatStaleTrialCallback` (Optuna 5's
    name for `failed_trial_callback=RetryFailedTrialCallback`, which it deprecates) enqueues it again
    with the same params, up to `max_retry` times.
- `fail_stale_trials(study, storage)`: Optuna's, plus the RUNNING trials that never wrote a heartbeat and
  started more than the grace period ago (a worker killed between creating its trial and its heartbeat
  thread's first write: Optuna skips trials without a heartbeat row, so they would stay RUNNING forever).
- `study_name(...)`: '<prefix>:<kernel>:<gpu>:<bucket>:<code version>' (the code version hashes the
  kernel's sources, the space and the problem's shapes: spaces.KernelSpace.code_version).
- `DEFAULT_STORAGE`: tuning/studies.db beside the tables (git-ignored by tuning/.gitignore).
"""
from __future__ import annotations

import copy
import datetime
import os
import sqlite3
import warnings
from pathlib import Path

import optuna
import sqlalchemy
from sqlalchemy.engine import make_url

DEFAULT_DB = Path(__file__).resolve().parent / "studies.db"
DEFAULT_STORAGE = f"sqlite:///{DEFAULT_DB}"
SQLITE_TIMEOUT_S = 60


def study_name(prefix: str, kernel: str, gpu: str, bucket: str, code_version: str) -> str:
    return f"{prefix}:{kernel}:{gpu}:{bucket}:{code_version}"


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def redact(url: str) -> str:
    """The URL without its password (for messages and reports)."""
    return make_url(url).render_as_string(hide_password=True)


def _prepare_sqlite(url: str) -> dict:
    u = make_url(url)
    engine_kwargs: dict = {}
    if "timeout" not in u.query:
        engine_kwargs["connect_args"] = {"timeout": SQLITE_TIMEOUT_S}
    db = u.database
    if db and db != ":memory:" and not db.startswith("file:"):
        path = Path(db)
        path.parent.mkdir(parents=True, exist_ok=True)
        # WAL: persistent in the file; set once, before any engine holds the database.
        with sqlite3.connect(str(path), timeout=SQLITE_TIMEOUT_S) as con:
            con.execute("PRAGMA journal_mode=WAL")
    return engine_kwargs


def make_storage(url: str | None = None, *, heartbeat_interval: int | None = 10, grace_period: int | None = 60,
                 max_retry: int = 3) -> optuna.storages.RDBStorage:
    """See the module docstring. heartbeat_interval None: no heartbeats (a read-only look at a study)."""
    url = url or DEFAULT_STORAGE
    if is_sqlite(url):
        engine_kwargs = _prepare_sqlite(url)
    else:
        engine_kwargs = {"pool_pre_ping": True}
    kwargs: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if heartbeat_interval:
            kwargs.update(_heartbeat_kwargs(heartbeat_interval, grace_period, max_retry))
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)


def _heartbeat_kwargs(heartbeat_interval: int, grace_period: int | None, max_retry: int) -> dict:
    """Heartbeats, and the retry of trials whose worker stopped beating (same params, max_retry times)."""
    kwargs: dict = {"heartbeat_interval": int(heartbeat_interval),
                    "grace_period": int(grace_period or 2 * heartbeat_interval)}
    callback_cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    if callback_cls is not None:
        kwargs["heartbeat_stale_trial_callback"] = callback_cls(max_retry=max_retry)
    else:  # Optuna < 4.9 has only the older name
        kwargs["failed_trial_callback"] = optuna.storages.RetryFailedTrialCallback(max_retry=max_retry)
    return kwargs


def fail_stale_trials(study: optuna.Study, storage: optuna.storages.RDBStorage) -> None:
    """See the module docstring; `storage` is the study's, made with heartbeats."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
        interval = storage.get_heartbeat_interval()
        if interval is None:
            return
        started_before = datetime.datetime.now() - datetime.timedelta(seconds=storage.grace_period or 2 * interval)
        running = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
                   if t.datetime_start is not None and t.datetime_start < started_before]
        if not running:
            return
        with storage.engine.connect() as connection:  # Optuna has no public reader of the heartbeat table
            beating = set(connection.execute(sqlalchemy.text("SELECT trial_id FROM trial_heartbeats")).scalars())
        get_callback = getattr(storage, "get_heartbeat_stale_trial_callback", None) or storage.get_failed_trial_callback
        callback = get_callback()
        for trial in running:
            if trial._trial_id in beating:
                continue
            try:
                failed = storage.set_trial_state_values(trial._trial_id, state=optuna.trial.TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:  # another worker failed or finished it first
                continue
            if failed and callback is not None:
                callback(study, copy.deepcopy(storage.get_trial(trial._trial_id)))


def dispose(storage) -> None:
    """Close the storage's connections (SQLite files can then be removed; servers see fewer sessions)."""
    engine = getattr(storage, "engine", None)
    if engine is not None:
        engine.dispose()


def environ_url(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None
