"""Study configuration: one YAML file (or the built-in default), every key declared once.

    name: digits-thresholds        # default: <dataset>-<space>-<time>
    storage: results               # a local path or any URI Ray accepts (s3://, gs://, NFS path)
    dataset: digits
    split: {kind: lt, n_max: 50, gamma_l: 10, seed: 1, valid_size: 200, valid_kind: balanced}
                                   # the base split (gamma_l/gamma_u/unlabeled may be swept) and its
                                   # validation set; unlabeled: reversed, n_max_u: 100 shapes its pool
    train: {model: cnn_small, steps: 300, cap: true, cai: true, cadr: true, ...}  # TrainConfig fields
    space: thresholds              # named spaces joined with '+', or a mapping {param: {uniform: [lo, hi]}}
    search: {algorithm: optuna, num_samples: 4, max_concurrent: 2, seed: 0, points_to_evaluate: [...],
             fixed_points: [{label: fixmatch, cap: false, cai: false, cadr: false}],
             storage: "sqlite:///{study}/optuna.db"}   # optional: Optuna's study in a database
    metric: valid_balanced_accuracy_median_10   # what the study searches, prunes and ranks on
    mode: max                      # (default: this metric with a validation set, else its test_ twin)
    scheduler: {name: asha, grace_period: 2}
    resources: {num_workers: 1, use_gpu: false, cpus_per_worker: null, trial_cpus: 0.2, trainer: auto,
                gpus_per_worker: null}   # 0.25: four one-worker trials share a GPU

Each section is a frozen `Declared` dataclass (trainables/options.py): the YAML, the launcher's
flags, `--set` and `--help` all read the same declarations, and a config is checked once, when it
is built. What needs the search space as well (which values training accepts, the search's
starting points) is study/checks.py's.
"""

import copy
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import yaml

from data_prep.splits import KINDS, UNLABELED_SHAPES, VALID_KINDS, SplitSpec, describe_shapes
from search_spaces import get_space
from search_spaces.spaces import space_from_dict
from study.errors import StudyError
from study.method_spaces import named_space, training_values, variant_settings
from trainables.config import TrainConfig
from trainables.errors import TrainConfigError
from trainables.metrics import METRICS, default_metric, split_of
from trainables.options import Declared, option, section
from trainables.resources import Resources

SCHEDULERS = ("asha", "median", "none")
TRAINERS = ("auto", "torch_trainer", "in_trial")
ALGORITHMS = ("optuna", "random", "grid")
# Swept by cutting one split per value (study/splits.py), not training options.
SPLIT_PARAMETERS = ("gamma_l", "gamma_u", "unlabeled")
TAGS = ("label", "stage", "config")  # what a trial's params say about it, besides what it trains
DEFAULT_SPACE = "thresholds"


@dataclass(frozen=True)
class SplitConfig(Declared):
    where, error = "split.", StudyError

    kind: str = option("lt", "mcar (the training set's own class distribution), lt (long-tailed labels) or rand "
                       "(random per-class rates)", choices=KINDS)
    n_max: int | None = option(50, "labeled rows of the largest class (lt, rand)", low=1)
    gamma_l: float | None = option(10, "labeled imbalance ratio: class 0 has n_max, the last n_max / gamma_l (lt)",
                                   low=1)
    gamma_u: float | None = option(None, "unlabeled imbalance ratio (lt; < 1 inverts the tail; with unlabeled: the "
                                   "shape's ratio, >= 1, default gamma_l)", kind=float, low=0, low_open=True)
    unlabeled: str | None = option(None, "the unlabeled pool's class distribution (lt), drawn from the rows left "
                                   f"after the labeled and validation ones: {describe_shapes()} (default: the whole "
                                   "training set, or a gamma_u subset of it)", kind=str,
                                   choices=tuple(UNLABELED_SHAPES))
    n_max_u: int | None = option(None, "with unlabeled: unlabeled rows of its largest class", kind=int, low=1)
    size: int | None = option(None, "labeled rows in all (mcar)", kind=int, low=1)
    seed: int = option(1, "seed of the split")
    valid_size: int = option(0, "validation rows set aside (fewer than the classes: none, and the study selects "
                             "on test)", low=0)
    valid_kind: str = option("balanced", "balanced (valid_size / C per class) or labeled (the labeled proportions)",
                             choices=VALID_KINDS)


