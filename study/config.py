"""Study configuration: one YAML file (or the built-in default), validated before Ray starts.

    name: digits-thresholds        # default: <dataset>-<space>-<time>
    storage: results               # a local path or any URI Ray accepts (s3://, gs://, NFS path)
    dataset: digits
    split: {kind: lt, n_max: 50, gamma_l: 10, seed: 1, valid_size: 200, valid_kind: balanced}
                                   # the base split (gamma_l/gamma_u may be swept) and its validation set
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
"""

import itertools
import os
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path

import yaml

from data_prep.errors import DataPrepError
from data_prep.splits import SplitSpec
from search_spaces import SpaceError, get_space, validate_space
from search_spaces.spaces import Uniform, grid_size, is_grid, space_from_dict
from trainables.config import TrainConfig
from trainables.errors import TrainConfigError
from trainables.methods import COMMON_OPTIONS, option_names

SCHEDULERS = ("asha", "median", "none")
TRAINERS = ("auto", "torch_trainer", "in_trial")
ALGORITHMS = ("optuna", "random", "grid")
EVAL_SPLITS = ("valid", "test")
MEASURES = ("accuracy", "gm", "balanced_accuracy")
WINDOWS = ("", "_median_10", "_median_20")  # this evaluation, medians of the last 10 and 20
METRICS = tuple(f"{split}_{measure}{window}" for split in EVAL_SPLITS for measure in MEASURES for window in WINDOWS)
DEFAULT_METRIC = "balanced_accuracy_median_10"  # prefixed valid_ (or test_ without a validation set)


class StudyError(ValueError):
    """A user error in a study's configuration or its storage; printed as one line."""


@dataclass
class SplitConfig:
    kind: str = "lt"
    n_max: int | None = 50
    gamma_l: float | None = 10
    gamma_u: float | None = None
    size: int | None = None
    seed: int = 1
    valid_size: int = 0  # validation rows set aside (fewer than the classes: none; the study selects on test)
    valid_kind: str = "balanced"  # balanced (valid_size / C per class) or labeled (the labeled proportions)


@dataclass
class SearchConfig:
    algorithm: str = "optuna"  # TPE; "grid" runs every value of Grid spaces, "random" samples
    num_samples: int = 4  # searched trials (grid spaces: repeats of the grid, seeded train.seed + 0, 1, ...)
    max_concurrent: int = 2
    seed: int = 0
    points_to_evaluate: list = field(default_factory=list)  # in-space points tried first (with an optional label)
    fixed_points: list = field(default_factory=list)  # whole configurations run as-is (baselines)
    # Where Optuna keeps its study (sqlite:///{study}/optuna.db, postgresql://..., mysql://...):
    # optuna-dashboard can watch the search, and the Optuna study outlives the driver.
    storage: str | None = None


@dataclass
class SchedulerConfig:
    name: str = "asha"
    grace_period: int = 2  # evaluations before a trial may be stopped: SSL needs time to start


@dataclass
class ResourceConfig:
    num_workers: int = 1
    use_gpu: bool = False
    # Each GPU worker's share of a GPU: 1 (the default with use_gpu), or 1/n to pack n one-worker
    # trials on a GPU (0.25: four at once). Setting it implies use_gpu.
    gpus_per_worker: float | None = None
    cpus_per_worker: float | None = None
    trial_cpus: float = 0.2  # the Tune trial that drives a TorchTrainer
    # How a trial trains: "torch_trainer" (a Ray Train TorchTrainer inside the trial), "in_trial"
    # (the trial process is the one worker: same loop, no worker group), or "auto" (in_trial for
    # one worker, torch_trainer for more). A one-worker TorchTrainer costs ~50 s of start-up.
    trainer: str = "auto"

    def in_trial(self) -> bool:
        return self.trainer == "in_trial" or (self.trainer == "auto" and self.num_workers == 1)

    def gpus(self) -> float:
        """The GPUs each worker reserves (0 on CPU)."""
        if self.gpus_per_worker is not None:
            return self.gpus_per_worker
        return 1.0 if self.use_gpu else 0.0


