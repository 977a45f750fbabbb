"""The verdict of a compare study (docs/method.md, "Comparing methods"), read from its trials:
per method its tuned values, its best stage-1 score and, over the confirmation seeds, its test
numbers for the reference defaults and the tuned configuration; the leading method against every
other with paired differences; and how stable each selection is under a bootstrap of the
validation rows."""

from dataclasses import dataclass

import numpy as np

from study.report.statistics import (
    Interval,
    PairedDifference,
    mean_interval,
    paired_difference,
    resample_counts,
    resampled_measure,
    stays_first,
    verdict,
    windowed,
)
from study.report.trials import TrialRecord
from study.tune_files import DEFAULTS, STAGE_CONFIRM, STAGE_SEARCH, TUNED
from trainables.metrics import MEASURES, WINDOWS, metric_name, on_split, rows_name, split_of, unpack_classes

REPORTED = tuple(metric_name("test", measure, "median_10") for measure in MEASURES)  # what a verdict shows
RESAMPLES = 1000


@dataclass
class MethodResult:
    name: str  # the variant (cadr, freematch, ...)
    label: str  # how reports name it (CADR, FreeMatch)
    searched: list[TrialRecord]  # stage 1
    winner: TrialRecord | None  # stage 1's best on the study's metric
    confirmed: dict[str, list[TrialRecord]]  # defaults / tuned -> stage-2 trials, by seed
    intervals: dict[str, dict[str, Interval]]  # defaults / tuned -> metric -> over seeds
    selection_stability: float | None = None  # share of resamples in which the winner stays first

    def values(self, kind: str, metric: str) -> dict:
        """{seed: value} of the `kind` confirmations."""
        return {t.seed: t.value(metric) for t in self.confirmed[kind] if t.value(metric) is not None}


@dataclass
class Comparison:
    metric: str  # the study's (what stage 1 selected on and the leader is chosen on)
    mode: str
    seeds: list
    methods: list[MethodResult]  # the leader first: best mean of the metric over seeds, tuned
    differences: dict[str, dict[str, PairedDifference]]  # other method -> reported metric -> leader - other
    # (row method, column method) -> row - column on the test split's counterpart of the metric,
    # tuned, paired by seed: every pair, so any method's lead over any other can be read off
    pairwise: dict[tuple[str, str], PairedDifference] | None = None
    leader_stability: float | None = None

    @property
    def leader(self) -> MethodResult:
        return self.methods[0]

    def sentence(self, other: str) -> str:
        """The verdict against `other` on the study's metric measured on the test split."""
        test = on_split(self.metric, "test")
        return verdict(self.leader.label, self.by_name(other).label, self.differences[other][test], _words(test))

    def by_name(self, name: str) -> MethodResult:
        return next(m for m in self.methods if m.name == name)


def _words(metric: str) -> str:
    measure = next(m for m in sorted(MEASURES, key=len, reverse=True) if f"_{m}" in metric)
    return {"accuracy": "test accuracy", "gm": "test GM", "balanced_accuracy": "test balanced accuracy"}[measure]