@dataclass(frozen=True)
class SearchConfig(Declared):
    where, error = "search.", StudyError

    algorithm: str = option("optuna", "optuna (TPE), random, or grid (every value of grid spaces)",
                            choices=ALGORITHMS)
    num_samples: int = option(4, "searched trials (grid spaces: repeats of the grid, seeded train.seed + 0, 1, "
                              "...)", low=1)
    max_concurrent: int = option(2, "trials running at once", low=1)
    seed: int = option(0, "seed of the sampler")
    points_to_evaluate: list = option([], "in-space points tried first (each may have a label)")
    fixed_points: list = option([], "whole configurations run as they are, outside the search (baselines)")
    # optuna-dashboard can watch a search kept in a database, and it outlives the driver.
    storage: str | None = option(None, "where Optuna keeps its study: sqlite:///{study}/optuna.db, "
                                 "postgresql://..., mysql://...", kind=str)

    def check(self):
        for kind in ("fixed_points", "points_to_evaluate"):
            for point in getattr(self, kind):
                if not isinstance(point, dict):
                    raise StudyError(f"search.{kind}: a point must be a mapping, got {point!r}")


@dataclass(frozen=True)
class SchedulerConfig(Declared):
    where, error = "scheduler.", StudyError

    name: str = option("asha", "early stopping: asha, median or none", choices=SCHEDULERS)
    grace_period: int = option(2, "evaluations before a trial may be stopped: SSL needs time to start", low=1)

    @classmethod
    def from_dict(cls, raw):
        if isinstance(raw, dict) and set(raw) & {"metric", "mode"}:
            raise StudyError("scheduler.metric and scheduler.mode moved to the top level of the study config "
                             "(`metric:` and `mode:`): the search, the scheduler and the report all use them")
        return super().from_dict(raw)


@dataclass(frozen=True)
class CompareConfig(Declared):
    """A compare study (docs/method.md, "Comparing methods"): every method tuned with the same
    budget on validation, then its winner and its defaults confirmed with fresh seeds."""

    where, error = "compare.", StudyError

    methods: list = option([], "the methods (or variants: cadr, cap, ...) compared; empty: not a compare study")
    trials_per_method: int = option(8, "stage 1: searched trials of every method, its reference defaults first",
                                    low=1)
    confirm_seeds: list = option([100, 101, 102], "stage 2: training seeds every method's winner and defaults run "
                                 "with, the same for every method (never the search's seed)")
    confirm_defaults: bool = option(True, "stage 2 also runs each method's reference defaults (false: only the "
                                    "tuned winners, so no method runs untuned)")
    unlabeled: list = option([], "stage 2 on these unlabeled shapes, each its own split (stage 1 searches on the "
                             "base split's shape, which must be one of them); empty: the base split only")

    def check(self):
        if len(set(map(str, self.methods))) != len(self.methods):
            raise StudyError(f"compare.methods names a method twice: {self.methods}")
        for method in self.methods:
            variant_settings(method)
        if self.methods and not self.confirm_seeds:
            raise StudyError("compare.confirm_seeds: at least one seed")
        if not all(isinstance(seed, int) and not isinstance(seed, bool) for seed in self.confirm_seeds):
            raise StudyError(f"compare.confirm_seeds must be whole numbers, got {self.confirm_seeds}")
        if len(set(self.confirm_seeds)) != len(self.confirm_seeds):
            raise StudyError(f"compare.confirm_seeds repeats a seed: {self.confirm_seeds}")
        unknown = [shape for shape in self.unlabeled if shape not in UNLABELED_SHAPES]
        if unknown:
            raise StudyError(f"compare.unlabeled: unknown shape {unknown[0]!r} (known: {', '.join(UNLABELED_SHAPES)})")
        if len(set(self.unlabeled)) != len(self.unlabeled):
            raise StudyError(f"compare.unlabeled names a shape twice: {self.unlabeled}")


