"""Specification of validation sets (splits.py, docs/method.md "Validation"): `valid_size` training
rows set aside with the split, disjoint from the labeled rows, removed from the unlabeled pool,
never part of the test split; drawn balanced (valid_size / C per class) or in the labeled set's
proportions; reproducible from the seed; recorded in the split file."""

import json

import numpy as np
import pytest
from raw_sources import SYNTH_TRAIN_COUNTS

from data_prep.loading import load_arrays
from data_prep.splits import SplitSpec, load_split, make_split, parse_split_name, save_split

NUM_CLASSES = 10

BASE_SPECS = {
    "lt": dict(kind="lt", seed=1, n_max=60, gamma_l=10),
    "lt_gamma_u": dict(kind="lt", seed=2, n_max=40, gamma_l=10, gamma_u=4),
    "mcar": dict(kind="mcar", seed=3, size=120),
    "rand": dict(kind="rand", seed=4, n_max=50),
}


def expected_counts(kind, size, labeled_counts) -> list[int]:
    """The documented rule, written out: balanced gives size // C to each class and the remainder
    one each to the first classes; labeled gives each class one row, then apportions the rest in
    the labeled proportions by largest remainder (ties to the lower class)."""
    if size < NUM_CLASSES:
        return [0] * NUM_CLASSES
    if kind == "balanced":
        return [size // NUM_CLASSES + (1 if c < size % NUM_CLASSES else 0) for c in range(NUM_CLASSES)]
    total = sum(labeled_counts)
    rest = size - NUM_CLASSES
    exact = [rest * n / total for n in labeled_counts]
    counts = [1 + int(e) for e in exact]
    by_remainder = sorted(range(NUM_CLASSES), key=lambda c: (-(exact[c] - int(exact[c])), c))
    for c in by_remainder[:size - sum(counts)]:
        counts[c] += 1
    return counts


@pytest.mark.parametrize("valid_kind", ["balanced", "labeled"])
@pytest.mark.parametrize("base", list(BASE_SPECS))
def test_validation_rows_are_disjoint_from_labeled_unlabeled_and_test_rows(shared_synth, base, valid_kind):
    spec = SplitSpec(**BASE_SPECS[base], valid_size=57, valid_kind=valid_kind)
    split = make_split(shared_synth.info, spec)
    valid, labeled, unlabeled = (set(a.tolist()) for a in (split.valid_indices, split.labeled_indices,
                                                            split.unlabeled_indices))
    assert len(valid) == len(split.valid_indices) == 57  # no row twice
    assert not valid & labeled
    assert not valid & unlabeled
    # The pool is what it would be without a validation set, less the validation rows.
    without = make_split(shared_synth.info, SplitSpec(**BASE_SPECS[base]))
    assert unlabeled == set(without.unlabeled_indices.tolist()) - valid
    np.testing.assert_array_equal(split.labeled_indices, without.labeled_indices)  # labeled draw untouched
    # Every validation row is a training row: the test split is a separate set of images.
    assert valid <= set(range(sum(SYNTH_TRAIN_COUNTS)))
    labels = shared_synth.train_labels[split.valid_indices]
    assert np.bincount(labels, minlength=NUM_CLASSES).tolist() == split.valid_counts
    assert split.valid_counts == expected_counts(valid_kind, 57, split.labeled_counts)


def test_balanced_validation_has_size_over_c_rows_per_class(shared_synth):
    split = make_split(shared_synth.info, SplitSpec("lt", 1, n_max=60, gamma_l=10, valid_size=200))
    assert split.valid_counts == [20] * NUM_CLASSES


def test_labeled_validation_follows_the_labeled_proportions_with_every_class_present(shared_synth):
    split = make_split(shared_synth.info, SplitSpec("lt", 1, n_max=60, gamma_l=20, valid_size=100,
                                                    valid_kind="labeled"))
    assert split.labeled_counts == [60, 44, 31, 23, 16, 12, 9, 6, 5, 3]
    # One row each, then 90 in proportion to the 209 labels: 25.84, 18.95, 13.35, 9.90, 6.89, 5.17,
    # 3.88, 2.58, 2.15, 1.29 floor to 84; the 6 largest remainders (classes 1, 3, 4, 6, 0, 7) get one more.
    assert split.valid_counts == expected_counts("labeled", 100, split.labeled_counts)
    assert split.valid_counts == [27, 20, 14, 11, 8, 6, 5, 4, 3, 2]


def test_same_seed_gives_the_same_validation_rows_and_another_seed_others(shared_synth):
    spec = SplitSpec("lt", 5, n_max=60, gamma_l=10, valid_size=80)
    first, again = make_split(shared_synth.info, spec), make_split(shared_synth.info, spec)
    assert first.to_json() == again.to_json()
    other = make_split(shared_synth.info, SplitSpec("lt", 6, n_max=60, gamma_l=10, valid_size=80))
    assert other.valid_counts == first.valid_counts
    assert set(other.valid_indices.tolist()) != set(first.valid_indices.tolist())


@pytest.mark.parametrize("valid_size", [0, 1, 9])
def test_fewer_validation_rows_than_classes_is_no_validation_set(shared_synth, valid_size):
    split = make_split(shared_synth.info, SplitSpec("lt", 1, n_max=60, gamma_l=10, valid_size=valid_size))
    assert not split.has_validation
    assert split.valid_indices.tolist() == [] and split.valid_counts == []
    assert split.unlabeled_indices.tolist() == list(range(sum(SYNTH_TRAIN_COUNTS)))


def test_a_validation_set_the_training_rows_cannot_supply_is_a_one_line_error(synth, cli_error):
    # Class 0 has 100 training rows, 60 of them labeled: 40 are left, and 50 are asked for.
    line = cli_error("split", "synth", "--data-root", synth.root, "--kind", "lt", "--n-max", "60",
                     "--gamma-l", "10", "--valid-size", "500")
    assert line == ("error: class 0 needs 50 validation rows but synth has only 40 training rows left after "
                    "the labeled ones (lower valid_size)")


@pytest.mark.parametrize("name, valid_size, valid_kind", [
    ("cifar10_LT_50.1@50-5000", 5000, "balanced"),
    ("cifar10_LT_50.1@50-1", 1, "balanced"),
    ("cifar10_LT_50.1@50", 0, "balanced"),
    ("cifar10.1@40-500labeled", 500, "labeled"),
    ("stl10_rand.4@30-100", 100, "balanced"),
])
def test_original_names_take_the_trailing_number_as_the_validation_size(name, valid_size, valid_kind):
    _, spec = parse_split_name(name)
    assert (spec.valid_size, spec.valid_kind) == (valid_size, valid_kind)


def test_default_names_with_validation_parse_back_to_their_spec():
    for spec in (SplitSpec("lt", 1, n_max=50, gamma_l=50, valid_size=5000),
                 SplitSpec("mcar", 3, size=40, valid_size=200, valid_kind="labeled")):
        name = spec.default_name("cifar10")
        assert parse_split_name(name) == ("cifar10", spec)
    assert SplitSpec("lt", 1, n_max=50, gamma_l=50, valid_size=5000).default_name("c") == "c_LT_50.1@50-5000"


def test_split_command_records_kind_size_counts_and_indices_of_the_validation_set(synth, capsys):
    from data_prep.__main__ import main

    assert main(["split", "synth", "--data-root", str(synth.root), "--kind", "lt", "--n-max", "30",
                 "--gamma-l", "5", "--valid-size", "40", "--valid-kind", "labeled"]) == 0
    out = capsys.readouterr().out
    path = synth.info.path / "splits" / "synth_LT_5.1@30-40labeled.json"
    data = json.loads(path.read_text())
    expected = make_split(synth.info, SplitSpec("lt", 1, n_max=30, gamma_l=5, valid_size=40, valid_kind="labeled"))
    assert (data["format_version"], data["valid_size"], data["valid_kind"]) == (2, 40, "labeled")
    assert data["valid_counts"] == expected.valid_counts == expected_counts("labeled", 40, expected.labeled_counts)
    assert data["valid_indices"] == expected.valid_indices.tolist()
    assert data["dataset_checksum"] == synth.info.checksum
    assert f"validation     40 per class [{' '.join(map(str, expected.valid_counts))}] (labeled" in out


def test_a_split_file_from_before_validation_sets_loads_without_one(synth):
    split = make_split(synth.info, SplitSpec("lt", 1, n_max=30, gamma_l=5), "old")
    data = split.to_json()
    for key in ("valid_size", "valid_kind", "valid_counts", "valid_indices"):
        del data[key]
    data["format_version"] = 1
    (synth.info.path / "splits").mkdir(exist_ok=True)
    (synth.info.path / "splits" / "old.json").write_text(json.dumps(data))
    loaded = load_split(synth.info, "old", create=False)
    assert not loaded.has_validation and loaded.spec.valid_size == 0
    np.testing.assert_array_equal(loaded.labeled_indices, split.labeled_indices)


def test_load_arrays_returns_the_validation_rows_and_never_trains_on_them(synth):
    split = make_split(synth.info, SplitSpec("lt", 1, n_max=60, gamma_l=10, valid_size=100), "v")
    save_split(synth.info, split)
    arrays = load_arrays("synth", "v", synth.root)
    np.testing.assert_array_equal(arrays.valid_images, synth.train_images[split.valid_indices])
    np.testing.assert_array_equal(arrays.valid_labels, synth.train_labels[split.valid_indices])
    assert len(arrays.unlabeled_images) == sum(SYNTH_TRAIN_COUNTS) - 100
    np.testing.assert_array_equal(arrays.unlabeled_images, synth.train_images[split.unlabeled_indices])
    # No validation image (they are random 4x4 images, all distinct) is among the training images.
    training = {image.tobytes() for image in np.concatenate([arrays.labeled_images, arrays.unlabeled_images])}
    assert not any(image.tobytes() in training for image in arrays.valid_images)


def test_load_arrays_of_a_split_without_validation_has_empty_validation_arrays(synth):
    arrays = load_arrays("synth", "synth_LT_10.1@60", synth.root)
    assert arrays.valid_images.shape == (0, 4, 4, 1) and arrays.valid_labels.shape == (0,)
