"""Study reports (DESIGN.md 7): report.md, report.csv and plots/*.png, read from a study directory.

    python -m study.report results/digits-thresholds-20250101-120000

Everything comes from the files Ray Tune writes (params.json, result.json, error.txt, the
experiment_state JSON) and the launcher's study.json, so a report can be rebuilt at any time,
on any machine, with no Ray cluster, also while the study is still running: a trial without
results yet is listed last, and a result line cut in half is skipped. Every output is written
to a temporary file and renamed into place, so a report being rebuilt never looks complete
while it is half-written.

Trials are ranked by the study's metric (`metric` in study.json, by default the validation
split's balanced accuracy, median of the last 10 evaluations): the same number the search
optimised and the scheduler pruned on. The report gives the test metrics of the trial chosen on
validation beside it; a study that selected on the test split says so in its first lines.
Accuracy, GM and balanced accuracy are fractions in the CSV (as reported) and percentages in the
markdown.
"""

import argparse
import csv
import io
import json
import math
import os
import re
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure

from data_prep.parquet import current_umask
from search_spaces import VARIANTS
from study.config import StudyError

FLAGS = ("cap", "cai", "cadr")
EVAL_SPLITS = ("valid", "test")
MEASURES = ("accuracy", "gm", "balanced_accuracy")
# report.csv's metric columns -> the reported key (`_last` is the value at the last evaluation).
METRIC_COLUMNS = {f"{split}_{measure}_{window}": f"{split}_{measure}" + ("" if window == "last" else f"_{window}")
                  for split in EVAL_SPLITS for measure in MEASURES for window in ("last", "median_10", "median_20")}
LEGACY_METRIC = "test_balanced_accuracy_median_10"  # studies whose study.json names no metric
STATUSES = ("TERMINATED", "RUNNING", "PENDING", "PAUSED", "ERROR")
TAIL_CLASSES = 3  # the paper's ablation table reports the last (rarest) classes
METHOD_NAMES = {  # (cap, cai, cadr) -> the paper's name
    (False, False, False): "FixMatch",
    (True, False, False): "FixMatch+CAP",
    (False, True, False): "FixMatch+CAI",
    (True, True, False): "FixMatch+CAP+CAI",
    (True, True, True): "CADR",
}


# --- trials ----------------------------------------------------------------------------------


@dataclass
class TrialRecord:
    """One Tune trial as its files describe it. `results` are the result.json lines in order."""

    trial_id: str
    params: dict
    status: str
    results: list[dict] = field(default_factory=list)
    path: Path | None = None
    error: str | None = None  # the exception line of error.txt

    @property
    def last(self) -> dict:
        return self.results[-1] if self.results else {}

    def value(self, key: str) -> float | None:
        """The last reported value of `key`; None if never reported or not a finite number."""
        value = self.last.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return None
        return float(value)

    @property
    def steps(self) -> int | None:
        steps = self.last.get("step", self.last.get("training_iteration"))
        return int(steps) if isinstance(steps, (int, float)) else None

    @property
    def wall_time_s(self) -> float | None:
        return self.value("time_total_s")

    @property
    def flags(self) -> dict:
        """The loss flags the trial trained with: a `variant` param overrides the flags."""
        flags = {name: bool(self.params.get(name, False)) for name in FLAGS}
        return {**flags, **VARIANTS.get(self.params.get("variant"), {})}

    @property
    def method(self) -> str:
        flags = self.flags
        return METHOD_NAMES.get(tuple(flags[name] for name in FLAGS), "+".join(n.upper() for n in FLAGS if flags[n]))

    @property
    def label(self) -> str:
        return str(self.params.get("label", ""))

    @property
    def is_baseline(self) -> bool:
        """A FixMatch baseline: labelled so, or trained with every correction off."""
        return self.label == "fixmatch" or not any(self.flags.values())

    @property
    def group(self) -> str:
        """What repeats over seeds: the variant, else a fixed point's label, else the method."""
        if "variant" in self.params:
            return str(self.params["variant"])
        return self.label if self.label not in ("", "search") else self.method

    @property
    def class_accuracy(self) -> list[float]:
        """Last per-class test accuracies, class 0 first (NaN where a class was not reported)."""
        indices = [int(k.split("/", 1)[1]) for k in self.last if re.fullmatch(r"test_class_accuracy/\d+", k)]
        if not indices:
            return []
        values = [self.value(f"test_class_accuracy/{c}") for c in range(max(indices) + 1)]
        return [math.nan if v is None else v for v in values]


