"""The one training loop: sampling, the step, evaluation, checkpoints, reports, progress.

Every runner uses `run_loop`: the single-process `train()` below (benchmarks, debugging), each
Ray Train worker (trainables/ray_train.py) and each in-trial Tune run (study/trial.py). A runner
supplies the data (`TrainData`) and a `LoopContext`: where the loop runs (device, rank, world
size), how it reports (a function of the metrics and a checkpoint directory) and what it resumes
from. Everything else (compile, resume, progress output, TensorBoard, every option) is here, so
it behaves the same on every path.

The global batch (B labeled, mu*B unlabeled) is split across the workers: more workers means
less work per worker, not a larger batch. Every `eval_every` steps rank 0 evaluates the EMA model
on the validation and test splits, writes TensorBoard scalars, and reports metrics with a
checkpoint.
"""

import os
import pickle
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from data_prep.files import write_atomic
from trainables.config import TrainConfig
from trainables.errors import CheckpointRefused, TrainConfigError, TrainingDiverged
from trainables.evaluation import evaluation_metrics, progress_line
from trainables.step import (
    TrainState,
    build_state,
    images_per_step,
    resolve_device,
    train_step,
    use_flip,
)

CHECKPOINT_FILE = "state.pt"


@dataclass
class TrainData:
    """What one worker trains on: its share of the labeled and unlabeled rows (uint8 NHWC images),
    the unlabeled rows' positions in the whole unlabeled pool, and on rank 0 the evaluation splits
    {"valid": (images, labels), "test": (images, labels)} (a split with no rows is skipped)."""

    labeled_images: np.ndarray
    labeled_labels: np.ndarray
    unlabeled_images: np.ndarray
    unlabeled_positions: np.ndarray  # in [0, num_unlabeled)
    num_unlabeled: int  # rows of the whole unlabeled pool, across workers
    num_classes: int
    image_shape: tuple
    eval_sets: dict = field(default_factory=dict)
    labeled_counts: list | None = None  # labeled rows per class, across workers (methods that need them)
    labeled_in_pool: np.ndarray | None = None  # (num_unlabeled,) bool: the pool's rows that are labeled too

    @classmethod
    def from_arrays(cls, arrays) -> "TrainData":
        """All of a split's rows, from `data_prep.loading.load_arrays`."""
        eval_sets = {"valid": (arrays.valid_images, arrays.valid_labels),
                     "test": (arrays.test_images, arrays.test_labels)}
        return cls(arrays.labeled_images, arrays.labeled_labels, arrays.unlabeled_images,
                   np.arange(len(arrays.unlabeled_images)), len(arrays.unlabeled_images), arrays.num_classes,
                   tuple(arrays.image_shape), eval_sets,
                   np.bincount(arrays.labeled_labels, minlength=arrays.num_classes).tolist(),
                   arrays.unlabeled_also_labeled)


class LocalCheckpoint:
    """A checkpoint directory on this machine, with the one method the loop uses of Ray's Checkpoint."""

    def __init__(self, path):
        self.path = str(path)

    @contextmanager
    def as_directory(self):
        yield self.path


def _print(line: str) -> None:
    print(line, file=sys.stdout, flush=True)


@dataclass
class LoopContext:
    """Where and how the loop runs. `report(metrics, checkpoint_dir)` is called on every worker at
    every evaluation (rank 0 has the metrics and the checkpoint; others pass {} and None)."""

    device: torch.device
    report: Callable[[dict, str | None], None]
    restored: object = None  # a checkpoint to resume from (has .as_directory()), or None
    rank: int = 0
    world_size: int = 1
    wrap_model: Callable | None = None  # data parallel (world_size > 1): e.g. Ray Train's prepare_model
    tensorboard_dir: str | None = None
    log: Callable[[str], None] = _print  # the progress line of each evaluation (rank 0)


