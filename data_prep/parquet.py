"""The on-disk dataset: Parquet parts of PNG images plus `dataset.json` (DESIGN.md 3.1).

    <data_root>/<dataset>/
      train/part-00000.parquet ...   index:int64, image:struct{bytes:binary, path:string}, label:int64
      test/part-00000.parquet ...
      unlabeled/...                  (STL-10 only; label -1)
      dataset.json
      splits/<name>.json

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

FORMAT_VERSION = 1
ROWS_PER_FILE = 10_000
ROWS_PER_GROUP = 1_000  # several row groups per file, so Ray Data can split files across workers
SPLIT_NAMES = ("train", "test", "unlabeled")

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
SCHEMA = pa.schema(
    [("index", pa.int64()), ("image", IMAGE_TYPE), ("label", pa.int64())],
    metadata={"huggingface": json.dumps({"info": {"features": {
        "index": {"dtype": "int64", "_type": "Value"},
        "image": {"_type": "Image"},
        "label": {"dtype": "int64", "_type": "Value"},
    }}})},
)


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

    def split_counts(self, split) -> dict:
        return self.meta["splits"][split]

    def files(self, split) -> list[Path]:
        return [self.path / f for f in self.meta["splits"].get(split, {}).get("files", [])]

    def pool_splits(self) -> list[str]:
        """Splits whose rows can be unlabeled training data (train, and STL-10's unlabeled)."""
        return [s for s in ("train", "unlabeled") if s in self.meta["splits"]]


def open_dataset(name, data_root=None) -> DatasetInfo:
    root = Path(data_root) if data_root is not None else default_data_root()
    path = root / name
    meta_path = path / "dataset.json"
    if not meta_path.is_file():
        raise DataPrepError(
            f"dataset '{name}' not found under {root} (convert it first: python -m data_prep convert {name})"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataPrepError(f"{meta_path}: unreadable ({exc})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataPrepError(f"{meta_path}: format version {meta.get('format_version')}, expected {FORMAT_VERSION}")
    return DatasetInfo(path, meta)


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
    files = [f for split in info.meta["splits"].values() for f in split["files"]]
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


def read_split(info: DatasetInfo, split: str) -> pa.Table:
    """All rows of a split as one Arrow table (index, image, label)."""
    tables = []
    for path in info.files(split):
        try:
            tables.append(pq.read_table(path, schema=SCHEMA))
        except (pa.ArrowException, OSError) as exc:
            raise DataPrepError(f"{path}: corrupt or truncated Parquet file ({exc})") from None
    return pa.concat_tables(tables) if tables else SCHEMA.empty_table()


# --- writing ----------------------------------------------------------------------------------


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _writable_root(data_root: Path) -> Path:
    try:
        data_root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataPrepError(f"data root {data_root} is not writable ({exc.strerror})") from None
    if not os.access(data_root, os.W_OK | os.X_OK):
        raise DataPrepError(f"data root {data_root} is not writable")
    return data_root


def _write_split(out_dir: Path, split: str, source, first_index: int, progress) -> dict:
    """Encode a split's chunks to PNG and write its Parquet parts; returns its dataset.json entry."""
    (out_dir / split).mkdir()
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
                    files.append(f"{split}/part-{len(files):05d}.parquet")
                    writer = pq.ParquetWriter(out_dir / files[-1], SCHEMA)
                    rows_in_file = 0
                n = len(batch_labels)
                table = pa.table({
                    "index": pa.array(np.arange(index, index + n), pa.int64()),
                    "image": pa.StructArray.from_arrays(
                        [pa.array(pngs, pa.binary()), pa.nulls(n, pa.string())], fields=list(IMAGE_TYPE)),
                    "label": pa.array(batch_labels, pa.int64()),
                }, schema=SCHEMA)
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
        raise DataPrepError(f"{split}: source yielded {count} images, expected {source.count}")
    return {"count": count, "first_index": first_index, "files": files,
            "class_counts": {str(k): v for k, v in sorted(class_counts.items())}}


def write_dataset(raw, data_root=None, *, overwrite=False) -> DatasetInfo:
    """Write a RawDataset as Parquet + dataset.json, atomically: a partial write is never visible.

    Row `index` values are unique across the training pool: train rows come first, then
    STL-10's unlabeled rows. Test rows are numbered from 0.
    """
    from tqdm import tqdm

    root = _writable_root(Path(data_root) if data_root is not None else default_data_root())
    final = root / raw.name
    if final.exists() and not overwrite:
        raise DataPrepError(f"{final} already exists (pass --overwrite to replace it)")
    tmp = Path(tempfile.mkdtemp(prefix=f".{raw.name}.partial-", dir=root))
    tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes it private; the dataset should not be
    try:
        total = sum(s.count for s in raw.splits.values())
        splits, next_pool_index = {}, 0
        with tqdm(total=total, desc=f"converting {raw.name}", unit="img") as progress:
            for split in SPLIT_NAMES:
                if split not in raw.splits:
                    continue
                first = 0 if split == "test" else next_pool_index
                splits[split] = _write_split(tmp, split, raw.splits[split], first, progress)
                if split != "test":
                    next_pool_index += splits[split]["count"]
        files = [f for s in splits.values() for f in s["files"]]
        meta = {
            "format_version": FORMAT_VERSION,
            "name": raw.name,
            "classes": list(raw.classes),
            "num_classes": len(raw.classes),
            "image_shape": list(raw.image_shape),
            "splits": splits,
            "source_sha256": raw.source_sha256,
            "checksum": parquet_checksum(tmp, files),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        (tmp / "splits").mkdir()
        (tmp / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{raw.name}.old-", dir=root))
            os.rename(final, old / raw.name)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return DatasetInfo(final, meta)
