"""Specification of unlabeled shapes (splits.py, docs/method.md "Unlabeled shapes"): the unlabeled
pool of a long-tailed split dealt as LeapLabTHU/SimPro's make_imb_data deals it (consistent,
uniform, reversed, middle, head-tail), its exact per-class counts, its rows, the split file and
name, and the one-line refusals of `python -m data_prep split`."""

import json
import math
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from raw_sources import SYNTH_TRAIN_COUNTS, entries, write_synth
from test_splits import exact_long_tail

from data_prep.__main__ import main
from data_prep.splits import UNLABELED_SHAPES, SplitSpec, load_split, make_split, parse_split_name, shape_counts

ROOT = Path(__file__).resolve().parents[2]
SHAPES = ("consistent", "uniform", "reversed", "middle", "head-tail")


def exact_floor_tail(n_max, gamma, num_classes) -> list:
    """floor(n_max * gamma ** (-r / (C - 1))) for r = 0..C-1 without floating point: the exact
    ceiling, less one where the value is not a whole number (k ** (C - 1) * gamma ** r != n_max ** (C - 1))."""
    e, gamma = num_classes - 1, Fraction(gamma)
    return [k if Fraction(k) ** e * gamma ** r == Fraction(n_max) ** e else k - 1
            for r, k in enumerate(exact_long_tail(n_max, gamma, num_classes))]


def reference_order(shape, num_classes) -> list:
    """Which entry of the descending tail each class takes, built as the reference builds its index
    lists (flag_reverse_LT 0, 1, 3 "centric", 4 "off-centric")."""
    evens, odds = list(range(0, num_classes, 2)), list(range(1, num_classes, 2))
    return {"consistent": list(range(num_classes)), "uniform": list(range(num_classes)),
            "reversed": list(range(num_classes))[::-1], "middle": evens[::-1] + odds,
            "head-tail": odds + evens[::-1]}[shape]


def expected_counts(shape, n_max_u, gamma_u, num_classes) -> list:
    tail = exact_floor_tail(n_max_u, 1 if shape == "uniform" else gamma_u, num_classes)
    return [tail[r] for r in reference_order(shape, num_classes)]


def labels_of(synth, indices):
    return synth.train_labels[np.asarray(indices, np.int64)]


# --- per-class counts ----------------------------------------------------------------------------


def test_the_shapes_are_the_five_of_the_realistic_long_tailed_evaluations_in_the_papers_order():
    assert tuple(UNLABELED_SHAPES) == SHAPES


def test_each_shape_deals_the_same_tail_to_the_classes_in_its_own_order():
    # C 5, n_max_u 16, gamma_u 16: the tail is 16 * 16 ** (-r / 4) = 16, 8, 4, 2, 1.
    assert {shape: shape_counts(shape, 16, 16, 5).tolist() for shape in SHAPES} == {
        "consistent": [16, 8, 4, 2, 1],
        "uniform": [16, 16, 16, 16, 16],
        "reversed": [1, 2, 4, 8, 16],
        "middle": [1, 4, 16, 8, 2],  # peak in class ceil(5 / 2) - 1 = 2
        "head-tail": [8, 2, 1, 4, 16],  # smallest in the middle, the two largest at the ends
    }


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("num_classes, n_max_u, gamma_u", [
    (10, 4000, 150),  # the reference's CIFAR-10 runs (N 500, M 4000, gamma 150)
    (100, 400, 20),  # its CIFAR-100 runs
    (10, 30, 27),  # the reference's floats give 30 * 27 ** (-1/3) = 9.999999999999998 -> 9; exact is 10
    (7, 4000, 64),  # 4000 * 64 ** (-5/6) is 124.99999999999999 in floats; exact is 125
    (11, 400, 32),  # the same noise at r = 4 and r = 8 (exact 100 and 25)
    (7, 50, 10),
    (9, 30, 5),
    (5, 100, Fraction(5, 2)),  # a non-integer ratio
    (3, 10, 100),  # the smallest classes get no row
    (11, 1000, 1000),
    (2, 8, 4),
    (1, 9, 20),  # a single class gets n_max_u
])
def test_shape_counts_are_the_floor_of_the_tail_dealt_in_the_references_order(shape, num_classes, n_max_u, gamma_u):
    counts = shape_counts(shape, n_max_u, float(gamma_u), num_classes).tolist()
    assert counts == expected_counts(shape, n_max_u, gamma_u, num_classes)


@pytest.mark.parametrize("num_classes", [1, 2, 3, 4, 7, 8, 9, 10])
def test_middle_peaks_in_the_middle_class_and_head_tail_is_smallest_there(num_classes):
    middle = shape_counts("middle", 1000, 100, num_classes)
    head_tail = shape_counts("head-tail", 1000, 100, num_classes)
    centre = math.ceil(num_classes / 2) - 1
    assert int(np.argmax(middle)) == centre and middle[centre] == 1000
    assert int(np.argmin(head_tail)) == centre and head_tail[-1] == 1000
    assert sorted(middle) == sorted(head_tail) == sorted(shape_counts("consistent", 1000, 100, num_classes))