def load_trials(study_dir) -> list[TrialRecord]:
    """Every trial of a study directory, in the order Tune created them (by trial id).

    Statuses come from Tune's newest experiment_state-*.json; a trial it does not list yet is
    ERROR if it left an error file, TERMINATED if its last result is final, RUNNING if it has
    results and PENDING if not. Trials Tune lists but has not started have no directory."""
    study_dir = Path(study_dir)
    states = _experiment_state(study_dir)
    by_dir = {state.get("relative_logdir"): state for state in states if state.get("relative_logdir")}
    planned_steps = _study_json(study_dir).get("config", {}).get("train", {}).get("steps")
    trials, seen = [], set()
    for path in sorted(p for p in _subdirs(study_dir) if (p / "params.json").is_file()):
        params = _read_json(path / "params.json")
        if params is None:  # being written
            continue
        results = _read_results(path / "result.json")
        error = _error_line(path)
        state = by_dir.get(path.name)
        trial_id = (state or {}).get("trial_id") or _trial_id(path.name, results)
        status = state["status"] if state and state.get("status") else _inferred_status(results, error, planned_steps)
        trials.append(TrialRecord(trial_id, _flat_params(params), status, results, path, error))
        seen.add(trial_id)
    for state in states:  # created by Tune, not started yet
        if state.get("trial_id") and state["trial_id"] not in seen:
            trials.append(TrialRecord(state["trial_id"], _flat_params(state.get("config") or {}),
                                      state.get("status") or "PENDING"))
    return sorted(trials, key=lambda t: t.trial_id)


def _flat_params(params: dict) -> dict:
    # A TorchTrainer run under Tune nests the trial's config under train_loop_config.
    nested = params.get("train_loop_config")
    rest = {k: v for k, v in params.items() if k != "train_loop_config"}
    return {**nested, **rest} if isinstance(nested, dict) else rest


def _inferred_status(results, error, planned_steps) -> str:
    if error is not None:
        return "ERROR"
    if not results:
        return "PENDING"
    last = results[-1]
    finished = last.get("done") is True or (planned_steps is not None and last.get("step", 0) >= planned_steps)
    return "TERMINATED" if finished else "RUNNING"


def _trial_id(dir_name: str, results: list[dict]) -> str:
    for result in results:
        if result.get("trial_id"):
            return str(result["trial_id"])
    match = re.search(r"(?:^|_)([0-9a-f]{5,}_\d{5})(?:_|$)", dir_name)  # Tune's <trainable>_<id>_<tag>
    return match.group(1) if match else dir_name


def _experiment_state(study_dir: Path) -> list[dict]:
    """The per-trial JSON of Tune's newest experiment state, or [] if there is none (yet) or it
    is being rewritten. Plain JSON only: the pickled fields Tune embeds are never decoded."""
    files = sorted(study_dir.glob("experiment_state-*.json"))  # Tune picks the newest by name too
    state = _read_json(files[-1]) if files else None
    if not isinstance(state, dict):
        return []
    trials = []
    for entry in state.get("trial_data", []):
        # Tune 2.x stores each trial as [trial JSON, run metadata JSON], both JSON strings.
        trial = entry[0] if isinstance(entry, (list, tuple)) and entry else entry
        try:
            trial = json.loads(trial) if isinstance(trial, str) else trial
        except json.JSONDecodeError:
            continue
        if isinstance(trial, dict):
            trials.append(trial)
    return trials


