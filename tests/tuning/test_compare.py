"""The recorded comparison (tuning/compare.py, bench/bench_tuning.py) on the stand-in cost: default vs
autotune list vs Optuna vs grid, every config run once, the time budget, the outputs."""
import csv
import math
import sys
from collections import Counter
from pathlib import Path

import pytest

from dsv4_compile.tuning import compare as cmp
from dsv4_compile.tuning import objective
from dsv4_compile.tuning.objective import StandInRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import bench_tuning  # noqa: E402 (the bench entry, a script of the checkout's bench/)


@pytest.fixture
def counted(monkeypatch):
    """The stand-in runner, counting how often each config reaches the gate."""
    calls = Counter()

    class Counting(StandInRunner):
        def check(self, config):
            calls[(self.space.name, self.problem.bucket, config.to_str())] += 1
            return super().check(config)

    monkeypatch.setitem(objective.RUNNERS, "standin", Counting)
    return calls


def test_comparison_end_to_end(counted, tmp_path):
    result = cmp.compare(["sparse_attention", "newton_schulz"], [8192, 32768], gpu="H100", runner="standin",
                         replays=2, log=lambda _: None)
    assert [(p.kernel, p.bucket) for p in result.problems] == [
        ("sparse_attention", "8k"), ("sparse_attention", "32k"), ("newton_schulz", "any")]   # NS is context-free
    assert set(counted.values()) == {1}, "a config ran twice"
    assert sum(len(p.measurements) for p in result.problems) == len(counted)
    for p in result.problems:
        row = p.row()
        assert p.grid_complete and p.grid_valid == len(p.grid_order) and p.grid_raw == math.prod(
            len(c) for c in p.grid_choices.values())
        assert p.optuna_n == math.ceil(p.grid_valid / 3) and len(p.optuna) == p.optuna_n
        assert p.default.ms is not None and p.default.config in {m.config for m in p.grid_order}
        assert len(p.autotune) == len(cmp.TYPICAL[p.kernel])
        # Optuna searches the grid's space: its best is a grid config, never better than the grid's best.
        assert row["grid_best_ms"] <= row["optuna_best_ms"] <= row["default_ms"]
        assert row["optuna_best_config"] in {cmp._compact(m.params) for m in p.grid_order}
        assert row["tuned_vs_default"] == pytest.approx(row["default_ms"] / row["optuna_best_ms"], rel=1e-3)
        assert len(p.replays) == 2 and all(1 <= r <= p.grid_valid for r in p.replays)
        assert len(p.random_to_2pct) == 500 and len(p.random_curve) == p.grid_valid
        assert p.random_curve[-1] == pytest.approx(p.grid_best.ms)
        assert isinstance(row["target_met"], bool)
    paths = cmp.write_outputs(result, tmp_path)
    assert [p.name for p in paths] == ["tuning_compare.csv", "tuning_compare_configs.csv", "tuning_compare.md",
                                       "tuning_compare.png"]
    rows = list(csv.DictReader(open(tmp_path / "tuning_compare.csv")))
    assert [r["bucket"] for r in rows] == ["8k", "32k", "any"] and rows[0]["grid_valid"] == "30"
    md = (tmp_path / "tuning_compare.md").read_text()
    assert "stand-in" in md and "| sparse_attention | 8k |" in md and "autotune list (8)" in md
    assert (tmp_path / "tuning_compare.png").stat().st_size > 10000


def test_trials_to_within_and_best_so_far():
    assert cmp.trials_to_within([5.0, None, 3.0, 2.03, 2.0], 2.0) == 4
    assert cmp.trials_to_within([5.0, 3.0], 2.0) is None
    assert cmp.best_so_far([3.0, None, 4.0, 1.0]) == [3.0, 3.0, 3.0, 1.0]


def test_wrong_configs_never_win_and_the_budget_bounds_the_grid(tmp_path):
    # The autotune list's best on the stand-in cost, reported wrong by the gate: another one wins.
    first = cmp.compare(["sparse_attention"], [8192], gpu="H100", runner="standin", replays=0, log=lambda _: None)
    best = first.problems[0].autotune_best
    result = cmp.compare(["sparse_attention"], [8192], gpu="H100", runner="standin", replays=1, budget_s=1.5,
                         runner_options={"delay": 0.1, "wrong": [best.params]}, log=lambda _: None)
    (p,) = result.problems
    assert [m.config for m in p.autotune if m.status == "wrong"] == [best.config]
    assert p.autotune_best.status == "measured" and p.autotune_best.ms > best.ms
    assert not p.grid_complete and 0 < p.grid_measured < p.grid_valid
    assert any("grid incomplete" in n for n in result.notes) and p.replays == []
    row = p.row()
    assert row["grid_complete"] is False and row["optuna_to_2pct_median"] == ""
    cmp.write_outputs(result, tmp_path)
    assert f"{p.grid_measured}/{p.grid_valid}" in (tmp_path / "tuning_compare.md").read_text()


def test_bench_entry_on_cpu(tmp_path, capsys):
    code = bench_tuning.main(["--cost", "standin", "--gpu", "H100", "--kernels", "newton_schulz", "--contexts", "8k",
                     "--replays", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0 and "newton_schulz any: default" in out and "tuned/default" in out
    assert (tmp_path / "tuning_compare.png").exists()
    with pytest.raises(KeyError, match="no comparison set up"):
        cmp.compare(["hc_pre"], [8192], gpu="H100", runner="standin")
