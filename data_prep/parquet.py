"""The on-disk dataset: Parquet parts of PNG images plus `dataset.json`.

    <data_root>/<dataset>/
      train/part-00000.parquet ...   index:int64, image:struct{bytes:binary, path:string}, label:int64
      test/part-00000.parquet ...
      unlabeled/...                  (STL-10 only; label -1)
      dataset.json
      splits/<name>.json             MNAR splits (data_prep/splits.py)

Words: a *partition* is one of the dataset's own files sets (train, test, unlabeled), as its
publisher cut them; a *split* is an MNAR split of the training partition into labeled and
unlabeled rows (and a validation set).

The image struct is Hugging Face `datasets`' Image feature, so the files open there too.
A dataset is written under a temporary name and renamed into place when complete.
"""

import hashlib
import io
import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_prep.errors import DataPrepError
from data_prep.files import current_umask
from data_prep.names import entry, is_plain_name
from data_prep.readers import DATASETS

FORMAT_VERSION = 2  # 2 calls the train/test/unlabeled files "partitions"; version 1 files still open
ROWS_PER_FILE = 10_000
ROWS_PER_GROUP = 1_000  # several row groups per file, so Ray Data can split files across workers
PARTITIONS = ("train", "test", "unlabeled")

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
SCHEMA = pa.schema([("index", pa.int64()), ("image", IMAGE_TYPE), ("label", pa.int64())])


def dataset_schema(classes) -> pa.Schema:
    """SCHEMA with Hugging Face `datasets` feature metadata: the image struct is its Image, and
    `label` its ClassLabel with the class names (-1, STL-10's unlabeled rows, is its "no label")."""
    features = {
        "index": {"dtype": "int64", "_type": "Value"},
        "image": {"_type": "Image"},
        "label": {"names": [str(name) for name in classes], "_type": "ClassLabel"},
    }
    return SCHEMA.with_metadata({"huggingface": json.dumps({"info": {"features": features}})})


def default_data_root() -> Path:
    """$ML_DATA (the original project's variable) or ./data."""
    return Path(os.environ.get("ML_DATA") or "data")


# --- PNG ------------------------------------------------------------------------------------


def encode_png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def decode_pngs(blobs, image_shape) -> np.ndarray:
    """Decode PNG byte strings into one uint8 (N, H, W, C) array (threads: PIL releases the GIL)."""
    from PIL import Image

    out = np.empty((len(blobs), *image_shape), np.uint8)

    def decode(i):
        with Image.open(io.BytesIO(blobs[i])) as image:
            out[i] = np.asarray(image).reshape(image_shape)

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(decode, range(len(blobs)), chunksize=256))
    return out


# --- metadata ---------------------------------------------------------------------------------


@dataclass
class DatasetInfo:
    """dataset.json, plus where the dataset lives."""

    path: Path
    meta: dict

    @property
    def name(self) -> str:
        return self.meta["name"]

    @property
    def num_classes(self) -> int:
        return self.meta["num_classes"]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.meta["image_shape"])

    @property
    def checksum(self) -> str:
        return self.meta["checksum"]

    @property
    def partitions(self) -> dict:
        """{partition: {count, first_index, files, class_counts}} for train, test (and unlabeled)."""
        return self.meta["partitions"]

    def files(self, partition) -> list[Path]:
        return [self.path / f for f in self.partitions.get(partition, {}).get("files", [])]

    def pool_partitions(self) -> list[str]:
        """Partitions whose rows can be unlabeled training data (train, and STL-10's unlabeled)."""
        return [p for p in ("train", "unlabeled") if p in self.partitions]


def open_dataset(name, data_root=None) -> DatasetInfo:
    root = Path(data_root) if data_root is not None else default_data_root()
    path = entry(root, name, "dataset name")
    meta_path = path / "dataset.json"
    if not meta_path.is_file():
        # A name of the user's own: any reader can write it (data_prep convert READER --name NAME).
        how = name if name in DATASETS else f"READER --source ... --name {name}; python -m data_prep list names them"
        raise DataPrepError(f"dataset '{name}' not found under {root} (convert it first: python -m data_prep convert "
                            f"{how})")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataPrepError(f"{meta_path}: unreadable ({exc})") from None
    if meta.get("format_version") not in (1, FORMAT_VERSION):
        raise DataPrepError(f"{meta_path}: format version {meta.get('format_version')}, expected {FORMAT_VERSION}")
    if meta["format_version"] == 1:  # the same layout, its partitions under their old key
        meta = {**meta, "format_version": FORMAT_VERSION, "partitions": meta.pop("splits")}
    return DatasetInfo(path, meta)


def converted_datasets(data_root) -> list[DatasetInfo]:
    """Every dataset converted under `data_root` (a folder holding a readable dataset.json), by name."""
    root = Path(data_root)
    found = []
    for path in sorted(root.iterdir() if root.is_dir() else []):
        if (path / "dataset.json").is_file() and is_plain_name(path.name):
            try:
                found.append(open_dataset(path.name, root))
            except DataPrepError:
                continue  # unreadable: `data_prep info NAME` says why
    return found


