"""What a study config is checked against before Ray starts, beyond its own declarations: the
search space (study/config.py declares the config, search_spaces/ the distributions), every
value the space can produce and every search point against what training (and the split)
accepts, and the search's settings that depend on the space."""

import itertools
from dataclasses import fields

from data_prep.errors import DataPrepError
from search_spaces import SpaceError, validate_space
from search_spaces.spaces import Grid, Uniform, grid_size, is_grid
from study.config import SPLIT_PARAMETERS, StudyConfig
from study.errors import StudyError
from study.method_spaces import COMPLEMENT
from study.splits import split_parameters
from trainables.config import TrainConfig
from trainables.errors import TrainConfigError
from trainables.methods import option_names

# Training fields a space may not sweep: they say what the study is about, not how to train.
NOT_SEARCHABLE = ("dataset", "split", "data_root", "device")
MAX_COMBINATIONS = 4096  # categorical combinations checked one by one before Ray starts
OPTUNA_DATABASES = ("sqlite", "postgresql", "mysql")  # Optuna's RDB storage, as SQLAlchemy URLs


def checked(config: StudyConfig) -> tuple[StudyConfig, dict]:
    """Check everything that can be checked without Ray. Returns the config as the study runs it
    (a space of grids only is searched as a grid) and its resolved space (a grid repeated
    num_samples times sweeps the seed; a compare study: {method: its space})."""
    if config.compare.methods:
        return config, _checked_compare(config)
    try:
        space = config.resolved_space()
        config.split_spec()
        validate_space(space)
    except SpaceError as exc:
        raise StudyError(str(exc)) from None
    except DataPrepError as exc:
        raise StudyError(f"split: {exc}") from None
    check_space_values(config, space)
    _check_points(config)
    search = config.search
    if search.algorithm == "grid" and not is_grid(space):
        raise StudyError("search.algorithm grid needs a space of grid parameters only (e.g. ablation)")
    if is_grid(space) and search.algorithm != "grid":
        search = search.replace(algorithm="grid")
        config = config.replace(search=search)
    if search.algorithm == "grid" and search.fixed_points:
        raise StudyError("fixed_points cannot be combined with a grid search (put them in the grid)")
    for point in search.points_to_evaluate:
        if set(point) - {"label"} != set(space):
            raise StudyError(f"points_to_evaluate entries must set exactly the space's parameters "
                             f"({', '.join(sorted(space))}) and may have a label; got {', '.join(sorted(point))}")
    if search.storage is not None:
        _check_optuna_storage(config)
    if search.algorithm == "grid" and search.num_samples > 1:
        space = _repeats_as_seeds(space, search.num_samples, config.train.seed)
    return config, space


def space_values(dist) -> list:
    """The values of a distribution that bound what it can produce: every Choice / Grid value,
    and both ends of a range (Optuna's float ranges include them)."""
    return [dist.low, dist.high] if isinstance(dist, Uniform) else list(dist.values)


def searchable() -> set[str]:
    """Every parameter a space may name: training fields, the methods' options (from the
    registry), `method`, `variant` and the split parameters (imbalance ratios, unlabeled shape)."""
    train = {f.name for f in fields(TrainConfig)} - set(NOT_SEARCHABLE)
    options = train | option_names()
    return options | {COMPLEMENT + name for name in options} | {"variant", *SPLIT_PARAMETERS}


def methods_that_run(space: dict) -> list[dict]:
    """The methods the study's trials train, as trial params: each variant the space sweeps (a
    variant sets its method), else each method it sweeps, else the base ({}: the train section's)."""
    for name in ("variant", "method"):
        if name in space:
            return [{name: value} for value in space[name].values]
    return [{}]


def check_space_values(config: StudyConfig, space: dict, base: dict | None = None) -> None:
    """Every value the space can produce goes through the checks training (or the split) applies,
    with each method that will run (a parameter belongs to the methods that use it), so a value a
    trial would reject fails here, naming the parameter. Then every combination of the categorical
    values (choices and grids: methods, variants, flags) is checked together, so e.g. cadr on with
    cap off fails here too. `base`: params every trial has (a compare stage's variant: the one
    method that runs)."""
    runs = [base] if base else methods_that_run(space)
    unknown = sorted(set(space) - searchable())
    if unknown:
        raise StudyError(f"unknown space parameter(s) {', '.join(unknown)} (searchable: "
                         f"{', '.join(sorted(searchable()))})")
    for name, dist in space.items():
        if name in SPLIT_PARAMETERS and isinstance(dist, Uniform):
            raise StudyError(f"space parameter {name}: use choice or grid values (each value gets its own split, "
                             "cut before the study starts)")
        methods = [{}] if name in (*SPLIT_PARAMETERS, "variant", "method") else runs
        for value, method in itertools.product(space_values(dist), methods):
            try:
                if name in SPLIT_PARAMETERS:
                    config.split_spec({name: value})
                else:
                    config.train_config({**method, name: value})
            except (TrainConfigError, DataPrepError) as exc:
                with_method = "".join(f" with {key} {chosen}" for key, chosen in method.items())
                where = "the split" if name in SPLIT_PARAMETERS else "training"
                raise StudyError(f"space parameter {name}={value!r} would fail in {where}{with_method}: "
                                 f"{exc}") from None
    for params in split_parameters(config, space):  # e.g. unlabeled uniform with a swept gamma_u
        try:
            config.split_spec(params)
        except DataPrepError as exc:
            raise StudyError(f"space values {params} would fail in the split together: {exc}") from None
    categorical = {name: dist.values for name, dist in space.items()
                   if not isinstance(dist, Uniform) and name not in SPLIT_PARAMETERS}
    combinations = list(itertools.islice(itertools.product(*categorical.values()), MAX_COMBINATIONS))
    for values in combinations if len(categorical) > 1 else ():
        params = dict(zip(categorical, values))
        try:
            config.train_config({**(base or {}), **params})
        except TrainConfigError as exc:
            raise StudyError(f"space values {params} would fail in training together: {exc}") from None