def _read_results(path: Path) -> list[dict]:
    """result.json: one JSON object per report. A line still being written is skipped."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise StudyError(f"cannot read {path}: {exc.strerror}") from None
    results = []
    for line in text.splitlines():
        try:
            result = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(result, dict):
            results.append(result)
    return results


def _error_line(trial_dir: Path) -> str | None:
    """The exception line (last non-empty line) of error.txt; '' if only error.pkl exists."""
    try:
        lines = [line.strip() for line in (trial_dir / "error.txt").read_text(errors="replace").splitlines()]
    except FileNotFoundError:
        return "" if (trial_dir / "error.pkl").exists() else None
    except OSError as exc:
        raise StudyError(f"cannot read {trial_dir / 'error.txt'}: {exc.strerror}") from None
    return next((line for line in reversed(lines) if line), "")


def _read_json(path: Path):
    """A JSON file's content, or None if it is missing, vanished or half-written."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    except OSError as exc:
        raise StudyError(f"cannot read {path}: {exc.strerror}") from None


def _study_json(study_dir: Path) -> dict:
    path = study_dir / "study.json"
    if not path.exists():
        return {}
    study = _read_json(path)
    if not isinstance(study, dict):
        raise StudyError(f"{path} is not a valid study file (expected a JSON object)")
    return study


