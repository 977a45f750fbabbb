"""A compare study confirmed on several unlabeled shapes (docs/method.md, "Comparing methods"):
per shape, every method's tuned configuration over the confirmation seeds, the shape's leader
chosen on the study's metric (validation: the same labeled and validation rows for every shape,
only the unlabeled pool differs), and each other method's paired difference to that leader in test
GM, the measure a collapsed class pulls down wherever the shape puts it."""

from dataclasses import dataclass

from study.report.comparison import REPORTED
from study.report.statistics import Interval, PairedDifference, mean_interval, paired_difference
from study.report.trials import TrialRecord
from study.tune_files import STAGE_CONFIRM, TUNED
from trainables.metrics import metric_name, on_split

GM = metric_name("test", "gm", "median_10")  # what the shapes are compared on


@dataclass
class ShapeResult:
    shape: str
    intervals: dict[str, dict[str, Interval]]  # method -> metric -> over the seeds
    leader: str | None  # the method with the best mean of the study's metric (None: no results yet)
    differences: dict[str, PairedDifference]  # other method -> leader - other in test GM, paired by seed


@dataclass
class AcrossShapes:
    metric: str  # the study's: what each shape's leader is chosen on
    seeds: list
    methods: dict[str, str]  # method -> how reports name it, in the study's order
    shapes: list[ShapeResult]  # in the study's order


def trial_shape(trial: TrialRecord, base: str | None) -> str | None:
    """The unlabeled shape a trial trained on: its own (stage 2), else the base split's."""
    return trial.params.get("unlabeled", base)


def build_across_shapes(trials: list[TrialRecord], methods: list[str], shapes: list[str], metric: str, mode: str,
                        seeds: list) -> AcrossShapes | None:
    """Every shape's numbers, once some stage-2 trial has results; None before."""
    sign = 1 if mode == "max" else -1
    tracked = sorted({*REPORTED, GM, metric, on_split(metric, "test")})
    confirmed = [t for t in trials if t.stage == STAGE_CONFIRM and t.config_tag == TUNED and t.status != "ERROR"]
    labels = {name: next((t.method for t in confirmed if t.group == name), name) for name in methods}
    results = []
    for shape in shapes:
        runs = {name: [t for t in confirmed if t.group == name and t.params.get("unlabeled") == shape]
                for name in methods}
        values = {name: {m: {t.seed: v for t in own if (v := t.value(m)) is not None} for m in tracked}
                  for name, own in runs.items()}
        intervals = {name: {m: mean_interval(list(by_seed.values())) for m, by_seed in own.items()}
                     for name, own in values.items()}
        ranked = sorted((name for name in methods if intervals[name][metric].n),
                        key=lambda name: -sign * intervals[name][metric].mean)
        leader = ranked[0] if ranked else None
        differences = {}
        if leader is not None:
            mine = values[leader][GM]
            for other in ranked[1:]:
                theirs = values[other][GM]
                paired = [seed for seed in mine if seed in theirs]
                differences[other] = paired_difference([mine[s] for s in paired], [theirs[s] for s in paired])
        results.append(ShapeResult(shape, intervals, leader, differences))
    if not any(result.leader for result in results):
        return None
    return AcrossShapes(metric, list(seeds), labels, results)
