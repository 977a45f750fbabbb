"""One Tune trial: the trial's TrainConfig, trained data-parallel, reporting to Tune.

  torch_trainer  calls `trainables.ray_train.fit` (a TorchTrainer over Ray Data shards) with Ray
                 Train's `TuneReportCallback`, the pattern Ray documents for Train inside Tune.
                 The Train run is named after the trial, so a resumed study continues unfinished
                 trials from their last Train checkpoint.
  in_trial       (one worker) runs the same training loop in the trial's own process on the
                 in-process loader, reporting and checkpointing through Tune: no worker group,
                 controller or Ray Data start-up per trial.

The study's config reaches every trial as the frozen object the launcher checked; a trial checks
only its own sampled values, once, when it builds its TrainConfig.
"""

import math
from dataclasses import dataclass

from ray import tune

from study.config import StudyConfig
from study.storage import join
from trainables.cluster import check_placement
from trainables.config import TrainConfig
from trainables.ray_train import fit, quiet_ray_logs
from trainables.resources import Resources

MAX_FAILURES = 2  # restarts of a failed training from its last checkpoint


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of a study shares."""

    config: StudyConfig
    workers: Resources  # each trial's workers, sized for the cluster
    train_runs: str  # where TorchTrainer trials keep their Train runs


def run_trial(params: dict, *, setup: TrialSetup, datasets: dict | None = None) -> None:
    """One Tune trial: train the trial's configuration data-parallel, reporting to Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    quiet_ray_logs()
    config = setup.config
    train_config = config.train_config(params)
    if config.resources.in_trial():
        # A failure that would recur (divergence, ...) ends the trial with one result Tune accepts
        # (it holds the study's metric), instead of an error Tune would retry; the report marks
        # the trial failed with that line.
        train_in_trial(train_config, use_gpu=setup.workers.gpus > 0, failure_metrics={config.metric: math.nan})
        return
    # TrainingFailed ends a TorchTrainer trial as an error: Tune does not retry those (Train does).
    fit(train_config, setup.workers, storage_path=setup.train_runs,
        datasets=(datasets or {}).get(train_config.split),
        name=tune.get_context().get_trial_id(), max_failures=MAX_FAILURES, tensorboard=False,
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

    def load_data():
        return TrainData.from_arrays(load_arrays(config.dataset, config.split, config.data_root, verify=False))

    def report(metrics, checkpoint_dir):
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)

    context = LoopContext(device=device, report=report, restored=tune.get_checkpoint())
    run_or_report_failure(config, load_data, context, failure_metrics)


def build_trainable(config: StudyConfig, study_dir: str, cluster_cpus: float, datasets=None):
    """The study's trainable: `run_trial` with what every trial shares, reserving a trial's share."""
    workers = config.resources.for_trial(cluster_cpus, config.search.max_concurrent)
    setup = TrialSetup(config, workers, join(study_dir, "train_runs"))
    trainable = tune.with_parameters(run_trial, setup=setup, datasets=datasets)
    return tune.with_resources(trainable, config.resources.reservation(workers))


def check_trials_fit(config: StudyConfig, cluster: dict, nodes: list[dict], local: bool) -> None:
    """A trial that the cluster's nodes can never hold would wait forever: refuse it (on a
    cluster that cannot grow; see trainables/cluster.py)."""
    res = config.resources
    res.check_gpus(cluster.get("GPU", 0))
    workers = res.for_trial(cluster.get("CPU", 1), config.search.max_concurrent)
    # A TorchTrainer trial's driver reserves its own share; the workers read data decoded once,
    # by the launcher, so Ray Data's tasks need no CPU of their own then.
    driver = {} if res.in_trial() else {"a trial's driver (resources.trial_cpus)": {"CPU": res.trial_cpus}}
    check_placement(workers.num_workers, workers.per_worker, driver, nodes, local)