def build_comparison(trials: list[TrialRecord], methods: list[str], metric: str, mode: str,
                     seeds: list, winners: dict | None = None) -> Comparison | None:
    """The comparison, once some confirmation trial has results; None before. `winners`: {method:
    trial id} of the stage-1 winners the study confirmed (compare.json; among trials tied on the
    metric, the one it chose); a method without one gets its best searched trial."""
    sign = 1 if mode == "max" else -1
    tracked = sorted({*REPORTED, metric, on_split(metric, "test")})
    results = []
    for name in methods:
        own = [t for t in trials if t.group == name and t.status != "ERROR"]
        searched = [t for t in own if t.stage == STAGE_SEARCH]
        scored = [t for t in searched if t.value(metric) is not None]
        chosen = [t for t in scored if t.trial_id == (winners or {}).get(name)]
        winner = chosen[0] if chosen else max(scored, key=lambda t: sign * t.value(metric)) if scored else None
        confirmed = {kind: sorted((t for t in own if t.stage == STAGE_CONFIRM and t.config_tag == kind),
                                  key=lambda t: str(t.seed)) for kind in (DEFAULTS, TUNED)}
        intervals = {kind: {m: mean_interval([v for t in confirmed[kind] if (v := t.value(m)) is not None])
                            for m in tracked} for kind in confirmed}
        label = (winner or next(iter(own), None)).method if own else name
        results.append(MethodResult(name, label, searched, winner, confirmed, intervals))
    confirmed_any = [m for m in results if m.intervals[TUNED][metric].n]
    if not confirmed_any:
        return None
    results.sort(key=lambda m: (not m.intervals[TUNED][metric].n, -sign * m.intervals[TUNED][metric].mean
                                if m.intervals[TUNED][metric].n else 0))
    leader = results[0]
    differences = {}
    for other in results[1:]:
        differences[other.name] = {reported: _paired(leader, other, reported) for reported in tracked}
    test = on_split(metric, "test")
    pairwise = {(row.name, column.name): _paired(row, column, test)
                for row in results for column in results if row is not column}
    comparison = Comparison(metric, mode, list(seeds), results, differences, pairwise)
    _bootstrap(comparison)
    return comparison


def _paired(a: MethodResult, b: MethodResult, metric: str) -> PairedDifference:
    """a - b on `metric`, tuned, over the seeds both ran."""
    mine, theirs = a.values(TUNED, metric), b.values(TUNED, metric)
    paired = [seed for seed in mine if seed in theirs]
    return paired_difference([mine[s] for s in paired], [theirs[s] for s in paired])


# --- how stable the selections are ----------------------------------------------------------------


def _rows(trial: TrialRecord, window: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(evaluations, rows) predictions of the validation split at the evaluations the window uses,
    and the rows' labels; None where the trial did not record them."""
    key = rows_name("valid", "predictions")
    recorded = [r for r in trial.results if isinstance(r.get(key), str)]
    needed = int(window.removeprefix("median_")) if window else 1
    recorded = recorded[-needed:]
    if not recorded:
        return None
    labels = unpack_classes(recorded[-1][rows_name("valid", "labels")])
    return np.stack([unpack_classes(r[key]) for r in recorded]), labels


def _bootstrap(comparison: Comparison) -> None:
    """Recompute the study's metric for every trial on the same resamples of the validation rows:
    how often each method's stage-1 winner stays its best trial, and the leader the leader."""
    metric = comparison.metric
    if split_of(metric) != "valid":
        return
    window = next(w for w in sorted(WINDOWS, key=len, reverse=True) if metric.endswith(w))
    measure = metric.removeprefix("valid_").removesuffix(f"_{window}" if window else "")
    recorded = {}
    for method in comparison.methods:
        for trial in [*method.searched, *method.confirmed[TUNED]]:
            rows = _rows(trial, window)
            if rows is not None:
                recorded[trial.trial_id] = rows
    if not recorded:
        return
    labels = next(iter(recorded.values()))[1]
    if any(len(l) != len(labels) or (l != labels).any() for _, l in recorded.values()):
        return  # not the same validation rows: nothing to resample together
    classes = int(max(labels.max(), max(p.max() for p, _ in recorded.values()))) + 1
    counts = resample_counts(len(labels), RESAMPLES)
    scores = {trial_id: windowed(resampled_measure(counts, predictions, labels, classes, measure), window)
              for trial_id, (predictions, _) in recorded.items()}
    for method in comparison.methods:
        candidates = [t for t in method.searched if t.trial_id in scores and t.value(metric) is not None]
        if method.winner is not None and method.winner in candidates:
            matrix = np.stack([scores[t.trial_id] for t in candidates], axis=1)
            method.selection_stability = stays_first(matrix, candidates.index(method.winner), comparison.mode)
    tuned = [[scores[t.trial_id] for t in m.confirmed[TUNED] if t.trial_id in scores] for m in comparison.methods]
    if all(tuned):
        means = np.stack([np.mean(np.stack(runs, axis=1), axis=1) for runs in tuned], axis=1)
        comparison.leader_stability = stays_first(means, 0, comparison.mode)
