"""Data-parallel FixMatch on Ray Train: a TorchTrainer over Ray Data shards (DESIGN.md 3.3, 5).

Each worker decodes its shard of the labeled and unlabeled rows once (uint8, in memory), then
samples its slice of every global batch from it and runs `train_step` unchanged, with a
`DistributedCollective` so the batch-level quantities of the method are over the global batch.
The global batch (B labeled, mu*B unlabeled) is split across the workers: more workers means
less work per worker, not a larger batch.

Every `eval_every` steps rank 0 evaluates the EMA model on the full test split, writes
TensorBoard scalars, and reports metrics with a checkpoint; a restarted worker group resumes
from the last one.
"""

import os
import sys
from math import nan
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from trainables.config import TrainConfig
from trainables.errors import TrainConfigError
from trainables.train import (
    EpochSampler, RunningStats, build_state, evaluation_metrics, train_step, use_flip,
)

CHECKPOINT_FILE = "state.pt"


@dataclass(frozen=True)
class Resources:
    """How many workers and what each reserves. cpus_per_worker=None sizes them so one whole CPU
    stays free for Ray Data's tasks (with 2 CPUs and 2 workers: 0.5 each)."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float | None = None

    def scaling_config(self, cluster_cpus: float):
        from ray.train import ScalingConfig

        cpus = self.cpus_per_worker
        if cpus is None:
            cpus = min(1.0, max(cluster_cpus - 1, 0.5) / self.num_workers)
        return ScalingConfig(num_workers=self.num_workers, use_gpu=self.use_gpu,
                             resources_per_worker={"CPU": round(cpus, 3)})


def validate(config: TrainConfig, resources: Resources, cluster_cpus: float | None, cluster_gpus: float | None) -> None:
    """Fail before any worker starts on what can never work. cluster_cpus/gpus None: the
    cluster may grow (an autoscaler adds nodes on demand), so its current size is not checked."""
    workers = resources.num_workers
    if workers < 1:
        raise TrainConfigError(f"num_workers must be >= 1, got {workers}")
    if config.batch_size % workers:
        raise TrainConfigError(f"batch_size={config.batch_size} is not divisible by num_workers={workers}: "
                               "the global batch is split evenly across workers")
    if cluster_cpus is None:
        return
    if workers > cluster_cpus:
        raise TrainConfigError(f"num_workers={workers} exceeds the cluster's {cluster_cpus:g} CPUs")
    if resources.use_gpu and workers > cluster_gpus:
        raise TrainConfigError(f"num_workers={workers} with use_gpu needs {workers} GPUs; the cluster has {cluster_gpus:g}")


def _materialize(shard, image_shape) -> dict:
    """A worker's shard as in-memory numpy arrays (decoded once, sampled from every step)."""
    images, labels = [], []
    for batch in shard.iter_batches(batch_size=4096, batch_format="numpy"):
        images.append(batch["image"])
        labels.append(batch["label"])
    if not images:
        return {"image": np.empty((0, *image_shape), np.uint8), "label": np.empty(0, np.int64)}
    return {"image": np.concatenate(images), "label": np.concatenate(labels)}


def _progress_line(metrics, total_steps, width=30) -> str:
    done = int(width * metrics["step"] / total_steps)
    valid = (f"valid bal-acc {metrics['valid_balanced_accuracy']:.4f} " if "valid_balanced_accuracy" in metrics
             else "")
    return (f"[{'#' * done}{'.' * (width - done)}] step {metrics['step']}/{total_steps} {valid}"
            f"test acc {metrics['test_accuracy']:.4f} gm {metrics['test_gm']:.4f} "
            f"loss {metrics.get('loss/total', nan):.4f} "
            f"mask {metrics.get('mask_rate', nan):.3f} {metrics.get('images_per_second', nan):.0f} img/s")


