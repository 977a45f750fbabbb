"""The study's Tuner: new, or restored to resume an interrupted study."""

import pickle

from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

from study.callbacks import CHECKPOINTS_TO_KEEP, KeepResumableCheckpoints, ReconcileSearch, RecordEndedTrials
from study.checks import planned_trials
from study.config import StudyConfig
from study.errors import StudyError
from study.searcher import build_scheduler, build_searcher
from study.storage import ERRORS, join, split_uri
from study.tensorboard import StudyTensorBoard
from study.trial import MAX_FAILURES, build_trainable
from study.tune_files import damaged_state, recorded_a_state, trial_dirname


def build_tuner(config: StudyConfig, space: dict, study_dir: str, cluster_cpus: float, datasets=None, *,
                experiment: str | None = None, constants: dict | None = None, trials: int | None = None):
    """A Tuner for the study (new), ready to fit. datasets: decode_once's, for TorchTrainer trials.
    A compare study runs several: each `experiment` is a Tune experiment of its own in the study
    directory, its trials sharing `constants` (their stage and method), `trials` in all."""
    grid = config.search.algorithm == "grid"
    num_samples = 1 if grid else trials or planned_trials(config, space)  # a grid's repeats are its seeds
    searcher, param_space = build_searcher(config, space, study_dir, experiment, constants, num_samples)
    trainable = build_trainable(config, study_dir, cluster_cpus, datasets)
    tune_config = tune.TuneConfig(
        metric=config.metric, mode=config.mode, search_alg=searcher,  # the scheduler prunes on it too
        scheduler=build_scheduler(config), num_samples=num_samples,  # the searcher limits the concurrency
        trial_dirname_creator=trial_dirname,
        reuse_actors=config.resources.in_trial(),  # keeps the decoded dataset between trials
    )
    # In-trial runs restart from the trial's last checkpoint; TorchTrainer runs restart inside Train.
    failures = tune.FailureConfig(max_failures=MAX_FAILURES if config.resources.in_trial() else 0)
    storage, name = split_uri(join(study_dir, experiment) if experiment else study_dir)
    # Tune's own loggers but its TensorBoard one (see `logger_callbacks`).
    loggers = [CSVLoggerCallback(), JsonLoggerCallback(), StudyTensorBoard()]
    # verbose=0: the trials' own progress lines are the study's console, not Tune's tables too.
    # Tune keeps every checkpoint (num_to_keep=None): KeepResumableCheckpoints deletes the old ones.
    run_config = tune.RunConfig(name=name, storage_path=storage, failure_config=failures, verbose=0,
                                checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
                                callbacks=[ReconcileSearch(searcher), RecordEndedTrials(),
                                           KeepResumableCheckpoints(keep=CHECKPOINTS_TO_KEEP), *loggers])
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)


def study_tuner(config: StudyConfig, space: dict, study_dir: str, cluster_cpus: float, datasets=None, *,
                resume: bool, experiment: str | None = None, constants: dict | None = None,
                trials: int | None = None):
    """The Tuner of the study (or of one `experiment` of a compare study): new, or restored when
    resuming one whose trials Tune recorded. A resumed experiment that never recorded a state (its
    driver stopped before the first trial started) is built anew: nothing of it ran, and Tune's own
    restart of such an experiment loses the searcher's plan."""
    path = join(study_dir, experiment) if experiment else study_dir
    if resume and recorded_a_state(path):
        return restore_tuner(config, study_dir, cluster_cpus, datasets, experiment=experiment)
    if resume and not experiment and not tune.Tuner.can_restore(path):
        raise StudyError(f"nothing to resume at {path} (no Tune experiment state there)")
    return build_tuner(config, space, study_dir, cluster_cpus, datasets, experiment=experiment, constants=constants,
                       trials=trials)


def restore_tuner(config: StudyConfig, study_dir: str, cluster_cpus: float, datasets=None, *,
                  experiment: str | None = None):
    """The interrupted study's Tuner (or one `experiment` of a compare study): finished trials are
    kept, unfinished and errored ones rerun."""
    path = join(study_dir, experiment) if experiment else study_dir
    if not tune.Tuner.can_restore(path):
        raise StudyError(f"nothing to resume at {path} (no Tune experiment state there)")
    damaged = damaged_state(path)
    if damaged:
        raise StudyError(f"cannot resume {path}: {damaged} is damaged (empty or cut short, as a storage failure "
                         "leaves it); `python -m study.report` still lists every trial; run the study again under "
                         "another --name")
    try:
        return tune.Tuner.restore(path, trainable=build_trainable(config, study_dir, cluster_cpus, datasets),
                                  resume_unfinished=True, resume_errored=True)
    except (*ERRORS, EOFError, KeyError, pickle.UnpicklingError) as exc:
        # Never restarted from scratch behind the user's back: the finished trials stay on disk.
        raise StudyError(f"cannot resume {path}: its Tune state is damaged ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:200]}); `python -m study.report` still lists its trials; run "
                         "the study again under another --name") from None
