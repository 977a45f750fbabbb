"""report.md: how the winner was chosen, the verdict against the baseline, a compare study's
comparison (and its unlabeled shapes), the trials table and the over-seeds table."""

import math
from pathlib import Path

from study.report.cells import cell, md_row, mean_std, percent, seconds
from study.report.comparison import RESAMPLES
from study.report.ranking import TAIL_CLASSES, GroupSummary, Report
from study.report.shapes import GM
from study.report.trials import TrialRecord
from study.tune_files import GENERIC_LABELS
from trainables.metrics import MEASURES, metric_name, on_split

# What "beat the baseline" is judged on.
COMPARED = (metric_name("test", "accuracy", "median_10"), metric_name("test", "gm", "median_10"))


def compare_to_baseline(best: TrialRecord, baseline: TrialRecord, name: str = "fixmatch") -> str | None:
    """One plain sentence: did the best trial beat the study's baseline (`name`) in median-10 test
    accuracy and GM (percentage points)? None if either lacks the numbers."""
    if any(t.value(k) is None for t in (best, baseline) for k in COMPARED):
        return None
    if best.trial_id == baseline.trial_id:
        return f"The best trial is the baseline ({name}) itself, trial {baseline.trial_id}: no other trial beat it."
    d_accuracy, d_gm = (best.value(k) - baseline.value(k) for k in COMPARED)
    return _verdict(f"{best.method} (trial {best.trial_id})",
                    f"the baseline ({name}: {baseline.method}, trial {baseline.trial_id})",
                    d_accuracy, d_gm, "test, median of the last 10 evaluations")


def compare_groups(best: GroupSummary, baseline: GroupSummary) -> str | None:
    """The same sentence over seeds, on the groups' mean median-10 test accuracy and GM."""
    if best is baseline:
        return (f"Over seeds, the baseline {baseline.name} ({baseline.method}, {len(baseline.trials)} seeds) is the "
                "best: nothing beat it.")
    d_accuracy = best.test["accuracy"][0] - baseline.test["accuracy"][0]
    d_gm = best.test["gm"][0] - baseline.test["gm"][0]
    if math.isnan(d_accuracy) or math.isnan(d_gm):
        return None
    return _verdict(f"Over seeds, {best.name} ({best.method}, {len(best.trials)} seeds)",
                    f"the baseline {baseline.name} ({baseline.method}, {len(baseline.trials)} seeds)",
                    d_accuracy, d_gm, "test, mean median-10")


def _verdict(who: str, baseline: str, d_accuracy: float, d_gm: float, basis: str) -> str:
    """'beat' only when both accuracy and GM are higher; differences in percentage points."""
    difference = f"{100 * d_accuracy:+.1f} points accuracy and {100 * d_gm:+.1f} GM ({basis})."
    if d_accuracy > 0 and d_gm > 0:
        return f"{who} beat {baseline} by {difference}"
    return f"{who} did not beat {baseline}: {difference}"


def _short(metric: str) -> str:
    """valid_balanced_accuracy_median_10 -> 'valid bal-acc med10' (table headers)."""
    split, rest = metric.split("_", 1)
    for long, short in (("balanced_accuracy", "bal-acc"), ("accuracy", "acc"), ("gm", "GM"),
                        ("_median_10", " med10"), ("_median_20", " med20")):
        rest = rest.replace(long, short)
    return f"{split} {rest}"


def table_metrics(report: Report) -> list[str]:
    """The metric columns of the markdown table: the study's metric first, then the test split's
    median-10 measures (the validation ones too when the study had a validation set)."""
    columns = [report.metric]
    splits = ("valid", "test") if report.has_validation else ("test",)
    columns += [metric_name(split, measure, "median_10") for split in splits for measure in MEASURES]
    return list(dict.fromkeys(columns))


def format_table(report: Report) -> str:
    """The trials as a markdown table, best first (metrics in %)."""
    metrics = table_metrics(report)
    header = ["#", "trial", "label", "method", *report.param_columns, *map(_short, metrics), "steps", "wall s",
              "status"]
    lines = [md_row(header), md_row(["---"] * len(header))]
    for rank, trial in enumerate(report.trials, 1):
        cells = [rank, trial.trial_id, trial.label, trial.method, *(trial.params.get(n) for n in report.param_columns),
                 *(percent(trial.value(m)) for m in metrics), trial.steps, seconds(trial.wall_time_s),
                 trial.status_text]
        lines.append(md_row(cells))
    return "\n".join(lines)