@dataclass
class LoopContext:
    """What the training loop needs from the Ray API that runs it: Ray Train (one of N workers)
    or Ray Tune (a single-worker trial training in its own process)."""

    device: torch.device
    report: Callable  # report(metrics, checkpoint=None)
    checkpoint_class: type  # ray.train.Checkpoint or ray.tune.Checkpoint
    restored: object = None  # the checkpoint to resume from, if any
    rank: int = 0
    world_size: int = 1


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train's per-worker entry point. loop_config: {"train": TrainConfig.to_dict(),
    "classes": int, "image_shape": [H, W, C], "tensorboard_dir": str | None, "torch_threads": int}."""
    import ray.data
    import ray.train
    import ray.train.torch

    torch.set_num_threads(loop_config.get("torch_threads", 1))
    ray.data.DataContext.get_current().enable_progress_bars = False
    train_context = ray.train.get_context()
    context = LoopContext(device=ray.train.torch.get_device(), report=ray.train.report,
                          checkpoint_class=ray.train.Checkpoint, restored=ray.train.get_checkpoint(),
                          rank=train_context.get_world_rank(), world_size=train_context.get_world_size())
    image_shape = tuple(loop_config["image_shape"])
    data = {"labeled": _materialize(ray.train.get_dataset_shard("labeled"), image_shape),
            "unlabeled": _materialize(ray.train.get_dataset_shard("unlabeled"), image_shape)}
    if context.rank == 0:  # only rank 0 evaluates
        for split in ("valid", "test") if loop_config.get("has_valid") else ("test",):
            data[split] = _materialize(ray.train.get_dataset_shard(split), image_shape)
    run_loop(TrainConfig.from_dict(loop_config["train"]), context, data, loop_config["classes"], image_shape,
             tensorboard_dir=loop_config.get("tensorboard_dir"))


def run_loop(config: TrainConfig, context: LoopContext, data: dict, num_classes: int, image_shape,
             tensorboard_dir=None) -> None:
    """Train from `data` ({"labeled", "unlabeled", "valid", "test"}: {"image", "label"} numpy arrays;
    "valid" and "test" only on rank 0, "valid" only with a validation set), evaluating,
    checkpointing and reporting every `eval_every` steps."""
    rank, world_size, device = context.rank, context.world_size, context.device
    state = build_state(config, num_classes, image_shape, device)
    if context.restored is not None:
        with context.restored.as_directory() as directory:
            saved = torch.load(Path(directory) / CHECKPOINT_FILE, map_location=device, weights_only=True)
        state.load_state_dict(saved)
    collective = None
    if world_size > 1:
        import ray.train.torch

        from trainables.distributed import DistributedCollective

        # Each worker augments and samples differently; after a restart, differently again.
        state.generator.manual_seed(config.seed + 1_000_003 * rank + 7_919 * state.step)
        state.model = ray.train.torch.prepare_model(state.model, move_to_device=False)
        collective = DistributedCollective()

    labeled, unlabeled = data["labeled"], data["unlabeled"]
    eval_sets = {split: (data[split]["image"], data[split]["label"]) for split in ("valid", "test") if data.get(split)}
    labeled_images = torch.from_numpy(labeled["image"]).to(device)
    labeled_labels = torch.from_numpy(labeled["label"]).to(device)
    unlabeled_images = torch.from_numpy(unlabeled["image"]).to(device)
    local_batch = config.batch_size // world_size
    labeled_sampler = EpochSampler(len(labeled_labels), local_batch, state.generator)
    unlabeled_sampler = EpochSampler(len(unlabeled_images), local_batch * config.mu, state.generator)
    flip = use_flip(config, image_shape)

    writer = None
    if rank == 0 and tensorboard_dir:
        from tensorboardX import SummaryWriter

        # TensorBoard hides earlier events at steps >= purge_step: those a lost worker group wrote
        # after the checkpoint we resume from, but not the checkpoint's own evaluation.
        writer = SummaryWriter(tensorboard_dir, purge_step=state.step + 1)

    def evaluate_and_report(running: RunningStats) -> None:
        metrics, checkpoint = {}, None
        # report() copies the checkpoint into the run's storage; the local copy goes afterwards.
        with tempfile.TemporaryDirectory(prefix="fixmatch-ckpt-") as directory:
            if rank == 0:
                metrics = evaluation_metrics(state, config, eval_sets, num_classes, device, running)
                torch.save(state.state_dict(), os.path.join(directory, CHECKPOINT_FILE))
                checkpoint = context.checkpoint_class.from_directory(directory)
                if writer is not None:
                    for key, value in metrics.items():
                        writer.add_scalar(key, value, state.step)
                    writer.flush()
                print(_progress_line(metrics, config.steps), file=sys.stdout, flush=True)
            else:
                running.means(state.step)  # every worker stops on a non-finite loss
            context.report(metrics, checkpoint=checkpoint)

    if state.step >= config.steps:
        # Restored from the final checkpoint (e.g. a study resumed after its driver died just as
        # this run finished): report the final state once, so the run still has a result.
        evaluate_and_report(RunningStats())
    running = RunningStats()
    images_per_step = config.batch_size * (1 + 2 * config.mu)  # global
    while state.step < config.steps:
        rows = labeled_sampler.next().to(device)
        stats = train_step(state, config, labeled_images[rows], labeled_labels[rows],
                           unlabeled_images[unlabeled_sampler.next().to(device)],
                           flip=flip, collective=collective)
        running.add(stats, images_per_step)
        if state.step % config.eval_every == 0 or state.step == config.steps:
            evaluate_and_report(running)
            running = RunningStats()
    if writer is not None:
        writer.close()


def _tensorboard_dir(storage_path: str, name: str) -> str | None:
    """Where rank 0 writes TensorBoard events: under the run on a local (or file://) storage; on
    object storage none (Tune's own logger still records every reported metric there)."""
    if "://" in storage_path and not storage_path.startswith("file://"):
        print(f"note: no TensorBoard events are written to {storage_path.split('://')[0]}:// storage", file=sys.stderr)
        return None
    return os.path.join(storage_path.removeprefix("file://"), name, "tensorboard")


def fit(config: TrainConfig, resources: Resources = Resources(), *, storage_path="results", name=None,
        max_failures=0, tensorboard=True, checkpoints_to_keep=2, callbacks=None, check_resources=True):
    """Run one data-parallel training on the connected (or a new local) Ray cluster.

    Returns Ray Train's Result (metrics of the last report, checkpoint, path). `name` must be
    unique per run: Ray resumes a run whose name and storage path already exist. With
    check_resources=False the workers may wait for nodes an autoscaler has yet to add."""
    import ray
    import ray.data
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from data_prep.loading import ray_datasets, resolve

    info, split = resolve(config.dataset, config.split, config.data_root)
    if not ray.is_initialized():
        ray.init()
    ray.data.DataContext.get_current().enable_progress_bars = False
    cluster = ray.cluster_resources()
    if check_resources:
        validate(config, resources, cluster.get("CPU", 0), cluster.get("GPU", 0))
    else:
        validate(config, resources, None, None)
    if name is None:
        from datetime import datetime

        name = f"{config.dataset}-{datetime.now():%Y%m%d-%H%M%S}"
    storage_path = str(storage_path)
    if "://" not in storage_path:  # a URI (s3://, gs://, file://) goes to Ray as it is
        storage_path = os.path.abspath(storage_path)
    config = TrainConfig.from_dict({**config.to_dict(), "data_root": str(info.path.parent.resolve()),
                                    "device": "cuda" if resources.use_gpu else "cpu"})
    loop_config = {
        "train": config.to_dict(), "classes": info.num_classes, "image_shape": list(info.image_shape),
        "has_valid": split.has_validation,
        "tensorboard_dir": _tensorboard_dir(storage_path, name) if tensorboard else None,
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=resources.scaling_config(cluster.get("CPU", 1)),
        datasets=ray_datasets(config.dataset, split.name, config.data_root, verify=False),
        dataset_config=DataConfig(datasets_to_split=["labeled", "unlabeled"]),
        run_config=RunConfig(
            name=name, storage_path=storage_path,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=checkpoints_to_keep),
            callbacks=callbacks,
        ),
    )
    return trainer.fit()