def _check_points(config: StudyConfig) -> None:
    for kind in ("fixed_points", "points_to_evaluate"):
        for point in getattr(config.search, kind):
            try:
                config.train_config(point)
            except (TrainConfigError, DataPrepError) as exc:
                raise StudyError(f"search.{kind} entry {point}: {exc}") from None


def _check_optuna_storage(config: StudyConfig) -> None:
    url = config.search.storage
    if config.search.algorithm == "grid":
        raise StudyError("search.storage keeps an Optuna study; a grid search has none (remove it, or search with "
                         "algorithm optuna or random)")
    database = url.split("://", 1)[0].split("+", 1)[0]
    if "://" not in url or database not in OPTUNA_DATABASES:
        raise StudyError(f"search.storage must be a database URL Optuna can use ({', '.join(OPTUNA_DATABASES)}), "
                         f"e.g. sqlite:///{{study}}/optuna.db; got {url!r}")
    if "{study}" in url and "://" in config.storage.removeprefix("file://"):
        raise StudyError(f"search.storage {url} puts a database file in the study directory, but studies "
                         f"live at {config.storage}; give the database a local path or a server URL instead")


def _repeats_as_seeds(space: dict, repeats: int, base_seed: int) -> dict:
    """A grid repeated num_samples times: each repeat trains with its own seed (base_seed + r),
    as a `seed` grid parameter; repeats of identical trials would measure nothing."""
    if "seed" in space:
        raise StudyError(f"search.num_samples={repeats} repeats a grid that already sweeps seed, which would "
                         "rerun the same trials: add seeds to the grid instead")
    return {**space, "seed": Grid(tuple(base_seed + r for r in range(repeats)))}


def _checked_compare(config: StudyConfig) -> dict:
    """A compare study: every method's space checked for that method, the same budget for all."""
    from study.compare import defaults_point, method_spaces

    search = config.search
    if search.algorithm == "grid":
        raise StudyError("a compare study searches each method with Optuna (search.algorithm optuna or random)")
    if search.fixed_points or search.points_to_evaluate:
        raise StudyError("a compare study runs each method's reference defaults first and the same budget for "
                         "every method: remove search.fixed_points and search.points_to_evaluate")
    if config.train.seed in config.compare.confirm_seeds:
        raise StudyError(f"compare.confirm_seeds: {config.train.seed} is the search's seed (train.seed); "
                         "confirmation seeds must be fresh")
    if search.storage is not None:
        _check_optuna_storage(config)
    try:
        for params in split_parameters(config, {}):  # stage 2's shapes, or the base split
            config.split_spec(params)
        spaces = method_spaces(config)
        for space in spaces.values():
            validate_space(space)
    except SpaceError as exc:
        raise StudyError(str(exc)) from None
    except DataPrepError as exc:
        raise StudyError(f"split: {exc}") from None
    for method, space in spaces.items():
        fixed = sorted(set(space) & {*SPLIT_PARAMETERS, "variant", "seed"})
        if fixed:
            raise StudyError(f"a compare study's space may not sweep {', '.join(fixed)}: every method trains on the "
                             "same split, with the same seeds")
        if not space:
            raise StudyError(f"method {method} has nothing to search: its space is empty")
        try:
            check_space_values(config, space, {"variant": method})
        except StudyError as exc:
            raise StudyError(f"compare.methods {method}: {exc}") from None
        config.train_config({"variant": method, **defaults_point(config, method, space)})
    return spaces


def planned_trials(config: StudyConfig, space: dict) -> int:
    """Trials of the study; `space` is checked()'s (grid repeats are already its seeds)."""
    if config.compare.methods:
        compare = config.compare
        confirmed = (1 + compare.confirm_defaults) * len(compare.confirm_seeds) * max(1, len(compare.unlabeled))
        return len(compare.methods) * (compare.trials_per_method + confirmed)
    searched = grid_size(space) if config.search.algorithm == "grid" else config.search.num_samples
    return searched + len(config.search.fixed_points)
