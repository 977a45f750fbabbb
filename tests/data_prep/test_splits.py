"""Specification of MNAR splits (splits.py, docs/method.md "MNAR splits"): per-class counts, reproducibility,
interleaved labeled order, unlabeled pools, aliases, and the split file."""

import json
import math
from fractions import Fraction

import numpy as np
import pytest
from raw_sources import SYNTH_TRAIN_COUNTS

from data_prep.__main__ import main
from data_prep.splits import SplitSpec, load_split, long_tail_counts, make_split, parse_split_name, random_rate_counts


def exact_long_tail(n_max, gamma, num_classes) -> list:
    """ceil(n_max * gamma ** (-c / (C - 1))) without floating point: the smallest integer k with
    k ** (C - 1) * gamma ** c >= n_max ** (C - 1)."""
    if num_classes == 1:
        return [n_max]
    gamma, e = Fraction(gamma), num_classes - 1
    counts = []
    for c in range(num_classes):
        k = max(1, math.floor(n_max * float(gamma) ** (-c / e)) - 2)
        while Fraction(k) ** e * gamma ** c < Fraction(n_max) ** e:
            k += 1
        counts.append(k)
    return counts


def greedy_order_of_classes(targets, total) -> list:
    """The documented draw rule, written out: each draw takes the class with rows left that is
    furthest behind its share targets[c] / max(targets), measured against the most-drawn class;
    ties go to the lowest class."""
    share = [t / max(targets) for t in targets]
    taken = [0] * len(targets)
    order = []
    for _ in range(total):
        most = max(max(taken), 1)
        open_classes = [c for c in range(len(targets)) if taken[c] < targets[c]]
        c = max(open_classes, key=lambda c: (share[c] - taken[c] / most, -c))
        taken[c] += 1
        order.append(c)
    return order


def labels_of(synth, indices):
    return synth.train_labels[np.asarray(indices)]


# --- long-tailed counts ----------------------------------------------------------------------


@pytest.mark.parametrize("n_max, gamma_l, num_classes", [
    (50, 50, 10),  # last class n_max / gamma_l = 1 exactly (50 * 50 ** -1 must not round up to 2)
    (100, 1000, 4),  # floats give 100 * 1000 ** (-1/3) = 10.000000000000002 -> 11; exact is 10
    (30, 1000, 7),  # same noise at c = 2 and c = 4 (exact 3 and 0.3 -> 1)
    (1500, 100, 10),  # the paper's CIFAR-10 setting
    (150, 10, 100),  # CIFAR-100
    (400, Fraction(5, 2), 6),  # a non-integer ratio
    (7, 1, 5),  # gamma_l 1: balanced
    (9, 20, 1),  # a single class gets n_max
])
def test_long_tail_counts_are_ceil_of_n_max_times_gamma_to_minus_c_over_c_minus_1(n_max, gamma_l, num_classes):
    assert long_tail_counts(n_max, float(gamma_l), num_classes).tolist() == exact_long_tail(n_max, gamma_l, num_classes)


def test_long_tail_counts_of_the_papers_cifar10_setting():
    assert long_tail_counts(1500, 100, 10).tolist() == [1500, 900, 540, 324, 194, 117, 70, 42, 26, 15]
    assert long_tail_counts(50, 50, 10).tolist() == [50, 33, 21, 14, 9, 6, 4, 3, 2, 1]


@pytest.mark.parametrize("n_max, gamma_l", [(60, 10), (50, 50), (64, 1), (20, 5)])
def test_lt_split_labels_exactly_the_long_tail_counts_of_distinct_training_rows(shared_synth, n_max, gamma_l):
    split = make_split(shared_synth.info, SplitSpec("lt", seed=1, n_max=n_max, gamma_l=gamma_l))
    expected = exact_long_tail(n_max, gamma_l, 10)
    assert split.labeled_counts == expected
    assert np.bincount(labels_of(shared_synth, split.labeled_indices), minlength=10).tolist() == expected
    assert len(set(split.labeled_indices.tolist())) == sum(expected)  # no row twice
    assert split.name == f"synth_LT_{gamma_l}.1@{n_max}"


def test_lt_split_unlabeled_pool_is_the_whole_training_set_by_default(shared_synth):
    split = make_split(shared_synth.info, SplitSpec("lt", seed=1, n_max=60, gamma_l=10))
    np.testing.assert_array_equal(split.unlabeled_indices, np.arange(820))
    assert split.unlabeled_counts == SYNTH_TRAIN_COUNTS
    assert split.unlabeled_without_label == 0


# --- reproducibility and order -----------------------------------------------------------------


def test_same_seed_gives_same_rows_and_different_seeds_differ(shared_synth):
    spec = SplitSpec("lt", seed=3, n_max=60, gamma_l=10)
    first, again = make_split(shared_synth.info, spec), make_split(shared_synth.info, spec)
    assert first.to_json() == again.to_json()
    other = make_split(shared_synth.info, SplitSpec("lt", seed=4, n_max=60, gamma_l=10))
    assert other.labeled_counts == first.labeled_counts
    assert set(other.labeled_indices.tolist()) != set(first.labeled_indices.tolist())


