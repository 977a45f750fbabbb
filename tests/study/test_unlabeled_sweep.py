"""A study over the unlabeled shape (docs/method.md, "Unlabeled shapes"): `split.unlabeled` in the
study file, a grid over it cut into one split per shape before any trial starts, each trial
training on its own shape's split, and the report grouping and listing trials by shape. Nothing
here starts Ray."""

from pathlib import Path

import pytest
import ray
import yaml

from data_prep.parquet import open_dataset
from data_prep.splits import load_split, shape_counts
from study.checks import checked, planned_trials
from study.config import StudyConfig
from study.launch import main
from study.report import TrialRecord
from study.report.ranking import Report, _groups, _param_columns
from study.splits import prepare_splits, split_parameters

SHAPES = ["consistent", "uniform", "reversed", "middle", "head-tail"]
STUDY = {
    "dataset": "digits",
    "split": {"kind": "lt", "n_max": 20, "gamma_l": 10, "seed": 1, "valid_size": 100, "n_max_u": 40},
    "train": {"model": "cnn_small", "steps": 20, "eval_every": 10, "batch_size": 8, "mu": 2},
    "space": {"unlabeled": {"grid": SHAPES}},
    "search": {"algorithm": "grid", "num_samples": 1, "max_concurrent": 1},
    "scheduler": {"name": "none"},
}
# digits_LT_10 with n_max 20, 100 validation rows and a pool of at most 40 rows per class.
NAMES = [f"digits_LT_10_{shape}{'' if shape == 'uniform' else '_u10'}_m40.1@20-100" for shape in SHAPES]


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
    from data_prep.convert import prepare

    root = tmp_path_factory.mktemp("data")
    prepare("digits", root)
    return str(root)


def study_file(tmp_path, **sections) -> str:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({**STUDY, **sections}))
    return str(path)


