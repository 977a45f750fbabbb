"""python -m study.launch: run a study. Until the study runner exists, this prepares the default
dataset (digits) and its default long-tailed split, and says what it did."""

import argparse
import sys

from data_prep import DataPrepError
from data_prep.__main__ import prepare
from data_prep.splits import load_split

DEFAULT_DATASET = "digits"
DEFAULT_SPLIT = "digits_LT_10.1@50"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m study.launch", description=__doc__)
    parser.add_argument("--data-root", help="where datasets live (default: $ML_DATA or ./data)")
    args = parser.parse_args(argv)
    try:
        info = prepare(DEFAULT_DATASET, args.data_root)
        split = load_split(info, DEFAULT_SPLIT)
    except DataPrepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"dataset {info.name} ready at {info.path}")
    print(f"split {split.name}: {len(split.labeled_indices)} labeled rows per class {split.labeled_counts}, "
          f"{len(split.unlabeled_indices)} unlabeled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
