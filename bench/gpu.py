"""The GPU figures in one command: precision and compile, data-parallel scaling, packed trials.

    bash bench/gpu.sh                          # WRN-28-2, B=64, mu=7, 32x32x3, all visible GPUs
    python bench/gpu.py --model cnn_small --image-size 8 --channels 1 --batch-size 8 --mu 2 \\
        --steps 2 --warmup 1                   # a CPU smoke run of every part

Every part times the project's own training step (`trainables.step.train_step`, plain FixMatch)
and leaves `--warmup` steps (and any compilation) out of the timing:

- precision: iterations/s of the step on synthetic uint8 images held on the device (as
  train_step.py times "ours"), fp32 and bf16, each eager and with torch.compile of the model (as
  trainables/loop.py compiles it; `--compile-backend`, inductor by default as there), each as a
  ratio to fp32 eager;
- scaling: the same global batch on 1 vs N Ray Train workers (`trainables.ray_train.fit`, as
  scaling.py runs it) on a synthetic dataset of the same shapes, N = `--gpus` (default: every
  visible GPU);
- packing: `--trials` trainings sharing one GPU at once (Ray actors with 1/trials of a GPU each)
  against the same trainings one at a time, as a throughput ratio.

Each measurement prints a human line and a JSON line. On a CPU, scaling and packing still run
(CPU workers, CPU fractions) so that their code is exercised; those lines say they are a CPU
smoke run, not a GPU figure. Ray starts here (and stops at the end) unless `--address` names a
cluster.
"""

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from trainables.config import TrainConfig
from trainables.step import build_state, train_step

