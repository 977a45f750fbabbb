"""Ray Tune + Optuna wiring: a Tuner whose trials each run a data-parallel FixMatch training.

Each Tune trial is a small function that builds the trial's TrainConfig and split, then trains:
  torch_trainer  calls `trainables.ray_train.fit` (a TorchTrainer over Ray Data shards) with Ray
                 Train's `TuneReportCallback`, the pattern Ray documents for Train inside Tune.
                 The Train run is named after the trial, so a resumed study continues unfinished
                 trials from their last Train checkpoint.
  in_trial       (one worker) runs the same training loop in the trial's own process on the
                 in-process loader, reporting and checkpointing through Tune: no worker group,
                 controller or Ray Data start-up per trial.
Fixed points (e.g. the FixMatch baseline) run first and are kept out of Optuna's model.
"""

import json
import math
import pickle
import posixpath
import sys

import pyarrow.fs as pafs
from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.search import Searcher

from data_prep.parquet import open_dataset
from data_prep.splits import load_split, make_split, save_split, split_path
from search_spaces.spaces import to_optuna, to_tune
from study.config import StudyConfig, StudyError, optuna_storage, planned_trials, split_spec, trial_overrides
from study.storage import ERRORS, filesystem, join, split_uri, write_whole
from study.tensorboard import StudyTensorBoard
from trainables.config import TrainConfig
from trainables.ray_train import Resources, fit, quiet_ray_logs

MAX_FAILURES = 2  # restarts of a failed training from its last checkpoint
CHECKPOINTS_TO_KEEP = 2  # per in-trial run, and any a resume may still need (KeepResumableCheckpoints)


class FixedPointsFirst(Searcher):
    """Suggest whole fixed configurations first, then defer to an inner searcher.

    Every suggestion gets a label: a fixed point's own, a named starting point's own (the inner
    searcher suggests its `points_to_evaluate` first, in order), else "search". Results of fixed
    points are not fed to the inner searcher: they lie outside its space."""

    def __init__(self, searcher, fixed_points, metric, mode, start_labels=()):
        super().__init__(metric=metric, mode=mode)
        self.searcher, self.pending = searcher, list(fixed_points)
        self.start_labels = list(start_labels)  # the labels of the inner searcher's first suggestions
        self.fixed_trials = set()

    def set_search_properties(self, metric, mode, config, **spec):
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    def suggest(self, trial_id):
        if self.pending:
            self.fixed_trials.add(trial_id)
            return {"label": "fixed", **self.pending.pop(0)}
        suggestion = self.searcher.suggest(trial_id)
        if not isinstance(suggestion, dict):
            return suggestion
        return {"label": self.start_labels.pop(0) if self.start_labels else "search", **suggestion}

    def on_trial_result(self, trial_id, result):
        if trial_id not in self.fixed_trials:
            self.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id, result=None, error=False):
        if trial_id not in self.fixed_trials:
            self.searcher.on_trial_complete(trial_id, result=result, error=error)

    # Tune saves the inner searcher itself; a wrapper keeps only its own state.
    def get_state(self):
        return {"pending": self.pending, "fixed_trials": self.fixed_trials, "start_labels": self.start_labels}

    def set_state(self, state):
        self.__dict__.update(state)


# --- checkpoints --------------------------------------------------------------------------------