def format_groups(report: Report) -> str:
    """The over-seeds table: per configuration, the mean of the study's metric (unless it is one
    of the test measures shown anyway) and the test measures as mean ± std over seeds (%)."""
    tail_classes = sorted({c for group in report.groups for c in group.tail_class_accuracy})
    own_column = report.metric not in {metric_name("test", m, "median_10") for m in MEASURES}
    header = ["group", "method", "seeds", *([f"{_short(report.metric)} (mean)"] if own_column else []),
              *(f"{_short(metric_name('test', m, 'median_10'))} (mean ± std)" for m in MEASURES),
              f"test tail-{TAIL_CLASSES} class acc (mean)", *(f"class {c} acc" for c in tail_classes)]
    lines = [md_row(header), md_row(["---"] * len(header))]
    for group in report.groups:
        score = [percent(group.score)] if own_column else []
        lines.append(md_row([group.name, group.method, ", ".join(map(cell, group.seeds)), *score,
                              *(mean_std(*group.test[m]) for m in MEASURES),
                              percent(group.tail_accuracy_mean),
                              *(percent(group.tail_class_accuracy.get(c)) for c in tail_classes)]))
    return "\n".join(lines)


def selection_lines(report: Report) -> list[str]:
    """How the winner was chosen, first thing in the report."""
    if report.selected_on_test:
        return ["**Selected on the test split**: the winner was chosen by its test score "
                f"({report.metric}), so its number is optimistic; cut a validation set "
                "(split.valid_size) to select on validation.", ""]
    return [f"Selected on the validation split ({report.metric}); test numbers are reported beside it, "
            "never used to choose.", ""]


def unfinished_lines(report: Report) -> list[str]:
    """Above everything else, when the study has trials still to run: that it is unfinished, and how to go on."""
    why = report.unfinished()
    if why is None:
        return []
    command = report.study.get("resume_command")  # study.json records it (study/directory.py)
    how = f"`{command}`" if command else "the command that started it, and --resume"
    return [f"**Unfinished**: {why}; the study was interrupted (or is still running). Continue it with {how}; the "
            "numbers below are those of the trials so far.", ""]


def format_markdown(report: Report) -> str:
    study, config = report.study, report.study.get("config", {})
    counts = ", ".join(f"{n} {status}" for status, n in report.counts().items())
    direction = "higher" if report.mode == "max" else "lower"
    lines = [f"# Study {report.name}", "", *unfinished_lines(report), *selection_lines(report)]
    if study:
        lines.append(f"- Dataset: {_dataset(study)}")
        swept = f" (swept: {', '.join(report.swept)})" if report.swept else ""
        lines.append(f"- Search space: {cell(config.get('space', '?'))}{swept}")
    lines.append(f"- Ranked by: {report.metric} ({direction} is better), the number the study's search and "
                 "scheduler use too; accuracy, GM and balanced accuracy in %")
    lines.append(f"- Trials: {len(report.trials)}: {counts}")
    best = report.best
    if best is None:
        lines.append("- Best: none yet (no trial has reported)")
    else:
        lines.append(f"- Best: trial {best.trial_id} ({_describe(best, report)}): {report.metric} "
                     f"{percent(report.score(best))}; test {_numbers(best, 'test')}; {best.steps} steps, "
                     f"{seconds(best.wall_time_s)} s")
        on_test = report.best_on_test
        if not report.selected_on_test and on_test is not None:
            same = "the same trial" if on_test is best else f"trial {on_test.trial_id} ({_describe(on_test, report)})"
            lines.append(f"- Had the study ranked on {report.test_twin} instead, it would have picked {same}: "
                         f"test {_numbers(on_test, 'test')}")
    baseline = report.baseline
    sentence = compare_to_baseline(best, baseline, report.baseline_name) if best and baseline else None
    if sentence:
        lines += ["", f"**{sentence}**"]
    elif best and not report.is_baseline(best):
        lines += ["", f"No trial of the baseline ({report.baseline_name}) has results: nothing to compare with."]
    if report.comparison is not None:
        lines += ["", *format_comparison(report)]
    if report.shapes is not None:
        lines += ["", *format_shapes(report)]
    lines += ["", "## Trials", "", format_table(report)]
    if report.groups:
        lines += ["", "## Over seeds", "", format_groups(report), "",
                  (f"Configurations ranked by the mean of {report.metric} over seeds; test numbers are medians of "
                   "the last 10 evaluations, mean ± sample std over seeds; the tail is the "
                   f"last {TAIL_CLASSES} classes (the rarest in a long-tailed split), test split, at the last "
                   "evaluation, averaged over seeds.")]
        baseline_group = next((g for g in report.groups if report.is_baseline_group(g)), None)
        group_sentence = compare_groups(report.groups[0], baseline_group) if baseline_group else None
        if group_sentence:
            lines += ["", f"**{group_sentence}**"]
    failed = [t for t in report.trials if t.status in ("ERROR", "LOST")]
    if failed:
        lines += ["", "## Failed trials", ""]
        lines += [f"- {t.trial_id}: {t.error or 'no error message'}"
                  + (f" (see {t.path.name}/error.txt)" if t.path else "") for t in failed]
    plots = sorted(p.name for p in (report.study_dir / "plots").glob("*.png"))
    if plots:
        lines += ["", "## Plots", ""] + [f"![{Path(name).stem}](plots/{name})" for name in plots]
    return "\n".join(lines) + "\n"


