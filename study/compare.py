"""A compare study's two stages (docs/method.md, "Comparing methods"), one Tune experiment each
stage and method, in the study directory:

    search-<method>/   stage 1: an Optuna search of the method's own space, the same number of
                       trials, steps, split and scheduler for every method, its reference
                       defaults first
    compare.json       each method's stage-1 winner, written whole when stage 1 is finished
    confirm/           stage 2: each method's winner and its defaults, with every confirmation
                       seed (the same seeds for every method, so differences are paired)

A resumed study continues the stage it stopped in: a finished experiment is restored as it is,
an unfinished one continues; stage 2 starts only once every method's stage 1 has finished.
"""

import json
import math

from study.config import StudyConfig
from study.errors import StudyError
from study.method_spaces import COMPLEMENT, method_space
from study.storage import join, read_bytes, write_bytes
from study.tune_files import DEFAULTS, TUNED, WINNERS_FILE, search_experiment
from study.tune_files import STAGE_CONFIRM as CONFIRM
from study.tune_files import STAGE_SEARCH as SEARCH
from study.tuner import study_tuner


def method_spaces(config: StudyConfig) -> dict[str, dict]:
    """{method: its stage-1 space}: the study's space for every method, or each method's own."""
    return {method: config.resolved_space() if config.space is not None else method_space(method)
            for method in config.compare.methods}


def defaults_point(config: StudyConfig, method: str, space: dict) -> dict:
    """The method's reference defaults (as the study's train section leaves them) as a point of
    its space."""
    train = config.train_config({"variant": method})
    point = {}
    for parameter in space:
        name = parameter.removeprefix(COMPLEMENT)
        value = getattr(train, name) if name in train.field_names() else train.method.options[name]
        point[parameter] = round(1 - value, 12) if parameter.startswith(COMPLEMENT) else value
    return point


def run_stages(config: StudyConfig, study_dir: str, cluster_cpus: float, datasets=None) -> str | None:
    """Run (or continue) both stages. None when both finished; else the stage that stopped
    before its trials all ended (interrupted)."""
    spaces, grids = method_spaces(config), {}
    trials = config.compare.trials_per_method
    for method, space in spaces.items():
        start = [{"label": DEFAULTS, **defaults_point(config, method, space)}]
        stage = config.replace(search=config.search.replace(num_samples=trials, points_to_evaluate=start))
        grids[method] = _fit(stage, space, study_dir, cluster_cpus, datasets, search_experiment(method),
                             {"stage": SEARCH, "variant": method}, trials)
        if not _finished(grids[method], trials):
            return f"{SEARCH} ({method})"
    winners = stage_one_winners(config, study_dir, spaces, grids)
    points = confirmation_points(config, spaces, winners)
    confirm = config.replace(search=config.search.replace(fixed_points=points, points_to_evaluate=[]),
                             scheduler=config.scheduler.replace(name="none"))  # full length, every one
    grid = _fit(confirm, {}, study_dir, cluster_cpus, datasets, CONFIRM, {"stage": CONFIRM}, len(points))
    return None if _finished(grid, len(points)) else CONFIRM


def _fit(config, space, study_dir, cluster_cpus, datasets, experiment, constants, trials):
    # An experiment that has begun continues (a finished one is restored as it is).
    return study_tuner(config, space, study_dir, cluster_cpus, datasets, resume=True, experiment=experiment,
                       constants=constants, trials=trials).fit()


def _finished(grid, trials: int) -> bool:
    return len(grid) == trials and grid.num_terminated + grid.num_errors == trials


def stage_one_winners(config: StudyConfig, study_dir: str, spaces: dict, grids: dict) -> dict:
    """{method: {"params", "score", "trial_id"}}: each method's stage-1 trial best on the study's
    metric. Chosen once, when stage 1 has finished, and kept in compare.json, so a resumed stage 2
    confirms what it started with."""
    path = join(study_dir, WINNERS_FILE)
    saved = read_bytes(path)
    if saved is not None:
        return json.loads(saved)["winners"]
    sign = 1 if config.mode == "max" else -1
    winners = {}
    for method, space in spaces.items():
        scored = [(result.metrics.get(config.metric), result) for result in grids[method] if result.error is None]
        scored = [(score, result) for score, result in scored if isinstance(score, (int, float)) and
                  math.isfinite(score)]
        if not scored:
            raise StudyError(f"stage 1 of {method} has no trial that reported {config.metric}, so there is no winner "
                             "to confirm; see the report (python -m study.report) for why its trials failed")
        score, best = max(scored, key=lambda pair: sign * pair[0])
        winners[method] = {"params": {k: v for k, v in best.config.items() if k in space}, "score": score,
                           "trial_id": best.metrics.get("trial_id")}
    write_bytes(path, json.dumps({"metric": config.metric, "mode": config.mode, "winners": winners},
                                 indent=2).encode())
    return winners


def confirmation_points(config: StudyConfig, spaces: dict, winners: dict) -> list[dict]:
    """Every method's winner (and its defaults, unless compare.confirm_defaults is off), each with
    every confirmation seed, on every shape of compare.unlabeled (none: the base split)."""
    compare, points = config.compare, []
    shapes = [{"unlabeled": shape} for shape in compare.unlabeled] or [{}]
    for method, space in spaces.items():
        kinds = ((DEFAULTS, defaults_point(config, method, space)),) if compare.confirm_defaults else ()
        for kind, values in (*kinds, (TUNED, winners[method]["params"])):
            for shape in shapes:
                label = " ".join([method, kind, *shape.values()])
                points += [{"label": label, "stage": CONFIRM, "config": kind, "variant": method, **shape,
                            "seed": seed, **values} for seed in compare.confirm_seeds]
    return points