# --- the pool a split draws ----------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_a_shaped_pool_has_exactly_the_shape_counts_and_leaves_out_the_labeled_and_validation_rows(shared_synth,
                                                                                                    shape):
    gamma_u = None if shape == "uniform" else 4
    spec = SplitSpec("lt", 1, n_max=20, gamma_l=5, gamma_u=gamma_u, valid_size=50, unlabeled=shape, n_max_u=40)
    split = make_split(shared_synth.info, spec)
    expected = expected_counts(shape, 40, 4, 10)
    assert split.unlabeled_counts == expected
    pool = split.unlabeled_indices
    assert np.bincount(labels_of(shared_synth, pool), minlength=10).tolist() == expected
    assert len(set(pool.tolist())) == len(pool) == sum(expected)
    assert not set(pool.tolist()) & set(split.labeled_indices.tolist())
    assert not set(pool.tolist()) & set(split.valid_indices.tolist())
    # The labeled and validation rows are those of the split without a shape.
    plain = make_split(shared_synth.info, SplitSpec("lt", 1, n_max=20, gamma_l=5, valid_size=50))
    np.testing.assert_array_equal(split.labeled_indices, plain.labeled_indices)
    np.testing.assert_array_equal(split.valid_indices, plain.valid_indices)


@pytest.mark.parametrize("shape", ["middle", "head-tail", "reversed"])
def test_a_shaped_pool_of_an_odd_number_of_classes_follows_the_reference(tmp_path, shape):
    synth = write_synth(tmp_path / "data", name="seven", train_counts=[60, 58, 56, 54, 52, 50, 48])
    split = make_split(synth.info, SplitSpec("lt", 2, n_max=10, gamma_l=10, unlabeled=shape, n_max_u=38,
                                             gamma_u=7))
    expected = expected_counts(shape, 38, 7, 7)
    assert split.unlabeled_counts == expected
    assert np.bincount(labels_of(synth, split.unlabeled_indices), minlength=7).tolist() == expected
    assert split.name == f"seven_LT_10_{shape}_u7_m38.2@10"


def test_gamma_u_of_a_shape_with_a_ratio_defaults_to_gamma_l():
    assert SplitSpec("lt", 1, n_max=20, gamma_l=5, unlabeled="reversed", n_max_u=40).gamma_u == 5.0
    assert SplitSpec("lt", 1, n_max=20, gamma_l=5, unlabeled="uniform", n_max_u=40).gamma_u is None


def test_a_split_without_a_shape_keeps_the_whole_pool(shared_synth):
    split = make_split(shared_synth.info, SplitSpec("lt", 1, n_max=20, gamma_l=5))
    assert split.unlabeled_counts == SYNTH_TRAIN_COUNTS and split.spec.unlabeled is None


# --- names and the split file --------------------------------------------------------------------


def test_every_shape_has_a_name_of_its_own_that_parses_back_to_its_spec():
    specs = [SplitSpec("lt", 1, n_max=50, gamma_l=10, unlabeled=shape, n_max_u=100) for shape in SHAPES]
    names = [spec.default_name("cifar10") for spec in specs]
    assert names == ["cifar10_LT_10_consistent_u10_m100.1@50", "cifar10_LT_10_uniform_m100.1@50",
                     "cifar10_LT_10_reversed_u10_m100.1@50", "cifar10_LT_10_middle_u10_m100.1@50",
                     "cifar10_LT_10_head-tail_u10_m100.1@50"]
    assert [parse_split_name(name) for name in names] == [("cifar10", spec) for spec in specs]
    other = SplitSpec("lt", 1, n_max=50, gamma_l=10, gamma_u=2.5, unlabeled="middle", n_max_u=80, valid_size=500)
    assert other.default_name("cifar10") == "cifar10_LT_10_middle_u2.5_m80.1@50-500"
    assert parse_split_name(other.default_name("cifar10")) == ("cifar10", other)


