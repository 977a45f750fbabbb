"""MNAR splits: which training rows are labeled, which are unlabeled (docs/method.md, "MNAR splits").

Kinds:
  mcar  N labeled rows following the training set's own class distribution.
  lt    class c gets ceil(n_max * gamma_l ** (-c / (C - 1))) labeled rows (long-tailed labels).
        The unlabeled pool is the whole training set, or with gamma_u a long-tailed subset of it
        (gamma_u < 1 inverts the tail), or with an unlabeled shape (below) a pool of its own.
  rand  per-class labeling rates drawn from the seed, normalised to a maximum of 1;
        class c gets ceil(n_max * rate_c) labeled rows.

Labeled rows are ordered as in the original create_split.py: each next row comes from the class
furthest behind its target share, so any prefix of the list follows the target distribution.

A split may set aside a validation set (docs/method.md, "Validation"): `valid_size` training rows,
disjoint from the labeled rows and removed from the unlabeled pool, drawn either `balanced`
(valid_size / C per class) or `labeled` (in the labeled set's own class proportions). Fewer rows
than classes means no validation set, as the original's `-1` did.

Unlabeled shapes (docs/method.md, "Unlabeled shapes"), the unlabeled class distributions of
realistic long-tailed SSL as LeapLabTHU/SimPro's code defines them: the counts of a long tail
floor(n_max_u * gamma_u ** (-r / (C - 1))), r = 0..C-1, dealt to the classes in the shape's order
(consistent, uniform, reversed, middle, head-tail). The pool is drawn from each class's rows after
its labeled and validation ones, so it is disjoint from both, as in the reference.

Names in the original style are accepted: `cifar10_LT_50.1@50-5000` is cifar10, kind lt,
gamma_l 50, seed 1, n_max 50, 5,000 balanced validation rows; `...@50-500labeled` draws the
validation rows in the labeled proportions; `...@50-1` (or no suffix) has no validation set.
A shaped pool adds its shape, ratio and n_max_u after gamma_l: `cifar10_LT_150_reversed_u150_m4000.1@500`
(`..._uniform_m4000...` for the shape without a ratio).
"""

import codecs
import json
import math
import numbers
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from data_prep.errors import DataPrepError
from data_prep.files import write_atomic
from data_prep.names import plain_name
from data_prep.parquet import DatasetInfo, read_partition

SPLIT_FORMAT_VERSION = 2  # 2 added the validation set; version 1 files load as splits without one
KINDS = ("mcar", "lt", "rand")
VALID_KINDS = ("balanced", "labeled")


# --- unlabeled shapes ----------------------------------------------------------------------------


def _consistent_ranks(num_classes) -> list[int]:
    return list(range(num_classes))


def _reversed_ranks(num_classes) -> list[int]:
    return list(range(num_classes))[::-1]


def _middle_ranks(num_classes) -> list[int]:
    """Rank 0 (the largest count) in class m = ceil(C / 2) - 1; then the ranks alternate outwards,
    odd ones to the right (m + 1 gets 1, m + 2 gets 3, ...), even ones to the left (m - 1 gets 2, ...)."""
    m = (num_classes + 1) // 2 - 1
    return [2 * (m - c) if c <= m else 2 * (c - m) - 1 for c in range(num_classes)]


def _head_tail_ranks(num_classes) -> list[int]:
    """The odd ranks ascending in the first floor(C / 2) classes, the even ones descending in the
    rest: rank 0 in the last class, rank 1 in the first, the smallest counts in the middle."""
    k = num_classes // 2
    return [2 * c + 1 if c < k else 2 * (num_classes - 1 - c) for c in range(num_classes)]


@dataclass(frozen=True)
class UnlabeledShape:
    """An unlabeled class distribution: class c gets the ranks(C)[c]-th largest count of the long
    tail (rank 0 the largest). A shape without a ratio is the tail with gamma_u 1."""

    help: str
    ranks: Callable[[int], list[int]]
    has_ratio: bool = True