def format_comparison(report: Report) -> list[str]:
    """The "Comparison" section: the budget, each method defaults and tuned over the confirmation
    seeds, the leader against each other method, how stable the selections are."""
    comparison, config = report.comparison, report.study.get("config", {})
    compare, leader = config.get("compare", {}), report.comparison.leader
    seeds = ", ".join(map(str, comparison.seeds))
    defaults = compare.get("confirm_defaults", True)
    shape = (config.get("split") or {}).get("unlabeled") if compare.get("unlabeled") else None
    lines = ["## Comparison", "",
             f"Every method had the same budget: {compare.get('trials_per_method')} stage-1 trials "
             f"({config.get('search', {}).get('algorithm')}, its reference defaults first) of "
             f"{config.get('train', {}).get('steps')} steps on the same split, scheduler "
             f"{config.get('scheduler', {}).get('name')}; each selected on {comparison.metric}. Stage 2 ran each "
             f"method's winner (tuned){' and its reference defaults' if defaults else ''} with the seeds {seeds}, "
             "the same for every method"
             + (f"; here on the {shape} unlabeled shape stage 1 searched on (every shape: the next section)" if shape
                else "")
             + ". Test numbers: medians of the last 10 evaluations, mean ± std over the seeds [95% CI].", ""]
    measures = [(metric_name("test", m, "median_10"), _short(metric_name("test", m, "median_10"))) for m in MEASURES]
    header = ["method", "config", "tuned values", f"stage-1 best {_short(comparison.metric)}",
              f"{_short(comparison.metric)} (mean)", *(short for _, short in measures), "selection stable"]
    lines += [md_row(header), md_row(["---"] * len(header))]
    for method in comparison.methods:
        for kind in ("defaults", "tuned") if defaults else ("tuned",):
            intervals = method.intervals[kind]
            tuned = kind == "tuned"
            values = ", ".join(f"{k}={cell(v)}" for k, v in (method.winner.params.items() if method.winner else [])
                               if k in report.swept) if tuned else "reference"
            lines.append(md_row([method.label, kind, values,
                                 percent(method.winner.value(comparison.metric)) if tuned and method.winner else "",
                                 percent(intervals[comparison.metric].mean),
                                 *(_interval(intervals[m]) for m, _ in measures),
                                 _share(method.selection_stability) if tuned else ""]))
    lines += ["", f"**Leader (best mean {comparison.metric} over the seeds, tuned): {leader.label}.**", ""]
    if comparison.differences:
        header = ["against", *(f"Δ {short}" for _, short in measures), "paired t-test p", "verdict"]
        lines += [md_row(header), md_row(["---"] * len(header))]
        test = on_split(comparison.metric, "test")
        for other, differences in comparison.differences.items():
            lines.append(md_row([comparison.by_name(other).label,
                                 *(_interval(differences[m].interval, signed=True) for m, _ in measures),
                                 cell(differences[test].p_value), comparison.sentence(other)]))
        lines.append("")
    if comparison.pairwise and len(comparison.methods) > 2:
        test = on_split(comparison.metric, "test")
        labels = [m.label for m in comparison.methods]
        lines += [f"Every pair, tuned: row minus column in {_short(test)}, mean over the paired seeds [95% CI]; "
                  "a pair whose interval excludes 0 is marked *.", "",
                  md_row(["", *labels]), md_row(["---"] * (len(labels) + 1))]
        for row in comparison.methods:
            lines.append(md_row([row.label, *(_pair(comparison.pairwise[(row.name, column.name)])
                                             if column is not row else "–" for column in comparison.methods)]))
        lines.append("")
    if comparison.leader_stability is not None:
        lines.append(f"Resampling the validation rows ({RESAMPLES} bootstrap resamples of the stored per-row "
                     f"predictions), {leader.label} stays the leader in {_share(comparison.leader_stability)} of "
                     "them; 'selection stable' is the share in which a method's stage-1 winner stays its best "
                     "trial.")
    return lines


