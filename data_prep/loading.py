"""Loading a dataset and a split for training.

Two paths, same rows:
  load_arrays   in-process: decoded uint8 NHWC numpy arrays, decoded once per process and cached.
  ray_datasets  Ray Data: `read_parquet`, rows selected by the split, PNGs decoded in vectorised
                `map_batches`; ready for `ray.train.get_dataset_shard`.
"""

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pyarrow as pa

from data_prep.parquet import DatasetInfo, decode_pngs, open_dataset, read_partition, verify_dataset
from data_prep.splits import Split, load_split


def resolve(dataset, split, data_root=None, *, verify=True) -> tuple[DatasetInfo, Split]:
    """Open a converted dataset and one of its splits (created if `split` is an alias).

    With `verify`, every Parquet part is checked (readable footer, checksum unchanged)."""
    info = open_dataset(dataset, data_root)
    if verify:
        verify_dataset(info)
    return info, load_split(info, split)


@dataclass
class SSLArrays:
    """A split's data in memory: images uint8 (N, H, W, C), labels int64. The validation arrays are
    empty when the split has no validation set."""

    labeled_images: np.ndarray
    labeled_labels: np.ndarray
    unlabeled_images: np.ndarray
    unlabeled_labels: np.ndarray  # true labels for diagnostics only; -1 where a row has none
    valid_images: np.ndarray
    valid_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list[str]
    unlabeled_also_labeled: np.ndarray | None = None  # bool per unlabeled row: the row is a labeled row too

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.test_images.shape[1:]


@lru_cache(maxsize=4)
def _decoded(path, checksum, partitions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(index, images, labels) of the given partitions, decoded once per process."""
    info = open_dataset(path.name, path.parent)
    table = pa.concat_tables([read_partition(info, p) for p in partitions])
    images = decode_pngs(table["image"].combine_chunks().field("bytes").to_pylist(), info.image_shape)
    return np.array(table["index"]), images, np.array(table["label"])


def _rows(indices, wanted) -> np.ndarray:
    """Positions of `wanted` index values in `indices` (repeats kept)."""
    position = np.full(int(indices.max()) + 1, -1, np.int64)
    position[indices] = np.arange(len(indices))
    return position[wanted]


def load_arrays(dataset, split, data_root=None, *, verify=True) -> SSLArrays:
    """The labeled, unlabeled, validation and test rows of a split as decoded uint8 arrays, each in
    ascending row index (a repeated labeled row appears as often as the split lists it), the
    order a Ray Data shard is put in too, so both paths train on the same arrays."""
    info, split = resolve(dataset, split, data_root, verify=verify)
    pool_index, pool_images, pool_labels = _decoded(info.path, info.checksum, tuple(info.pool_partitions()))
    _, test_images, test_labels = _decoded(info.path, info.checksum, ("test",))
    labeled = _rows(pool_index, np.sort(split.labeled_indices, kind="stable"))
    unlabeled = _rows(pool_index, split.unlabeled_indices)
    valid = _rows(pool_index, split.valid_indices)
    return SSLArrays(
        pool_images[labeled], pool_labels[labeled],
        pool_images[unlabeled], pool_labels[unlabeled],
        pool_images[valid], pool_labels[valid],
        test_images, test_labels, list(info.meta["classes"]),
        np.isin(split.unlabeled_indices, split.labeled_indices),
    )


DATA_TASK_CPUS = 0.25


class _SelectRows:
    """map_batches: keep the rows of a split, each as often as the split lists it. With
    `positions`, rows (listed once each) get a `position` column: their place in `indices`."""

    def __init__(self, indices, size, positions=False):
        self.multiplicity = np.bincount(indices, minlength=size).astype(np.int64)
        self.position = None
        if positions:
            self.position = np.full(size, -1, np.int64)
            self.position[indices] = np.arange(len(indices))

    def __call__(self, batch: pa.Table) -> pa.Table:
        index = batch["index"].to_numpy()
        keep = np.repeat(np.arange(len(index)), self.multiplicity[index])
        rows = batch.take(pa.array(keep, pa.int64()))
        if self.position is not None:
            rows = rows.append_column("position", pa.array(self.position[rows["index"].to_numpy()], pa.int64()))
        return rows


class _DecodeImages:
    """map_batches: PNG bytes -> uint8 (n, H, W, C) tensor column."""

    def __init__(self, image_shape):
        self.image_shape = tuple(image_shape)

    def __call__(self, batch: pa.Table) -> dict:
        blobs = batch["image"].combine_chunks().field("bytes").to_pylist() if len(batch) else []
        columns = {
            "index": batch["index"].to_numpy(),
            "image": decode_pngs(blobs, self.image_shape),
            "label": batch["label"].to_numpy(),
        }
        if "position" in batch.column_names:
            columns["position"] = batch["position"].to_numpy()
        return columns


def ray_datasets(dataset, split, data_root=None, *, verify=True) -> dict:
    """Ray Data datasets {"labeled", "unlabeled", "valid", "test"} with columns index, image (uint8
    H x W x C), label, and for "unlabeled" position (the row's place in the split's unlabeled
    list, what methods with a per-row memory key on); "valid" only when the split has a
    validation set. Reading is lazy; each is ready to pass to a TorchTrainer's `datasets=`."""
    import ray.data

    info, split = resolve(dataset, split, data_root, verify=verify)
    pool_files = [str(f) for p in info.pool_partitions() for f in info.files(p)]
    pool_size = sum(info.partitions[p]["count"] for p in info.pool_partitions())
    decode = _DecodeImages(info.image_shape)

    # Ray Data's tasks ask for a fraction of a CPU: a whole one may never be free on a node whose
    # CPUs the training workers reserve (a cluster of 1-CPU nodes would wait forever).
    task = {"num_cpus": DATA_TASK_CPUS}

    def read(files):
        return ray.data.read_parquet(files, **task)

    def select(indices, positions=False):
        rows = read(pool_files).map_batches(_SelectRows(indices, pool_size, positions), batch_format="pyarrow", **task)
        return rows.map_batches(decode, batch_format="pyarrow", **task)

    test = read([str(f) for f in info.files("test")]).map_batches(decode, batch_format="pyarrow", **task)
    datasets = {"labeled": select(split.labeled_indices), "unlabeled": select(split.unlabeled_indices, positions=True),
                "test": test}
    if split.has_validation:
        datasets["valid"] = select(split.valid_indices)
    return datasets
