import pytest


@pytest.fixture(autouse=True)
def _quiet_optuna():
    import optuna

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    yield
    optuna.logging.set_verbosity(level)


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path / 'studies.db'}"


@pytest.fixture(autouse=True)
def _close_storages():
    yield
    import tuning_scenarios

    tuning_scenarios.close_storages()
