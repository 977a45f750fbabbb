"""The ranking model: every trial ordered by the study's one metric, the trial the test split
would have picked, the baseline, and configurations summarised over seeds."""

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from data_prep.errors import DataPrepError
from study.config import TAGS, StudyConfig
from study.directory import read_study_json
from study.errors import StudyError
from study.report.cells import cell
from study.report.comparison import Comparison, build_comparison
from study.report.shapes import AcrossShapes, build_across_shapes, trial_shape
from study.report.trials import FLAGS, STATUSES, UNFINISHED, TrialRecord, load_trials
from study.tune_files import WINNERS_FILE, compare_experiments
from trainables.errors import TrainConfigError
from trainables.metrics import EVAL_SPLITS, MEASURES, WINDOWS, default_metric, metric_name, on_split, split_of

# report.csv's metric columns -> the reported key (`_last` is the value at the last evaluation).
METRIC_COLUMNS = {metric_name(split, measure, window or "last"): metric_name(split, measure, window)
                  for split in EVAL_SPLITS for measure in MEASURES for window in WINDOWS}
LEGACY_METRIC = default_metric(has_validation=False)  # studies whose study.json names no metric
TAIL_CLASSES = 3  # the paper's ablation table reports the last (rarest) classes

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
    baseline_name: str | None = "fixmatch"  # the study's `baseline`: a trial label, variant or group
    comparison: Comparison | None = None  # a compare study's verdict (study/report/comparison.py)
    shapes: AcrossShapes | None = None  # its stage 2 on several unlabeled shapes (study/report/shapes.py)

    def is_baseline(self, trial: TrialRecord) -> bool:
        """The study's `baseline` names the trial's label, its group (variant or method), or the
        value of one of its parameters (e.g. an `augment` string)."""
        name = self.baseline_name
        return name is not None and (name in (trial.label, trial.group) or name in map(str, trial.params.values()))

    def is_baseline_group(self, group: GroupSummary) -> bool:
        return all(self.is_baseline(t) for t in group.trials)

    def score(self, trial: TrialRecord) -> float | None:
        return trial.value(self.metric)

    @property
    def selected_on_test(self) -> bool:
        return split_of(self.metric) == "test"

    @property
    def test_twin(self) -> str:
        """The study's metric measured on the test split (itself when it selected on test)."""
        return on_split(self.metric, "test")

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
        """The best trial of the study's baseline, if it ran one."""
        return next((t for t in self.ranked if self.is_baseline(t)), None)

    @property
    def swept(self) -> list[str]:
        return list(self.study.get("swept", []))

    @property
    def has_validation(self) -> bool:
        return any(metric_name("valid", "accuracy") in result for trial in self.trials for result in trial.results)

    def counts(self) -> dict[str, int]:
        found = [t.status for t in self.trials]
        order = list(STATUSES) + sorted(set(found) - set(STATUSES))
        return {status: found.count(status) for status in order if status in found}

    def unfinished(self) -> str | None:
        """Why the study is not finished, in words (trials still to run, or to run on), or None
        when every trial it planned has ended."""
        waiting = [t for t in self.trials if t.status in UNFINISHED]
        planned = self.study.get("planned_trials")
        ended = len(self.trials) - len(waiting)
        if not waiting and (planned is None or ended >= planned):
            return None
        counts = ", ".join(f"{n} {status}" for status, n in self.counts().items() if status in UNFINISHED)
        return (f"{ended} of {planned if planned is not None else len(self.trials)} planned trials ended"
                + (f" ({counts})" if counts else ""))

    def rows(self) -> list[dict]:
        """report.csv: one row per trial, best first, values exactly as reported."""
        rows = []
        for trial in self.trials:
            row = {"trial_id": trial.trial_id, "label": trial.label, "method": trial.method, "stage": trial.stage,
                   "group": trial.group, "config": trial.config_tag, "seed": trial.seed, **trial.flags}
            row.update({name: trial.params.get(name) for name in self.param_columns})
            row.update({column: trial.value(key) for column, key in METRIC_COLUMNS.items()})
            row.update(steps=trial.steps, wall_time_s=trial.wall_time_s, status=trial.status_text, error=trial.error)
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
    study = read_study_json(study_dir)
    experiments = compare_experiments(study.get("config", {}).get("compare", {}).get("methods") or [])
    planned = study.get("config", {}).get("train", {}).get("steps")
    started = [study_dir / experiment for experiment in experiments if (study_dir / experiment).is_dir()]
    trials = [trial for path in started for trial in load_trials(path, planned)] if experiments else \
        load_trials(study_dir)
    if not trials:
        what = "has no trials yet" if study else "is not a study directory (no study.json and no trial directories)"
        raise StudyError(f"{study_dir} {what}")
    metric, mode = study_metric(study)
    if mode not in ("max", "min"):
        raise StudyError(f"{study_dir / 'study.json'}: mode must be max or min, got {mode!r}")
    config = _study_config(study)
    for trial in trials:
        trial.resolve(config)
    ranked = sorted(trials, key=lambda t: _rank(t, metric, mode))
    baseline = config.baseline if config else study.get("config", {}).get("baseline", "fixmatch")
    # A compare study is summarised over seeds by its own section (study/report/comparison.py).
    groups = [] if experiments else _groups(ranked, metric, mode, _grid_parameters(study))
    comparison = shapes = None
    if experiments:
        compare, base = study["config"]["compare"], (study["config"].get("split") or {}).get("unlabeled")
        seeds = compare.get("confirm_seeds", [])
        # The verdict is the base split's, the one stage 1 searched on; other shapes have their own section.
        on_base = [t for t in trials if trial_shape(t, base) == base]
        comparison = build_comparison(on_base, compare["methods"], metric, mode, seeds, _confirmed_winners(study_dir))
        if compare.get("unlabeled"):
            shapes = build_across_shapes(trials, compare["methods"], compare["unlabeled"], metric, mode, seeds)
    return Report(study_dir, study.get("name", study_dir.name), study, metric, mode, ranked,
                  _param_columns(trials, study.get("swept", [])), groups, baseline, comparison, shapes)