@pytest.mark.parametrize("spec, targets", [
    (SplitSpec("lt", seed=2, n_max=60, gamma_l=10), exact_long_tail(60, 10, 10)),
    (SplitSpec("lt", seed=2, n_max=50, gamma_l=50), exact_long_tail(50, 50, 10)),
    (SplitSpec("mcar", seed=2, size=100), SYNTH_TRAIN_COUNTS),
])
def test_labeled_rows_are_interleaved_by_the_greedy_rule(shared_synth, spec, targets):
    split = make_split(shared_synth.info, spec)
    classes = labels_of(shared_synth, split.labeled_indices).tolist()
    expected = greedy_order_of_classes(targets, len(classes))
    for k in (1, 10, 11, 25, 50, len(classes)):
        assert classes[:k] == expected[:k], f"first {k} rows"


@pytest.mark.parametrize("spec", [SplitSpec("lt", seed=5, n_max=60, gamma_l=10), SplitSpec("mcar", seed=5, size=250)])
def test_every_prefix_of_the_labeled_rows_follows_the_target_shares_within_two_rows(shared_synth, spec):
    split = make_split(shared_synth.info, spec)
    classes = labels_of(shared_synth, split.labeled_indices)
    targets = np.array(split.labeled_counts if spec.kind == "lt" else SYNTH_TRAIN_COUNTS, float)
    counts = np.zeros(10)
    for k, c in enumerate(classes, 1):
        counts[c] += 1
        assert np.abs(counts - k * targets / targets.sum()).max() <= 2, f"prefix of {k} rows: {counts}"


# --- unlabeled pools with their own imbalance ---------------------------------------------------


def test_gamma_u_gives_a_long_tailed_unlabeled_pool_that_contains_the_labeled_rows(shared_synth):
    split = make_split(shared_synth.info, SplitSpec("lt", seed=1, n_max=20, gamma_l=5, gamma_u=10))
    counts = split.unlabeled_counts
    assert counts == sorted(counts, reverse=True)
    assert counts[0] == 100  # as large as the data allows: all of class 0
    assert counts[0] / counts[-1] == pytest.approx(10, rel=0.1)
    pool = split.unlabeled_indices
    assert len(set(pool.tolist())) == len(pool) == sum(counts)
    assert np.bincount(labels_of(shared_synth, pool), minlength=10).tolist() == counts
    assert set(split.labeled_indices.tolist()) <= set(pool.tolist())
    assert split.name == "synth_LT_5_u10.1@20"


def test_gamma_u_below_1_inverts_the_tail_so_the_last_class_is_largest(shared_synth):
    split = make_split(shared_synth.info, SplitSpec("lt", seed=1, n_max=5, gamma_l=5, gamma_u=0.1))
    counts = split.unlabeled_counts
    assert counts == sorted(counts)
    assert counts[-1] == 64  # all of the smallest class, which is now the head
    assert counts[-1] / counts[0] == pytest.approx(10, rel=0.1)
    assert np.bincount(labels_of(shared_synth, split.unlabeled_indices), minlength=10).tolist() == counts
    assert set(split.labeled_indices.tolist()) <= set(split.unlabeled_indices.tolist())


# --- rand and mcar -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_random_rate_counts_are_ceil_n_max_times_rate_normalised_to_max_1(seed):
    rates = np.random.default_rng(seed).uniform(size=10)
    expected = [math.ceil(r) for r in (40 * rates / rates.max()).round(9)]
    counts = random_rate_counts(40, 10, np.random.default_rng(seed)).tolist()
    assert counts == expected
    assert max(counts) == 40


def test_rand_split_has_n_max_in_its_largest_class_and_differs_by_seed(shared_synth):
    splits = [make_split(shared_synth.info, SplitSpec("rand", seed=s, n_max=30)) for s in (1, 2)]
    for split in splits:
        assert max(split.labeled_counts) == 30
        assert min(split.labeled_counts) >= 1
        assert np.bincount(labels_of(shared_synth, split.labeled_indices), minlength=10).tolist() \
            == split.labeled_counts
        assert split.name.startswith("synth_rand.")
    assert splits[0].labeled_counts != splits[1].labeled_counts


def test_mcar_split_follows_the_training_class_distribution(shared_synth):
    split = make_split(shared_synth.info, SplitSpec("mcar", seed=1, size=41))
    assert len(split.labeled_indices) == len(set(split.labeled_indices.tolist())) == 41
    counts = np.bincount(labels_of(shared_synth, split.labeled_indices), minlength=10)
    assert counts.tolist() == split.labeled_counts
    assert np.abs(counts - 41 * np.array(SYNTH_TRAIN_COUNTS) / 820).max() <= 1
    assert split.name == "synth.1@41"