NUM_CLASSES = 10
PARTS = ("precision", "scaling", "packing")
SMOKE_NOTE = "CPU smoke run, not a GPU figure"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepBench:
    """The project's training step on synthetic uint8 batches already on the device."""

    def __init__(self, settings: dict, precision: str = "fp32", compile: bool = False):
        torch.set_num_threads(settings["torch_threads"])
        self.device = torch.device(settings["device"])
        shape = (settings["image_size"], settings["image_size"], settings["channels"])
        self.config = TrainConfig.from_dict({
            "model": settings["model"], "batch_size": settings["batch_size"], "mu": settings["mu"],
            "steps": 100_000, "precision": precision, "compile": compile, "device": settings["device"]})
        self.state = build_state(self.config, NUM_CLASSES, shape, self.device)
        self.forward = (torch.compile(self.state.model, backend=settings["compile_backend"]) if compile
                        else self.state.model)
        self.flip = settings["channels"] == 3
        g = torch.Generator().manual_seed(0)
        n_labeled = settings["batch_size"]
        self.labeled = torch.randint(0, 256, (n_labeled, *shape), generator=g, dtype=torch.uint8).to(self.device)
        self.labels = torch.randint(0, NUM_CLASSES, (n_labeled,), generator=g).to(self.device)
        self.unlabeled = torch.randint(0, 256, (n_labeled * settings["mu"], *shape), generator=g,
                                       dtype=torch.uint8).to(self.device)

    def run(self, steps: int) -> float:
        """Seconds for `steps` steps, the device synchronised before and after."""
        synchronize(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            stats = train_step(self.state, self.config, self.labeled, self.labels, self.unlabeled,
                               flip=self.flip, forward=self.forward)
        float(stats["loss/total"])  # one host read, as a logger would do
        synchronize(self.device)
        return time.perf_counter() - start


def emit(line: str, record: dict) -> None:
    print(line, flush=True)
    print(json.dumps(record), flush=True)


def precision_part(args, settings: dict, common: dict) -> None:
    """fp32 and bf16, eager and compiled, one after another in this process."""
    baseline = None
    for precision in ("fp32", "bf16"):
        for compiled in (False, True):
            bench = StepBench(settings, precision, compiled)
            bench.run(args.warmup)
            rate = args.steps / bench.run(args.steps)
            baseline = baseline or rate
            variant = f"{precision} {'compile' if compiled else 'eager'}"
            emit(f"precision {variant}: {rate:.2f} it/s, {rate / baseline:.2f}x fp32 eager",
                 {**common, "part": "precision", "precision": precision, "compile": compiled,
                  "compile_backend": settings["compile_backend"] if compiled else None,
                  "iterations_per_second": rate, "images_per_second": rate * common["images_per_step"],
                  "ratio_to_fp32_eager": rate / baseline})
            del bench


def write_synthetic_dataset(root: Path, args) -> tuple[str, str]:
    """A dataset of random images in the benchmark's shapes, converted like any other; returns
    (dataset, split): 2B labeled rows, an unlabeled pool of 2B(1 + mu) rows, 100 test rows."""
    from data_prep.parquet import write_dataset
    from data_prep.readers import PartitionSource, RawDataset
    from data_prep.splits import SplitSpec, make_split, save_split

    shape = (args.image_size, args.image_size, args.channels)
    rng = np.random.default_rng(0)

    def partition(rows):
        images = rng.integers(0, 256, (rows, *shape), dtype=np.uint8)
        labels = np.arange(rows, dtype=np.int64) % NUM_CLASSES
        return PartitionSource(rows, lambda: iter([(images, labels)]))

    raw = RawDataset("synthetic", [str(c) for c in range(NUM_CLASSES)], shape,
                     {"train": partition(2 * args.batch_size * (1 + args.mu)), "test": partition(100)},
                     source_sha256="synthetic")
    info = write_dataset(raw, root)
    split = make_split(info, SplitSpec("mcar", 0, size=2 * args.batch_size))
    save_split(info, split)
    return info.name, split.name


def scaling_run(args, config: TrainConfig, workers: int, storage: Path, datasets: dict) -> float:
    """Iterations/s of one Ray Train run over the steps after the warm-up, from the loop's own
    timing of each evaluation interval (an evaluation every `--warmup` steps)."""
    from trainables.ray_train import fit
    from trainables.resources import Resources

    result = fit(config, Resources(num_workers=workers, use_gpu=args.device == "cuda"),
                 storage_path=str(storage), datasets=datasets,
                 name=f"workers-{workers}", tensorboard=False, checkpoints_to_keep=None)
    if result.error is not None:
        sys.exit(f"error: the run on {workers} worker(s) failed: {result.error}")
    reports = result.metrics_dataframe.sort_values("step")
    steps = reports["step"].diff().fillna(reports["step"])
    seconds = steps * (config.batch_size * (1 + 2 * config.mu)) / reports["images_per_second"]
    timed = reports["step"] > args.warmup
    return float(steps[timed].sum() / seconds[timed].sum())


def scaling_part(args, common: dict, tmp: Path) -> None:
    """The same global batch on 1 and N workers through the project's Ray Train path."""
    if args.device == "cuda" and args.gpus < 2:
        emit(f"scaling: skipped, {args.gpus} GPU visible (needs 2 or more)",
             {**common, "part": "scaling", "skipped": f"{args.gpus} GPU visible"})
        return
    dataset, split = write_synthetic_dataset(tmp / "data", args)
    config = TrainConfig.from_dict({
        "dataset": dataset, "split": split, "data_root": str(tmp / "data"), "model": args.model,
        "batch_size": args.batch_size, "mu": args.mu, "steps": args.warmup + args.steps,
        "eval_every": args.warmup, "eval_batch_size": 100})
    note = f" ({SMOKE_NOTE})" if args.device == "cpu" else ""
    unit = "GPU" if args.device == "cuda" else "CPU worker"
    # Read and decoded once for both runs, as a study does for its trials (timed steps read memory).
    from data_prep.loading import ray_datasets

    datasets = {part: data.materialize() for part, data in ray_datasets(dataset, split, str(tmp / "data")).items()}
    baseline = None
    for workers in (1, args.gpus):
        rate = scaling_run(args, config, workers, tmp / "runs", datasets)
        baseline = baseline or rate
        emit(f"scaling {workers} {unit}(s): {rate:.2f} it/s, {rate / baseline:.2f}x 1 {unit}{note}",
             {**common, "part": "scaling", "workers": workers, "iterations_per_second": rate,
              "images_per_second": rate * common["images_per_step"], "speedup": rate / baseline})


def packing_part(args, settings: dict, common: dict) -> None:
    """`--trials` trainings on one device at once vs the same trainings one at a time; each is a
    Ray actor holding 1/trials of a GPU (on a CPU, of a CPU) and its own model and batches."""
    import ray

    share = 1 / args.trials
    resources = {"num_gpus": share} if args.device == "cuda" else {"num_cpus": share}
    if args.device == "cpu":  # each trial on its own core share, as a study's trials run
        settings = {**settings, "torch_threads": 1}
    actor = ray.remote(**resources)(StepBench)
    trials = [actor.remote(settings) for _ in range(args.trials)]
    ray.get([trial.run.remote(args.warmup) for trial in trials])
    gpu_ids = ray.get([trial.__ray_call__.remote(lambda self: ray.get_gpu_ids()) for trial in trials])

    start = time.perf_counter()
    for trial in trials:
        ray.get(trial.run.remote(args.steps))
    one_at_a_time = args.trials * args.steps / (time.perf_counter() - start)
    start = time.perf_counter()
    ray.get([trial.run.remote(args.steps) for trial in trials])
    together = args.trials * args.steps / (time.perf_counter() - start)
    for trial in trials:
        ray.kill(trial)

    # Ray packs fractional GPU requests onto one GPU; the record shows where the trials ran.
    one_device = len({tuple(ids) for ids in gpu_ids}) == 1
    note = f" ({SMOKE_NOTE})" if args.device == "cpu" else ""
    if not one_device:
        note += f" (the trials ran on different GPUs: {gpu_ids})"
    for mode, rate in (("one_at_a_time", one_at_a_time), ("together", together)):
        emit(f"packing {args.trials} trials {mode.replace('_', ' ')}: {rate:.2f} it/s in all, "
             f"{rate / one_at_a_time:.2f}x one at a time{note}",
             {**common, "part": "packing", "mode": mode, "trials": args.trials, "share": share,
              "gpu_ids": gpu_ids, "one_device": one_device, "iterations_per_second": rate,
              "images_per_second": rate * common["images_per_step"], "ratio": rate / one_at_a_time})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="wrn28_2")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64, help="B labeled images per step (global)")
    parser.add_argument("--mu", type=int, default=7)
    parser.add_argument("--steps", type=int, default=100, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps before each measurement")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--gpus", type=int,
                        help="N for the scaling part (default: every visible GPU; on a CPU, 2 workers)")
    parser.add_argument("--trials", type=int, default=4, help="trainings packed on one device")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile's backend for the precision part (default: inductor, as training "
                             "compiles; aot_eager traces the same graphs without generating code)")
    parser.add_argument("--address", help="a Ray cluster to use (default: start a local one)")
    parser.add_argument("--num-cpus", type=int,
                        help="CPUs of the local Ray (default: 2 on a CPU, every core with --device cuda)")
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no CUDA device is visible")
    if args.steps < 1 or args.warmup < 1 or args.trials < 1:
        sys.exit("error: --steps, --warmup and --trials must be >= 1")
    if args.gpus is None:
        args.gpus = torch.cuda.device_count() if args.device == "cuda" else 2
    if "scaling" in args.parts and args.gpus > 1 and args.batch_size % args.gpus:
        sys.exit(f"error: --batch-size {args.batch_size} is not divisible by --gpus {args.gpus}")

    device = torch.device(args.device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    settings = {"device": args.device, "model": args.model, "image_size": args.image_size,
                "channels": args.channels, "batch_size": args.batch_size, "mu": args.mu,
                "torch_threads": torch.get_num_threads(), "compile_backend": args.compile_backend}
    common = {"device": args.device, "device_name": device_name, "torch": torch.__version__,
              "model": args.model, "image_size": args.image_size, "channels": args.channels,
              "batch_size": args.batch_size, "mu": args.mu, "images_per_step": args.batch_size * (1 + 2 * args.mu),
              "steps": args.steps, "warmup_steps_excluded": args.warmup, "cpu_smoke_run": args.device == "cpu"}
    if args.device == "cpu":
        print(f"{SMOKE_NOTE}: these figures exercise the code; run `bash bench/gpu.sh` on a GPU machine", flush=True)

    if "precision" in args.parts:
        precision_part(args, settings, common)
    if "scaling" in args.parts or "packing" in args.parts:
        import ray

        if args.address:
            ray.init(address=args.address, log_to_driver=False)
        else:
            num_cpus = args.num_cpus or (2 if args.device == "cpu" else None)
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
        try:
            with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
                if "scaling" in args.parts:
                    scaling_part(args, common, Path(tmp))
                if "packing" in args.parts:
                    packing_part(args, settings, common)
        finally:
            ray.shutdown()


if __name__ == "__main__":
    main()