def test_the_split_file_records_the_shape_its_ratio_and_its_counts(synth, capsys):
    assert main(["split", "synth", "--data-root", str(synth.root), "--n-max", "20", "--gamma-l", "5",
                 "--unlabeled", "middle", "--n-max-u", "30", "--seed", "3"]) == 0
    path = synth.info.path / "splits" / "synth_LT_5_middle_u5_m30.3@20.json"
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"wrote {path}"
    counts = expected_counts("middle", 30, 5, 10)
    assert out[2] == (f"unlabeled {sum(counts):>7} per class [{' '.join(map(str, counts))}] "
                      "(middle, disjoint from the labeled rows)")
    data = json.loads(path.read_text())
    assert {k: data[k] for k in ("kind", "unlabeled", "gamma_l", "gamma_u", "n_max_u")} == {
        "kind": "lt", "unlabeled": "middle", "gamma_l": 5.0, "gamma_u": 5.0, "n_max_u": 30}
    assert data["unlabeled_counts"] == counts
    assert np.bincount(labels_of(synth, data["unlabeled_indices"]), minlength=10).tolist() == counts
    loaded = load_split(synth.info, path.stem, create=False)
    assert loaded.spec == SplitSpec("lt", 3, n_max=20, gamma_l=5, unlabeled="middle", n_max_u=30)


def test_a_shaped_name_is_cut_on_first_use_like_any_original_style_name(synth):
    split = load_split(synth.info, "synth_LT_5_reversed_u4_m40.1@20-50")
    assert split.spec == SplitSpec("lt", 1, n_max=20, gamma_l=5, gamma_u=4, valid_size=50, unlabeled="reversed",
                                   n_max_u=40)
    assert split.unlabeled_counts == expected_counts("reversed", 40, 4, 10)
    assert (synth.info.path / "splits" / "synth_LT_5_reversed_u4_m40.1@20-50.json").is_file()


# --- refusals ------------------------------------------------------------------------------------


def test_a_pool_the_training_rows_cannot_supply_is_refused_in_one_line_with_exit_code_2(synth):
    # Reversed: class 8 asks for floor(100 * 10 ** (-1/9)) = 77 rows; it has 68, 3 of them labeled.
    argv = ["split", "synth", "--data-root", str(synth.root), "--n-max", "20", "--gamma-l", "10",
            "--unlabeled", "reversed", "--n-max-u", "100"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "data_prep", *argv], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.splitlines() == [
        "error: class 8 needs 77 unlabeled rows (reversed) but synth has only 65 training rows left after the "
        "labeled and validation ones (lower n_max_u)"]
    assert entries(synth.info.path / "splits") == []


def test_a_validation_set_counts_against_the_rows_a_shaped_pool_can_take(synth, cli_error):
    # Consistent: class 0 asks for 80 rows; 100 - 20 labeled - 5 validation leaves 75.
    line = cli_error("split", "synth", "--data-root", synth.root, "--n-max", "20", "--gamma-l", "5",
                     "--unlabeled", "consistent", "--n-max-u", "80", "--valid-size", "50")
    assert line == ("error: class 0 needs 80 unlabeled rows (consistent) but synth has only 75 training rows left "
                    "after the labeled and validation ones (lower n_max_u)")


@pytest.mark.parametrize("args, message", [
    (["--unlabeled", "reversed"], "unlabeled reversed needs n_max_u >= 1 (unlabeled rows of its largest class)"),
    (["--unlabeled", "middle", "--n-max-u", "0"], "unlabeled middle needs n_max_u >= 1 (unlabeled rows of its "
                                                  "largest class)"),
    (["--n-max-u", "10"], "n_max_u is only for an unlabeled shape (set unlabeled)"),
    (["--unlabeled", "uniform", "--n-max-u", "10", "--gamma-u", "5"],
     "unlabeled uniform has no ratio (n_max_u rows in every class): leave gamma_u unset (got 5)"),
    (["--unlabeled", "reversed", "--n-max-u", "10", "--gamma-u", "0.1"],
     "with unlabeled reversed gamma_u must be >= 1, got 0.1 (the shape sets the direction: reversed inverts the "
     "tail)"),
], ids=["no n_max_u", "n_max_u 0", "n_max_u alone", "uniform with gamma_u", "gamma_u < 1"])
def test_invalid_shape_parameters_are_refused_in_one_line(synth, cli_error, args, message):
    line = cli_error("split", "synth", "--data-root", synth.root, "--n-max", "10", "--gamma-l", "5", *args)
    assert line == f"error: {message}"
    assert entries(synth.info.path / "splits") == []


def test_an_unknown_shape_is_refused_in_one_line_naming_the_shapes(synth, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["split", "synth", "--data-root", str(synth.root), "--n-max", "10", "--gamma-l", "5",
              "--unlabeled", "flat", "--n-max-u", "10"])
    assert exit.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: argument --unlabeled: invalid choice: 'flat' (choose from 'consistent', 'uniform', 'reversed', "
        "'middle', 'head-tail') (see python -m data_prep split --help)"]


def test_a_shape_is_only_for_long_tailed_splits(synth, cli_error):
    line = cli_error("split", "synth", "--data-root", synth.root, "--kind", "mcar", "--size", "40",
                     "--unlabeled", "uniform", "--n-max-u", "10")
    assert line == "error: an unlabeled shape is only for lt splits"