def parquet_checksum(path: Path, files: list[str]) -> str:
    """sha256 over the Parquet parts (relative names and bytes), in a fixed order."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode())
        try:
            with open(path / name, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        except OSError as exc:
            raise DataPrepError(f"{path / name}: unreadable ({exc})") from None
    return digest.hexdigest()


def verify_dataset(info: DatasetInfo) -> None:
    """Fail if any Parquet part changed since conversion, or is not a readable Parquet file."""
    files = [f for partition in info.partitions.values() for f in partition["files"]]
    for name in files:
        try:
            pq.read_metadata(info.path / name)
        except (pa.ArrowException, OSError) as exc:
            raise DataPrepError(f"{info.path / name}: corrupt or truncated Parquet file ({exc})") from None
    if parquet_checksum(info.path, files) != info.checksum:
        raise DataPrepError(
            f"{info.path}: Parquet files changed since conversion (checksum differs from dataset.json); "
            f"convert {info.name} again"
        )


def read_partition(info: DatasetInfo, partition: str) -> pa.Table:
    """All rows of a partition (train, test, unlabeled) as one Arrow table (index, image, label)."""
    tables = []
    for path in info.files(partition):
        try:
            tables.append(pq.read_table(path, schema=SCHEMA))
        except (pa.ArrowException, OSError) as exc:
            raise DataPrepError(f"{path}: corrupt or truncated Parquet file ({exc})") from None
    return pa.concat_tables(tables) if tables else SCHEMA.empty_table()


# --- writing ----------------------------------------------------------------------------------


def _writable_root(data_root: Path) -> Path:
    try:
        data_root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataPrepError(f"data root {data_root} is not writable ({exc.strerror})") from None
    if not os.access(data_root, os.W_OK | os.X_OK):
        raise DataPrepError(f"data root {data_root} is not writable")
    return data_root


def _write_partition(out_dir: Path, partition: str, source, first_index: int, schema, progress) -> dict:
    """Encode a partition's chunks to PNG and write its Parquet parts; returns its dataset.json entry."""
    (out_dir / partition).mkdir()
    files, class_counts = [], {}
    writer, rows_in_file, index = None, 0, first_index
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        for images, labels in source.chunks():
            for start in range(0, len(labels), ROWS_PER_GROUP):
                batch_images = images[start:start + ROWS_PER_GROUP]
                batch_labels = np.asarray(labels[start:start + ROWS_PER_GROUP], np.int64)
                pngs = list(pool.map(encode_png, batch_images))
                if writer is None or rows_in_file >= ROWS_PER_FILE:
                    if writer is not None:
                        writer.close()
                    files.append(f"{partition}/part-{len(files):05d}.parquet")
                    writer = pq.ParquetWriter(out_dir / files[-1], schema)
                    rows_in_file = 0
                n = len(batch_labels)
                table = pa.table({
                    "index": pa.array(np.arange(index, index + n), pa.int64()),
                    "image": pa.StructArray.from_arrays(
                        [pa.array(pngs, pa.binary()), pa.nulls(n, pa.string())], fields=list(IMAGE_TYPE)),
                    "label": pa.array(batch_labels, pa.int64()),
                }, schema=schema)
                writer.write_table(table, row_group_size=ROWS_PER_GROUP)
                for label, count in zip(*np.unique(batch_labels, return_counts=True)):
                    class_counts[int(label)] = class_counts.get(int(label), 0) + int(count)
                rows_in_file += n
                index += n
                progress.update(n)
    if writer is not None:
        writer.close()
    count = index - first_index
    if count != source.count:
        raise DataPrepError(f"{partition}: source yielded {count} images, expected {source.count}")
    return {"count": count, "first_index": first_index, "files": files,
            "class_counts": {str(k): v for k, v in sorted(class_counts.items())}}


def write_dataset(raw, data_root=None, *, overwrite=False) -> DatasetInfo:
    """Write a RawDataset as Parquet + dataset.json, atomically: a partial write is never visible.

    Row `index` values are unique across the training pool: train rows come first, then
    STL-10's unlabeled rows. Test rows are numbered from 0.
    """
    from tqdm import tqdm

    root = _writable_root(Path(data_root) if data_root is not None else default_data_root())
    final = entry(root, raw.name, "dataset name")
    if final.exists() and not overwrite:
        raise DataPrepError(f"{final} already exists (pass --overwrite to replace it)")
    tmp = Path(tempfile.mkdtemp(prefix=f".{raw.name}.partial-", dir=root))
    tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes it private; the dataset should not be
    try:
        total = sum(source.count for source in raw.partitions.values())
        partitions, next_pool_index = {}, 0
        with tqdm(total=total, desc=f"converting {raw.name}", unit="img") as progress:
            for partition in PARTITIONS:
                if partition not in raw.partitions:
                    continue
                first = 0 if partition == "test" else next_pool_index
                partitions[partition] = _write_partition(tmp, partition, raw.partitions[partition], first,
                                                         dataset_schema(raw.classes), progress)
                if partition != "test":
                    next_pool_index += partitions[partition]["count"]
        files = [f for p in partitions.values() for f in p["files"]]
        meta = {
            "format_version": FORMAT_VERSION,
            "name": raw.name,
            "reader": raw.reader or raw.name,
            "classes": list(raw.classes),
            "num_classes": len(raw.classes),
            "image_shape": list(raw.image_shape),
            "partitions": partitions,
            "source_sha256": raw.source_sha256,
            "checksum": parquet_checksum(tmp, files),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        (tmp / "splits").mkdir()
        (tmp / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
        if overwrite and final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{raw.name}.old-", dir=root))
            os.rename(final, old / raw.name)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            try:
                os.rename(tmp, final)
            except OSError:  # another process finished converting it meanwhile
                raise DataPrepError(f"{final} already exists (pass --overwrite to replace it)") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return DatasetInfo(final, meta)
