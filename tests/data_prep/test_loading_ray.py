"""Specification of the Ray Data path (loading.ray_datasets): the labeled, unlabeled, validation
and test datasets hold exactly the split's rows, as many times as the split lists them, with the same
images and labels as load_arrays. One local Ray instance serves the whole module."""

import numpy as np
import pytest
from raw_sources import write_synth

import data_prep.parquet
from data_prep.convert import convert
from data_prep.loading import load_arrays, ray_datasets, resolve
from data_prep.splits import SplitSpec, make_split, save_split

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def assert_same_rows(dataset, indices, images, labels):
    """`dataset` holds exactly the rows `indices` (a multiset), with these images and labels."""
    rows = dataset.take_all()
    got = np.array([row["index"] for row in rows])
    np.testing.assert_array_equal(np.sort(got), np.sort(indices))
    first_position = {int(i): k for k, i in reversed(list(enumerate(indices)))}
    for row in rows:
        k = first_position[int(row["index"])]
        np.testing.assert_array_equal(row["image"], images[k])
        assert row["image"].dtype == np.uint8
        assert row["label"] == labels[k]


def check_split(data_root, dataset, split_name):
    arrays = load_arrays(dataset, split_name, data_root)
    _, split = resolve(dataset, split_name, data_root)
    datasets = ray_datasets(dataset, split_name, data_root)
    assert sorted(datasets) == ["labeled", "test", "unlabeled"] + (["valid"] if split.has_validation else [])
    if split.has_validation:
        assert_same_rows(datasets["valid"], split.valid_indices, arrays.valid_images, arrays.valid_labels)
    assert_same_rows(datasets["labeled"], np.sort(split.labeled_indices), arrays.labeled_images, arrays.labeled_labels)
    assert_same_rows(datasets["unlabeled"], split.unlabeled_indices, arrays.unlabeled_images, arrays.unlabeled_labels)
    # Each unlabeled row knows its place in the split's unlabeled list (a method's per-row memory).
    for row in datasets["unlabeled"].take_all():
        assert split.unlabeled_indices[row["position"]] == row["index"]
    assert_same_rows(datasets["test"], np.arange(len(arrays.test_labels)), arrays.test_images, arrays.test_labels)


def test_ray_datasets_hold_the_stl10_split_rows_across_train_and_unlabeled_files(local_ray, tmp_path, stl10_source):
    info, _ = convert("stl10", stl10_source.path, tmp_path, chunk_size=2)
    # Labeled counts [3, 3, 3, 3, 2, 2, 2, 2, 2, 1] from 2 rows per class: with allow_repeat,
    # classes 0-3 each label one row twice.
    split = make_split(info, SplitSpec("lt", 1, n_max=3, gamma_l=3, allow_repeat=True), "repeats")
    assert (len(split.labeled_indices), len(set(split.labeled_indices.tolist()))) == (23, 19)
    save_split(info, split)
    check_split(tmp_path, "stl10", "repeats")


def test_ray_datasets_hold_a_subset_pool_read_from_many_files_and_row_groups(local_ray, tmp_path, monkeypatch):
    monkeypatch.setattr(data_prep.parquet, "ROWS_PER_GROUP", 100)
    monkeypatch.setattr(data_prep.parquet, "ROWS_PER_FILE", 300)
    synth = write_synth(tmp_path)
    assert len(synth.info.files("train")) == 3
    save_split(synth.info, make_split(synth.info, SplitSpec("lt", 4, n_max=40, gamma_l=10, gamma_u=5), "sub"))
    check_split(tmp_path, "synth", "sub")
    spec = SplitSpec("lt", 4, n_max=40, gamma_l=10, gamma_u=5, valid_size=50, valid_kind="labeled")
    save_split(synth.info, make_split(synth.info, spec, "sub-valid"))
    check_split(tmp_path, "synth", "sub-valid")
