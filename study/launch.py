"""python -m study.launch: run a study (Ray Tune + Optuna over data-parallel FixMatch trainings).

With no arguments it runs the default study: digits with long-tailed labels, an Optuna sweep of
the CAI thresholds with CADR, plus the FixMatch baseline and CADR at the paper's defaults.

    python -m study.launch                                  # the default study
    python -m study.launch --config examples/digits_thresholds.yaml --num-samples 8
    python -m study.launch --config examples/paper/cifar10_lt_50.yaml --set train.batch_size=16 --set train.mu=2
    python -m study.launch --list-spaces
    python -m study.launch --name my-study --resume         # continue an interrupted study
    ray job submit --address http://HEAD:8265 --working-dir . -- python -m study.launch --config FILE
"""

import argparse
import os
import shlex
import sys
from pathlib import Path

import yaml

from data_prep import DataPrepError
from data_prep.cli import ArgumentParser
from data_prep.parquet import default_data_root, verify_dataset
from search_spaces import SPACES, VARIANTS, SpaceError
from search_spaces.spaces import describe
from study.checks import checked
from study.claim import DriverClaim
from study.config import StudyConfig, load, with_metric
from study.console import print_plan
from study.directory import locate
from study.errors import StudyError
from study.method_spaces import PREFIX, method_space
from trainables.config import TrainConfig
from trainables.errors import TrainConfigError
from trainables.options import add_argument, flag

USER_ERRORS = (StudyError, DataPrepError, TrainConfigError, SpaceError)

# The study keys with a flag of their own (the flag is the key's last part); --set reaches every key.
FLAGS = ("space", "search.num_samples", "search.max_concurrent", "scheduler.name", "metric", "storage", "name",
         "resources.num_workers", "resources.use_gpu", "address", "data_root", "train.steps")
FLAG_NAMES = {"scheduler.name": "scheduler"}  # where the last part alone would not say what it is


def declaration(key: str):
    """The Option declared for a dotted study key."""
    *sections, leaf = key.split(".")
    if sections == ["train"]:
        return TrainConfig.options()[leaf]
    declared = StudyConfig
    for name in sections:
        declared = declared.sections()[name]
    return declared.options()[leaf]


def build_parser():
    parser = ArgumentParser(prog="python -m study.launch", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="study YAML file (default: the built-in default study)")
    for key in FLAGS:
        add_argument(parser, flag(FLAG_NAMES.get(key, key.rsplit(".", 1)[-1])), declaration(key), dest=key)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="assignments",
                        help="set any key of the study config, dotted (train.batch_size=8, resources.use_gpu=false; "
                        "VALUE is read as YAML); repeatable, applied after the file and the options above")
    parser.add_argument("--resume", action="store_true", help="continue the study --name (default: the latest)")
    parser.add_argument("--dry-run", action="store_true", help="check and print the plan; train nothing")
    parser.add_argument("--list-spaces", action="store_true", help="print the named search spaces and exit")
    return parser


def settings(args) -> list[tuple[str, object]]:
    """(dotted key, value) pairs: the flags given, then each --set in order (VALUE read as YAML)."""
    pairs = [(key, getattr(args, key)) for key in FLAGS if hasattr(args, key)]
    for assignment in args.assignments:
        key, sep, text = assignment.partition("=")
        key = key.strip()
        if not sep or not key or "" in key.split("."):
            raise StudyError(f"--set {assignment!r}: expected KEY=VALUE with a dotted KEY, e.g. train.batch_size=8")
        try:
            pairs.append((key, yaml.safe_load(text)))
        except yaml.YAMLError:
            raise StudyError(f"--set {key}: {text!r} is not a YAML value") from None
    return pairs


def resume_command(argv: list[str], name: str) -> str:
    """The command line that continues this study: the same arguments, its name, and --resume."""
    named = any(arg == "--name" or arg.startswith("--name=") for arg in argv)
    argv = [*argv, *([] if named else ["--name", name]), *([] if "--resume" in argv else ["--resume"])]
    return shlex.join(["python", "-m", "study.launch", *argv])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(arg) for arg in argv]
    args = build_parser().parse_args(argv)
    if args.list_spaces:
        for name in SPACES:
            print(describe(name))
        for variant in VARIANTS:
            print(f"{PREFIX}{variant}: the {variant} method's own space (from the methods registry)")
            for param, dist in method_space(variant).items():
                print(f"    {param:<14} {dist.describe()}")
        return 0
    try:
        return launch(args, argv)
    except USER_ERRORS as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


def launch(args, argv: list[str]) -> int:
    """Check the study, convert its dataset and cut its splits (all before Ray starts), then run it."""
    from data_prep.convert import prepare
    from study.splits import prepare_splits

    config = load(args.config, settings(args))
    # Trials run in other processes and directories: give them an absolute data root.
    config = config.with_data_root(os.path.abspath(config.data_root or default_data_root()))
    config, space = checked(config)
    config, study_dir = locate(config, args.resume)
    converted = not (Path(config.data_root) / config.dataset / "dataset.json").is_file()
    info = prepare(config.dataset, config.data_root)
    verify_dataset(info)  # once per study: trials trust it (a changed or damaged file fails here)
    images = sum(p["count"] for p in info.partitions.values())
    print(f"dataset {info.name}: {'converted now into' if converted else 'found at'} {info.path} ({images} images, "
          "checksum verified)")
    splits = prepare_splits(config, space)
    for name, split in splits.items():
        created = split.pop("created")
        valid = f", {split['valid']} validation ({split['valid_kind']})" if split["valid"] else ", no validation set"
        print(f"split {name}: {'cut now' if created else 'found'} in {info.path / 'splits'} ({split['labeled']} "
              f"labeled, {split['unlabeled']} unlabeled{valid})")
    config, warning = with_metric(config, has_validation=all(s["valid"] > 0 for s in splits.values()))
    if warning:
        print(warning, file=sys.stderr)
    if args.dry_run:
        print_plan(config, space, study_dir)
        print("dry run: nothing was trained")
        return 0

    from study.driver import drive

    with DriverClaim(study_dir):  # one driver per study, from here to the report
        return drive(config, space, study_dir, resume=args.resume, info=info, splits=splits,
                     resume_command=resume_command(argv, config.name))


if __name__ == "__main__":
    sys.exit(main())
