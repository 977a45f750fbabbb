"""python -m trainables.run: one data-parallel training on Ray, without a sweep.

    python -m trainables.run --dataset digits --split digits_LT_10.1@50 --cadr --num-workers 2 --steps 500
"""

import argparse
import os
import sys
from dataclasses import fields

from data_prep import DataPrepError
from trainables.config import LossConfig, TrainConfig
from trainables.errors import TrainConfigError
from trainables.ray_train import Resources, fit

SUMMARY_KEYS = ("step", *(f"{split}_{name}{window}" for split in ("valid", "test")
                          for name in ("accuracy", "balanced_accuracy", "gm") for window in ("", "_median_10")),
                "loss/total", "mask_rate", "images_per_second")


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m trainables.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        if f.name in ("loss", "device", "flip"):
            continue
        value = getattr(defaults, f.name)
        kind = type(value) if value is not None else str
        if kind is bool:
            parser.add_argument(f"--{f.name.replace('_', '-')}", action=argparse.BooleanOptionalAction, default=value)
        else:
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=value)
    losses = parser.add_argument_group("loss (the paper's names)")
    for f in fields(LossConfig):
        value = f.default
        if isinstance(value, bool):
            losses.add_argument(f"--{f.name.replace('_', '-')}", action=argparse.BooleanOptionalAction, default=value)
        else:
            losses.add_argument(f"--{f.name.replace('_', '-')}", type=type(value), default=value)
    ray_group = parser.add_argument_group("Ray")
    ray_group.add_argument("--num-workers", type=int, default=1)
    ray_group.add_argument("--use-gpu", action="store_true")
    ray_group.add_argument("--cpus-per-worker", type=float)
    ray_group.add_argument("--storage", default="results", help="where runs, checkpoints and TensorBoard logs go")
    ray_group.add_argument("--name", help="run name (default: <dataset>-<time>; an existing name resumes)")
    ray_group.add_argument("--max-failures", type=int, default=2, help="worker-group restarts from the last checkpoint")
    ray_group.add_argument("--address", help="Ray cluster address (default: start a local one)")
    return parser


def main(argv=None):
    args = vars(build_parser().parse_args(argv))
    resources = Resources(args.pop("num_workers"), args.pop("use_gpu"), args.pop("cpus_per_worker"))
    storage, name, max_failures, address = (args.pop(k) for k in ("storage", "name", "max_failures", "address"))
    try:
        config = TrainConfig.from_dict(args)
        import ray

        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False)
        # A cluster (--address, or RAY_ADDRESS under `ray job submit`) may autoscale: its current
        # size is no limit.
        local_ray = address is None and not os.environ.get("RAY_ADDRESS")
        result = fit(config, resources, storage_path=storage, name=name, max_failures=max_failures,
                     check_resources=local_ray)
    except (TrainConfigError, DataPrepError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if result.error is not None:
        print(f"error: training failed: {result.error}", file=sys.stderr)
        return 1
    metrics = result.metrics or {}
    print("final metrics:")
    for key in SUMMARY_KEYS:
        if key in metrics:
            print(f"  {key:<34} {metrics[key]:.4f}" if isinstance(metrics[key], float) else f"  {key:<34} {metrics[key]}")
    print(f"run directory: {result.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
