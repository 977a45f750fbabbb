"""plots/*.png: per-class accuracy of the best trials, the study's history, each swept parameter."""

import io
import re
from pathlib import Path

from matplotlib.figure import Figure

from study.errors import StudyError
from study.report.ranking import Report
from study.report.shapes import GM
from study.storage import WRITE_AGAIN, write_bytes
from trainables.metrics import metric_name


def write_plots(report: Report) -> list[Path]:
    """plots/per_class_accuracy.png, plots/history.png and plots/param_<name>.png for each swept
    numeric param. Nothing is drawn before a trial has reported."""
    if report.best is None:
        return []
    plots = report.study_dir / "plots"
    try:
        plots.mkdir(exist_ok=True)
    except OSError as exc:
        raise StudyError(f"cannot write {plots}: {exc.strerror}{WRITE_AGAIN}") from None
    written = []
    figure = _per_class_figure(report)
    if figure is not None:
        written.append(_save(figure, plots / "per_class_accuracy.png"))
    written.append(_save(_history_figure(report), plots / "history.png"))
    if report.comparison is not None:
        written.append(_save(_comparison_figure(report), plots / "comparison_gm.png"))
    if report.shapes is not None:
        written.append(_save(_shapes_figure(report), plots / "shapes_gm.png"))
    for name in report.swept:
        figure = _param_figure(report, name)
        if figure is not None:
            written.append(_save(figure, plots / f"param_{_file_safe(name)}.png"))
    return written


def _comparison_figure(report: Report) -> Figure:
    """Test GM (median of the last 10) per method, defaults and tuned side by side: the mean over
    the confirmation seeds with its 95% confidence interval."""
    comparison = report.comparison
    gm = metric_name("test", "gm", "median_10")
    figure = Figure(figsize=(max(5.0, 1.3 * len(comparison.methods) + 2), 4), layout="constrained")
    axes = figure.subplots()
    width = 0.38
    for offset, kind in ((-width / 2, "defaults"), (width / 2, "tuned")):
        intervals = [m.intervals[kind][gm] for m in comparison.methods]
        means = [100 * i.mean if i.n else 0.0 for i in intervals]
        errors = [[100 * (i.mean - i.low) if i.n > 1 else 0.0 for i in intervals],
                  [100 * (i.high - i.mean) if i.n > 1 else 0.0 for i in intervals]]
        axes.bar([k + offset for k in range(len(intervals))], means, width, yerr=errors, capsize=3, label=kind)
    axes.set_xticks(range(len(comparison.methods)), [m.label for m in comparison.methods])
    axes.set_ylabel("test GM, median of the last 10 (%)")
    axes.set_title(f"Over seeds {', '.join(map(str, comparison.seeds))}: mean and 95% CI")
    axes.legend()
    return figure


def _shapes_figure(report: Report) -> Figure:
    """Test GM (median of the last 10) per unlabeled shape, a bar per method's tuned configuration:
    the mean over the confirmation seeds with its 95% confidence interval."""
    across = report.shapes
    methods = list(across.methods)
    figure = Figure(figsize=(max(6.0, 0.25 * len(methods) * len(across.shapes) + 3), 4), layout="constrained")
    axes = figure.subplots()
    width = 0.8 / len(methods)
    for k, name in enumerate(methods):
        intervals = [result.intervals[name][GM] for result in across.shapes]
        means = [100 * i.mean if i.n else 0.0 for i in intervals]
        errors = [[100 * (i.mean - i.low) if i.n > 1 else 0.0 for i in intervals],
                  [100 * (i.high - i.mean) if i.n > 1 else 0.0 for i in intervals]]
        axes.bar([s - 0.4 + width * (k + 0.5) for s in range(len(intervals))], means, width, yerr=errors,
                 capsize=2, label=across.methods[name])
    axes.set_xticks(range(len(across.shapes)), [result.shape for result in across.shapes])
    axes.set_xlabel("unlabeled shape")
    axes.set_ylabel("test GM, median of the last 10 (%)")
    axes.set_title(f"Tuned, over seeds {', '.join(map(str, across.seeds))}: mean and 95% CI")
    axes.legend(fontsize="small", ncols=min(len(methods), 5))
    return figure


def _per_class_figure(report: Report) -> Figure | None:
    best, baseline = report.best, report.baseline
    shown = [best] if baseline is None or baseline is best else [best, baseline]
    shown = [t for t in shown if t.class_accuracy]
    if not shown:
        return None
    figure = Figure(figsize=(max(6.0, 0.5 * len(shown[0].class_accuracy) + 2), 4), layout="constrained")
    axes = figure.add_subplot()
    width = 0.8 / len(shown)
    for i, trial in enumerate(shown):
        values = [100 * v for v in trial.class_accuracy]
        x = [c + (i - (len(shown) - 1) / 2) * width for c in range(len(values))]
        role = "baseline" if trial is baseline else "best"
        axes.bar(x, values, width, label=f"{role}: {trial.method} ({trial.trial_id})")
    axes.set_xticks(range(len(shown[0].class_accuracy)))
    axes.set(xlabel="class", ylabel="accuracy (%, last evaluation)", ylim=(0, 100),
             title=f"Per-class accuracy: {report.name}")
    figure.legend(loc="outside lower center", ncols=len(shown))
    return figure


def _history_figure(report: Report) -> Figure:
    order = {t.trial_id: i for i, t in enumerate(sorted(report.trials, key=lambda t: t.trial_id), 1)}
    scored = sorted((t for t in report.trials if report.score(t) is not None), key=lambda t: order[t.trial_id])
    figure = Figure(figsize=(7, 4), layout="constrained")
    axes = figure.add_subplot()
    for failed in (False, True):
        shown = [t for t in scored if (t.status == "ERROR") == failed]
        if shown:
            axes.scatter([order[t.trial_id] for t in shown], [100 * report.score(t) for t in shown],
                         marker="x" if failed else "o", label="failed trial" if failed else "trial")
    better = max if report.mode == "max" else min
    x, running_best = [], []
    for trial in (t for t in scored if t.status != "ERROR"):
        x.append(order[trial.trial_id])
        running_best.append(better(running_best[-1], report.score(trial)) if running_best else report.score(trial))
    if x:
        axes.step(x, [100 * v for v in running_best], where="post", color="black", label="running best")
    axes.set(xlabel="trial (creation order)", ylabel=f"{report.metric} (%)", title=f"Study history: {report.name}")
    axes.legend()
    return figure


def _param_figure(report: Report, name: str) -> Figure | None:
    points = [(t.params[name], report.score(t), report.is_baseline(t)) for t in report.ranked
              if isinstance(t.params.get(name), (int, float)) and not isinstance(t.params[name], bool)]
    if not points:
        return None
    figure = Figure(figsize=(6, 4), layout="constrained")
    axes = figure.add_subplot()
    for baseline in (False, True):
        shown = [(x, y) for x, y, b in points if b == baseline]
        if shown:
            axes.scatter([x for x, _ in shown], [100 * y for _, y in shown], marker="s" if baseline else "o",
                         label=f"baseline ({report.baseline_name})" if baseline else "trial")
    axes.set(xlabel=name, ylabel=f"{report.metric} (%)", title=f"{name} vs {report.metric}")
    axes.legend()
    return figure


def _file_safe(name: str) -> str:
    return re.sub(r"[^\w.-]", "_", name)


def _save(figure: Figure, path: Path) -> Path:
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=100)
    write_bytes(str(path), png.getvalue())
    return path