def fails_before_ray(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert not ray.is_initialized()
    return err[0]


# --- cutting the splits --------------------------------------------------------------------------


def test_a_grid_over_unlabeled_cuts_one_split_per_shape_and_each_trial_trains_on_its_own(digits_root):
    config, space = checked(StudyConfig.from_dict({**STUDY, "data_root": digits_root}))
    assert config.search.algorithm == "grid" and planned_trials(config, space) == 5
    params = split_parameters(config, space)
    assert params == [{"unlabeled": shape} for shape in SHAPES]
    splits = prepare_splits(config, space)
    assert list(splits) == NAMES
    info = open_dataset("digits", digits_root)
    labeled = {tuple(split["labeled_counts"]) for split in splits.values()}
    assert len(labeled) == 1  # one labeled set, five pools
    for shape, name, trial in zip(SHAPES, NAMES, params):
        assert config.train_config(trial).split == name
        split = load_split(info, name, create=False)
        assert (split.spec.unlabeled, split.spec.n_max_u) == (shape, 40)
        assert split.spec.gamma_u == (None if shape == "uniform" else 10)
        assert splits[name]["unlabeled_counts"] == split.unlabeled_counts == shape_counts(shape, 40, 10, 10).tolist()
        assert not set(split.unlabeled_indices.tolist()) & set(split.labeled_indices.tolist())


def test_a_grid_over_unlabeled_and_gamma_l_cuts_every_combination():
    config = StudyConfig.from_dict({**STUDY, "space": {"gamma_l": {"grid": [10, 50]}, "unlabeled": {"grid": SHAPES}}})
    config, space = checked(config)
    params = split_parameters(config, space)
    assert params == [{"gamma_l": g, "unlabeled": s} for g in (10, 50) for s in SHAPES]
    names = {config.split_spec(p).default_name("digits") for p in params}
    assert len(names) == 10
    assert "digits_LT_50_reversed_u50_m40.1@20-100" in names  # a shape's ratio follows the trial's gamma_l


def test_a_base_split_with_a_shape_is_every_trials_split():
    config = StudyConfig.from_dict({**STUDY, "split": {**STUDY["split"], "unlabeled": "head-tail", "gamma_u": 5},
                                    "space": "thresholds", "search": {}})
    assert split_parameters(config, config.resolved_space()) == [{}]
    assert config.train_config({"confidence": 0.9}).split == "digits_LT_10_head-tail_u5_m40.1@20-100"


def test_a_dry_run_cuts_the_five_splits_before_any_trial(tmp_path, capsys, digits_root):
    argv = ["--config", study_file(tmp_path), "--storage", str(tmp_path / "studies"), "--data-root", digits_root,
            "--name", "shapes", "--dry-run"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "search unlabeled: each of {consistent, uniform, reversed, middle, head-tail}" in out
    for name in NAMES:
        assert f"split {name}: " in out
    assert not ray.is_initialized()


# --- refusals, before Ray starts -----------------------------------------------------------------


def test_an_unknown_shape_in_the_study_file_fails_in_one_line_naming_the_shapes(tmp_path, capsys):
    config = study_file(tmp_path, split={**STUDY["split"], "unlabeled": "flat"}, space="thresholds", search={})
    line = fails_before_ray(capsys, ["--config", config, "--storage", str(tmp_path)])
    assert line == ("error: split.unlabeled must be one of consistent, uniform, reversed, middle, head-tail, "
                    "got 'flat'")


def test_an_unknown_shape_in_the_space_fails_in_one_line_naming_the_shapes(tmp_path, capsys):
    config = study_file(tmp_path, space={"unlabeled": {"grid": ["reversed", "flat"]}})
    line = fails_before_ray(capsys, ["--config", config, "--storage", str(tmp_path)])
    assert line == ("error: space parameter unlabeled='flat' would fail in the split: unknown unlabeled shape "
                    "'flat' (known: consistent, uniform, reversed, middle, head-tail)")


@pytest.mark.parametrize("changes, message", [
    ({"space": {"unlabeled": {"grid": SHAPES}, "gamma_u": {"grid": [5, 10]}}},
     "error: space values {'gamma_u': 5, 'unlabeled': 'uniform'} would fail in the split together: unlabeled "
     "uniform has no ratio (n_max_u rows in every class): leave gamma_u unset (got 5)"),
    ({"split": {**STUDY["split"], "n_max_u": None}},
     "error: space parameter unlabeled='consistent' would fail in the split: unlabeled consistent needs "
     "n_max_u >= 1 (unlabeled rows of its largest class)"),
    ({"space": "thresholds", "search": {}},
     "error: split.n_max_u sizes an unlabeled shape: set split.unlabeled, or sweep unlabeled in the space"),
    ({"space": {"unlabeled": {"uniform": [0, 1]}}},
     "error: space parameter unlabeled: use choice or grid values (each value gets its own split, cut before "
     "the study starts)"),
], ids=["uniform with gamma_u", "no n_max_u", "n_max_u without a shape", "a range of shapes"])
def test_shape_settings_the_split_refuses_fail_in_one_line(tmp_path, capsys, changes, message):
    line = fails_before_ray(capsys, ["--config", study_file(tmp_path, **changes), "--storage", str(tmp_path)])
    assert line == message


def test_a_pool_the_dataset_cannot_supply_fails_before_any_trial(tmp_path, capsys, digits_root):
    config = study_file(tmp_path, split={**STUDY["split"], "n_max_u": 500})
    line = fails_before_ray(capsys, ["--config", config, "--storage", str(tmp_path / "studies"),
                                     "--data-root", digits_root])
    assert line.startswith("error: class 0 needs 500 unlabeled rows (consistent) but digits has only ")
    assert line.endswith(" training rows left after the labeled and validation ones (lower n_max_u)")


# --- the report ----------------------------------------------------------------------------------


def shape_trial(i, shape, seed, score) -> TrialRecord:
    return TrialRecord(f"t{i}", {"variant": "cadr", "unlabeled": shape, "seed": seed, "label": "grid"}, "TERMINATED",
                       [{"step": 20, "valid_gm_median_10": score, "test_accuracy_median_10": score - 0.1}])


def test_the_report_groups_trials_by_shape_and_report_csv_has_a_column_for_it():
    swept = ["unlabeled", "variant", "seed"]
    trials = [shape_trial(0, "reversed", 0, 0.5), shape_trial(1, "reversed", 1, 0.7),
              shape_trial(2, "middle", 0, 0.9), shape_trial(3, "middle", 1, 0.8)]
    groups = _groups(trials, "valid_gm_median_10", "max", swept)
    assert [(g.name, g.seeds) for g in groups] == [("cadr, unlabeled=middle", [0, 1]),
                                                   ("cadr, unlabeled=reversed", [0, 1])]
    assert groups[0].score == pytest.approx(0.85) and groups[1].score == pytest.approx(0.6)
    report = Report(Path("shapes"), "shapes", {"swept": swept}, "valid_gm_median_10", "max", trials,
                    _param_columns(trials, swept), groups)
    assert [(row["trial_id"], row["unlabeled"]) for row in report.rows()] == [
        ("t0", "reversed"), ("t1", "reversed"), ("t2", "middle"), ("t3", "middle")]


def test_the_report_resolves_each_trials_split_from_its_shape():
    config = StudyConfig.from_dict(STUDY)
    trial = shape_trial(0, "head-tail", 0, 0.5)
    trial.resolve(config)
    assert trial.train.split == "digits_LT_10_head-tail_u10_m40.1@20-100"
