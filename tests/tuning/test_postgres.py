"""The same sweeps over a real PostgreSQL server (shared storage for several machines).

.ci/run installs Debian's PostgreSQL, starts it as the postgres user and exports the URL in
DSV4_TEST_POSTGRES_URL (e.g. postgresql+psycopg://dsv4:dsv4@localhost:5432/dsv4_tuning). Each test uses
its own study prefix and deletes its studies afterwards.
"""
import os

import pytest

import tuning_scenarios as sc
from dsv4_compile.tuning.sweep import tune

URL_VAR = "DSV4_TEST_POSTGRES_URL"
URL = os.environ.get(URL_VAR, "").strip()

pytestmark = pytest.mark.skipif(not URL, reason=f"{URL_VAR} is not set: no PostgreSQL server to test against "
                                                "(.ci/run starts one and sets it)")


@pytest.fixture
def pg_url():
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install 'psycopg[binary]', the test extra)")
    from sqlalchemy import create_engine, text

    engine = create_engine(URL)
    try:
        with engine.connect() as con:
            con.execute(text("SELECT 1"))
    except Exception as err:  # noqa: BLE001
        pytest.fail(f"{URL_VAR} is set but the server does not answer: {type(err).__name__}: {err}")
    finally:
        engine.dispose()
    return URL


def test_end_to_end_and_resume_postgres(pg_url, tmp_path):
    req = sc.request(pg_url, tmp_path, contexts=[8192, 32768], kernels=["fp8_quantize"], trials=5)
    try:
        first = tune(req)
        assert first.ok and [s.measured for s in first.summaries] == [5, 5]
        counts = [len(sc.load(req, p).trials) for p in first.plans]
        again = tune(req)
        assert [len(sc.load(req, p).trials) for p in first.plans] == counts
        assert [s.best_params for s in again.summaries] == [s.best_params for s in first.summaries]
        assert first.table_path.exists()
    finally:
        sc.close_storages()
        sc.delete_studies(req)


def test_kill_and_resume_postgres(pg_url, tmp_path):
    sc.kill_and_resume(pg_url, tmp_path)


def test_trial_without_heartbeat_failed_and_retried_postgres(pg_url, tmp_path):
    sc.trial_without_heartbeat(pg_url, tmp_path)


def test_three_workers_one_postgres_study(pg_url, tmp_path):
    sc.three_workers(pg_url, tmp_path)
