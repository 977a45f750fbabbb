"""Converting a raw dataset to Parquet, and preparing one that ships with a package on first use."""

import time

from data_prep.errors import DataPrepError
from data_prep.parquet import open_dataset, write_dataset
from data_prep.readers import get_reader


def convert(dataset, source=None, data_root=None, *, overwrite=False, **options):
    """Read a raw dataset and write it as Parquet. Returns (DatasetInfo, images per second)."""
    reader = get_reader(dataset)
    start = time.perf_counter()
    raw = reader.read(source=source, **options) if reader.needs_source else reader.read(**options)
    info = write_dataset(raw, data_root, overwrite=overwrite)
    images = sum(p["count"] for p in info.partitions.values())
    return info, images / (time.perf_counter() - start)


def prepare(dataset, data_root=None):
    """Convert a dataset that needs no source if it is not there yet; returns its DatasetInfo."""
    try:
        return open_dataset(dataset, data_root)
    except DataPrepError:
        if get_reader(dataset).needs_source:
            raise
    try:
        info, _ = convert(dataset, data_root=data_root)
    except DataPrepError:
        try:  # two launches at once: the other one converted it first
            return open_dataset(dataset, data_root)
        except DataPrepError:
            pass
        raise
    return info