def _subdirs(study_dir: Path) -> list[Path]:
    try:
        return [p for p in study_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    except OSError as exc:
        raise StudyError(f"cannot list {study_dir}: {exc.strerror}") from None


# --- the report ------------------------------------------------------------------------------

@dataclass
class GroupSummary:
    """One configuration over seeds: the mean of the study's metric (what ranks the groups), mean
    and sample std (n - 1) of each median-10 test measure, and the test accuracy of the tail classes
    (last TAIL_CLASSES classes, last evaluation): their mean, and each one's mean over seeds."""

    name: str
    trials: list[TrialRecord]
    score: float  # mean of the study's metric
    test: dict[str, tuple[float, float | None]]  # measure -> (mean, std) of test_<measure>_median_10
    tail_accuracy_mean: float | None
    tail_class_accuracy: dict[int, float]  # class index -> mean over seeds

    @property
    def seeds(self) -> list:
        return [t.params.get("seed") for t in self.trials]

    @property
    def method(self) -> str:
        return self.trials[0].method

    @property
    def is_baseline(self) -> bool:
        return all(t.is_baseline for t in self.trials)


@dataclass
class Report:
    study_dir: Path
    name: str
    study: dict  # study.json ({} for a plain Tune experiment)
    metric: str  # what the study searched, pruned and ranks on
    mode: str
    trials: list[TrialRecord]  # best first; ERROR trials after the others, trials without results last
    param_columns: list[str]
    groups: list[GroupSummary]  # best first; [] unless some configuration ran with several seeds

    def score(self, trial: TrialRecord) -> float | None:
        return trial.value(self.metric)

    @property
    def selected_on_test(self) -> bool:
        return self.metric.startswith("test_")

    @property
    def test_twin(self) -> str:
        """The study's metric measured on the test split (itself when it selected on test)."""
        return "test_" + self.metric.split("_", 1)[1]

    @property
    def ranked(self) -> list[TrialRecord]:
        """Trials that can be compared: they have a score and did not fail."""
        return [t for t in self.trials if t.status != "ERROR" and self.score(t) is not None]

    @property
    def best(self) -> TrialRecord | None:
        return self.ranked[0] if self.ranked else None

    @property
    def best_on_test(self) -> TrialRecord | None:
        """The trial the study would have picked had it ranked on the test split instead."""
        scored = [t for t in self.ranked if t.value(self.test_twin) is not None]
        if not scored:
            return None
        sign = -1 if self.mode == "max" else 1
        return min(scored, key=lambda t: sign * t.value(self.test_twin))

    @property
    def baseline(self) -> TrialRecord | None:
        """The best FixMatch baseline trial, if the study ran one."""
        return next((t for t in self.ranked if t.is_baseline), None)

    @property
    def swept(self) -> list[str]:
        return list(self.study.get("swept", []))

    @property
    def has_validation(self) -> bool:
        return any("valid_accuracy" in result for trial in self.trials for result in trial.results)

    def counts(self) -> dict[str, int]:
        found = [t.status for t in self.trials]
        order = list(STATUSES) + sorted(set(found) - set(STATUSES))
        return {status: found.count(status) for status in order if status in found}

    def stopped_early(self) -> list[TrialRecord]:
        """TERMINATED trials that stopped before the planned steps (pruned by the scheduler, or
        stopped by a stopping rule)."""
        planned = self.study.get("config", {}).get("train", {}).get("steps")
        if planned is None:
            return []
        return [t for t in self.trials if t.status == "TERMINATED" and t.steps is not None and t.steps < planned]

    def rows(self) -> list[dict]:
        """report.csv: one row per trial, best first, values exactly as reported."""
        rows = []
        for trial in self.trials:
            row = {"trial_id": trial.trial_id, "label": trial.label, "method": trial.method, **trial.flags}
            row.update({name: trial.params.get(name) for name in self.param_columns})
            row.update({column: trial.value(key) for column, key in METRIC_COLUMNS.items()})
            row.update(steps=trial.steps, wall_time_s=trial.wall_time_s, status=trial.status, error=trial.error)
            rows.append(row)
        return rows


def study_metric(study: dict) -> tuple[str, str]:
    """(metric, mode) the study selected on, as study.json records them."""
    config = study.get("config", {})
    metric = study.get("metric") or config.get("metric") or LEGACY_METRIC
    return metric, study.get("mode") or config.get("mode") or "max"


def build_report(study_dir) -> Report:
    """Read a study directory into a Report; StudyError if it is not one."""
    study_dir = Path(study_dir)
    if not study_dir.is_dir():
        raise StudyError(f"study directory {study_dir} does not exist")
    study = _study_json(study_dir)
    trials = load_trials(study_dir)
    if not trials:
        what = "has no trials yet" if study else "is not a study directory (no study.json and no trial directories)"
        raise StudyError(f"{study_dir} {what}")
    metric, mode = study_metric(study)
    if mode not in ("max", "min"):
        raise StudyError(f"{study_dir / 'study.json'}: mode must be max or min, got {mode!r}")
    ranked = sorted(trials, key=lambda t: _rank(t, metric, mode))
    return Report(study_dir, study.get("name", study_dir.name), study, metric, mode, ranked,
                  _param_columns(trials, study.get("swept", [])), _groups(ranked, metric, mode, _grid_parameters(study)))


def _rank(trial: TrialRecord, metric: str, mode: str) -> tuple:
    score = trial.value(metric)
    if score is None:
        return (2, 0.0)
    return (int(trial.status == "ERROR"), -score if mode == "max" else score)


def _param_columns(trials: list[TrialRecord], swept) -> list[str]:
    """The swept params first (study.json order), then the other varying ones (seed, variant)."""
    names = {name for t in trials for name in t.params} - set(FLAGS) - {"label"}
    return [n for n in swept if n in names] + sorted(names - set(swept))


def _grid_parameters(study: dict) -> list[str]:
    """The parameters the study ran as a grid (study.json describes each as 'each of {...}')."""
    return [name for name, described in study.get("space", {}).items() if str(described).startswith("each of")]


def _group_name(trial: TrialRecord, swept) -> str:
    """The trial's group, plus any other grid parameter but the seed (e.g. a grid over
    variant x gamma_l x seed groups by variant and gamma_l)."""
    others = [name for name in swept if name not in ("seed", "variant")]
    return ", ".join([trial.group] + [f"{name}={_cell(trial.params.get(name))}" for name in others])


def _groups(best_first: list[TrialRecord], metric: str, mode: str, swept=()) -> list[GroupSummary]:
    by_group: dict[str, list[TrialRecord]] = {}
    for trial in best_first:
        if trial.status != "ERROR" and trial.value(metric) is not None:
            by_group.setdefault(_group_name(trial, swept), []).append(trial)
    if not any(len({t.params.get("seed") for t in group if "seed" in t.params}) > 1 for group in by_group.values()):
        return []
    summaries = []
    for name, trials in by_group.items():
        test = {}
        for measure in MEASURES:
            values = [t.value(f"test_{measure}_median_10") for t in trials]
            test[measure] = (_mean(values), _std(values))
        per_class = [t.class_accuracy for t in trials if t.class_accuracy]
        tails = [_mean(classes[-TAIL_CLASSES:]) for classes in per_class]
        num_classes = min((len(classes) for classes in per_class), default=0)
        tail_classes = range(max(num_classes - TAIL_CLASSES, 0), num_classes)
        summaries.append(GroupSummary(
            name, sorted(trials, key=lambda t: _seed_order(t.params.get("seed"))),
            _mean([t.value(metric) for t in trials]), test,
            _mean(tails) if tails else None, {c: _mean([classes[c] for classes in per_class]) for c in tail_classes}))
    return sorted(summaries, key=lambda g: -g.score if mode == "max" else g.score)


def _seed_order(seed) -> tuple:
    return (0, seed, "") if isinstance(seed, (int, float)) else (1, 0, str(seed))


def _mean(values) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.fmean(values) if values else math.nan


def _std(values) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.stdev(values) if len(values) > 1 else None


# --- text ------------------------------------------------------------------------------------

COMPARED = ("test_accuracy_median_10", "test_gm_median_10")  # what "beat the baseline" is judged on


def compare_to_baseline(best: TrialRecord, baseline: TrialRecord) -> str | None:
    """One plain sentence: did the best trial beat the FixMatch baseline in median-10 test accuracy
    and GM (percentage points)? None if either lacks the numbers."""
    if any(t.value(k) is None for t in (best, baseline) for k in COMPARED):
        return None
    if best.trial_id == baseline.trial_id:
        return f"The best trial is the FixMatch baseline itself ({baseline.trial_id}): no corrected trial beat it."
    d_accuracy, d_gm = (best.value(k) - baseline.value(k) for k in COMPARED)
    return _verdict(f"{best.method} (trial {best.trial_id})", f"the FixMatch baseline (trial {baseline.trial_id})",
                    d_accuracy, d_gm, "test, median of the last 10 evaluations")


def compare_groups(best: GroupSummary, baseline: GroupSummary) -> str | None:
    """The same sentence over seeds, on the groups' mean median-10 test accuracy and GM."""
    if best is baseline:
        return f"Over seeds, FixMatch ({len(baseline.trials)} seeds) is the best method: no correction beat it."
    d_accuracy = best.test["accuracy"][0] - baseline.test["accuracy"][0]
    d_gm = best.test["gm"][0] - baseline.test["gm"][0]
    if math.isnan(d_accuracy) or math.isnan(d_gm):
        return None
    return _verdict(f"Over seeds, {best.method} ({len(best.trials)} seeds)", f"FixMatch ({len(baseline.trials)} seeds)",
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
    columns += [f"{split}_{measure}_median_10" for split in splits for measure in MEASURES]
    return list(dict.fromkeys(columns))


def format_table(report: Report) -> str:
    """The trials as a markdown table, best first (metrics in %)."""
    metrics = table_metrics(report)
    header = ["#", "trial", "label", "method", *report.param_columns, *map(_short, metrics), "steps", "wall s",
              "status"]
    lines = [_md_row(header), _md_row(["---"] * len(header))]
    for rank, trial in enumerate(report.trials, 1):
        cells = [rank, trial.trial_id, trial.label, trial.method, *(trial.params.get(n) for n in report.param_columns),
                 *(_percent(trial.value(m)) for m in metrics), trial.steps, _seconds(trial.wall_time_s), trial.status]
        lines.append(_md_row(cells))
    return "\n".join(lines)


def format_groups(report: Report) -> str:
    """The over-seeds table: per configuration, the mean of the study's metric and the test
    measures as mean ± std over seeds (%)."""
    tail_classes = sorted({c for group in report.groups for c in group.tail_class_accuracy})
    header = ["group", "method", "seeds", f"{_short(report.metric)} (mean)",
              *(f"{_short(f'test_{m}_median_10')} (mean ± std)" for m in MEASURES),
              f"test tail-{TAIL_CLASSES} class acc (mean)", *(f"class {c} acc" for c in tail_classes)]
    lines = [_md_row(header), _md_row(["---"] * len(header))]
    for group in report.groups:
        lines.append(_md_row([group.name, group.method, ", ".join(map(_cell, group.seeds)), _percent(group.score),
                              *(_mean_std(*group.test[m]) for m in MEASURES),
                              _percent(group.tail_accuracy_mean),
                              *(_percent(group.tail_class_accuracy.get(c)) for c in tail_classes)]))
    return "\n".join(lines)


def selection_lines(report: Report) -> list[str]:
    """How the winner was chosen, first thing in the report."""
    if report.selected_on_test:
        return ["**Selected on the test split**: the winner was chosen by its test score "
                f"({report.metric}), so its number is optimistic; cut a validation set "
                "(split.valid_size) to select on validation.", ""]
    return [f"Selected on the validation split ({report.metric}); test numbers are reported beside it, "
            "never used to choose.", ""]


def format_markdown(report: Report) -> str:
    study, config = report.study, report.study.get("config", {})
    early = len(report.stopped_early())
    counts = ", ".join(f"{n} {status}" + (f" ({early} of them stopped early, before the planned steps)"
                                          if status == "TERMINATED" and early else "")
                       for status, n in report.counts().items())
    direction = "higher" if report.mode == "max" else "lower"
    lines = [f"# Study {report.name}", "", *selection_lines(report)]
    if study:
        lines.append(f"- Dataset: {_dataset(study)}")
        swept = f" (swept: {', '.join(report.swept)})" if report.swept else ""
        lines.append(f"- Search space: {_cell(config.get('space', '?'))}{swept}")
    lines.append(f"- Ranked by: {report.metric} ({direction} is better), the metric the search optimised "
                 "and the scheduler pruned on; accuracy, GM and balanced accuracy in %")
    lines.append(f"- Trials: {len(report.trials)}: {counts}")
    best = report.best
    if best is None:
        lines.append("- Best: none yet (no trial has reported)")
    else:
        lines.append(f"- Best: trial {best.trial_id} ({_describe(best, report)}): {report.metric} "
                     f"{_percent(report.score(best))}; test {_numbers(best, 'test')}; {best.steps} steps, "
                     f"{_seconds(best.wall_time_s)} s")
        on_test = report.best_on_test
        if not report.selected_on_test and on_test is not None:
            same = "the same trial" if on_test is best else f"trial {on_test.trial_id} ({_describe(on_test, report)})"
            lines.append(f"- Had the study ranked on {report.test_twin} instead, it would have picked {same}: "
                         f"test {_numbers(on_test, 'test')}")
    baseline = report.baseline
    sentence = compare_to_baseline(best, baseline) if best and baseline else None
    if sentence:
        lines += ["", f"**{sentence}**"]
    elif best and not best.is_baseline:
        lines += ["", "No FixMatch baseline trial has results: nothing to compare with."]
    lines += ["", "## Trials", "", format_table(report)]
    if report.groups:
        lines += ["", "## Over seeds", "", format_groups(report), "",
                  (f"Configurations ranked by the mean of {report.metric} over seeds; test numbers are medians of "
                   "the last 10 evaluations, mean ± sample std over seeds; the tail is the "
                   f"last {TAIL_CLASSES} classes (the rarest in a long-tailed split), test split, at the last "
                   "evaluation, averaged over seeds.")]
        baseline_group = next((g for g in report.groups if g.is_baseline), None)
        group_sentence = compare_groups(report.groups[0], baseline_group) if baseline_group else None
        if group_sentence:
            lines += ["", f"**{group_sentence}**"]
    failed = [t for t in report.trials if t.status == "ERROR"]
    if failed:
        lines += ["", "## Failed trials", ""]
        lines += [f"- {t.trial_id}: {t.error or 'no error message'}"
                  + (f" (see {t.path.name}/error.txt)" if t.path else "") for t in failed]
    plots = sorted(p.name for p in (report.study_dir / "plots").glob("*.png"))
    if plots:
        lines += ["", "## Plots", ""] + [f"![{Path(name).stem}](plots/{name})" for name in plots]
    return "\n".join(lines) + "\n"


def _dataset(study: dict) -> str:
    config, dataset = study.get("config", {}), study.get("dataset")
    name = dataset.get("name") if isinstance(dataset, dict) else dataset
    name = name or config.get("dataset", "?")
    split = config.get("split") or {}
    details = ", ".join(f"{k} {v}" for k, v in split.items() if v is not None and k != "kind")
    return f"{name}, split {split['kind']} ({details})" if split.get("kind") else str(name)


def _describe(trial: TrialRecord, report: Report) -> str:
    params = ", ".join(f"{n}={_cell(trial.params[n])}" for n in report.param_columns
                       if n in trial.params and n != "variant")
    label = f"{trial.label}: " if trial.label not in ("", "search") else ""
    return f"{label}{trial.method}" + (f", {params}" if params else "")


def _numbers(trial: TrialRecord, split: str) -> str:
    """'accuracy 91.0, GM 90.1, balanced accuracy 90.5 (medians of the last 10)'."""
    values = ", ".join(f"{measure.replace('_', ' ').replace('gm', 'GM')} "
                       f"{_percent(trial.value(f'{split}_{measure}_median_10'))}" for measure in MEASURES)
    return f"{values} (medians of the last 10 evaluations)"


def _percent(value) -> str:
    return "–" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def _seconds(value) -> str:
    return "–" if value is None else f"{value:.0f}"


def _mean_std(mean, std) -> str:
    return _percent(mean) + ("" if std is None else f" ± {100 * std:.1f}")


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _md_row(cells) -> str:
    return "| " + " | ".join(_cell(c).replace("|", "\\|") for c in cells) + " |"


# --- plots -----------------------------------------------------------------------------------


def write_plots(report: Report) -> list[Path]:
    """plots/per_class_accuracy.png, plots/history.png and plots/param_<name>.png for each swept
    numeric param. Nothing is drawn before a trial has reported."""
    if report.best is None:
        return []
    plots = report.study_dir / "plots"
    try:
        plots.mkdir(exist_ok=True)
    except OSError as exc:
        raise StudyError(f"cannot write {plots}: {exc.strerror}") from None
    written = []
    figure = _per_class_figure(report)
    if figure is not None:
        written.append(_save(figure, plots / "per_class_accuracy.png"))
    written.append(_save(_history_figure(report), plots / "history.png"))
    for name in report.swept:
        figure = _param_figure(report, name)
        if figure is not None:
            written.append(_save(figure, plots / f"param_{_file_safe(name)}.png"))
    return written


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
    points = [(t.params[name], report.score(t), t.is_baseline) for t in report.ranked
              if isinstance(t.params.get(name), (int, float)) and not isinstance(t.params[name], bool)]
    if not points:
        return None
    figure = Figure(figsize=(6, 4), layout="constrained")
    axes = figure.add_subplot()
    for baseline in (False, True):
        shown = [(x, y) for x, y, b in points if b == baseline]
        if shown:
            axes.scatter([x for x, _ in shown], [100 * y for _, y in shown], marker="s" if baseline else "o",
                         label="FixMatch baseline" if baseline else "trial")
    axes.set(xlabel=name, ylabel=f"{report.metric} (%)", title=f"{name} vs {report.metric}")
    axes.legend()
    return figure


def _file_safe(name: str) -> str:
    return re.sub(r"[^\w.-]", "_", name)


def _save(figure: Figure, path: Path) -> Path:
    _write_atomic(path, lambda f: figure.savefig(f, format="png", dpi=100))
    return path


# --- files -----------------------------------------------------------------------------------


def write_report(study_dir) -> Report:
    """Rebuild plots/*.png, report.csv and report.md (in that order, each atomically)."""
    report = build_report(study_dir)
    write_plots(report)
    _write_atomic(report.study_dir / "report.csv", lambda f: f.write(_csv(report).encode()))
    _write_atomic(report.study_dir / "report.md", lambda f: f.write(format_markdown(report).encode()))
    return report


def _csv(report: Report) -> str:
    rows = report.rows()
    columns = ["trial_id", "label", "method", *FLAGS, *report.param_columns, *METRIC_COLUMNS,
               "steps", "wall_time_s", "status", "error"]
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    return out.getvalue()


def _write_atomic(path: Path, write) -> None:
    """Write through `write(binary file)` to a temporary file in the same directory, then rename."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise StudyError(f"cannot write {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except OSError as exc:
        raise StudyError(f"cannot write {path}: {exc.strerror}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# --- command line ----------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m study.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study_dir", help="a study directory (<storage>/<study name>): a path or a URI")
    args = parser.parse_args(argv)
    from study.storage import local_study

    try:
        with local_study(args.study_dir) as local:
            report = write_report(local)
    except StudyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
