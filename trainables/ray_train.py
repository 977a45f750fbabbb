"""Data-parallel training on Ray Train: a TorchTrainer over Ray Data shards (docs/method.md).

Only what is Ray's lives here: the worker group (sized by trainables/resources.py), each worker
reading its shard of the labeled and unlabeled rows (decoded once, in memory) and handing it to
the one training loop (trainables/loop.py) with Ray Train's report, checkpoint and DDP wrapper,
and `fit`, which starts the TorchTrainer.
"""

import logging
import os
import sys
from datetime import datetime

import numpy as np

from trainables.cluster import can_grow, check_placement, connect, node_resources
from trainables.config import TrainConfig
from trainables.errors import TrainConfigError, TrainingFailed
from trainables.loop import LoopContext, TrainData, run_or_report_failure
from trainables.resources import Resources
from trainables.same_config import check_rerun, record_run


def check_batch_split(config: TrainConfig, resources: Resources) -> None:
    """The global batch is split evenly across the workers."""
    if config.batch_size % resources.num_workers:
        raise TrainConfigError(f"batch_size={config.batch_size} is not divisible by num_workers="
                               f"{resources.num_workers}: the global batch is split evenly across workers")


def _materialize(shard, image_shape, columns=("image", "label")) -> dict:
    """A worker's shard as in-memory numpy arrays (decoded once, sampled from every step), in
    ascending row index like `load_arrays`: Ray Data may deliver blocks in any order."""
    parts = {column: [] for column in ("index", *columns)}
    for batch in shard.iter_batches(batch_size=4096, batch_format="numpy"):
        for column in parts:
            parts[column].append(batch[column])
    empty = {"image": np.empty((0, *image_shape), np.uint8)}
    arrays = {column: np.concatenate(values) if values else empty.get(column, np.empty(0, np.int64))
              for column, values in parts.items()}
    order = np.argsort(arrays.pop("index"), kind="stable")
    return {column: values[order] for column, values in arrays.items()}


def quiet_ray_logs() -> None:
    """In a worker: keep Ray Train's, Tune's and Ray Data's routine INFO lines ("Reporting training
    result ...", "Checkpoint successfully created ...") off the console, and print() lines from
    appearing twice (Ray Train also sends them through the root logger's console handler); the
    loop's own progress line is what a user follows. Warnings, and Ray's log files, keep all."""
    for name in ("ray.train", "ray.tune", "ray.data"):
        logging.getLogger(name).setLevel(logging.WARNING)
    console = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
    for name in ("ray.train", ""):
        for handler in logging.getLogger(name).handlers:
            if getattr(handler, "stream", None) in console:  # not Ray's log files
                handler.setLevel(logging.WARNING)


def train_loop_per_worker(loop_config: dict) -> str | None:
    """Ray Train's per-worker entry point. loop_config: {"train": the TrainConfig,
    "classes": int, "image_shape": [H, W, C], "num_unlabeled": int, "labeled_counts": [int],
    "labeled_in_pool": bool array, "has_valid": bool,
    "tensorboard_dir": str | None, "torch_threads": int}. Returns the one line of a failure that
    would recur on a retry (Ray Train does not retry a worker group that returned), else None."""
    import ray.data
    import ray.train
    import ray.train.torch
    import torch

    torch.set_num_threads(loop_config.get("torch_threads", 1))
    quiet_ray_logs()
    ray.data.DataContext.get_current().enable_progress_bars = False
    rank = ray.train.get_context().get_world_rank()
    image_shape = tuple(loop_config["image_shape"])

    def load_data() -> TrainData:
        labeled = _materialize(ray.train.get_dataset_shard("labeled"), image_shape)
        unlabeled = _materialize(ray.train.get_dataset_shard("unlabeled"), image_shape, ("image", "position"))
        eval_sets = {}
        if rank == 0:  # only rank 0 evaluates
            for split in ("valid", "test") if loop_config["has_valid"] else ("test",):
                rows = _materialize(ray.train.get_dataset_shard(split), image_shape)
                eval_sets[split] = (rows["image"], rows["label"])
        return TrainData(labeled["image"], labeled["label"], unlabeled["image"], unlabeled["position"],
                         loop_config["num_unlabeled"], loop_config["classes"], image_shape, eval_sets,
                         loop_config.get("labeled_counts"), loop_config.get("labeled_in_pool"))

    def report(metrics, checkpoint_dir):
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    context = LoopContext(device=ray.train.torch.get_device(), report=report, restored=ray.train.get_checkpoint(),
                          rank=rank, world_size=ray.train.get_context().get_world_size(),
                          wrap_model=lambda model: ray.train.torch.prepare_model(model, move_to_device=False),
                          tensorboard_dir=loop_config.get("tensorboard_dir"))
    return run_or_report_failure(loop_config["train"], load_data, context)


