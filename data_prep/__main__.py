"""python -m data_prep {convert,info,split,list}: raw datasets -> Parquet, and MNAR splits."""

import sys

from data_prep.cli import ArgumentParser
from data_prep.convert import convert
from data_prep.errors import DataPrepError
from data_prep.parquet import converted_datasets, default_data_root, open_dataset
from data_prep.readers import DATASETS
from data_prep.splits import (
    KINDS,
    UNLABELED_SHAPES,
    VALID_KINDS,
    SplitSpec,
    describe_counts,
    describe_shapes,
    imbalance,
    load_split,
    make_split,
    save_split,
)


def _cmd_convert(args):
    options = {k: v for k, v in (("image_size", args.image_size), ("seed", args.seed),
                                 ("test_fraction", args.test_fraction)) if v is not None}
    info, rate = convert(args.dataset, args.source, args.data_root, name=args.name, overwrite=args.overwrite,
                         **options)
    counts = ", ".join(f"{p}: {v['count']}" for p, v in info.partitions.items())
    print(f"wrote {info.path} ({counts}; {rate:.0f} images/s)")


def _cmd_info(args):
    info = open_dataset(args.dataset, args.data_root)
    meta = info.meta
    print(f"{meta['name']}: {meta['num_classes']} classes, images {'x'.join(map(str, meta['image_shape']))}, "
          f"checksum {meta['checksum'][:12]}")
    width = max(len("class"), *(len(c) for c in meta["classes"]))
    partitions = info.partitions
    print(f"{'class':>{width}} " + " ".join(f"{p:>9}" for p in partitions))
    for c, name in enumerate(meta["classes"]):
        print(f"{name:>{width}} " + " ".join(f"{v['class_counts'].get(str(c), 0):>9}" for v in partitions.values()))
    print(f"{'total':>{width}} " + " ".join(f"{v['count']:>9}" for v in partitions.values()))
    for path in sorted((info.path / "splits").glob("*.json")):
        split = load_split(info, path.stem, create=False)
        valid = (f", {len(split.valid_indices)} validation [{describe_counts(split.valid_counts)}]"
                 if split.has_validation else ", no validation")
        print(f"split {split.name}: {len(split.labeled_indices)} labeled "
              f"[{describe_counts(split.labeled_counts)}], {len(split.unlabeled_indices)} unlabeled{valid}")


def _cmd_split(args):
    info = open_dataset(args.dataset, args.data_root)
    spec = SplitSpec(args.kind, args.seed, n_max=args.n_max, size=args.size, gamma_l=args.gamma_l,
                     gamma_u=args.gamma_u, allow_repeat=args.allow_repeat, valid_size=args.valid_size,
                     valid_kind=args.valid_kind, unlabeled=args.unlabeled, n_max_u=args.n_max_u)
    split = make_split(info, spec, name=args.name)
    path = save_split(info, split)
    print(f"wrote {path}")
    print(f"labeled   {len(split.labeled_indices):>7} per class [{describe_counts(split.labeled_counts)}] "
          f"imbalance {imbalance(split.labeled_counts):.1f}")
    shape = split.spec.unlabeled
    print(f"unlabeled {len(split.unlabeled_indices):>7} per class [{describe_counts(split.unlabeled_counts)}]"
          + (f" + {split.unlabeled_without_label} without labels" if split.unlabeled_without_label else "")
          + (f" ({shape}, disjoint from the labeled rows)" if shape else ""))
    if split.has_validation:
        print(f"validation {len(split.valid_indices):>6} per class [{describe_counts(split.valid_counts)}] "
              f"({split.spec.valid_kind}; never used for training)")
    else:
        print("validation      none (a study on this split selects on the test split)")


def _cmd_list(args):
    root = args.data_root or default_data_root()
    for name, reader in sorted(DATASETS.items()):
        try:
            state = f"converted at {open_dataset(name, root).path}"
        except DataPrepError:
            state = "not converted"
        print(f"{name:<13} {state:<40} source: {reader.source_hint}")
    for info in converted_datasets(root):
        if info.path.name not in DATASETS:  # named by the user (convert READER --name NAME)
            print(f"{info.path.name:<13} {'converted at ' + str(info.path):<40} from the {info.meta.get('reader')} "
                  "reader")


def build_parser():
    parser = ArgumentParser(prog="python -m data_prep", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name, func, help):
        p = sub.add_parser(name, help=help)
        p.add_argument("--data-root", help="where datasets live (default: $ML_DATA or ./data)")
        p.set_defaults(func=func)
        return p

    p = command("convert", _cmd_convert, "convert a raw dataset to Parquet")
    p.add_argument("dataset", help=f"the reader, one of: {', '.join(sorted(DATASETS))}")
    p.add_argument("--source", help="the raw file or folder (not needed for digits, mnist5k)")
    p.add_argument("--name", help="the converted dataset's name (default: the reader's), a folder in the data root: "
                   "two image folders can live side by side as two names")
    p.add_argument("--overwrite", action="store_true", help="replace an existing converted dataset")
    p.add_argument("--image-size", type=int, help="side to resize to (imagefolder, miniimagenet trees)")
    p.add_argument("--seed", type=int, help="seed of the train/test split where the source has none")
    p.add_argument("--test-fraction", type=float, help="test share where the source has no test set")

    p = command("info", _cmd_info, "per-class counts of every split")
    p.add_argument("dataset")

    p = command("split", _cmd_split, "cut an MNAR split")
    p.add_argument("dataset")
    p.add_argument("--kind", choices=KINDS, default="lt")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--n-max", type=int, help="lt/rand: labeled rows of the largest class")
    p.add_argument("--size", type=int, help="mcar: total labeled rows")
    p.add_argument("--gamma-l", type=float, help="lt: labeled imbalance ratio (>= 1)")
    p.add_argument("--gamma-u", type=float, help="lt: unlabeled imbalance ratio (< 1 inverts the tail); with "
                   "--unlabeled the shape's ratio, >= 1 (default: gamma-l)")
    p.add_argument("--unlabeled", choices=list(UNLABELED_SHAPES),
                   help=f"lt: the unlabeled pool's class distribution, drawn from the rows left after the labeled "
                        f"and validation ones: {describe_shapes()} (default: the whole training set, or a gamma-u "
                        "subset of it; docs/method.md, \"Unlabeled shapes\")")
    p.add_argument("--n-max-u", type=int, help="with --unlabeled: unlabeled rows of its largest class")
    p.add_argument("--allow-repeat", action="store_true", help="let classes repeat rows when short")
    p.add_argument("--valid-size", type=int, default=0,
                   help="training rows set aside for validation, never trained on (default 0: none; "
                        "fewer than the classes means none)")
    p.add_argument("--valid-kind", choices=VALID_KINDS, default="balanced",
                   help="balanced: valid-size / C rows per class; labeled: in the labeled set's class "
                        "proportions (default: balanced)")
    p.add_argument("--name", help="split name (default: original-style name, e.g. cifar10_LT_50.1@50)")

    command("list", _cmd_list, "the readers and whether their datasets are converted, then the datasets converted "
            "under names of their own")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except DataPrepError as exc:
        # One line, even when the message quotes a library's multi-line error (tarfile's "r:*").
        print("error: " + " ".join(line.strip() for line in str(exc).splitlines()), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