def test_allow_repeat_reuses_rows_only_when_a_class_is_short(synth):
    split = make_split(synth.info, SplitSpec("lt", seed=1, n_max=110, gamma_l=2, allow_repeat=True))
    assert split.labeled_counts == exact_long_tail(110, 2, 10)
    class0 = split.labeled_indices[labels_of(synth, split.labeled_indices) == 0]
    assert (len(class0), len(set(class0.tolist()))) == (110, 100)
    class9 = split.labeled_indices[labels_of(synth, split.labeled_indices) == 9]
    assert len(class9) == len(set(class9.tolist())) == 55


# --- aliases ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, expected", [
    ("cifar10_LT_50.1@50-1", ("cifar10", SplitSpec("lt", 1, n_max=50, gamma_l=50.0, valid_size=1))),
    ("cifar10_LT_50.1@50", ("cifar10", SplitSpec("lt", 1, n_max=50, gamma_l=50.0))),
    ("cifar10.1@40-1", ("cifar10", SplitSpec("mcar", 1, size=40, valid_size=1))),
    ("cifar100_LT_10.3@150", ("cifar100", SplitSpec("lt", 3, n_max=150, gamma_l=10.0))),
    ("cifar10_LT_100_u0.01.2@1500", ("cifar10", SplitSpec("lt", 2, n_max=1500, gamma_l=100.0, gamma_u=0.01))),
    ("stl10_rand.4@30", ("stl10", SplitSpec("rand", 4, n_max=30))),
    ("mnist5k.2@250", ("mnist5k", SplitSpec("mcar", 2, size=250))),
])
def test_original_style_names_parse_to_dataset_and_spec(name, expected):
    assert parse_split_name(name) == expected


@pytest.mark.parametrize("name", ["labeled-40", "cifar10", "cifar10_LT_50", "cifar10.1", "cifar10@40", "my split.json"])
def test_other_names_are_not_aliases(name):
    assert parse_split_name(name) is None


def test_default_names_parse_back_to_their_spec():
    for spec in (SplitSpec("lt", 1, n_max=50, gamma_l=50), SplitSpec("mcar", 3, size=40),
                 SplitSpec("rand", 2, n_max=9), SplitSpec("lt", 1, n_max=5, gamma_l=2.5, gamma_u=0.5)):
        assert parse_split_name(spec.default_name("cifar10")) == ("cifar10", spec)


def test_load_split_creates_an_alias_split_on_demand_and_saves_it(synth):
    path = synth.info.path / "splits" / "synth_LT_10.2@30-1.json"
    assert not path.exists()
    split = load_split(synth.info, "synth_LT_10.2@30-1")
    assert path.is_file()
    assert split.spec == SplitSpec("lt", 2, n_max=30, gamma_l=10.0, valid_size=1)  # one row: no validation set
    assert split.labeled_counts == exact_long_tail(30, 10, 10) and not split.has_validation
    again = load_split(synth.info, "synth_LT_10.2@30-1")
    assert again.to_json() == split.to_json() == json.loads(path.read_text())


# --- the split file ------------------------------------------------------------------------------


def test_split_command_writes_a_file_with_spec_counts_indices_and_dataset_checksum(synth, capsys):
    root = synth.root
    assert main(["split", "synth", "--data-root", str(root), "--kind", "lt", "--n-max", "20",
                 "--gamma-l", "5", "--gamma-u", "10", "--seed", "3"]) == 0
    path = synth.info.path / "splits" / "synth_LT_5_u10.3@20.json"
    assert capsys.readouterr().out.splitlines()[0] == f"wrote {path}"
    data = json.loads(path.read_text())
    expected = make_split(synth.info, SplitSpec("lt", 3, n_max=20, gamma_l=5, gamma_u=10))
    assert {k: data[k] for k in ("kind", "seed", "n_max", "size", "gamma_l", "gamma_u", "allow_repeat")} == {
        "kind": "lt", "seed": 3, "n_max": 20, "size": None, "gamma_l": 5.0, "gamma_u": 10.0, "allow_repeat": False}
    assert data["name"] == "synth_LT_5_u10.3@20"
    assert data["dataset"] == "synth"
    assert data["labeled_counts"] == exact_long_tail(20, 5, 10)
    assert data["unlabeled_counts"] == expected.unlabeled_counts
    assert data["labeled_indices"] == expected.labeled_indices.tolist()
    assert data["unlabeled_indices"] == expected.unlabeled_indices.tolist()
    assert data["dataset_checksum"] == json.loads((synth.info.path / "dataset.json").read_text())["checksum"]
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp file left


def test_split_command_with_a_name_saves_under_that_name(synth):
    assert main(["split", "synth", "--data-root", str(synth.root), "--kind", "mcar", "--size", "40",
                 "--name", "forty"]) == 0
    split = load_split(synth.info, "forty", create=False)
    assert (split.name, split.spec.kind, split.spec.size, len(split.labeled_indices)) == ("forty", "mcar", 40, 40)