class KeepResumableCheckpoints(tune.Callback):
    """Delete an in-trial run's old checkpoints (all but its newest `keep`), but never one that the
    experiment state on storage may still resume the trial from.

    Tune's own CheckpointConfig(num_to_keep) deletes old checkpoints as soon as a new one is
    registered, while the experiment state that `--resume` reads (it names each trial's checkpoint)
    is written every few seconds and uploaded in the background: a driver killed in between leaves
    a state naming a deleted checkpoint, and the resumed trial fails. So Tune keeps every checkpoint
    and this callback deletes them once the state on storage has moved past them. That state only
    moves forward, and resumes a trial from the checkpoint of its last result, or from the one
    before if Tune had yet to register that checkpoint: both are kept, and all later ones."""

    def __init__(self, keep: int):
        self.keep = keep
        self.runs = {}  # trial id -> (filesystem, trial directory, checkpoint names, oldest first)

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        names = self._track(trial)
        names[:] = sorted({*names, posixpath.basename(checkpoint.path)})
        self._prune()

    def on_experiment_end(self, trials, **info):
        # Tune has just uploaded its final experiment state. Trials that finished before a killed
        # driver could delete their old checkpoints are pruned here too.
        for trial in trials:
            if trial.has_reported_at_least_once:
                self._track(trial)
        self._prune()

    def _track(self, trial) -> list[str]:
        if trial.trial_id not in self.runs:  # a resumed trial also has its earlier run's checkpoints
            fs = trial.storage.storage_filesystem
            self.runs[trial.trial_id] = (fs, trial.path, _checkpoint_names(fs, trial.path))
        return self.runs[trial.trial_id][2]

    def _prune(self):
        if not self.runs:
            return
        fs, directory, _ = next(iter(self.runs.values()))
        saved = _saved_checkpoints(fs, posixpath.dirname(directory))
        if saved is None:
            return
        for trial_id, (fs, directory, names) in self.runs.items():
            needed = names.index(saved[trial_id]) - 1 if saved.get(trial_id) in names else 0
            for name in names[:max(0, min(needed, len(names) - self.keep))]:
                try:
                    fs.delete_dir(posixpath.join(directory, name))
                except FileNotFoundError:
                    pass
                except ERRORS:
                    continue  # kept: tried again at the next checkpoint
                names.remove(name)


FINISHED = "finished"  # <study>/finished/<trial id>.json: the study's own record of each ended trial


def _plain(value):
    """For json.dumps: numpy scalars and arrays (and tensors) as numbers and lists, anything else
    unknown as its text."""
    for convert in ("item", "tolist"):
        try:
            return getattr(value, convert)()
        except (AttributeError, TypeError, ValueError, RuntimeError):
            continue
    return str(value)


