"""python -m trainables.run: one data-parallel training on Ray, without a sweep.

    python -m trainables.run --dataset digits --split digits_LT_10.1@50-100 --cap --cai --cadr --num-workers 2
    python -m trainables.run --method flexmatch --dataset digits --split digits_LT_10.1@50-100 --steps 500
"""

import argparse
import sys
from dataclasses import fields

from data_prep import DataPrepError
from data_prep.cli import ArgumentParser
from trainables.config import TrainConfig
from trainables.errors import TrainConfigError, TrainingFailed
from trainables.methods import METHODS
from trainables.ray_train import Resources, fit

SUMMARY_KEYS = ("step", *(f"{split}_{name}{window}" for split in ("valid", "test")
                          for name in ("accuracy", "balanced_accuracy", "gm") for window in ("", "_median_10")),
                "loss/total", "mask_rate", "images_per_second")


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def build_parser():
    parser = ArgumentParser(prog="python -m trainables.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        if f.name in ("method", "device", "flip"):
            continue
        value = getattr(defaults, f.name)
        help = f"{TrainConfig.help(f.name)} (default: {value})"
        if isinstance(value, bool):
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=value, help=help)
        else:
            parser.add_argument(_flag(f.name), type=type(value) if value is not None else str, default=value,
                                help=help)
    methods = parser.add_argument_group("method (each option belongs to the methods named in its help)")
    methods.add_argument("--method", choices=sorted(METHODS), default="fixmatch", help="default: fixmatch")
    owners = {}
    for method in METHODS.values():
        for name, option in method.all_options().items():
            owners.setdefault(name, (option, []))[1].append(method.name)
    for name, (option, names) in owners.items():
        which = "every method" if len(names) == len(METHODS) else ", ".join(names)
        help = f"{option.help} ({which}; default {option.default}; {option.allowed})"
        if option.kind is bool:
            methods.add_argument(_flag(name), action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                 help=help)
        else:
            methods.add_argument(_flag(name), type=option.kind, choices=option.choices, default=argparse.SUPPRESS,
                                 help=help)
    ray_group = parser.add_argument_group("Ray")
    ray_group.add_argument("--num-workers", type=int, default=1, help="data-parallel workers (default: 1)")
    ray_group.add_argument("--use-gpu", action="store_true", help="one GPU per worker (NCCL)")
    ray_group.add_argument("--cpus-per-worker", type=float,
                           help="CPUs each worker reserves (default: at most 1, leaving one CPU for Ray Data)")
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
        result = fit(config, resources, storage_path=storage, name=name, max_failures=max_failures, address=address)
    except (TrainConfigError, DataPrepError, TrainingFailed) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    if result.error is not None:
        print(f"error: training failed: {result.error}", file=sys.stderr)
        return 1
    metrics = result.metrics or {}
    print("final metrics:")
    for key in SUMMARY_KEYS:
        if key in metrics:
            value = metrics[key]
            print(f"  {key:<34} {value:.4f}" if isinstance(value, float) else f"  {key:<34} {value}")
    print(f"run directory: {result.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