def _confirmed_winners(study_dir: Path) -> dict:
    """{method: trial id} of the stage-1 winners a compare study confirmed (its compare.json),
    {} before stage 1 has finished."""
    try:
        winners = json.loads((Path(study_dir) / WINNERS_FILE).read_text())["winners"]
        return {method: winner["trial_id"] for method, winner in winners.items()}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _study_config(study: dict) -> StudyConfig | None:
    """The study's config as the launcher resolved it, or None (a plain Tune experiment, or a
    study.json from another version of the tool)."""
    try:
        return StudyConfig.from_dict(study["config"]) if isinstance(study.get("config"), dict) else None
    except (StudyError, TypeError, TrainConfigError, DataPrepError):
        return None


def _rank(trial: TrialRecord, metric: str, mode: str) -> tuple:
    score = trial.value(metric)
    if score is None:
        return (2, 0.0)
    return (int(trial.status == "ERROR"), -score if mode == "max" else score)


def _param_columns(trials: list[TrialRecord], swept) -> list[str]:
    """The swept params first (study.json order), then the other varying ones (seed, variant)."""
    names = {name for t in trials for name in t.params} - set(FLAGS) - {*TAGS, "method", "seed"}
    return [n for n in swept if n in names] + sorted(names - set(swept))


def _grid_parameters(study: dict) -> list[str]:
    """The parameters the study ran as a grid (study.json describes each as 'each of {...}')."""
    return [name for name, described in study.get("space", {}).items() if str(described).startswith("each of")]


def _group_name(trial: TrialRecord, swept) -> str:
    """The trial's group, plus any other grid parameter but the seed (e.g. a grid over
    variant x gamma_l x seed groups by variant and gamma_l)."""
    others = [name for name in swept if name not in ("seed", "variant")]
    return ", ".join([trial.group] + [f"{name}={cell(trial.params.get(name))}" for name in others])


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
            values = [t.value(metric_name("test", measure, "median_10")) for t in trials]
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