def run_loop(config: TrainConfig, data: TrainData, context: LoopContext) -> TrainState:
    """Train, evaluating, checkpointing and reporting every `eval_every` steps; resumes from
    `context.restored`. Returns the final state."""
    rank, world_size, device = context.rank, context.world_size, context.device
    collective = None
    if world_size > 1:
        from trainables.distributed import DistributedCollective

        collective = DistributedCollective()
    state = build_state(config, data.num_classes, data.image_shape, device, num_unlabeled=data.num_unlabeled,
                        collective=collective, labeled_counts=data.labeled_counts,
                        labeled_in_pool=data.labeled_in_pool)
    local_batch = config.batch_size // world_size
    state.samplers = {"labeled": EpochSampler(len(data.labeled_labels), local_batch, state.generator),
                      "unlabeled": EpochSampler(len(data.unlabeled_images), local_batch * config.mu, state.generator)}
    if context.restored is not None:
        with context.restored.as_directory() as directory:
            state.load_state_dict(load_checkpoint(Path(directory) / CHECKPOINT_FILE, device))
    if world_size > 1:
        # Each worker augments and samples differently; after a restart, differently again (the
        # checkpoint holds the first worker's samplers only).
        state.generator.manual_seed(config.seed + 1_000_003 * rank + 7_919 * state.step)
        for sampler in state.samplers.values():
            sampler.new_epoch()
        wrap = context.wrap_model or (lambda model: torch.nn.parallel.DistributedDataParallel(model))
        state.model = wrap(state.model)
    forward = torch.compile(state.model) if config.compile else state.model

    labeled_images = torch.from_numpy(data.labeled_images).to(device)
    labeled_labels = torch.from_numpy(data.labeled_labels).to(device)
    unlabeled_images = torch.from_numpy(data.unlabeled_images).to(device)
    unlabeled_positions = torch.from_numpy(np.asarray(data.unlabeled_positions, np.int64)).to(device)
    labeled_sampler, unlabeled_sampler = state.samplers["labeled"], state.samplers["unlabeled"]
    flip = use_flip(config, data.image_shape)

    writer = None
    if rank == 0 and context.tensorboard_dir:
        from tensorboardX import SummaryWriter

        # TensorBoard hides earlier events at steps >= purge_step: those a lost worker group wrote
        # after the checkpoint we resume from, but not the checkpoint's own evaluation.
        writer = SummaryWriter(context.tensorboard_dir, purge_step=state.step + 1)

    def evaluate_and_report(running: RunningStats) -> None:
        metrics, checkpoint_dir = {}, None
        # report() copies the checkpoint where it keeps it; the local copy goes afterwards.
        with tempfile.TemporaryDirectory(prefix="fixmatch-ckpt-") as directory:
            if rank == 0:
                metrics = evaluation_metrics(state, config, data.eval_sets, data.num_classes, device,
                                             running.means(state.step))
                torch.save(state.state_dict(), os.path.join(directory, CHECKPOINT_FILE))
                checkpoint_dir = directory
                if writer is not None:
                    for key, value in metrics.items():
                        if not isinstance(value, str):  # the packed validation rows are for reports
                            writer.add_scalar(key, value, state.step)
                    writer.flush()
                context.log(progress_line(metrics, config.steps))
            else:
                running.means(state.step)  # every worker stops on a non-finite loss
            context.report(metrics, checkpoint_dir)

    if state.step >= config.steps:
        # Restored from the final checkpoint (e.g. a study resumed after its driver died just as
        # this run finished): report the final state once, so the run still has a result.
        evaluate_and_report(RunningStats())
    running = RunningStats()
    step_images = images_per_step(config, state.method)  # global
    while state.step < config.steps:
        labeled_rows = labeled_sampler.next().to(device)
        unlabeled_rows = unlabeled_sampler.next().to(device)
        stats = train_step(state, config, labeled_images[labeled_rows], labeled_labels[labeled_rows],
                           unlabeled_images[unlabeled_rows], unlabeled_positions[unlabeled_rows],
                           flip=flip, forward=forward)
        running.add(stats, step_images)
        if state.step % config.eval_every == 0 or state.step == config.steps:
            evaluate_and_report(running)
            running = RunningStats()
    if writer is not None:
        writer.close()
    return state