def format_shapes(report: Report) -> list[str]:
    """The "Across unlabeled shapes" section: each method's tuned configuration on every shape, and
    each against the shape's leader."""
    across, config = report.shapes, report.study.get("config", {})
    base = (config.get("split") or {}).get("unlabeled")
    shapes = [result.shape for result in across.shapes]
    lines = ["## Across unlabeled shapes", "",
             f"Stage 2 also ran every method's tuned configuration (searched on the {base} shape) on each unlabeled "
             f"shape with the seeds {', '.join(map(str, across.seeds))}: the same labeled and validation rows, a pool "
             "of another class distribution (docs/method.md, \"Unlabeled shapes\"). Test GM, median of the last 10 "
             "evaluations, mean over the seeds [95% CI]; in bold each shape's leader, the best mean "
             f"{across.metric} (chosen on validation, not on test).", "",
             md_row(["method", *shapes]), md_row(["---"] * (len(shapes) + 1))]
    for name, label in across.methods.items():
        cells = []
        for result in across.shapes:
            text = _interval(result.intervals[name][GM], brief=True)
            cells.append(f"**{text}**" if result.leader == name else text)
        lines.append(md_row([label, *cells]))
    lines += ["", "Each method against the shape's leader: leader minus method in test GM, mean over the paired "
              "seeds [95% CI]; * where the interval excludes 0 (the leader is ahead), else a tie within the noise of "
              "the seeds.", "", md_row(["method", *shapes]), md_row(["---"] * (len(shapes) + 1))]
    for name, label in across.methods.items():
        lines.append(md_row([label, *("leader" if result.leader == name else
                                      _pair(result.differences[name]) if name in result.differences else "–"
                                      for result in across.shapes)]))
    leaders = ", ".join(f"{result.shape}: {across.methods[result.leader]}" for result in across.shapes
                        if result.leader)
    if leaders:
        lines += ["", f"Leaders: {leaders}."]
    return lines


def _interval(interval, signed: bool = False, brief: bool = False) -> str:
    if not interval.n:
        return "–"
    sign = "+" if signed else ""
    text = f"{100 * interval.mean:{sign}.1f}"
    if interval.n > 1:
        spread = "" if brief else f" ± {100 * interval.std:.1f}"
        text += f"{spread} [{100 * interval.low:{sign}.1f}, {100 * interval.high:{sign}.1f}]"
    return text


def _pair(difference) -> str:
    interval = difference.interval
    if interval.n < 2:
        return _interval(interval, signed=True)
    apart = interval.low > 0 or interval.high < 0
    return (f"{100 * interval.mean:+.1f} [{100 * interval.low:+.1f}, {100 * interval.high:+.1f}]"
            + ("*" if apart else ""))


def _share(value) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def _dataset(study: dict) -> str:
    config, dataset = study.get("config", {}), study.get("dataset")
    name = dataset.get("name") if isinstance(dataset, dict) else dataset
    name = name or config.get("dataset", "?")
    split = config.get("split") or {}
    details = ", ".join(f"{k} {v}" for k, v in split.items() if v is not None and k != "kind")
    return f"{name}, split {split['kind']} ({details})" if split.get("kind") else str(name)


def _describe(trial: TrialRecord, report: Report) -> str:
    names = [*report.param_columns, "seed"]  # the seed has a report.csv column of its own
    params = ", ".join(f"{n}={cell(trial.params[n])}" for n in names if n in trial.params and n != "variant")
    label = f"{trial.label}: " if trial.label not in GENERIC_LABELS else ""
    return f"{label}{trial.method}" + (f", {params}" if params else "")


def _numbers(trial: TrialRecord, split: str) -> str:
    """'accuracy 91.0, GM 90.1, balanced accuracy 90.5 (medians of the last 10)'."""
    values = ", ".join(f"{measure.replace('_', ' ').replace('gm', 'GM')} "
                       f"{percent(trial.value(metric_name(split, measure, 'median_10')))}" for measure in MEASURES)
    return f"{values} (medians of the last 10 evaluations)"