@dataclass(frozen=True)
class StudyResources(Resources):
    """A trial's resources: a run's (trainables/resources.py), and how a trial drives it."""

    where, error = "resources.", StudyError

    trial_cpus: float = option(0.2, "CPUs of the Tune trial that drives a TorchTrainer", low=0, low_open=True)
    # A one-worker TorchTrainer costs ~50 s of start-up; an in-trial run none.
    trainer: str = option("auto", "how a trial trains: torch_trainer (a Ray Train TorchTrainer inside the trial), "
                          "in_trial (the trial process is the one worker: the same loop, no worker group), or auto "
                          "(in_trial for one worker, torch_trainer for more)", choices=TRAINERS)

    def check(self):
        super().check()
        if self.trainer == "in_trial" and self.num_workers != 1:
            raise StudyError("resources.trainer in_trial runs one worker; use torch_trainer (or auto) for "
                             "num_workers > 1")

    def in_trial(self) -> bool:
        return self.trainer == "in_trial" or (self.trainer == "auto" and self.num_workers == 1)

    def for_trial(self, cluster_cpus: float, trials_at_once: int) -> Resources:
        """A trial's workers, sized so that `trials_at_once` trials fit. An in-trial run is its
        own trial and reads no Ray Data; a TorchTrainer's trial leaves one CPU to Ray Data and
        `trial_cpus` to its driver."""
        if self.in_trial():
            return self.sized(cluster_cpus, trials_at_once, keep_free=0)
        return self.sized(cluster_cpus, trials_at_once, driver_cpus=self.trial_cpus)

    def reservation(self, workers: Resources) -> dict:
        """What Tune reserves for one trial: the worker itself (in-trial runs; with gpus_per_worker
        0.25, four such trials share a GPU), or the small driver of a TorchTrainer, whose workers
        reserve their own resources through the trainer's ScalingConfig."""
        if self.in_trial():
            return {"CPU": workers.cpus_per_worker, "GPU": workers.gpus}
        return {"CPU": self.trial_cpus}


# Training fields a study sets for every trial itself: they say what the study is about.
STUDY_FIELDS = ("dataset", "data_root", "split")