# The reference's flag_reverse_LT 0 (consistent; uniform is 0 with ratio 1), 1, 3 and 4.
UNLABELED_SHAPES = {
    "consistent": UnlabeledShape("the labeled tail: class c gets the c-th largest count", _consistent_ranks),
    "uniform": UnlabeledShape("n_max_u rows in every class (no ratio)", _consistent_ranks, has_ratio=False),
    "reversed": UnlabeledShape("the tail inverted: the last class is the largest", _reversed_ranks),
    "middle": UnlabeledShape("largest in the middle class, falling off towards both ends", _middle_ranks),
    "head-tail": UnlabeledShape("largest at both ends, smallest in the middle", _head_tail_ranks),
}


def describe_shapes() -> str:
    """The shapes' counts and every shape with what it means, for help texts."""
    shapes = "; ".join(f"{name}: {shape.help}" for name, shape in UNLABELED_SHAPES.items())
    return f"the tail floor(n_max_u * gamma_u ** (-r / (C - 1))), r = 0..C-1, dealt to the classes as {shapes}"


@dataclass(frozen=True)
class SplitSpec:
    kind: str
    seed: int
    n_max: int | None = None  # lt, rand: labeled rows of the largest class
    size: int | None = None  # mcar: total labeled rows
    gamma_l: float | None = None  # lt: labeled imbalance ratio (>= 1)
    gamma_u: float | None = None  # lt: unlabeled imbalance ratio (< 1 inverts the tail)
    allow_repeat: bool = False  # let a class repeat rows when asked for more than it has
    valid_size: int = 0  # validation rows set aside; fewer than the classes means none
    valid_kind: str = "balanced"  # balanced: valid_size / C per class; labeled: the labeled proportions
    unlabeled: str | None = None  # lt: the unlabeled pool's shape (UNLABELED_SHAPES); None: as gamma_u says
    n_max_u: int | None = None  # with a shape: unlabeled rows of its largest class

    def __post_init__(self):
        for name in ("n_max", "size", "seed", "valid_size", "n_max_u"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
                raise DataPrepError(f"{name} must be an integer, got {value!r}")
        if self.kind not in KINDS:
            raise DataPrepError(f"unknown split kind '{self.kind}' (known: {', '.join(KINDS)})")
        if self.kind == "mcar" and (self.size is None or self.size < 1):
            raise DataPrepError("an mcar split needs size >= 1")
        if self.kind in ("lt", "rand") and (self.n_max is None or self.n_max < 1):
            raise DataPrepError(f"an {self.kind} split needs n_max >= 1")
        if self.kind == "lt" and (self.gamma_l is None or not self.gamma_l >= 1):
            raise DataPrepError(f"gamma_l must be >= 1 (got {self.gamma_l})")
        if self.gamma_u is not None and (self.kind != "lt" or not self.gamma_u > 0):
            raise DataPrepError("gamma_u must be > 0 and is only for lt splits")
        for name in ("gamma_l", "gamma_u"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise DataPrepError(f"{name} must be a finite number, got {value!r}")
        if self.valid_size < 0:
            raise DataPrepError(f"valid_size must be >= 0, got {self.valid_size}")
        if self.valid_kind not in VALID_KINDS:
            raise DataPrepError(f"unknown validation kind '{self.valid_kind}' (known: {', '.join(VALID_KINDS)})")
        self._check_shape()

    def _check_shape(self):
        """A shape's rules; a shape with a ratio and no gamma_u takes gamma_l (the same tail)."""
        if self.unlabeled is None:
            if self.n_max_u is not None:
                raise DataPrepError("n_max_u is only for an unlabeled shape (set unlabeled)")
            return
        if self.unlabeled not in UNLABELED_SHAPES:
            raise DataPrepError(f"unknown unlabeled shape '{self.unlabeled}' (known: {', '.join(UNLABELED_SHAPES)})")
        if self.kind != "lt":
            raise DataPrepError("an unlabeled shape is only for lt splits")
        if self.n_max_u is None or self.n_max_u < 1:
            raise DataPrepError(f"unlabeled {self.unlabeled} needs n_max_u >= 1 (unlabeled rows of its largest class)")
        if not UNLABELED_SHAPES[self.unlabeled].has_ratio:
            if self.gamma_u is not None:
                raise DataPrepError(f"unlabeled {self.unlabeled} has no ratio (n_max_u rows in every class): "
                                    f"leave gamma_u unset (got {self.gamma_u:g})")
            return
        if self.gamma_u is None:
            object.__setattr__(self, "gamma_u", float(self.gamma_l))
        elif not self.gamma_u >= 1:
            raise DataPrepError(f"with unlabeled {self.unlabeled} gamma_u must be >= 1, got {self.gamma_u:g} "
                                "(the shape sets the direction: reversed inverts the tail)")

    def default_name(self, dataset) -> str:
        if self.kind == "mcar":
            name = f"{dataset}.{self.seed}@{self.size}"
        elif self.kind == "rand":
            name = f"{dataset}_rand.{self.seed}@{self.n_max}"
        else:
            shape = f"_{self.unlabeled}" if self.unlabeled is not None else ""
            ratio = f"_u{self.gamma_u:g}" if self.gamma_u is not None else ""
            size = f"_m{self.n_max_u}" if self.n_max_u is not None else ""
            name = f"{dataset}_LT_{self.gamma_l:g}{shape}{ratio}{size}.{self.seed}@{self.n_max}"
        if self.valid_size:
            name += f"-{self.valid_size}" + ("labeled" if self.valid_kind == "labeled" else "")
        return name


_ALIAS = re.compile(
    r"^(?P<dataset>[A-Za-z0-9_-]+?)"  # a reader's name, or one a user chose (e.g. my_cats)
    r"(?:_(?P<rand>rand)|_LT_(?P<gamma_l>\d+(?:\.\d+)?)"
    rf"(?:_(?P<shape>{'|'.join(map(re.escape, UNLABELED_SHAPES))}))?"
    r"(?:_u(?P<gamma_u>\d+(?:\.\d+)?))?(?:_m(?P<n_max_u>\d+))?)?"
    r"\.(?P<seed>\d+)@(?P<size>\d+)(?:-(?P<valid_size>\d+)(?P<valid_labeled>labeled)?)?$"
)


def parse_split_name(name) -> tuple[str, SplitSpec] | None:
    """`cifar10_LT_50.1@50-5000` -> ("cifar10", SplitSpec(lt, seed 1, n_max 50, gamma_l 50,
    valid_size 5000)); None if the name is not in the original style. Dataset names are matched
    case-insensitively."""
    match = _ALIAS.match(name)
    if match is None:
        return None
    dataset, seed, size = match["dataset"].lower(), int(match["seed"]), int(match["size"])
    valid = {"valid_size": int(match["valid_size"] or 0),
             "valid_kind": "labeled" if match["valid_labeled"] else "balanced"}
    if match["rand"]:
        return dataset, SplitSpec("rand", seed, n_max=size, **valid)
    if match["gamma_l"]:
        gamma_u = float(match["gamma_u"]) if match["gamma_u"] else None
        n_max_u = int(match["n_max_u"]) if match["n_max_u"] else None
        return dataset, SplitSpec("lt", seed, n_max=size, gamma_l=float(match["gamma_l"]), gamma_u=gamma_u,
                                  unlabeled=match["shape"], n_max_u=n_max_u, **valid)
    return dataset, SplitSpec("mcar", seed, size=size, **valid)


# --- per-class counts -------------------------------------------------------------------------


def _ceil(x):
    # Round away float noise first: 50 * 50 ** -1 is 1.0000000000000002, and must count as 1.
    return np.ceil(np.round(x, 9)).astype(np.int64)


def _tail(n_max, gamma, num_classes) -> np.ndarray:
    """n_max * gamma ** (-c / (C - 1)) for c = 0..C-1, unrounded."""
    c = np.arange(num_classes)
    exponent = -c / (num_classes - 1) if num_classes > 1 else np.zeros(num_classes)
    return n_max * np.power(float(gamma), exponent)


def long_tail_counts(n_max, gamma, num_classes) -> np.ndarray:
    """ceil(n_max * gamma ** (-c / (C - 1))) for c = 0..C-1."""
    return _ceil(_tail(n_max, gamma, num_classes))


def shape_counts(shape, n_max_u, gamma_u, num_classes) -> np.ndarray:
    """Unlabeled rows per class of an unlabeled shape: the tail floor(n_max_u * gamma_u ** (-r / (C - 1))),
    r = 0..C-1 (gamma_u 1 for a shape without a ratio), class c taking rank ranks(C)[c]. Floor as
    the reference's int(), without its float noise (100 * 1000 ** (-1/3) counts as 10)."""
    declared = UNLABELED_SHAPES[shape]
    tail = np.floor(np.round(_tail(n_max_u, gamma_u if declared.has_ratio else 1, num_classes), 9))
    return tail.astype(np.int64)[declared.ranks(num_classes)]


def random_rate_counts(n_max, num_classes, rng) -> np.ndarray:
    rates = rng.uniform(size=num_classes)
    return _ceil(n_max * rates / rates.max())


def interleaved_order(class_rows, targets, total) -> np.ndarray:
    """Draw `total` rows class by class: each draw takes the next row of the class furthest
    behind its target share (targets / max(targets)), as the original create_split.py did.
    A class is exhausted when its rows in `class_rows` run out."""
    targets = np.asarray(targets, np.float64)
    share = targets / targets.max()
    available = np.array([len(rows) for rows in class_rows])
    taken = np.zeros(len(class_rows), np.int64)
    order = np.empty(total, np.int64)
    for k in range(total):
        behind = np.where(taken < available, share - taken / max(taken.max(), 1), -np.inf)
        c = int(np.argmax(behind))
        order[k] = class_rows[c][taken[c]]
        taken[c] += 1
    return order


# --- split construction ----------------------------------------------------------------------


@dataclass
class Split:
    name: str
    dataset: str
    spec: SplitSpec
    labeled_indices: np.ndarray
    unlabeled_indices: np.ndarray
    labeled_counts: list[int]
    unlabeled_counts: list[int]
    unlabeled_without_label: int  # rows of the pool that have no label at all (STL-10)
    dataset_checksum: str
    valid_indices: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    valid_counts: list[int] = field(default_factory=list)  # [] when the split has no validation set

    @property
    def has_validation(self) -> bool:
        return len(self.valid_indices) > 0

    def to_json(self) -> dict:
        return {
            "format_version": SPLIT_FORMAT_VERSION,
            "name": self.name,
            "dataset": self.dataset,
            **asdict(self.spec),
            "labeled_counts": self.labeled_counts,
            "unlabeled_counts": self.unlabeled_counts,
            "unlabeled_without_label": self.unlabeled_without_label,
            "dataset_checksum": self.dataset_checksum,
            "labeled_indices": self.labeled_indices.tolist(),
            "unlabeled_indices": self.unlabeled_indices.tolist(),
            "valid_counts": self.valid_counts,
            "valid_indices": self.valid_indices.tolist(),
        }

    @classmethod
    def from_json(cls, data) -> "Split":
        if data.get("format_version") not in (1, SPLIT_FORMAT_VERSION):
            raise ValueError(f"format version {data.get('format_version')}, expected {SPLIT_FORMAT_VERSION}")
        # Version 1 files predate validation sets: their specs lack the valid_* fields (defaults).
        spec = SplitSpec(**{k: data[k] for k in SplitSpec.__dataclass_fields__ if k in data})
        return cls(
            data["name"], data["dataset"], spec,
            np.asarray(data["labeled_indices"], np.int64), np.asarray(data["unlabeled_indices"], np.int64),
            data["labeled_counts"], data["unlabeled_counts"], data["unlabeled_without_label"],
            data["dataset_checksum"], np.asarray(data.get("valid_indices", []), np.int64),
            data.get("valid_counts", []),
        )


def _pool_labels(info: DatasetInfo) -> tuple[np.ndarray, np.ndarray]:
    """(index, label) of every training-pool row, without decoding images."""
    tables = [read_partition(info, p).select(["index", "label"]) for p in info.pool_partitions()]
    indices = np.concatenate([t["index"].to_numpy() for t in tables])
    labels = np.concatenate([t["label"].to_numpy() for t in tables])
    return indices, labels


def make_split(info: DatasetInfo, spec: SplitSpec, name=None) -> Split:
    """Cut a split from a converted dataset, reproducibly from spec.seed."""
    num_classes = info.num_classes
    indices, labels = _pool_labels(info)
    rng = np.random.default_rng(spec.seed)
    class_rows = [rng.permutation(indices[labels == c]) for c in range(num_classes)]
    permutations = class_rows  # kept whole: validation rows come after each class's labeled ones
    available = np.array([len(rows) for rows in class_rows])

    if spec.kind == "mcar":
        targets, total = available, spec.size
        if total > available.sum() and not spec.allow_repeat:
            raise DataPrepError(f"mcar size {total} exceeds the {available.sum()} labeled training rows")
    else:
        if spec.kind == "lt":
            targets = long_tail_counts(spec.n_max, spec.gamma_l, num_classes)
        else:
            targets = random_rate_counts(spec.n_max, num_classes, rng)
        total = int(targets.sum())
        short = np.flatnonzero(targets > available)
        if len(short) and not spec.allow_repeat:
            c = int(short[0])
            raise DataPrepError(
                f"class {c} needs {targets[c]} labeled rows but {info.name} has only {available[c]} "
                "(lower n_max, or allow repeats)"
            )
    if spec.allow_repeat:
        # Repeat each class's permutation as often as needed; only when the user asked for it.
        reps = int(np.ceil(max(targets.max(), 1) / max(available[available > 0].min(), 1))) + 1
        class_rows = [np.tile(rows, reps) if len(rows) else rows for rows in class_rows]
    if spec.kind != "mcar":
        class_rows = [rows[:t] for rows, t in zip(class_rows, targets)]
    labeled = interleaved_order(class_rows, targets, total)
    label_of = dict(zip(indices.tolist(), labels.tolist()))
    labeled_counts = np.bincount([label_of[i] for i in labeled], minlength=num_classes)
    valid = _validation_rows(permutations, labeled, labeled_counts, spec, info)

    if spec.unlabeled is not None:
        unlabeled = _shaped_pool(permutations, labels, np.concatenate([labeled, valid]), spec, info)
    elif spec.gamma_u is None:
        unlabeled = np.sort(indices)
    else:
        unlabeled = _long_tail_pool(indices, labels, set(labeled.tolist()), spec, rng, num_classes, info)
    unlabeled = unlabeled[~np.isin(unlabeled, valid)]  # validation rows never reach training
    unlabeled_labels = np.array([label_of[i] for i in unlabeled.tolist()], np.int64)
    unlabeled_counts = np.bincount(unlabeled_labels[unlabeled_labels >= 0], minlength=num_classes)
    valid_counts = np.bincount([label_of[i] for i in valid.tolist()], minlength=num_classes) if len(valid) else []
    return Split(
        name or spec.default_name(info.name), info.name, spec, labeled, unlabeled,
        labeled_counts.tolist(), unlabeled_counts.tolist(), int((unlabeled_labels < 0).sum()),
        info.checksum, valid, [int(c) for c in valid_counts],
    )


def validation_counts(spec: SplitSpec, labeled_counts, num_classes) -> np.ndarray:
    """Validation rows per class; all zero when valid_size < num_classes (no validation set).

    balanced: valid_size // C per class, the remainder one each to the first classes.
    labeled:  valid_size apportioned in the labeled counts' proportions (largest remainder), with
              at least one row per class so every class's recall is defined.
    """
    size = spec.valid_size
    if size < num_classes:
        return np.zeros(num_classes, np.int64)
    if spec.valid_kind == "balanced":
        return size // num_classes + (np.arange(num_classes) < size % num_classes).astype(np.int64)
    weights = np.asarray(labeled_counts, np.float64)
    counts = np.ones(num_classes, np.int64)
    share = (size - num_classes) * weights / weights.sum()
    counts += np.floor(share).astype(np.int64)
    remainder = size - counts.sum()
    # Largest remainders first; ties go to the lower class.
    order = sorted(range(num_classes), key=lambda c: (-(share[c] - np.floor(share[c])), c))
    counts[order[:remainder]] += 1
    return counts


def _validation_rows(permutations, labeled, labeled_counts, spec, info) -> np.ndarray:
    """Each class's validation rows: the first rows of its permutation that are not labeled."""
    counts = validation_counts(spec, labeled_counts, info.num_classes)
    if not counts.any():
        return np.empty(0, np.int64)
    return _first_free_rows(permutations, labeled, counts, info, "validation rows", "the labeled ones", "valid_size")


def _first_free_rows(permutations, taken, counts, info, what, after, lower) -> np.ndarray:
    """counts[c] rows of each class c: the first rows of its permutation not in `taken`, sorted; a
    class with fewer is refused, naming the setting to `lower`."""
    rows = []
    for c, (permutation, wanted) in enumerate(zip(permutations, counts)):
        free = permutation[~np.isin(permutation, taken)]
        if wanted > len(free):
            raise DataPrepError(
                f"class {c} needs {wanted} {what} but {info.name} has only {len(free)} training rows "
                f"left after {after} (lower {lower})")
        rows.append(free[:wanted])
    return np.sort(np.concatenate(rows))


def _shaped_pool(permutations, labels, taken, spec, info) -> np.ndarray:
    """An unlabeled shape's pool (docs/method.md, "Unlabeled shapes"): shape_counts rows of each
    class, the first of its permutation after its labeled and validation rows (`taken`), as the
    reference takes each class's rows after its labeled ones."""
    _needs_class_labels(labels, f"unlabeled {spec.unlabeled}", info)
    counts = shape_counts(spec.unlabeled, spec.n_max_u, spec.gamma_u, info.num_classes)
    return _first_free_rows(permutations, taken, counts, info, f"unlabeled rows ({spec.unlabeled})",
                            "the labeled and validation ones", "n_max_u")


def _needs_class_labels(labels, what, info):
    if (labels < 0).any():
        raise DataPrepError(f"{what} needs class labels for the whole pool; {info.name} has unlabeled-only rows")


def _long_tail_pool(indices, labels, labeled, spec, rng, num_classes, info) -> np.ndarray:
    """A long-tailed subset of the labeled training rows with ratio gamma_u, as large as the data
    allows. Labeled rows are taken first, so the labeled set stays inside the pool."""
    _needs_class_labels(labels, "gamma_u", info)
    c = np.arange(num_classes)
    shape = np.power(float(spec.gamma_u), -c / max(num_classes - 1, 1))
    shape = shape / shape.max()
    available = np.array([(labels == k).sum() for k in c])
    scale = (available / shape).min()
    counts = np.maximum(np.floor(np.round(scale * shape, 9)).astype(np.int64), 1)
    pool = []
    for k in c:
        rows = rng.permutation(indices[labels == k])
        first = np.array([r in labeled for r in rows.tolist()], bool)
        rows = np.concatenate([rows[first], rows[~first]])
        pool.append(rows[:counts[k]])
    return np.sort(np.concatenate(pool))


# --- files --------------------------------------------------------------------------------------


def split_path(info: DatasetInfo, name) -> Path:
    return info.path / "splits" / f"{plain_name(name, 'split name')}.json"


def save_split(info: DatasetInfo, split: Split) -> Path:
    """Write splits/<name>.json atomically (temp file, then rename)."""
    path = split_path(info, split.name)
    path.parent.mkdir(exist_ok=True)
    return write_atomic(path, lambda f: json.dump(split.to_json(), codecs.getwriter("utf-8")(f)))


def load_split(info: DatasetInfo, name, *, create=True) -> Split:
    """Load splits/<name>.json, or create it when `name` is an original-style alias.

    Fails if the split belongs to another dataset or was cut from different Parquet files.
    """
    path = split_path(info, name)
    if not path.is_file():
        parsed = parse_split_name(name)
        if parsed is None or not create:
            known = sorted(p.stem for p in (info.path / "splits").glob("*.json"))
            raise DataPrepError(f"split '{name}' not found for {info.name} (known: {', '.join(known) or 'none'})")
        dataset, spec = parsed
        if dataset != info.name.lower():
            raise DataPrepError(f"split '{name}' is for dataset '{dataset}', not '{info.name}'")
        split = make_split(info, spec, name=name)
        save_split(info, split)
        return split
    try:
        split = Split.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataPrepError(f"{path}: not a valid split file ({exc})") from None
    if split.dataset != info.name:
        raise DataPrepError(f"split '{name}' belongs to dataset '{split.dataset}', not '{info.name}'")
    if split.dataset_checksum != info.checksum:
        raise DataPrepError(
            f"split '{name}' was cut from different {info.name} Parquet files (dataset checksum mismatch); "
            "cut it again"
        )
    return split


def describe_counts(counts) -> str:
    return " ".join(str(int(c)) for c in counts)


def imbalance(counts) -> float:
    counts = [c for c in counts if c > 0]
    return max(counts) / min(counts) if counts else math.nan