def prepare_storage(storage_path: str) -> str:
    """The absolute path of a local storage directory, created; a URI (s3://, gs://, file://) goes
    to Ray as it is. TrainConfigError if the directory cannot be made."""
    if "://" in storage_path:
        return storage_path
    storage_path = os.path.abspath(storage_path)
    try:
        os.makedirs(storage_path, exist_ok=True)
    except OSError as exc:
        raise TrainConfigError(f"storage {storage_path} is not writable ({exc.strerror}); pass another --storage") \
            from None
    return storage_path


def _tensorboard_dir(storage_path: str, name: str) -> str | None:
    """Where rank 0 writes TensorBoard events: under the run on a local (or file://) storage; on
    object storage none (Tune's own logger still records every reported metric there)."""
    if "://" in storage_path and not storage_path.startswith("file://"):
        print(f"note: no TensorBoard events are written to {storage_path.split('://')[0]}:// storage", file=sys.stderr)
        return None
    return os.path.join(storage_path.removeprefix("file://"), name, "tensorboard")


def fit(config: TrainConfig, resources: Resources = Resources(), *, storage_path="results", name=None,
        max_failures=0, tensorboard=True, checkpoints_to_keep=2, callbacks=None, check_resources=True,
        verify=True, address=None, datasets=None):
    """Run one data-parallel training on the connected (or a new local) Ray cluster.

    Returns Ray Train's Result (metrics of the last report, checkpoint, path). `name` must be
    unique per run: Ray resumes a run whose name and storage path already exist, and only with the
    training config the run recorded when it started (its run.json; TrainConfigError otherwise).
    check_resources=False skips the check that the workers fit the cluster's nodes (skipped anyway
    on a cluster an autoscaler may grow). verify=False skips the dataset's checksum (a study
    verifies it once, before its first trial). `datasets`: the split's Ray datasets as
    `ray_datasets` builds them, already materialized (a study decodes them once for all its
    trials); by default they are read and decoded from the Parquet files.

    A failure that would recur on a retry (divergence, a refused checkpoint, bad data) is not
    retried: `fit` raises TrainingFailed with its one line. Process and node faults are retried
    (`max_failures`) from the last checkpoint."""
    import ray
    import ray.data
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from data_prep.loading import DATA_TASK_CPUS, ray_datasets, resolve

    info, split = resolve(config.dataset, config.split, config.data_root, verify=verify)
    storage_path = prepare_storage(str(storage_path))
    name = name or f"{config.dataset}-{datetime.now():%Y%m%d-%H%M%S}"
    check_rerun(config, storage_path, name)  # an existing run continues only as it started
    check_batch_split(config, resources)
    # A new local Ray unless --address or RAY_ADDRESS names a cluster.
    local = connect(address) if not ray.is_initialized() else False
    ray.data.DataContext.get_current().enable_progress_bars = False
    cluster = ray.cluster_resources()
    resources = resources.sized(cluster.get("CPU", 1))
    # A cluster an autoscaler may grow is no limit; one that cannot would make the workers wait
    # forever for what it lacks.
    if check_resources and (local or not can_grow()):
        resources.check_gpus(cluster.get("GPU", 0))
        data_tasks = {} if datasets else {"Ray Data's tasks": {"CPU": DATA_TASK_CPUS}}
        check_placement(resources.num_workers, resources.per_worker, data_tasks, node_resources(), local)
    loop_config = {
        "train": config, "classes": info.num_classes, "image_shape": list(info.image_shape),
        "has_valid": split.has_validation, "num_unlabeled": len(split.unlabeled_indices),
        "labeled_counts": list(split.labeled_counts),
        "labeled_in_pool": np.isin(split.unlabeled_indices, split.labeled_indices),
        "tensorboard_dir": _tensorboard_dir(storage_path, name) if tensorboard else None,
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=resources.scaling_config(),
        datasets=datasets or ray_datasets(config.dataset, split.name, str(info.path.parent.resolve()), verify=False),
        dataset_config=DataConfig(datasets_to_split=["labeled", "unlabeled"]),
        run_config=RunConfig(
            name=name, storage_path=storage_path,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=checkpoints_to_keep),
            callbacks=callbacks,
        ),
    )
    record_run(config, storage_path, name)
    result = trainer.fit()
    if result.error is None and result.return_value:
        raise TrainingFailed(result.return_value)
    return result
