"""Converting a raw dataset to Parquet, and preparing one that ships with a package on first use."""

import dataclasses
import time

from data_prep.errors import DataPrepError
from data_prep.names import plain_name
from data_prep.parquet import open_dataset, write_dataset
from data_prep.readers import DATASETS, get_reader


def convert(dataset, source=None, data_root=None, *, name=None, overwrite=False, **options):
    """Read a raw dataset with the reader `dataset` and write it as Parquet under `name` (default:
    the reader's name), so one data root can hold several datasets of one reader (two image
    folders, say). Returns (DatasetInfo, images per second)."""
    reader = get_reader(dataset)
    name = plain_name(dataset if name is None else name, "dataset name")  # refused before any reading
    if name != dataset and name in DATASETS:
        raise DataPrepError(f"dataset name {name!r} is what the {name} reader writes; choose another --name")
    start = time.perf_counter()
    raw = reader.read(source=source, **options) if reader.needs_source else reader.read(**options)
    info = write_dataset(dataclasses.replace(raw, name=name, reader=reader.name), data_root, overwrite=overwrite)
    images = sum(p["count"] for p in info.partitions.values())
    return info, images / (time.perf_counter() - start)


def prepare(dataset, data_root=None):
    """Convert a dataset that needs no source if it is not there yet; returns its DatasetInfo."""
    try:
        return open_dataset(dataset, data_root)
    except DataPrepError:
        if dataset not in DATASETS or DATASETS[dataset].needs_source:  # a name of the user's own, or a source to read
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