def load_checkpoint(path: Path, device) -> dict:
    """A checkpoint's state, loaded as tensors and plain data only (never arbitrary objects).
    CheckpointRefused, naming the file, if it holds anything else or cannot be read."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointRefused(f"checkpoint {path} holds something other than tensors and plain data (it could "
                                "run code when loaded); refusing it: delete it, or start the run under another name"
                                ) from None
    except (OSError, EOFError, RuntimeError) as exc:
        raise CheckpointRefused(f"checkpoint {path} cannot be read ({' '.join(str(exc).split())[:200]}); delete it, "
                                "or start the run under another name") from None


# Failures that would recur if the run were retried from its last checkpoint.
RECURRING_FAILURES = (TrainingDiverged, TrainConfigError)
FATAL_ERROR = "fatal_error"  # the key of the one result an in-trial run reports when such a failure stops it


def run_or_report_failure(config: TrainConfig, load_data: Callable[[], TrainData], context: LoopContext,
                          failure_metrics: dict | None = None) -> str | None:
    """`run_loop` for a runner that Ray retries. A failure that would recur on a retry (divergence,
    a refused checkpoint, bad data or configuration) returns its one line instead of raising, so
    Ray does not retry it; with `failure_metrics` it is also reported, as
    {"fatal_error": line, **failure_metrics}. Process and node faults still raise, and are retried
    from the last checkpoint."""
    from data_prep.errors import DataPrepError

    try:
        run_loop(config, load_data(), context)
    except (*RECURRING_FAILURES, DataPrepError) as exc:
        line = one_line(exc)
        if failure_metrics is not None:
            context.report({FATAL_ERROR: line, **failure_metrics}, None)
        return line
    return None


def one_line(exc: BaseException) -> str:
    """A failure as one line (divergence keeps its name: the message alone reads as a symptom)."""
    text = " ".join(str(exc).split())
    return f"training diverged: {text}" if isinstance(exc, TrainingDiverged) else text


# --- sampling and statistics ------------------------------------------------------------------


class EpochSampler:
    """Endless shuffled epochs over n rows, served in batches (rows repeat only across epochs,
    or within a batch when n < batch_size)."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator):
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self.new_epoch()

    def next(self) -> torch.Tensor:
        while len(self._order) < self.batch_size:
            self._order = torch.cat([self._order, torch.randperm(self.n, generator=self.generator)])
        batch, self._order = self._order[:self.batch_size], self._order[self.batch_size:]
        return batch

    def new_epoch(self) -> None:
        """Drop the rest of the current epoch: the next batch starts a new one."""
        self._order = torch.empty(0, dtype=torch.long)

    def state_dict(self) -> dict:
        """The rows left in the current epoch (a checkpoint's part: trainables/step.py)."""
        return {"order": self._order.clone()}

    def load_state_dict(self, state: dict) -> None:
        order = state["order"]
        if order.numel() and int(order.max()) >= self.n:  # saved over other rows: start a new epoch
            self.new_epoch()
            return
        self._order = order.to(dtype=torch.long).clone()


class RunningStats:
    """Step statistics summed on the device between evaluations, plus the wall time they took."""

    def __init__(self):
        self.sums, self.steps, self.images, self.started = {}, 0, 0, time.perf_counter()

    def add(self, stats: dict, images: int) -> None:
        for key, value in stats.items():
            self.sums[key] = self.sums.get(key, 0) + value
        self.steps += 1
        self.images += images

    def means(self, step: int) -> dict:
        """Mean of each statistic (one host sync); raises TrainingDiverged on a non-finite loss.
        Empty when no step ran since the last evaluation."""
        if not self.steps:
            return {}
        sums = {key: float(value) for key, value in self.sums.items()}
        if sums.pop("finite") != self.steps:
            raise TrainingDiverged(f"loss became NaN or infinite before step {step}; lower lr or check the data")
        means = {key: value / self.steps for key, value in sums.items()}
        means["images_per_second"] = self.images / (time.perf_counter() - self.started)
        return means


# --- the single-process runner ------------------------------------------------------------------


def train(config: TrainConfig, *, progress=True, on_eval=None, checkpoint_dir=None) -> dict:
    """Train in this process on the in-memory loader; returns the final metrics, the history and
    the state. With `checkpoint_dir`, the last evaluation's checkpoint is kept there (as
    `state.pt`) and a rerun resumes from it. `on_eval(metrics)` is called after each evaluation."""
    from data_prep.loading import load_arrays

    history = []

    def report(metrics: dict, directory: str | None) -> None:
        history.append(metrics)
        if checkpoint_dir is not None:
            Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
            with open(Path(directory) / CHECKPOINT_FILE, "rb") as saved:
                write_atomic(Path(checkpoint_dir) / CHECKPOINT_FILE, lambda f: shutil.copyfileobj(saved, f))
        if on_eval is not None:
            on_eval(metrics)

    restored = None
    if checkpoint_dir is not None and (Path(checkpoint_dir) / CHECKPOINT_FILE).is_file():
        restored = LocalCheckpoint(checkpoint_dir)
    data = TrainData.from_arrays(load_arrays(config.dataset, config.split, config.data_root))
    context = LoopContext(device=resolve_device(config.device), report=report, restored=restored,
                          log=_print if progress else (lambda line: None))
    state = run_loop(config, data, context)
    return {"metrics": history[-1] if history else {}, "history": history, "state": state}