@dataclass
class StudyConfig:
    name: str | None = None
    storage: str = "results"
    dataset: str = "digits"
    data_root: str | None = None
    split: SplitConfig = field(default_factory=SplitConfig)
    train: dict = field(default_factory=dict)
    space: object = "thresholds"
    # The one number the study searches (Optuna), prunes (ASHA) and ranks (report) on. None: the
    # validation split's balanced accuracy (median of the last 10 evaluations), or the test
    # split's when the split has no validation set (with a warning: that winner is optimistic).
    metric: str | None = None
    mode: str = "max"
    # What the report compares the winner with: a trial label, variant or group name.
    baseline: str | None = "fixmatch"
    search: SearchConfig = field(default_factory=SearchConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    resources: ResourceConfig = field(default_factory=ResourceConfig)
    address: str | None = None

    def resolved_space(self) -> dict:
        return space_from_dict(self.space) if isinstance(self.space, dict) else get_space(self.space)

    def space_name(self) -> str:
        return self.space if isinstance(self.space, str) else "custom"

    def train_config(self, overrides: dict | None = None) -> TrainConfig:
        """The TrainConfig of one trial: the base `train` section with the trial's overrides
        (`trial_overrides` of its params). A trial that runs another method than the base starts
        from that method's defaults: the base's method options belong to the base's method."""
        values, overrides = dict(self.train), dict(overrides or {})
        if overrides.get("method", values.get("method", "fixmatch")) != values.get("method", "fixmatch"):
            values = {k: v for k, v in values.items() if k not in option_names() or k in COMMON_OPTIONS}
        values.update(overrides)
        return TrainConfig.from_dict({**values, "dataset": self.dataset, "data_root": self.data_root})

    def to_dict(self) -> dict:
        return asdict(self)


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


def _section(cls, raw, name):
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise StudyError(f"'{name}' must be a mapping")
    known = {f.name for f in fields(cls)}
    unknown = set(raw) - known
    if cls is SchedulerConfig and unknown & {"metric", "mode"}:
        raise StudyError("scheduler.metric and scheduler.mode moved to the top level of the study config "
                         "(`metric:` and `mode:`): the search, the scheduler and the report all use them")
    if unknown:
        raise StudyError(f"unknown key(s) in '{name}': {', '.join(sorted(unknown))} "
                         f"(known: {', '.join(sorted(known))})")
    return cls(**raw)


def from_dict(raw: dict) -> StudyConfig:
    if not isinstance(raw, dict):
        raise StudyError("a study config must be a mapping")
    top = {f.name for f in fields(StudyConfig)}
    unknown = set(raw) - top
    if unknown:
        raise StudyError(f"unknown study key(s): {', '.join(sorted(unknown))} (known: {', '.join(sorted(top))})")
    sections = {"split": SplitConfig, "search": SearchConfig, "scheduler": SchedulerConfig, "resources": ResourceConfig}
    values = {k: v for k, v in raw.items() if k not in sections}
    values.update({k: _section(cls, raw.get(k), k) for k, cls in sections.items()})
    return StudyConfig(**values)


def load(path: str | None, overrides: dict) -> StudyConfig:
    """The default study, or a YAML file, with command-line overrides (dotted keys) applied."""
    raw = dict(DEFAULT_STUDY) if path is None else _read_yaml(path)
    for dotted, value in overrides.items():
        if value is None:
            continue
        target = raw
        *parents, key = dotted.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[key] = value
    return from_dict(raw)


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


SPLIT_PARAMETERS = ("gamma_l", "gamma_u")  # swept by cutting one split per value, not training options


def split_spec(config: StudyConfig, params: dict | None = None) -> SplitSpec:
    """The split of a trial: the study's base split with the trial's gamma_l / gamma_u."""
    base, params = config.split, params or {}
    return SplitSpec(base.kind, base.seed, n_max=base.n_max, size=base.size,
                     gamma_l=params.get("gamma_l", base.gamma_l), gamma_u=params.get("gamma_u", base.gamma_u),
                     valid_size=base.valid_size, valid_kind=base.valid_kind)


def space_values(dist) -> list:
    """The values of a distribution that bound what it can produce: every Choice / Grid value,
    and both ends of a range (Optuna's float ranges include them)."""
    return [dist.low, dist.high] if isinstance(dist, Uniform) else list(dist.values)


# Training fields a space may not sweep: they say what the study is about, not how to train.
NOT_SEARCHABLE = ("dataset", "split", "data_root", "device")
MAX_COMBINATIONS = 4096  # categorical combinations checked one by one before Ray starts


def searchable() -> set[str]:
    """Every parameter a space may name: training fields, the methods' options (from the
    registry), `method`, `variant` and the split's imbalance ratios."""
    from dataclasses import fields as dataclass_fields

    train = {f.name for f in dataclass_fields(TrainConfig)} - set(NOT_SEARCHABLE)
    return train | option_names() | {"variant", *SPLIT_PARAMETERS}


def check_space_values(config: StudyConfig, space: dict) -> None:
    """Every value the space can produce goes through the checks training (or the split) applies,
    so a value a trial would reject fails here, naming the parameter. Then every combination of
    the categorical values (choices and grids: methods, variants, flags) is checked together, so
    e.g. cadr on with cap off fails here too."""
    unknown = sorted(set(space) - searchable())
    if unknown:
        raise StudyError(f"unknown space parameter(s) {', '.join(unknown)} (searchable: "
                         f"{', '.join(sorted(searchable()))})")
    for name, dist in space.items():
        if name in SPLIT_PARAMETERS and isinstance(dist, Uniform):
            raise StudyError(f"space parameter {name}: use choice or grid values (each value gets its own split, "
                             "cut before the study starts)")
        for value in space_values(dist):
            try:
                if name in SPLIT_PARAMETERS:
                    split_spec(config, {name: value})
                else:
                    config.train_config(trial_overrides({name: value}))
            except (TrainConfigError, DataPrepError) as exc:
                raise StudyError(f"space parameter {name}={value!r} would fail in training: {exc}") from None
    categorical = {name: dist.values for name, dist in space.items()
                   if not isinstance(dist, Uniform) and name not in SPLIT_PARAMETERS}
    combinations = list(itertools.islice(itertools.product(*categorical.values()), MAX_COMBINATIONS))
    for values in combinations if len(categorical) > 1 else ():
        params = dict(zip(categorical, values))
        try:
            config.train_config(trial_overrides(params))
        except TrainConfigError as exc:
            raise StudyError(f"space values {params} would fail in training together: {exc}") from None


def _check_points(config: StudyConfig) -> None:
    for kind, points in (("fixed_points", config.search.fixed_points),
                         ("points_to_evaluate", config.search.points_to_evaluate)):
        for point in points:
            if not isinstance(point, dict):
                raise StudyError(f"search.{kind}: a point must be a mapping, got {point!r}")
            params = {k: v for k, v in point.items() if k != "label"}
            try:
                split_spec(config, params)
                config.train_config(trial_overrides(params))
            except (TrainConfigError, DataPrepError) as exc:
                raise StudyError(f"search.{kind} entry {point}: {exc}") from None


def validate(config: StudyConfig) -> dict:
    """Check everything that can be checked without Ray; returns the resolved space."""
    try:
        space = config.resolved_space()
        config.train_config()
        split_spec(config)
        validate_space(space)
    except SpaceError as exc:
        raise StudyError(str(exc)) from None
    except DataPrepError as exc:
        raise StudyError(f"split: {exc}") from None
    check_space_values(config, space)
    _check_points(config)
    search, scheduler = config.search, config.scheduler
    if search.algorithm not in ALGORITHMS:
        raise StudyError(f"search.algorithm must be one of {ALGORITHMS}, got {search.algorithm!r}")
    if search.algorithm == "grid" and not is_grid(space):
        raise StudyError("search.algorithm grid needs a space of grid parameters only (e.g. ablation)")
    if is_grid(space) and search.algorithm != "grid":
        search.algorithm = "grid"
    if search.algorithm == "grid" and search.fixed_points:
        raise StudyError("fixed_points cannot be combined with a grid search (put them in the grid)")
    for point in search.points_to_evaluate:
        params = set(point) - {"label"}
        if params != set(space):
            raise StudyError(f"points_to_evaluate entries must set exactly the space's parameters "
                             f"({', '.join(sorted(space))}) and may have a label; got {', '.join(sorted(point))}")
    if search.storage is not None:
        _check_optuna_storage(search, config.storage)
    if search.num_samples < 1 or search.max_concurrent < 1:
        raise StudyError("search.num_samples and search.max_concurrent must be >= 1")
    if search.algorithm == "grid" and search.num_samples > 1:
        space = _repeats_as_seeds(space, search.num_samples, config.train_config().seed)
    if scheduler.name not in SCHEDULERS:
        raise StudyError(f"scheduler.name must be one of {SCHEDULERS}, got {scheduler.name!r}")
    if config.metric is not None and config.metric not in METRICS:
        raise StudyError(f"unknown metric '{config.metric}' (known: {', '.join(METRICS)})")
    if config.mode not in ("max", "min"):
        raise StudyError(f"mode must be max or min, got {config.mode!r}")
    if config.resources.trainer not in TRAINERS:
        raise StudyError(f"unknown resources.trainer {config.resources.trainer!r}; choose from {', '.join(TRAINERS)}")
    if config.resources.trainer == "in_trial" and config.resources.num_workers != 1:
        raise StudyError("resources.trainer in_trial runs one worker; use torch_trainer (or auto) for num_workers > 1")
    _check_gpu_share(config.resources)
    if config.resources.trial_cpus <= 0:
        raise StudyError("resources.trial_cpus must be > 0 (the trial that drives the trainer needs a reservation)")
    return space


def _check_gpu_share(res: ResourceConfig) -> None:
    share = res.gpus_per_worker
    if share is None:
        return
    if not 0 < share <= 1:
        raise StudyError(f"resources.gpus_per_worker must be in (0, 1], got {share}: a worker trains on one GPU "
                         "(more GPUs per trial: more num_workers)")
    if abs(1 / share - round(1 / share)) > 1e-6 * (1 / share):
        raise StudyError(f"resources.gpus_per_worker must divide a GPU evenly (1, 0.5, 0.25, 0.2, ... 1/n), "
                         f"got {share}")
    if share < 1 and res.num_workers > 1:
        # Ray would place several workers of one trial on the same GPU, and their NCCL process
        # group refuses two ranks on one device: pack one-worker trials instead.
        raise StudyError(f"resources.gpus_per_worker {share} with num_workers {res.num_workers}: the workers of one "
                         "trial would share a GPU, which NCCL refuses; pack one-worker trials (num_workers: 1), or "
                         "give each worker a whole GPU")


OPTUNA_DATABASES = ("sqlite", "postgresql", "mysql")  # Optuna's RDB storage, as SQLAlchemy URLs


def _check_optuna_storage(search: SearchConfig, storage: str) -> None:
    if search.algorithm == "grid":
        raise StudyError("search.storage keeps an Optuna study; a grid search has none (remove it, or search with "
                         "algorithm optuna or random)")
    database = str(search.storage).split("://", 1)[0].split("+", 1)[0]
    if "://" not in str(search.storage) or database not in OPTUNA_DATABASES:
        raise StudyError(f"search.storage must be a database URL Optuna can use ({', '.join(OPTUNA_DATABASES)}), "
                         f"e.g. sqlite:///{{study}}/optuna.db; got {search.storage!r}")
    if "{study}" in search.storage and "://" in storage.removeprefix("file://"):
        raise StudyError(f"search.storage {search.storage} puts a database file in the study directory, but studies "
                         f"live at {storage}; give the database a local path or a server URL instead")


def optuna_storage(config: StudyConfig, study_dir: str) -> str | None:
    """The study's Optuna storage URL, `{study}` replaced by the (local) study directory, or None
    when the search keeps its Optuna study in memory."""
    url = config.search.storage
    if url is None or "{study}" not in url:
        return url
    return url.replace("{study}", os.path.abspath(study_dir.removeprefix("file://")))


def select_metric(config: StudyConfig, has_validation: bool) -> str | None:
    """Fix the study's metric (config.metric) now that it is known whether the split has a
    validation set. Returns a warning line when the study selects on the test split, else None."""
    if config.metric is None:
        config.metric = f"{'valid' if has_validation else 'test'}_{DEFAULT_METRIC}"
    if config.metric.startswith("valid_") and not has_validation:
        raise StudyError(f"metric {config.metric} needs a validation set, but the split has none: set "
                         "split.valid_size (at least the number of classes), or select on a test_ metric")
    if config.metric.startswith("valid_"):
        return None
    why = "the split has no validation set" if not has_validation else f"the metric is {config.metric}"
    return (f"warning: this study selects its winner on the test split ({why}), so the winner's test number "
            "is optimistic; set split.valid_size and a valid_ metric to select on validation")


def _repeats_as_seeds(space: dict, repeats: int, base_seed: int) -> dict:
    """A grid repeated num_samples times: each repeat trains with its own seed (base_seed + r),
    as a `seed` grid parameter; repeats of identical trials would measure nothing."""
    from search_spaces.spaces import Grid

    if "seed" in space:
        raise StudyError(f"search.num_samples={repeats} repeats a grid that already sweeps seed, which would "
                         "rerun the same trials: add seeds to the grid instead")
    return {**space, "seed": Grid(tuple(base_seed + r for r in range(repeats)))}


def trial_overrides(params: dict) -> dict:
    """Trial params -> TrainConfig fields: a variant becomes its method and options; split
    parameters (gamma_l, gamma_u) are not training options and are left out."""
    from search_spaces import VARIANTS

    out = {k: v for k, v in params.items() if k not in ("variant", "label", *SPLIT_PARAMETERS)}
    if "variant" in params:
        out.update(VARIANTS[params["variant"]])
    return out


def planned_trials(config: StudyConfig, space: dict) -> int:
    """Trials of the study; `space` is validate()'s (grid repeats are already its seeds)."""
    searched = grid_size(space) if config.search.algorithm == "grid" else config.search.num_samples
    return searched + len(config.search.fixed_points)


def default_name(config: StudyConfig) -> str:
    return f"{config.dataset}-{config.space_name().replace('+', '-')}-{datetime.now():%Y%m%d-%H%M%S}"
