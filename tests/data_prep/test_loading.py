"""Specification of loading (loading.py): a split's rows come back exactly, and a
dataset whose Parquet files are damaged or changed is refused with an error naming the file."""

import json
import shutil

import numpy as np
import pytest
from raw_sources import write_synth

from data_prep import DataPrepError
from data_prep.convert import convert
from data_prep.loading import load_arrays, resolve
from data_prep.splits import SplitSpec, load_split, make_split, save_split


def test_load_arrays_returns_exactly_the_rows_of_an_lt_split(synth):
    split = load_split(synth.info, "synth_LT_10.1@60")
    arrays = load_arrays("synth", "synth_LT_10.1@60", synth.root)
    np.testing.assert_array_equal(arrays.labeled_images, synth.train_images[np.sort(split.labeled_indices)])
    np.testing.assert_array_equal(arrays.labeled_labels, synth.train_labels[np.sort(split.labeled_indices)])
    np.testing.assert_array_equal(arrays.unlabeled_images, synth.train_images)  # the whole pool, in index order
    np.testing.assert_array_equal(arrays.unlabeled_labels, synth.train_labels)
    np.testing.assert_array_equal(arrays.test_images, synth.test_images)
    np.testing.assert_array_equal(arrays.test_labels, synth.test_labels)
    assert arrays.classes == [f"class{c}" for c in range(10)]
    assert (arrays.num_classes, arrays.image_shape) == (10, (4, 4, 1))
    assert arrays.labeled_images.dtype == np.uint8 and arrays.labeled_labels.dtype == np.int64


def test_load_arrays_follows_a_subset_pool_and_repeated_labeled_rows(synth):
    split = make_split(synth.info, SplitSpec("lt", 2, n_max=105, gamma_l=3, gamma_u=4, allow_repeat=True), "sub")
    save_split(synth.info, split)
    assert len(split.labeled_indices) > len(set(split.labeled_indices.tolist()))  # some rows twice
    arrays = load_arrays("synth", "sub", synth.root)
    np.testing.assert_array_equal(arrays.labeled_images, synth.train_images[np.sort(split.labeled_indices)])
    np.testing.assert_array_equal(arrays.labeled_labels, synth.train_labels[np.sort(split.labeled_indices)])
    np.testing.assert_array_equal(arrays.unlabeled_images, synth.train_images[split.unlabeled_indices])
    np.testing.assert_array_equal(arrays.unlabeled_labels, synth.train_labels[split.unlabeled_indices])


def test_load_arrays_flags_the_unlabeled_rows_that_are_labeled_rows_too(synth):
    split = load_split(synth.info, "synth_LT_10.1@60")
    arrays = load_arrays("synth", "synth_LT_10.1@60", synth.root)
    # The pool is the whole training set, in index order: its labeled rows are flagged, no others.
    expected = np.zeros(len(synth.train_images), bool)
    expected[split.labeled_indices] = True
    np.testing.assert_array_equal(arrays.unlabeled_also_labeled, expected)
    assert 0 < expected.sum() < len(expected)


def test_stl10_pool_spans_train_and_unlabeled_rows_which_load_with_label_minus_1(tmp_path, stl10_source):
    info, _ = convert("stl10", stl10_source.path, tmp_path, chunk_size=2)
    save_split(info, make_split(info, SplitSpec("mcar", 3, size=10), "ten"))
    split = load_split(info, "ten")
    pool_images = np.concatenate([stl10_source.images("train"), stl10_source.images("unlabeled")])
    pool_labels = np.concatenate([stl10_source.labels("train"), np.full(5, -1)])
    np.testing.assert_array_equal(split.unlabeled_indices, np.arange(25))
    assert split.unlabeled_without_label == 5
    assert set(split.labeled_indices.tolist()) <= set(range(20))  # only rows with a label are labeled
    arrays = load_arrays("stl10", "ten", tmp_path)
    np.testing.assert_array_equal(arrays.labeled_images, pool_images[np.sort(split.labeled_indices)])
    np.testing.assert_array_equal(arrays.labeled_labels, pool_labels[np.sort(split.labeled_indices)])
    np.testing.assert_array_equal(arrays.unlabeled_images, pool_images)
    np.testing.assert_array_equal(arrays.unlabeled_labels, pool_labels)
    np.testing.assert_array_equal(arrays.test_images, stl10_source.images("test"))


# --- damaged or changed datasets ---------------------------------------------------------------


