"""Specification of bad input: every user error ends `python -m data_prep` with exit code 2 and
one stderr line "error: ..." naming the problem, and leaves nothing behind in the data root."""

import io
import os
import pickle
import tarfile
from collections import OrderedDict

import numpy as np
import pytest
from PIL import Image
from raw_sources import cifar_pickle, cifar_rows, entries, make_image_tree, write_tar_gz

from data_prep import DataPrepError
from data_prep.safe_pickle import safe_load

CIFAR = "cifar-10-batches-py"
STL = "stl10_binary"


def tar_members(path) -> dict:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def with_member(source, target, name, data) -> str:
    """A copy of the archive `source` with member `name` replaced by `data` (or dropped if None)."""
    members = tar_members(source)
    if data is None:
        del members[name]
    else:
        members[name] = data
    return str(write_tar_gz(target, members))


class RunsShellCommand:
    """A pickle payload that, if unpickled with plain pickle.load, runs a shell command."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class WritesFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return exec, (f"open({str(self.path)!r}, 'w').write('pwned')",)


def assert_nothing_written(root):
    assert entries(root) == []


# --- sources that are missing, unreadable, or not the dataset -----------------------------------


def test_missing_source_file(tmp_path, cli_error):
    line = cli_error("convert", "cifar10", "--source", tmp_path / "nope.tar.gz", "--data-root", tmp_path / "data")
    assert line == f"error: source not found: {tmp_path / 'nope.tar.gz'}"
    assert_nothing_written(tmp_path / "data")


def test_dataset_that_needs_a_source_given_none(tmp_path, cli_error):
    line = cli_error("convert", "stl10", "--data-root", tmp_path / "data")
    assert line == "error: dataset 'stl10' needs --source (path to stl10_binary.tar.gz)"
    assert_nothing_written(tmp_path / "data")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_source_file(tmp_path, cifar10_source, cli_error):
    source = tmp_path / "cifar-10-python.tar.gz"
    source.write_bytes(cifar10_source.path.read_bytes())
    source.chmod(0)
    try:
        line = cli_error("convert", "cifar10", "--source", source, "--data-root", tmp_path / "data")
    finally:
        source.chmod(0o644)
    assert line == f"error: source is not readable: {source}"
    assert_nothing_written(tmp_path / "data")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads folders whatever their mode")
def test_unreadable_source_folder(tmp_path, cli_error):
    tree = make_image_tree(tmp_path / "tree").path
    tree.chmod(0)
    try:
        line = cli_error("convert", "imagefolder", "--source", tree, "--data-root", tmp_path / "data")
    finally:
        tree.chmod(0o755)
    assert line == f"error: source is not readable: {tree}"
    assert_nothing_written(tmp_path / "data")


def test_tar_without_the_datasets_members(tmp_path, cli_error):
    source = write_tar_gz(tmp_path / "other.tar.gz", {"README.txt": b"hello"})
    line = cli_error("convert", "cifar10", "--source", source, "--data-root", tmp_path / "data")
    assert line == f"error: {source}: not a cifar10 archive (missing member {CIFAR}/batches.meta)"
    assert_nothing_written(tmp_path / "data")


def test_another_datasets_archive(tmp_path, cifar10_source, cli_error):
    line = cli_error("convert", "stl10", "--source", cifar10_source.path, "--data-root", tmp_path / "data")
    assert line == f"error: {cifar10_source.path}: not a stl10 archive (missing member {STL}/class_names.txt)"
    assert_nothing_written(tmp_path / "data")


def test_random_bytes_instead_of_an_archive(tmp_path, cli_error):
    source = tmp_path / "cifar-10-python.tar.gz"
    source.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    line = cli_error("convert", "cifar10", "--source", source, "--data-root", tmp_path / "data")
    assert line.startswith(f"error: {source}: truncated or not a cifar10 tar archive (")
    assert "- method gz: ReadError('not a gzip file') - method bz2:" in line  # tarfile's lines, joined
    assert_nothing_written(tmp_path / "data")


def test_folder_instead_of_an_archive(tmp_path, cli_error):
    line = cli_error("convert", "cifar100", "--source", tmp_path, "--data-root", tmp_path / "data")
    assert line.startswith(f"error: {tmp_path}: truncated or not a cifar100 tar archive (")
    assert_nothing_written(tmp_path / "data")


@pytest.mark.parametrize("dataset", ["cifar10", "stl10"])
def test_truncated_archive(tmp_path, cifar10_source, stl10_source, cli_error, dataset):
    whole = (cifar10_source if dataset == "cifar10" else stl10_source).path.read_bytes()
    source = tmp_path / "cut.tar.gz"
    source.write_bytes(whole[:len(whole) // 2])
    line = cli_error("convert", dataset, "--source", source, "--data-root", tmp_path / "data")
    assert line.startswith(f"error: {source}: truncated or not a {dataset} tar archive (")
    assert_nothing_written(tmp_path / "data")


def test_truncated_pickle_inside_an_intact_archive(tmp_path, cifar10_source, cli_error):
    batch = tar_members(cifar10_source.path)[f"{CIFAR}/data_batch_3"]
    source = with_member(cifar10_source.path, tmp_path / "c.tar.gz", f"{CIFAR}/data_batch_3", batch[:len(batch) // 2])
    line = cli_error("convert", "cifar10", "--source", source, "--data-root", tmp_path / "data")
    assert line.startswith(f"error: {source}:{CIFAR}/data_batch_3: corrupt or truncated pickle (")
    assert_nothing_written(tmp_path / "data")


# --- pickles holding the wrong things -----------------------------------------------------------

GOOD_DATA = cifar_rows(np.zeros((4, 32, 32, 3), np.uint8))

WRONG_BATCHES = {
    "list instead of dict": ([GOOD_DATA, [0, 1, 2, 3]], "not a CIFAR batch (expected keys b'data', b'labels')"),
    "str keys": ({"data": GOOD_DATA, "labels": [0, 1, 2, 3]}, "not a CIFAR batch (expected keys b'data', b'labels')"),
    "data as list of bytes": ({b"data": [b"\0" * 3072] * 4, b"labels": [0, 1, 2, 3]},
                              "image data is not a uint8 array of shape (N, 3072)"),
    "data as float32": ({b"data": GOOD_DATA.astype(np.float32), b"labels": [0, 1, 2, 3]},
                        "image data is not a uint8 array of shape (N, 3072)"),
    "data rows of 1024": ({b"data": GOOD_DATA[:, :1024].copy(), b"labels": [0, 1, 2, 3]},
                          "image data is not a uint8 array of shape (N, 3072)"),
    "fewer labels than images": ({b"data": GOOD_DATA, b"labels": [0, 1, 2]},
                                 "image data is not a uint8 array of shape (N, 3072)"),
    "labels as bytes": ({b"data": GOOD_DATA, b"labels": [b"cat", b"dog", b"cat", b"dog"]},
                        "b'labels' is not a list of integer labels"),
    "labels as str": ({b"data": GOOD_DATA, b"labels": "0123"}, "b'labels' is not a list of integer labels"),
    "labels as dict": ({b"data": GOOD_DATA, b"labels": {0: 1}}, "b'labels' is not a list of integer labels"),
    "ragged labels": ({b"data": GOOD_DATA, b"labels": [[0], [1, 2], [3], [4]]},
                      "b'labels' is not a list of integer labels"),
    "label 10 of 10 classes": ({b"data": GOOD_DATA, b"labels": [0, 1, 2, 10]}, "labels outside 0..9"),
}


@pytest.mark.parametrize("batch, problem", WRONG_BATCHES.values(), ids=WRONG_BATCHES.keys())
def test_cifar_batch_holding_wrong_types(tmp_path, cifar10_source, cli_error, batch, problem):
    source = with_member(cifar10_source.path, tmp_path / "c.tar.gz", f"{CIFAR}/data_batch_2", cifar_pickle(batch))
    line = cli_error("convert", "cifar10", "--source", source, "--data-root", tmp_path / "data")
    assert line.startswith("error: ") and line.endswith(problem)
    assert source in line
    assert_nothing_written(tmp_path / "data")


@pytest.mark.parametrize("meta", [{b"label_names": 10}, {b"label_names": [1, 2]}, {b"names": [b"a"]}, [b"a", b"b"]],
                         ids=["int", "list of ints", "missing key", "list"])
def test_cifar_meta_without_a_list_of_class_names(tmp_path, cifar10_source, cli_error, meta):
    source = with_member(cifar10_source.path, tmp_path / "c.tar.gz", f"{CIFAR}/batches.meta", cifar_pickle(meta))
    line = cli_error("convert", "cifar10", "--source", source, "--data-root", tmp_path / "data")
    assert line == f"error: {source}: batches.meta has no b'label_names' list of class names"
    assert_nothing_written(tmp_path / "data")


@pytest.mark.parametrize("payload, name", [
    # Protocol 2 names Python 3's builtins module as Python 2's __builtin__.
    ({b"data": GOOD_DATA, b"labels": {0, 1, 2, 3}}, "__builtin__.set"),
    (OrderedDict([(b"data", GOOD_DATA), (b"labels", [0, 1, 2, 3])]), "collections.OrderedDict"),
    ({b"data": GOOD_DATA, b"labels": [0, 1, 2, 3], b"when": complex(1, 2)}, "__builtin__.complex"),
], ids=["set", "OrderedDict", "complex"])
def test_pickle_naming_any_type_outside_the_format_is_refused_by_name(tmp_path, cifar10_source, cli_error,
                                                                      payload, name):
    source = with_member(cifar10_source.path, tmp_path / "c.tar.gz", f"{CIFAR}/data_batch_1", cifar_pickle(payload))
    line = cli_error("convert", "cifar10", "--source", source, "--data-root", tmp_path / "data")
    assert line.startswith(f"error: {source}:{CIFAR}/data_batch_1: refusing to unpickle {name} (")
    assert_nothing_written(tmp_path / "data")


def test_malicious_cifar_pickle_is_refused_without_running_it(tmp_path, cifar10_source, cli_error):
    marker = tmp_path / "pwned"
    payload = {b"data": GOOD_DATA, b"labels": [0, 1, 2, 3], b"x": RunsShellCommand(f"touch {marker}")}
    source = with_member(cifar10_source.path, tmp_path / "c.tar.gz", f"{CIFAR}/data_batch_1",
                         pickle.dumps(payload, protocol=2))
    line = cli_error("convert", "cifar10", "--source", source, "--data-root", tmp_path / "data")
    assert f"refusing to unpickle {os.system.__module__}.system" in line
    assert not marker.exists()
    assert_nothing_written(tmp_path / "data")


@pytest.mark.parametrize("protocol", [2, 5])
def test_malicious_miniimagenet_pickle_is_refused_without_running_it(tmp_path, cli_error, protocol):
    marker = tmp_path / "pwned"
    source = tmp_path / "mini-imagenet-cache-train.pkl"
    source.write_bytes(pickle.dumps({"image_data": WritesFile(marker), "class_dict": {}}, protocol=protocol))
    line = cli_error("convert", "miniimagenet", "--source", source, "--data-root", tmp_path / "data")
    builtins = "__builtin__" if protocol == 2 else "builtins"
    assert line.startswith(f"error: {source}: refusing to unpickle {builtins}.exec (")
    assert not marker.exists()
    assert_nothing_written(tmp_path / "data")


def test_malicious_object_hidden_in_an_object_array_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    array = np.array([WritesFile(marker), 1], dtype=object)
    with pytest.raises(DataPrepError, match=r"^x: refusing to unpickle __builtin__\.exec \("):
        safe_load(io.BytesIO(pickle.dumps({"image_data": array}, protocol=2)), what="x")
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_safe_load_admits_the_formats_types_in_every_pickle_protocol(protocol):
    data = {b"data": np.arange(12, dtype=np.uint8).reshape(3, 4), "names": ["a", b"b"], "n": (1, 2.5, None, True),
            "f": np.float32(2.5), "empty": np.zeros((0, 3), np.int64), "fortran": np.asfortranarray(np.eye(3))}
    if protocol == 2:
        # Protocol 2 spells b"" (an empty array's buffer) as a call to bytes(), which is not admitted.
        del data["empty"]
    loaded = safe_load(io.BytesIO(pickle.dumps(data, protocol=protocol)), what="x", encoding="bytes")
    assert loaded.keys() == data.keys()
    for key in data.keys() & {b"data", "empty", "fortran"}:
        np.testing.assert_array_equal(loaded[key], data[key])
        assert loaded[key].dtype == data[key].dtype
    assert loaded["names"] == ["a", b"b"] and loaded["n"] == (1, 2.5, None, True) and loaded["f"] == np.float32(2.5)


def test_safe_load_reports_a_corrupt_stream():
    with pytest.raises(DataPrepError, match=r"^src: corrupt or truncated pickle \("):
        safe_load(io.BytesIO(pickle.dumps({"a": [1, 2, 3]})[:-5]), what="src")


@pytest.mark.parametrize("cache, problem", [
    ([1, 2], "not a mini-ImageNet cache (expected keys 'image_data', 'class_dict')"),
    ({"image_data": np.zeros((2, 8, 8, 3), np.float32), "class_dict": {"n1": [0, 1]}},
     "image_data is not a uint8 (N, H, W, 3) array"),
    ({"image_data": np.zeros((2, 8, 8, 3), np.uint8), "class_dict": [[0, 1]]},
     "class_dict is not a dict of class -> image_data rows"),
    ({"image_data": np.zeros((2, 8, 8, 3), np.uint8), "class_dict": {"n1": [0, 2]}},
     "class_dict['n1'] is not a list of row numbers of image_data"),
    ({"image_data": np.zeros((2, 8, 8, 3), np.uint8), "class_dict": {"n1": [0, -1]}},
     "class_dict['n1'] is not a list of row numbers of image_data"),
    ({"image_data": np.zeros((2, 8, 8, 3), np.uint8), "class_dict": {"n1": ["a", "b"]}},
     "class_dict['n1'] is not a list of row numbers of image_data"),
], ids=["list", "float images", "class_dict list", "row out of range", "negative row", "str rows"])
def test_miniimagenet_pickle_holding_wrong_types(tmp_path, cli_error, cache, problem):
    source = tmp_path / "mini.pkl"
    source.write_bytes(pickle.dumps(cache))
    line = cli_error("convert", "miniimagenet", "--source", source, "--data-root", tmp_path / "data")
    assert line == f"error: {source}: {problem}"
    assert_nothing_written(tmp_path / "data")


@pytest.mark.parametrize("member, data, problem", [
    ("train_X.bin", b"\0" * 1000, "train_X.bin holds 1000 bytes, expected 20 images of 27648 bytes"),
    ("test_y.bin", bytes(10), "test_y.bin has labels outside 1..10"),  # label 0 in a 1-based file
    ("unlabeled_X.bin", b"\0" * 27649, "unlabeled_X.bin size is not a whole number of images"),
])
def test_stl10_archive_with_inconsistent_members(tmp_path, stl10_source, cli_error, member, data, problem):
    source = with_member(stl10_source.path, tmp_path / "s.tar.gz", f"{STL}/{member}", data)
    line = cli_error("convert", "stl10", "--source", source, "--data-root", tmp_path / "data")
    assert line == f"error: {source}: {problem}"
    assert_nothing_written(tmp_path / "data")


def test_stl10_archive_without_unlabeled_images(tmp_path, stl10_source, cli_error):
    source = with_member(stl10_source.path, tmp_path / "s.tar.gz", f"{STL}/unlabeled_X.bin", None)
    line = cli_error("convert", "stl10", "--source", source, "--data-root", tmp_path / "data")
    assert line == f"error: {source}: not a stl10 archive (missing member {STL}/unlabeled_X.bin)"
    assert_nothing_written(tmp_path / "data")


def test_image_tree_with_a_file_that_is_not_an_image(tmp_path, capsys):
    from data_prep.__main__ import main

    tree = make_image_tree(tmp_path / "tree").path
    (tree / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    assert main(["convert", "imagefolder", "--source", str(tree), "--data-root", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err
    # The progress bar shares stderr; the error itself is one line, the last.
    assert err.rstrip("\n").split("\n")[-1].split("\r")[-1] \
        .startswith(f"error: {tree / 'dog' / 'broken.png'}: not a readable image (")
    assert err.count("error:") == 1 and "Traceback" not in err
    assert_nothing_written(tmp_path / "data")


def test_image_tree_without_images(tmp_path, cli_error):
    (tmp_path / "tree" / "cat").mkdir(parents=True)
    line = cli_error("convert", "imagefolder", "--source", tmp_path / "tree", "--data-root", tmp_path / "data")
    assert line == f"error: {tmp_path / 'tree'}: no images found (expected {tmp_path / 'tree'}/<class>/<image>)"


def test_imagefolder_given_a_file(tmp_path, cli_error):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "one.png")
    line = cli_error("convert", "imagefolder", "--source", tmp_path / "one.png", "--data-root", tmp_path / "data")
    assert line == f"error: imagefolder source must be a folder, got file {tmp_path / 'one.png'}"


def test_test_fraction_outside_0_1(tmp_path, cli_error):
    line = cli_error("convert", "digits", "--test-fraction", "1.5", "--data-root", tmp_path / "data")
    assert line == "error: test fraction must be in (0, 1), got 1.5"
    assert_nothing_written(tmp_path / "data")


# --- names and parameters -------------------------------------------------------------------------


def test_unknown_dataset_name(tmp_path, cli_error):
    line = cli_error("convert", "imagenet21k", "--data-root", tmp_path / "data")
    assert line == ("error: unknown dataset 'imagenet21k' "
                    "(known: cifar10, cifar100, digits, imagefolder, miniimagenet, mnist5k, stl10)")
    assert_nothing_written(tmp_path / "data")


@pytest.mark.parametrize("command", ["info", "split"])
def test_dataset_not_converted(tmp_path, cli_error, command):
    line = cli_error(command, "cifar10", "--data-root", tmp_path)
    assert line == (f"error: dataset 'cifar10' not found under {tmp_path} "
                    "(convert it first: python -m data_prep convert cifar10)")


def test_split_asking_for_more_labeled_rows_of_a_class_than_exist(synth, cli_error):
    line = cli_error("split", "synth", "--data-root", synth.root, "--n-max", "101", "--gamma-l", "10")
    assert line == "error: class 0 needs 101 labeled rows but synth has only 100 (lower n_max, or allow repeats)"
    assert entries(synth.info.path / "splits") == []


def test_mcar_split_larger_than_the_training_set(synth, cli_error):
    line = cli_error("split", "synth", "--data-root", synth.root, "--kind", "mcar", "--size", "821")
    assert line == "error: mcar size 821 exceeds the 820 labeled training rows"
    assert entries(synth.info.path / "splits") == []


@pytest.mark.parametrize("args, message", [
    (["--n-max", "10", "--gamma-l", "0.5"], "gamma_l must be >= 1 (got 0.5)"),
    (["--n-max", "10", "--gamma-l", "nan"], "gamma_l must be >= 1 (got nan)"),
    (["--n-max", "10"], "gamma_l must be >= 1 (got None)"),
    (["--gamma-l", "10"], "an lt split needs n_max >= 1"),
    (["--n-max", "0", "--gamma-l", "10"], "an lt split needs n_max >= 1"),
    (["--n-max", "10", "--gamma-l", "10", "--gamma-u", "0"], "gamma_u must be > 0 and is only for lt splits"),
    (["--kind", "mcar", "--size", "10", "--gamma-u", "2"], "gamma_u must be > 0 and is only for lt splits"),
    (["--kind", "mcar"], "an mcar split needs size >= 1"),
    (["--kind", "rand"], "an rand split needs n_max >= 1"),
    (["--n-max", "10", "--gamma-l", "10", "--name", "../escape"],
     "split name must be a plain name, one entry under its root (not empty, no '/' or '\\', not starting with '.'), "
     "got '../escape'"),
], ids=["gamma_l<1", "gamma_l nan", "no gamma_l", "no n_max", "n_max 0", "gamma_u 0", "gamma_u mcar",
        "mcar no size", "rand no n_max", "name with slash"])
def test_invalid_split_parameters(synth, cli_error, args, message):
    assert cli_error("split", "synth", "--data-root", synth.root, *args) == f"error: {message}"
    assert entries(synth.info.path / "splits") == []


def test_data_root_that_is_not_a_writable_folder(tmp_path, cifar10_source, cli_error):
    (tmp_path / "afile").write_text("not a folder")
    root = tmp_path / "afile" / "sub"
    line = cli_error("convert", "cifar10", "--source", cifar10_source.path, "--data-root", root)
    assert line == f"error: data root {root} is not writable (Not a directory)"
    assert (tmp_path / "afile").read_text() == "not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into folders whatever their mode")
def test_data_root_without_write_permission(tmp_path, cifar10_source, cli_error):
    root = tmp_path / "data"
    root.mkdir(mode=0o555)
    try:
        line = cli_error("convert", "cifar10", "--source", cifar10_source.path, "--data-root", root)
    finally:
        root.chmod(0o755)
    assert line == f"error: data root {root} is not writable"
    assert_nothing_written(root)