@dataclass(frozen=True)
class StudyConfig(Declared):
    error, noun = StudyError, "study"

    name: str | None = option(None, "study name, a directory under the storage (default: <dataset>-<space>-<time>)",
                              kind=str, path_name=True)
    storage: str = option("results", "where studies live: a local path or a URI Ray accepts")
    dataset: str = option("digits", "a converted dataset (python -m data_prep list), converted on first use",
                          path_name=True)
    data_root: str | None = option(None, "where datasets live (default: $ML_DATA or ./data)", kind=str)
    split: SplitConfig = section(SplitConfig)
    # The training config every trial starts from (its dataset and data root are the study's).
    train: TrainConfig = field(default_factory=TrainConfig)
    space: object = option(None, "named search space(s), joined with '+' (see --list-spaces; method:<name> is a "
                           "method's own space, from the registry), or a mapping {param: {uniform: [lo, hi]}} "
                           "(default: thresholds; in a compare study each method's own space)", kind=object)
    # The one number the study searches (Optuna), prunes (ASHA) and ranks (report) on.
    metric: str | None = option(None, "what the study searches, prunes and ranks on (default: "
                                f"{default_metric(True)}, or its test_ twin on a split without a validation set)",
                                kind=str, choices=METRICS)
    mode: str = option("max", "whether the metric is better high (max) or low (min)", choices=("max", "min"))
    baseline: str | None = option("fixmatch", "what the report compares the winner with: a trial label, variant or "
                                  "group name", kind=str)
    search: SearchConfig = section(SearchConfig)
    compare: CompareConfig = section(CompareConfig)
    # Options of a method the train section does not run, e.g. the epoch length of methods that
    # count in epochs, for a study whose trials run several methods.
    method_options: dict = option({}, "{method: {option: value}}: set for every trial that runs that method (its "
                                  "search starts from them too), e.g. {acr: {epoch_steps: 50}}")
    scheduler: SchedulerConfig = section(SchedulerConfig)
    resources: StudyResources = section(StudyResources)
    address: str | None = option(None, "Ray cluster address (default: start a local Ray)", kind=str)

    def check(self):
        if self.space is not None and not isinstance(self.space, (str, dict)):
            raise StudyError(f"space must be a named space or a mapping of parameters, got {self.space!r}")
        if (self.train.dataset, self.train.data_root) != (self.dataset, self.data_root):
            raise StudyError("the train section's dataset and data_root are the study's: set them at the top level")
        if self.compare.unlabeled and self.split.unlabeled not in self.compare.unlabeled:
            raise StudyError(f"compare.unlabeled: stage 1 searches on the base split, so split.unlabeled must be one "
                             f"of {', '.join(self.compare.unlabeled)} (got {self.split.unlabeled})")
        for method, options in self.method_options.items():
            if not isinstance(options, dict):
                raise StudyError(f"method_options.{method} must be a mapping of that method's options, got "
                                 f"{options!r}")
            try:
                self.train.with_values({"method": method, **options})
            except TrainConfigError as exc:
                raise StudyError(f"method_options.{method}: {exc}") from None
        sweeps_shape = isinstance(self.space, dict) and "unlabeled" in self.space
        if self.split.n_max_u is not None and self.split.unlabeled is None and not sweeps_shape:
            raise StudyError("split.n_max_u sizes an unlabeled shape: set split.unlabeled, or sweep unlabeled in the "
                             "space")

    @classmethod
    def from_dict(cls, raw) -> "StudyConfig":
        if not isinstance(raw, dict):
            raise StudyError("a study config must be a mapping")
        train = raw.get("train") or {}
        if isinstance(train, TrainConfig):
            return super().from_dict(raw)
        if not isinstance(train, dict):
            raise StudyError("'train' must be a mapping")
        shared = sorted(set(train) & set(STUDY_FIELDS))
        if shared:
            raise StudyError(f"train.{shared[0]}: a study sets it for every trial (dataset and data_root at the top "
                             "level, the split in the split section)")
        where = {"dataset": raw.get("dataset", cls.dataset), "data_root": raw.get("data_root")}
        for name, value in where.items():  # the study's own keys: a bad one is named as the user wrote it
            cls.options()[name].check(name, value, StudyError)
        try:
            train = TrainConfig.from_dict({**train, **where})
        except TrainConfigError as exc:
            raise StudyError(f"train: {exc}") from None
        return super().from_dict({**raw, "train": train})

    def to_dict(self) -> dict:
        """The config as a study file would write it (the train section flat, as in YAML)."""
        values = super().to_dict()
        values["train"] = {k: v for k, v in self.train.to_dict().items() if k not in STUDY_FIELDS}
        return values

    def with_data_root(self, data_root: str) -> "StudyConfig":
        return self.replace(data_root=data_root, train=self.train.replace(data_root=data_root))

    @property
    def space_name(self) -> str:
        if self.space is None:
            return "compare" if self.compare.methods else DEFAULT_SPACE
        return self.space if isinstance(self.space, str) else "custom"

    def resolved_space(self) -> dict:
        """The space every searched trial samples from (a compare study without a space: each
        method's own, study/method_spaces.py)."""
        if isinstance(self.space, dict):
            return space_from_dict(self.space)
        space = {}
        for part in (self.space or DEFAULT_SPACE).split("+"):
            found = named_space(part.strip()) or get_space(part.strip())
            overlap = set(space) & set(found)
            if overlap:
                raise StudyError(f"spaces in '{self.space}' both set {', '.join(sorted(overlap))}")
            space.update(found)
        return space

    def split_spec(self, params: dict | None = None) -> SplitSpec:
        """The split of a trial: the study's base split with the trial's split parameters (gamma_l,
        gamma_u, unlabeled). n_max_u sizes a shaped pool only: a trial without a shape (the base of
        a space that sweeps unlabeled, e.g. a fixed point) has the whole training set."""
        base, params = self.split, params or {}
        swept = {name: params.get(name, getattr(base, name)) for name in SPLIT_PARAMETERS}
        n_max_u = base.n_max_u if swept["unlabeled"] is not None else None
        return SplitSpec(base.kind, base.seed, n_max=base.n_max, size=base.size, valid_size=base.valid_size,
                         valid_kind=base.valid_kind, n_max_u=n_max_u, **swept)

    def train_config(self, params: dict | None = None) -> TrainConfig:
        """What a trial with these params trains: the base `train` section with the trial's values
        (a variant becomes its method and options), checked once. A trial that runs another
        method than the base starts from that method's defaults."""
        values = {**trial_overrides(params or {}), "split": self.split_spec(params).default_name(self.dataset)}
        method = values.get("method", self.train.method.name)
        return self.train.with_values({**self.method_options.get(method, {}), **values})


