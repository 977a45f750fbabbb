"""python -m trainables.run: one data-parallel training on Ray, without a sweep.

    python -m trainables.run --dataset digits --split digits_LT_10.1@50-100 --cap --cai --cadr --num-workers 2
    python -m trainables.run --method flexmatch --dataset digits --split digits_LT_10.1@50-100 --steps 500

Every flag is a declared option (trainables/options.py) of the training config, a method or the
resources: its type, choices and help come from that one declaration.
"""

import argparse
import sys

from data_prep import DataPrepError
from data_prep.cli import ArgumentParser
from trainables.config import TrainConfig
from trainables.errors import TrainConfigError, TrainingFailed
from trainables.methods import METHODS
from trainables.metrics import EVAL_SPLITS, MEASURES, metric_name
from trainables.options import Option, add_argument, flag
from trainables.ray_train import fit
from trainables.resources import Resources

SUMMARY_KEYS = ("step", *(metric_name(split, measure, window) for split in EVAL_SPLITS
                          for measure in MEASURES for window in ("", "median_10")),
                "loss/total", "mask_rate", "images_per_second")
RUN_OPTIONS = {
    "storage": Option("results", "where runs, checkpoints and TensorBoard logs go"),
    "name": Option(None, "run name, a directory under the storage (default: <dataset>-<time>; an existing name "
                   "resumes, with the same training options)", kind=str, path_name=True),
    "max_failures": Option(2, "worker-group restarts from the last checkpoint", low=0),
    "address": Option(None, "Ray cluster address (default: start a local one)", kind=str),
}


def build_parser():
    parser = ArgumentParser(prog="python -m trainables.run", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, declaration in TrainConfig.options().items():
        if name not in ("device", "flip"):
            add_argument(parser, flag(name), declaration)
    methods = parser.add_argument_group("method (each option belongs to the methods named in its help)")
    methods.add_argument("--method", choices=sorted(METHODS), default=argparse.SUPPRESS, help="default: fixmatch")
    owners: dict[str, list[tuple[Option, list[str]]]] = {}  # name -> [(a declaration, the methods declaring it)]
    for method in METHODS.values():
        for name, declaration in method.all_options().items():
            entries = owners.setdefault(name, [])
            same = [names for known, names in entries if known == declaration]
            if same:
                same[0].append(method.name)
            else:
                entries.append((declaration, [method.name]))
    for name, entries in owners.items():
        # Methods may give one name their own meaning or default: each declaration is described.
        texts = [f"{'every method' if len(names) == len(METHODS) else ', '.join(names)}: {declaration.describe()}"
                 for declaration, names in entries]
        add_argument(methods, flag(name), entries[0][0], help="; ".join(texts))
    ray_group = parser.add_argument_group("Ray")
    for name, declaration in {**Resources.options(), **RUN_OPTIONS}.items():
        add_argument(ray_group, flag(name), declaration, dest=f"run.{name}")
    return parser


def main(argv=None):
    args = vars(build_parser().parse_args(argv))
    run = {key.removeprefix("run."): args.pop(key) for key in list(args) if key.startswith("run.")}
    try:
        config = TrainConfig.from_dict(args)
        resources = Resources.from_dict({k: v for k, v in run.items() if k in Resources.options()})
        settings = {name: declaration.check(name, run.get(name, declaration.default), TrainConfigError)
                    for name, declaration in RUN_OPTIONS.items()}
        result = fit(config, resources, storage_path=settings["storage"], name=settings["name"],
                     max_failures=settings["max_failures"], address=settings["address"])
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
