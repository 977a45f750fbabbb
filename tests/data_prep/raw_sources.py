"""Tiny raw sources written in the exact formats their publishers ship, and an independent
reader of converted datasets (pyarrow + PIL only) to check conversions against.

Every builder returns a `Source`: the file or folder to convert, the class names, and per split
the uint8 NHWC images and int64 labels it holds, in the order the format stores them.
"""

import hashlib
import io
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
STL10_NAMES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


@dataclass
class Source:
    path: Path
    classes: list
    partitions: dict  # partition -> (images uint8 (N, H, W, C), labels int64 (N,))

    def images(self, partition):
        return self.partitions[partition][0]

    def labels(self, partition):
        return self.partitions[partition][1]


def sha256_of(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_tar_gz(path, members: dict) -> Path:
    """A .tar.gz holding `members` ({name: bytes}) as regular files, in that order."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return Path(path)


def cifar_pickle(obj) -> bytes:
    """As the CIFAR release was written: pickle protocol 2, bytes keys, and numpy's module named
    numpy.core (numpy 1.x) rather than numpy 2's numpy._core. Protocol 2 spells globals as text
    lines ('c<module>\\n<name>\\n'), so renaming the module is a plain byte substitution."""
    return pickle.dumps(obj, protocol=2).replace(b"cnumpy._core.", b"cnumpy.core.")


def _random_images(rng, n, side, channels=3):
    return rng.integers(0, 256, (n, side, side, channels), dtype=np.uint8)


def cifar_rows(images) -> np.ndarray:
    """CIFAR's row layout: 1024 red values, then green, then blue, each plane row-major."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(len(images), 3072)


def _labels_of(rng, counts) -> np.ndarray:
    """Class c repeated counts[c] times, shuffled: a split with exactly these class counts."""
    return rng.permutation(np.repeat(np.arange(len(counts)), counts)).astype(np.int64)


def make_cifar10(directory, *, seed=10, per_batch=4, test=6, train_counts=None, test_counts=None) -> Source:
    """Five training batches of `per_batch` random labels each, or, with `train_counts` (rows per
    class), those rows shuffled across the five batches; `test_counts` likewise fixes the test
    batch's class counts instead of `test` random labels."""
    rng = np.random.default_rng(seed)
    folder = "cifar-10-batches-py"
    members, train_images, train_labels = {}, [], []
    batch_labels = None if train_counts is None else np.array_split(_labels_of(rng, train_counts), 5)
    members[f"{folder}/batches.meta"] = cifar_pickle(
        {b"num_cases_per_batch": per_batch if batch_labels is None else len(batch_labels[0]),
         b"label_names": [n.encode() for n in CIFAR10_NAMES], b"num_vis": 3072})
    for b in range(1, 6):
        if batch_labels is None:
            images, labels = _random_images(rng, per_batch, 32), rng.integers(0, 10, per_batch)
        else:
            labels = batch_labels[b - 1]
            images = _random_images(rng, len(labels), 32)
        members[f"{folder}/data_batch_{b}"] = cifar_pickle({
            b"batch_label": f"training batch {b} of 5".encode(), b"labels": labels.tolist(),
            b"data": cifar_rows(images), b"filenames": [f"img_{b}_{i}.png".encode() for i in range(len(labels))],
        })
        train_images.append(images)
        train_labels.append(labels)
    if test_counts is None:
        test_images, test_labels = _random_images(rng, test, 32), rng.integers(0, 10, test)
    else:
        test_labels = _labels_of(rng, test_counts)
        test_images = _random_images(rng, len(test_labels), 32)
        test = len(test_labels)
    members[f"{folder}/test_batch"] = cifar_pickle({
        b"batch_label": b"testing batch 1 of 1", b"labels": test_labels.tolist(),
        b"data": cifar_rows(test_images), b"filenames": [f"test_{i}.png".encode() for i in range(test)],
    })
    members[f"{folder}/readme.html"] = b"<html></html>"
    path = write_tar_gz(Path(directory) / "cifar-10-python.tar.gz", members)
    return Source(path, CIFAR10_NAMES, {
        "train": (np.concatenate(train_images), np.concatenate(train_labels).astype(np.int64)),
        "test": (test_images, test_labels.astype(np.int64)),
    })


def make_cifar100(directory, *, seed=100, train=150, test=100, train_counts=None, test_counts=None) -> Source:
    """`train` / `test` rows labelled 0, 1, ..., 99, 0, 1, ...; or, with `train_counts` /
    `test_counts` (rows per class), exactly those class counts, shuffled."""
    rng = np.random.default_rng(seed)
    counts = {"train": train_counts, "test": test_counts}
    folder = "cifar-100-python"
    names = [f"fine{c:02d}" for c in range(100)]
    partitions, members = {}, {}
    members[f"{folder}/meta"] = cifar_pickle({
        b"fine_label_names": [n.encode() for n in names],
        b"coarse_label_names": [f"coarse{c:02d}".encode() for c in range(20)],
    })
    for split, n in (("train", train), ("test", test)):
        labels = np.arange(n) % 100 if counts[split] is None else _labels_of(rng, counts[split])
        n = len(labels)
        images = _random_images(rng, n, 32)
        members[f"{folder}/{split}"] = cifar_pickle({
            b"filenames": [f"{split}_{i}.png".encode() for i in range(n)], b"batch_label": split.encode(),
            b"fine_labels": labels.tolist(), b"coarse_labels": (labels // 5).tolist(), b"data": cifar_rows(images),
        })
        partitions[split] = (images, labels.astype(np.int64))
    path = write_tar_gz(Path(directory) / "cifar-100-python.tar.gz", members)
    return Source(path, names, partitions)


def stl10_bytes(images) -> bytes:
    """STL-10's layout (its README): per image the red, green, then blue channel, each channel
    stored column-major (Fortran order)."""
    return b"".join(image[:, :, ch].flatten(order="F").tobytes() for image in images for ch in range(3))


def make_stl10(directory, *, seed=96, train_per_class=2, test=10, unlabeled=5, train_counts=None,
               test_counts=None) -> Source:
    """`train_counts` / `test_counts` (rows per class) replace `train_per_class` / `test` random labels."""
    rng = np.random.default_rng(seed)
    folder = "stl10_binary"
    train_labels = rng.permutation(np.repeat(np.arange(10), train_per_class if train_counts is None else train_counts))
    test_labels = rng.integers(0, 10, test) if test_counts is None else _labels_of(rng, test_counts)
    partitions = {
        "train": (_random_images(rng, len(train_labels), 96), train_labels.astype(np.int64)),
        "test": (_random_images(rng, len(test_labels), 96), test_labels.astype(np.int64)),
        "unlabeled": (_random_images(rng, unlabeled, 96), np.full(unlabeled, -1, np.int64)),
    }
    members = {
        f"{folder}/class_names.txt": "\n".join(STL10_NAMES).encode() + b"\n",
        f"{folder}/fold_indices.txt": b"0 1 2\n",
        f"{folder}/train_X.bin": stl10_bytes(partitions["train"][0]),
        f"{folder}/train_y.bin": (train_labels + 1).astype(np.uint8).tobytes(),  # 1-based
        f"{folder}/test_X.bin": stl10_bytes(partitions["test"][0]),
        f"{folder}/test_y.bin": (test_labels + 1).astype(np.uint8).tobytes(),
        f"{folder}/unlabeled_X.bin": stl10_bytes(partitions["unlabeled"][0]),
    }
    path = write_tar_gz(Path(directory) / "stl10_binary.tar.gz", members)
    return Source(path, STL10_NAMES, partitions)


def make_image_tree(root, *, seed=7, classes=("cat", "dog", "fox"), per_class=5, side=16) -> Source:
    """root/<class>/<image>.png; `partitions["all"]` lists every image in sorted path order."""
    rng = np.random.default_rng(seed)
    images, labels = _random_images(rng, len(classes) * per_class, side), []
    for c, name in enumerate(classes):
        (Path(root) / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(images[c * per_class + i]).save(Path(root) / name / f"img{i:02d}.png")
            labels.append(c)
    return Source(Path(root), list(classes), {"all": (images, np.asarray(labels, np.int64))})


def make_miniimagenet_pickle(path, *, seed=84, wnids=("n01532829", "n01558993", "n01704323"), per_class=6,
                             side=84, protocol=pickle.HIGHEST_PROTOCOL) -> Source:
    """{'image_data': uint8 (N, side, side, 3), 'class_dict': {wnid: [rows]}}; rows of the classes
    interleave so the class_dict mapping matters. `partitions["all"]` is grouped by sorted wnid.
    `per_class` is one count for every class, or a list of counts (one per wnid, in order)."""
    rng = np.random.default_rng(seed)
    if isinstance(per_class, int):
        n = len(wnids) * per_class
        data = _random_images(rng, n, side)
        class_dict = {w: list(range(k, n, len(wnids))) for k, w in enumerate(wnids)}
    else:
        row_labels = _labels_of(rng, per_class)
        data = _random_images(rng, len(row_labels), side)
        class_dict = {w: np.flatnonzero(row_labels == k).tolist() for k, w in enumerate(wnids)}
    Path(path).write_bytes(pickle.dumps({"image_data": data, "class_dict": class_dict}, protocol=protocol))
    order = sorted(wnids)
    rows = [r for w in order for r in class_dict[w]]
    labels = np.repeat(np.arange(len(order)), [len(class_dict[w]) for w in order])
    return Source(Path(path), order, {"all": (data[rows], labels)})


# --- reading converted datasets without data_prep -------------------------------------------


def read_converted(dataset_dir, split):
    """(index, images uint8 NHWC, labels) of a converted split, via pyarrow and PIL only."""
    files = sorted((Path(dataset_dir) / split).glob("part-*.parquet"))
    table = pa.concat_tables([pq.read_table(f) for f in files])
    images = []
    for blob in table["image"].combine_chunks().field("bytes").to_pylist():
        with Image.open(io.BytesIO(blob)) as image:
            assert image.format == "PNG"
            array = np.asarray(image)
        images.append(array[..., None] if array.ndim == 2 else array)
    return table["index"].to_numpy(), np.stack(images), table["label"].to_numpy()


def row_multiset(images, labels) -> list:
    """(label, image bytes) pairs, sorted: compares datasets whose row order is a shuffle."""
    return sorted((int(label), image.tobytes()) for image, label in zip(images, labels))


def entries(root) -> list:
    """Names directly under `root`, hidden temporary folders included; [] if it is absent."""
    root = Path(root)
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


# --- a synthetic converted dataset ----------------------------------------------------------

# Training rows per class: unequal, so mcar and gamma_u splits have a distribution to follow.
SYNTH_TRAIN_COUNTS = [100 - 4 * c for c in range(10)]  # 100, 96, ..., 64


@dataclass
class Synth:
    info: object  # data_prep.parquet.DatasetInfo
    train_images: np.ndarray  # row i has index i
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray

    @property
    def root(self) -> Path:
        return self.info.path.parent


def write_synth(data_root, *, name="synth", seed=0, overwrite=False, train_counts=SYNTH_TRAIN_COUNTS) -> Synth:
    """4x4 grey images, `train_counts[c]` training rows of class c (default SYNTH_TRAIN_COUNTS:
    10 classes) in a shuffled order, 2 test rows per class, converted under `data_root` as
    dataset `name`."""
    from data_prep.parquet import write_dataset
    from data_prep.readers import PartitionSource, RawDataset

    rng = np.random.default_rng(seed)
    num_classes = len(train_counts)
    train_labels = rng.permutation(np.repeat(np.arange(num_classes), train_counts)).astype(np.int64)
    test_labels = np.repeat(np.arange(num_classes), 2).astype(np.int64)
    train_images = rng.integers(0, 256, (len(train_labels), 4, 4, 1), dtype=np.uint8)
    test_images = rng.integers(0, 256, (len(test_labels), 4, 4, 1), dtype=np.uint8)
    raw = RawDataset(name, [f"class{c}" for c in range(num_classes)], (4, 4, 1), {
        "train": PartitionSource(len(train_labels), lambda: iter([(train_images, train_labels)])),
        "test": PartitionSource(len(test_labels), lambda: iter([(test_images, test_labels)])),
    }, source_sha256="0" * 64)
    info = write_dataset(raw, data_root, overwrite=overwrite)
    return Synth(info, train_images, train_labels, test_images, test_labels)