def trial_overrides(params: dict) -> dict:
    """Trial params -> training values: a variant becomes its method and options, `1-<name>`
    parameters their option (study/method_spaces.py); the trial's tags and the split parameters
    (gamma_l, gamma_u, unlabeled) are not training options and are left out."""
    out = training_values({k: v for k, v in params.items() if k not in ("variant", *TAGS, *SPLIT_PARAMETERS)})
    if "variant" in params:
        out.update(variant_settings(params["variant"]))
    return out


DEFAULT_STUDY = {
    # Digits with long-tailed labels: an Optuna sweep over the thresholds with CADR, plus the
    # FixMatch baseline and CADR at the paper's defaults as fixed points. Sized for a 2-core laptop.
    "dataset": "digits",
    "split": {"kind": "lt", "n_max": 50, "gamma_l": 20, "seed": 1, "valid_size": 200, "valid_kind": "balanced"},
    "train": {"model": "cnn_small", "steps": 500, "eval_every": 50, "batch_size": 32, "mu": 3,
              "cap": True, "cai": True, "cadr": True},
    "space": "thresholds",
    "search": {
        "algorithm": "optuna", "num_samples": 5, "max_concurrent": 2, "seed": 0,
        "points_to_evaluate": [{"label": "paper defaults", "confidence": 0.95, "cai_beta": 0.5}],
        "fixed_points": [{"label": "fixmatch", "cap": False, "cai": False, "cadr": False,
                          "confidence": 0.95, "cai_beta": 0.5}],
    },
    "scheduler": {"name": "none"},
}


def set_dotted(raw: dict, key: str, value) -> None:
    """raw[a][b][c] = value for key "a.b.c" (a flag's key, or --set's), making the sections on the
    way (an unknown one is then the unknown key the config's checks name)."""
    if not key or "" in key.split("."):
        raise StudyError(f"--set {key!r}: not a dotted key such as train.batch_size")
    target = raw
    *parents, leaf = key.split(".")
    for depth, parent in enumerate(parents):
        if target.get(parent) is None:
            target[parent] = {}
        target = target[parent]
        if not isinstance(target, dict):
            raise StudyError(f"--set {key}: {'.'.join(parents[:depth + 1])} is {target!r}, not a mapping")
    target[leaf] = value


def load(path: str | None, settings=()) -> StudyConfig:
    """The default study, or a YAML file, with `settings` ((dotted key, value) pairs, in order)
    applied, checked once."""
    raw = copy.deepcopy(DEFAULT_STUDY) if path is None else _read_yaml(path)
    if not isinstance(raw, dict):
        raise StudyError(f"{path}: a study config must be a mapping")
    for key, value in settings:
        set_dotted(raw, key, value)
    return StudyConfig.from_dict(raw)


def _read_yaml(path) -> dict:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise StudyError(f"cannot read config {path}: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise StudyError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return raw or {}


def with_metric(config: StudyConfig, has_validation: bool) -> tuple[StudyConfig, str | None]:
    """The config with its metric fixed, now that it is known whether the split has a validation
    set, and a warning line when the study selects on the test split (else None)."""
    metric = config.metric or default_metric(has_validation)
    if split_of(metric) == "valid" and not has_validation:
        raise StudyError(f"metric {metric} needs a validation set, but the split has none: set "
                         "split.valid_size (at least the number of classes), or select on a test_ metric")
    config = config.replace(metric=metric)
    if split_of(metric) == "valid":
        return config, None
    why = "the split has no validation set" if not has_validation else f"the metric is {metric}"
    return config, (f"warning: this study selects its winner on the test split ({why}), so the winner's test "
                    "number is optimistic; set split.valid_size and a valid_ metric to select on validation")


def default_name(config: StudyConfig) -> str:
    return f"{config.dataset}-{config.space_name.replace('+', '-')}-{datetime.now():%Y%m%d-%H%M%S}"
