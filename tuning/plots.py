"""Plots of a sweep, as PNG files beside the table: `tuning/tables/<gpu>/`.

- `<kernel>-<bucket>-history.png`: each measured trial's latency and the best so far
  (optuna.visualization.matplotlib.plot_optimization_history);
- `<kernel>-<bucket>-importance.png`: per-parameter importance (fANOVA, seeded, where scikit-learn
  is installed; else PED-ANOVA), when the study has at least two measured trials and a parameter
  that varied;
- `<kernel>-latency-vs-context.png`: the best and the default config's latency per context bucket
  (one line per phase and batch).
Every figure's title says the GPU and the runner (stand-in costs are marked as such).
"""
from __future__ import annotations

import warnings
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import optuna

from .storage import dispose


def _mpl():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_dir(request) -> Path:
    from .tables import TABLES_DIR

    return Path(request.tables_dir or TABLES_DIR) / request.gpu


def _runner_note(request) -> str:
    return "" if request.runner == "cuda" else f"{request.runner} runner: stand-in costs, not measurements"


def _title(ax, text: str, note: str) -> None:
    for loc in ("left", "right"):          # Optuna's own titles
        ax.set_title("", loc=loc)
    ax.figure.suptitle("")
    ax.set_title(text + (f"\n[{note}]" if note else ""), fontsize=10)


def plot_sweep(request, plans: Sequence, summaries: Sequence, storage) -> list[Path]:
    """PNGs of the sweep's studies, read from `storage` (an Optuna storage; disposed here)."""
    paths: list[Path] = []
    note = _runner_note(request)
    plt = None
    try:
        plt = _mpl()
        out = plot_dir(request)
        out.mkdir(parents=True, exist_ok=True)
        for plan, summary in zip(plans, summaries):
            if summary.measured == 0:
                continue
            study = optuna.load_study(study_name=plan.study, storage=storage)
            stem = f"{plan.kernel}-{plan.problem.bucket}"
            measured = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                        if t.user_attrs.get("status") == "measured"]
            view = _measured_view(study, measured)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = optuna.visualization.matplotlib.plot_optimization_history(view)
                _title(ax, f"{plan.kernel} {plan.problem.bucket} on {plan.gpu}: tuning history", note)
                ax.set_ylabel("latency (ms)")
                ax.set_xlabel("measured config (in order)")
                paths.append(_save(plt, ax.figure, out / f"{stem}-history.png"))
                varied = any(len({t.params.get(k) for t in measured}) > 1 for k in (measured[0].params if measured else {}))
                if len(measured) >= 2 and varied:
                    try:
                        evaluator, method = _importance_evaluator()
                        ax = optuna.visualization.matplotlib.plot_param_importances(view, evaluator=evaluator)
                        _title(ax, f"{plan.kernel} {plan.problem.bucket} on {plan.gpu}: importance ({method})", note)
                        paths.append(_save(plt, ax.figure, out / f"{stem}-importance.png"))
                    except (RuntimeError, ValueError, ZeroDivisionError, ImportError):
                        plt.close("all")
        paths += _latency_vs_context(plt, request, plans, summaries, out, note)
    finally:
        dispose(storage)
        if plt is not None:
            plt.close("all")
    return paths


def _importance_evaluator():
    """fANOVA (Optuna's default; needs scikit-learn) when available, else PED-ANOVA (numpy only)."""
    try:
        import sklearn  # noqa: F401

        return optuna.importance.FanovaImportanceEvaluator(seed=0), "fANOVA"
    except ImportError:
        return optuna.importance.PedAnovaImportanceEvaluator(), "PED-ANOVA"


def _measured_view(study, measured):
    """An in-memory study holding only the measured trials (duplicates and pruned trials left out)."""
    view = optuna.create_study(direction="minimize")
    for t in measured:
        view.add_trial(optuna.trial.create_trial(params=t.params, distributions=t.distributions, value=t.value,
                                                 user_attrs=t.user_attrs))
    return view


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _latency_vs_context(plt, request, plans, summaries, out: Path, note: str) -> list[Path]:
    by_kernel = defaultdict(list)
    for plan, s in zip(plans, summaries):
        if s.best_ms is not None and s.phase != "any":
            by_kernel[plan.kernel].append(s)
    paths = []
    for kernel, rows in by_kernel.items():
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        series = defaultdict(list)
        for s in rows:
            series[(s.phase, s.batch)].append(s)
        for (phase, batch), items in sorted(series.items()):
            items.sort(key=lambda s: s.context)
            xs = [s.context for s in items]
            label = f"{phase}, batch {batch}"
            ax.plot(xs, [s.best_ms for s in items], "o-", label=f"tuned ({label})")
            pairs = [(s.context, s.default_ms) for s in items if s.default_ms is not None]
            if pairs:
                ax.plot(*zip(*pairs), "s--", alpha=0.7, label=f"default ({label})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        from ..model.context import format_context

        ticks = sorted({s.context for s in rows})
        ax.set_xticks(ticks)
        ax.set_xticklabels([format_context(t) for t in ticks])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("latency (ms)")
        _title(ax, f"{kernel} on {request.gpu}: best config vs context", note)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        paths.append(_save(plt, fig, out / f"{kernel}-latency-vs-context.png"))
    return paths