@pytest.mark.parametrize("verify", [True, False])
def test_truncated_parquet_file_is_an_error_naming_the_file(synth, verify):
    part = synth.info.path / "train" / "part-00000.parquet"
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    with pytest.raises(DataPrepError) as error:
        load_arrays("synth", "synth.1@40", synth.root, verify=verify)
    assert str(error.value).startswith(f"{part}: corrupt or truncated Parquet file (")
    with pytest.raises(DataPrepError, match="corrupt or truncated Parquet file") as error:
        resolve("synth", "synth.1@40", synth.root, verify=verify)
    assert str(part) in str(error.value)


def test_truncated_parquet_file_fails_the_split_command_with_one_line(synth, cli_error):
    part = synth.info.path / "train" / "part-00000.parquet"
    part.write_bytes(part.read_bytes()[:-100])
    line = cli_error("split", "synth", "--data-root", synth.root, "--kind", "mcar", "--size", "40")
    assert line.startswith(f"error: {part}: corrupt or truncated Parquet file (")
    assert not (synth.info.path / "splits" / "synth.1@40.json").exists()


def test_modified_parquet_file_is_refused_by_its_checksum(synth):
    part = synth.info.path / "train" / "part-00000.parquet"
    data = bytearray(part.read_bytes())
    data[200] ^= 0xFF  # inside the data pages: the footer still reads
    part.write_bytes(bytes(data))
    with pytest.raises(DataPrepError) as error:
        resolve("synth", "synth.1@40", synth.root)
    assert str(error.value) == (f"{synth.info.path}: Parquet files changed since conversion "
                                "(checksum differs from dataset.json); convert synth again")


def test_split_cut_from_a_previous_conversion_is_refused_after_reconverting(synth):
    split = load_split(synth.info, "synth_LT_10.1@60")
    saved = (synth.info.path / "splits" / f"{split.name}.json").read_text()
    write_synth(synth.root, seed=1, overwrite=True)  # different data, new checksum
    (synth.info.path / "splits" / f"{split.name}.json").write_text(saved)
    with pytest.raises(DataPrepError) as error:
        load_arrays("synth", "synth_LT_10.1@60", synth.root)
    assert str(error.value) == ("split 'synth_LT_10.1@60' was cut from different synth Parquet files "
                                "(dataset checksum mismatch); cut it again")


def test_split_file_of_another_dataset_is_refused(synth, tmp_path):
    other = write_synth(tmp_path / "other", name="other")
    load_split(other.info, "other.1@40")
    shutil.copy(other.info.path / "splits" / "other.1@40.json", synth.info.path / "splits" / "copied.json")
    with pytest.raises(DataPrepError, match=r"^split 'copied' belongs to dataset 'other', not 'synth'$"):
        resolve("synth", "copied", synth.root)


def test_unknown_split_name_lists_the_known_ones(synth):
    load_split(synth.info, "synth.1@40")
    with pytest.raises(DataPrepError, match=r"^split 'nope' not found for synth \(known: synth\.1@40\)$"):
        resolve("synth", "nope", synth.root)
    with pytest.raises(DataPrepError, match=r"^split 'stl10\.1@40' is for dataset 'stl10', not 'synth'$"):
        resolve("synth", "stl10.1@40", synth.root)


def test_corrupt_split_file_is_an_error_naming_it(synth):
    path = synth.info.path / "splits" / "broken.json"
    path.write_text('{"name": "broken", "labeled_ind')
    with pytest.raises(DataPrepError, match=r"not a valid split file") as error:
        resolve("synth", "broken", synth.root)
    assert str(error.value).startswith(f"{path}: ")


def test_a_version_1_dataset_json_opens_with_its_partitions_under_the_old_key(synth):
    meta_path = synth.info.path / "dataset.json"
    meta = json.loads(meta_path.read_text())
    old = {**{k: v for k, v in meta.items() if k != "partitions"}, "format_version": 1, "splits": meta["partitions"]}
    meta_path.write_text(json.dumps(old))
    arrays = load_arrays("synth", "synth_LT_10.1@60", synth.root)
    np.testing.assert_array_equal(arrays.test_images, synth.test_images)


def test_dataset_json_of_another_format_version_is_refused(synth):
    meta_path = synth.info.path / "dataset.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(DataPrepError, match=r"format version 99, expected 2$"):
        resolve("synth", "synth.1@40", synth.root)