class RecordEndedTrials(tune.Callback):
    """Write each trial's parameters, status and last result, whole (temporary name, then moved),
    to <study>/finished/<trial id>.json the moment it ends. Tune uploads its own copies of
    params.json and result.json again at every sync, overwriting them in place: when the storage
    fills up, a finished trial's files can be left empty. The study's record is written when the
    trial ends (again only if a resume runs it again), so the report still has what the trial
    reached (study/report/trials.py)."""

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._record(trial, "TERMINATED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._record(trial, "ERROR")

    def _record(self, trial, status: str) -> None:
        """Best effort: a record that cannot be written is said on the console, and Tune goes on
        (its own save on the same storage fails too, and the launcher stops the study then)."""
        record = {"trial_id": trial.trial_id, "status": status, "params": trial.config,
                  "last_result": {k: v for k, v in (trial.last_result or {}).items() if k != "config"}}
        # Where Tune keeps the study now (a resumed study may have moved since it started).
        fs, directory = trial.storage.storage_filesystem, posixpath.join(trial.storage.experiment_fs_path, FINISHED)
        try:
            fs.create_dir(directory, recursive=True)
            write_whole(fs, posixpath.join(directory, f"{trial.trial_id}.json"),
                        json.dumps(record, default=_plain, allow_nan=True).encode())
        except ERRORS as exc:
            print(f"warning: trial {trial.trial_id} ended {status}, but its record in {directory} could not be "
                  f"written ({exc})", file=sys.stderr)


def _checkpoint_names(fs, directory: str) -> list[str]:
    try:
        infos = fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True))
    except ERRORS:
        return []
    return sorted(i.base_name for i in infos
                  if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_"))


def _saved_checkpoints(fs, experiment: str) -> dict | None:
    """{trial id: checkpoint directory of the trial's last result} in the experiment state on
    storage that `--resume` restores (the newest), or None while it cannot be read (being written)."""
    try:
        files = [i.base_name for i in fs.get_file_info(pafs.FileSelector(experiment))]
        states = sorted(f for f in files if f.startswith("experiment_state-") and f.endswith(".json"))
        if not states:
            return {}
        with fs.open_input_stream(posixpath.join(experiment, states[-1])) as f:
            trial_data = json.loads(f.readall())["trial_data"]
        # Plain JSON: the parts of the state Tune stores pickled are left undecoded.
        return {json.loads(trial)["trial_id"]: json.loads(run)["last_result"].get("checkpoint_dir_name")
                for trial, run in trial_data}
    except (*ERRORS, KeyError, TypeError):
        return None


# --- splits -----------------------------------------------------------------------------------


def prepare_splits(config: StudyConfig, space: dict) -> dict:
    """Create (or check) every split the study can use, before any trial starts, so an imbalance
    the dataset cannot support fails here. Returns {split name: counts, dataset checksum and whether
    it was cut now ("created")}."""
    info = open_dataset(config.dataset, config.data_root)
    gammas_l = space["gamma_l"].values if "gamma_l" in space else [config.split.gamma_l]
    gammas_u = space["gamma_u"].values if "gamma_u" in space else [config.split.gamma_u]
    if config.split.kind != "lt" and ("gamma_l" in space or "gamma_u" in space):
        raise StudyError("sweeping gamma_l / gamma_u needs split.kind: lt")
    splits = {}
    for gamma_l in gammas_l:
        for gamma_u in gammas_u:
            spec = split_spec(config, {"gamma_l": gamma_l, "gamma_u": gamma_u})
            name = spec.default_name(info.name)
            created = not split_path(info, name).is_file()
            if created:
                split = make_split(info, spec)
                save_split(info, split)
            else:
                split = load_split(info, name, create=False)
            splits[name] = {"created": created,
                            "labeled": len(split.labeled_indices), "unlabeled": len(split.unlabeled_indices),
                            "labeled_counts": split.labeled_counts, "valid": len(split.valid_indices),
                            "valid_kind": split.spec.valid_kind if split.has_validation else None,
                            "valid_counts": split.valid_counts, "dataset_checksum": split.dataset_checksum}
    return splits


def decode_once(config: StudyConfig, split_names) -> dict:
    """Every split's Ray datasets (labeled, unlabeled, valid, test), read and decoded once into
    Ray's object store, for TorchTrainer trials: each trial's workers then take their shards from
    memory instead of reading and decoding the Parquet files again. {split name: datasets}."""
    import time

    from data_prep.loading import ray_datasets

    decoded, test = {}, None
    for name in split_names:
        start = time.perf_counter()
        datasets = ray_datasets(config.dataset, name, config.data_root, verify=False)
        if test is None:
            test = datasets["test"].materialize()
        decoded[name] = {**{part: data.materialize() for part, data in datasets.items() if part != "test"},
                         "test": test}  # the test split is the same for every split
        size = sum(data.size_bytes() for data in decoded[name].values())
        print(f"split {name}: decoded once for every trial ({size / 2**20:.0f} MiB in Ray's object store, "
              f"{time.perf_counter() - start:.1f} s)")
    return decoded


# --- the trial ----------------------------------------------------------------------------------


def run_trial(params: dict, *, study: dict, datasets: dict | None = None) -> None:
    """One Tune trial: train the trial's configuration data-parallel, reporting to Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from study.config import from_dict

    quiet_ray_logs()
    config = from_dict(study["config"])
    spec = split_spec(config, params)
    train_config = config.train_config({**trial_overrides(params), "split": spec.default_name(config.dataset)})
    if study["in_trial"]:
        # A failure that would recur (divergence, ...) ends the trial with one result Tune accepts
        # (it holds the study's metric), instead of an error Tune would retry; the report marks
        # the trial failed with that line.
        train_in_trial(train_config, use_gpu=study["resources"]["use_gpu"],
                       failure_metrics={config.metric: math.nan})
        return
    # TrainingFailed ends a TorchTrainer trial as an error: Tune does not retry those (Train does).
    fit(train_config, Resources(**study["resources"]), storage_path=study["train_runs"],
        datasets=(datasets or {}).get(train_config.split),
        name=tune.get_context().get_trial_id(), max_failures=study["max_failures"], tensorboard=False,
        callbacks=[TuneReportCallback()], check_resources=False,  # the launcher checked, once
        verify=False)  # the launcher verified the dataset


def train_in_trial(config: TrainConfig, use_gpu: bool, failure_metrics: dict) -> None:
    """Train one worker's loop in this (trial) process, resuming from the trial's checkpoint."""
    import torch

    from data_prep.loading import load_arrays
    from trainables.loop import LoopContext, TrainData, run_or_report_failure

    torch.set_num_threads(1)
    quiet_ray_logs()
    device = torch.device("cuda" if use_gpu else "cpu")
    config = TrainConfig.from_dict({**config.to_dict(), "device": device.type})

    def load_data():
        return TrainData.from_arrays(load_arrays(config.dataset, config.split, config.data_root, verify=False))

    def report(metrics, checkpoint_dir):
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)

    context = LoopContext(device=device, report=report, restored=tune.get_checkpoint())
    run_or_report_failure(config, load_data, context, failure_metrics)


def trial_resources(config: StudyConfig, cluster_cpus: float) -> dict:
    """Worker CPUs sized so that max_concurrent trials fit and (for TorchTrainer trials, which read
    through Ray Data) one CPU stays free for Ray Data's tasks."""
    res = config.resources
    if res.in_trial() and res.cpus_per_worker is None:
        cpus = min(1.0, max(cluster_cpus / config.search.max_concurrent, 0.05))
        return {"num_workers": 1, "use_gpu": res.gpus() > 0, "gpus_per_worker": res.gpus(),
                "cpus_per_worker": round(cpus, 3)}
    if res.cpus_per_worker is not None:
        cpus = res.cpus_per_worker
    else:
        per_trial = max(cluster_cpus - 1, 0.5) / config.search.max_concurrent - res.trial_cpus
        cpus = round(min(1.0, max(per_trial / res.num_workers, 0.05)), 3)
    return {"num_workers": res.num_workers, "use_gpu": res.gpus() > 0, "gpus_per_worker": res.gpus(),
            "cpus_per_worker": cpus}


def build_searcher(config: StudyConfig, space: dict, study_dir: str):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    search = config.search
    if search.algorithm == "grid":
        return None, {**to_tune(space), "label": "grid"}
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # its "new study created" line is noise here
    sampler = (optuna.samplers.TPESampler(seed=search.seed) if search.algorithm == "optuna"
               else optuna.samplers.RandomSampler(seed=search.seed))
    starts = [{k: v for k, v in point.items() if k != "label"} for point in search.points_to_evaluate]
    optuna_search = OptunaSearch(space=to_optuna(space), metric=config.metric, mode=config.mode,
                                 points_to_evaluate=starts or None, sampler=sampler,
                                 storage=_optuna_database(optuna_storage(config, study_dir)), study_name=config.name)
    fixed = [{"label": p.get("label", "fixed"), **p} for p in search.fixed_points]
    start_labels = [point.get("label", "search") for point in search.points_to_evaluate]
    return FixedPointsFirst(optuna_search, fixed, config.metric, config.mode, start_labels), {}


def _optuna_database(url: str | None):
    import optuna
    import sqlalchemy.exc

    if url is None:
        return None
    try:
        return optuna.storages.RDBStorage(url)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as exc:
        raise StudyError(f"search.storage {url}: Optuna cannot open it ({' '.join(str(exc).split())[:200]})") from None


def build_scheduler(config: StudyConfig):
    from ray.tune.schedulers import ASHAScheduler, MedianStoppingRule

    scheduler = config.scheduler
    base = config.train_config()
    reports = -(-base.steps // base.eval_every)
    if scheduler.name == "asha":
        return ASHAScheduler(time_attr="training_iteration", max_t=reports,
                             grace_period=min(scheduler.grace_period, reports))
    if scheduler.name == "median":
        return MedianStoppingRule(time_attr="training_iteration", grace_period=scheduler.grace_period,
                                  min_samples_required=3)
    return None


def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def build_tuner(config: StudyConfig, space: dict, study_dir: str, cluster_cpus: float, datasets=None):
    """A Tuner for the study (new), ready to fit. datasets: decode_once's, for TorchTrainer trials."""
    searcher, param_space = build_searcher(config, space, study_dir)
    trainable = _trainable(config, study_dir, cluster_cpus, datasets)
    num_samples = 1 if searcher is None else planned_trials(config, space)  # a grid's repeats are in its seeds
    tune_config = tune.TuneConfig(
        metric=config.metric, mode=config.mode, search_alg=searcher,  # the scheduler prunes on it too
        scheduler=build_scheduler(config), num_samples=num_samples,
        max_concurrent_trials=config.search.max_concurrent, trial_dirname_creator=trial_dirname,
        reuse_actors=config.resources.in_trial(),  # keeps the decoded dataset between trials
    )
    # In-trial runs restart from the trial's last checkpoint; TorchTrainer runs restart inside Train.
    failures = tune.FailureConfig(max_failures=MAX_FAILURES if config.resources.in_trial() else 0)
    storage, name = split_uri(study_dir)
    # Tune's own loggers but its TensorBoard one (see `logger_callbacks`).
    loggers = [CSVLoggerCallback(), JsonLoggerCallback(), StudyTensorBoard()]
    # verbose=0: the trials' own progress lines are the study's console, not Tune's tables too.
    # Tune keeps every checkpoint (num_to_keep=None): KeepResumableCheckpoints deletes the old ones.
    run_config = tune.RunConfig(name=name, storage_path=storage, failure_config=failures, verbose=0,
                                checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
                                callbacks=[KeepResumableCheckpoints(keep=CHECKPOINTS_TO_KEEP),
                                           RecordEndedTrials(), *loggers])
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)


def restore_tuner(config: StudyConfig, study_dir: str, cluster_cpus: float, datasets=None):
    """The interrupted study's Tuner: finished trials are kept, unfinished and errored ones rerun."""
    if not tune.Tuner.can_restore(study_dir):
        raise StudyError(f"nothing to resume at {study_dir} (no Tune experiment state there)")
    damaged = damaged_state(study_dir)
    if damaged:
        raise StudyError(f"cannot resume {study_dir}: {damaged} is damaged (empty or cut short, as a storage failure "
                         "leaves it); `python -m study.report` still lists every trial; run the study again under "
                         "another --name")
    try:
        return tune.Tuner.restore(study_dir, trainable=_trainable(config, study_dir, cluster_cpus, datasets),
                                  resume_unfinished=True, resume_errored=True)
    except (*ERRORS, EOFError, KeyError, pickle.UnpicklingError) as exc:
        # Never restarted from scratch behind the user's back: the finished trials stay on disk.
        raise StudyError(f"cannot resume {study_dir}: its Tune state is damaged ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:200]}); `python -m study.report` still lists its trials; run "
                         "the study again under another --name") from None


def damaged_state(study_dir: str) -> str | None:
    """The first of Tune's files a resume reads that is empty or not whole (the newest experiment
    state must parse as JSON), or None, also when the study cannot be listed (an unreachable
    storage says so itself). Nothing is unpickled to check."""
    fs, path = filesystem(study_dir)
    try:
        files = {i.base_name: i for i in fs.get_file_info(pafs.FileSelector(path))}
    except ERRORS:
        return None
    states = sorted(name for name in files if name.startswith("experiment_state-") and name.endswith(".json"))
    searchers = sorted(name for name in files if name.startswith("searcher-state-"))
    for name in ["tuner.pkl", *states[-1:], *searchers[-1:]]:
        if name in files and not files[name].size:
            return join(study_dir, name)
    if states:
        try:
            with fs.open_input_stream(posixpath.join(path, states[-1])) as f:
                json.loads(f.readall())
        except (*ERRORS, UnicodeDecodeError):
            return join(study_dir, states[-1])
    return None


def _trainable(config: StudyConfig, study_dir: str, cluster_cpus: float, datasets=None):
    resources = trial_resources(config, cluster_cpus)
    study = {
        "config": config.to_dict(),
        "resources": resources,
        "in_trial": config.resources.in_trial(),
        "train_runs": join(study_dir, "train_runs"),
        "max_failures": MAX_FAILURES,
    }
    trainable = tune.with_parameters(run_trial, study=study, datasets=datasets)
    return tune.with_resources(trainable, trial_reservation(config, resources))


def trial_reservation(config: StudyConfig, resources: dict) -> dict:
    """What Tune reserves for one trial: the worker itself (in-trial runs; with gpus_per_worker
    0.25, four such trials share a GPU), or the small driver of a TorchTrainer, whose workers
    reserve their own resources through the trainer's ScalingConfig."""
    if config.resources.in_trial():
        return {"CPU": resources["cpus_per_worker"], "GPU": resources["gpus_per_worker"]}
    return {"CPU": config.resources.trial_cpus}

