"""python -m study.launch: validation before Ray, dry runs, a real tiny study, resume after a kill."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
import ray
import torch
import yaml
from listening import listening, processes_with_env
from tensorboard_events import scalars

from search_spaces import SPACES, get_space
from search_spaces.spaces import is_grid
from study.checks import checked
from study.config import StudyConfig, load
from study.launch import main

TINY = {
    "dataset": "digits",
    "split": {"kind": "lt", "n_max": 20, "gamma_l": 10, "seed": 1, "valid_size": 100},
    "train": {"model": "cnn_small", "steps": 20, "eval_every": 10, "batch_size": 8, "mu": 2,
              "cap": True, "cai": True, "cadr": True},
    "space": "thresholds",
    "search": {"algorithm": "optuna", "num_samples": 1, "max_concurrent": 2, "seed": 0,
               "points_to_evaluate": [{"label": "paper defaults", "confidence": 0.95, "cai_beta": 0.5}],
               "fixed_points": [{"label": "fixmatch", "cap": False, "cai": False, "cadr": False}]},
    "scheduler": {"name": "asha", "grace_period": 2},  # 2 evaluations: ASHA stops no trial early
}
METRIC = "valid_balanced_accuracy_median_10"  # the default with a validation set


def _config(tmp_path, **changes) -> str:
    raw = json.loads(json.dumps(TINY))
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            raw[section][field] = value
        else:
            raw[section] = value
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _fails_before_ray(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert not ray.is_initialized()


@pytest.mark.parametrize("name", list(SPACES))
def test_every_named_space_passes_the_launch_checks_with_cadr(name):
    grid = {"algorithm": "grid", "num_samples": 1}
    config = StudyConfig.from_dict({**TINY, "space": name, "search": grid if is_grid(get_space(name)) else {}})
    checked(config)


EXAMPLE_STUDIES = sorted(p for p in Path(__file__).parents[2].glob("examples/*.yaml") if p.name != "cluster.yaml")


@pytest.mark.parametrize("path", EXAMPLE_STUDIES, ids=lambda p: p.name)
def test_every_example_study_passes_the_launch_checks(path):
    checked(load(str(path)))  # (examples/paper/ run for real in test_paper_configs.py)


def test_list_spaces_prints_every_space_with_its_ranges(capsys):
    assert main(["--list-spaces"]) == 0
    out = capsys.readouterr().out
    for name in SPACES:
        assert f"{name}:" in out
    assert "confidence     uniform [0.7, 0.99]" in out


def test_unknown_space_fails_before_ray(tmp_path, capsys):
    _fails_before_ray(capsys, ["--config", _config(tmp_path), "--space", "colours", "--storage", str(tmp_path)],
                      "unknown search space 'colours'")


def test_inverted_bounds_fail_before_ray(tmp_path, capsys):
    config = _config(tmp_path, space={"confidence": {"uniform": [0.9, 0.7]}})
    _fails_before_ray(capsys, ["--config", config, "--storage", str(tmp_path)],
                      "lower bound 0.9 is not below upper bound 0.7")


def test_cadr_without_cap_fails_before_ray(tmp_path, capsys):
    config = _config(tmp_path, train={**TINY["train"], "cap": False})
    _fails_before_ray(capsys, ["--config", config, "--storage", str(tmp_path)], "cadr=True requires cap=True")


def test_unknown_metric_fails_before_ray(tmp_path, capsys):
    _fails_before_ray(capsys, ["--config", _config(tmp_path), "--metric", "f1", "--storage", str(tmp_path)],
                      "metric must be one of valid_accuracy, valid_accuracy_median_10, ")


def test_unknown_trainer_fails_before_ray(tmp_path, capsys):
    _fails_before_ray(capsys, ["--config", _config(tmp_path, resources={"trainer": "threads"}),
                               "--storage", str(tmp_path)],
                      "resources.trainer must be one of auto, torch_trainer, in_trial, got 'threads'")


def test_in_trial_with_two_workers_fails_before_ray(tmp_path, capsys):
    config = _config(tmp_path, resources={"trainer": "in_trial"})
    _fails_before_ray(capsys, ["--config", config, "--num-workers", "2", "--storage", str(tmp_path)],
                      "in_trial runs one worker")


@pytest.mark.parametrize("search, storage, message", [
    ({"storage": "optuna.db"}, None, "search.storage must be a database URL Optuna can use (sqlite, postgresql, "
                                     "mysql), e.g. sqlite:///{study}/optuna.db; got 'optuna.db'"),
    ({"storage": "sqlite:///{study}/optuna.db"}, "s3://bucket/studies",
     "search.storage sqlite:///{study}/optuna.db puts a database file in the study directory, but studies live "
     "at s3://bucket/studies; give the database a local path or a server URL instead"),
    ({"storage": "sqlite:///optuna.db", "algorithm": "grid"}, None, "a grid search has none"),
])
def test_an_optuna_storage_the_study_cannot_use_fails_before_ray(tmp_path, capsys, search, storage, message):
    changes = {"search": {**TINY["search"], **search}}
    if search.get("algorithm") == "grid":
        changes.update(space="ablation", search={"algorithm": "grid", "storage": search["storage"]})
    argv = ["--config", _config(tmp_path, **changes), "--name", "s", "--dry-run",
            "--storage", storage or str(tmp_path / "studies")]
    _fails_before_ray(capsys, argv, message)


PLAIN = "must be a plain name, one entry under its root (not empty, no '/' or '\\', not starting with '.'), got "


@pytest.mark.parametrize("argv, message", [
    (["--name", "../../elsewhere"], f"name {PLAIN}'../../elsewhere'"),
    (["--name", "a/b"], f"name {PLAIN}'a/b'"),
    (["--name", ".."], f"name {PLAIN}'..'"),
    (["--name", ".hidden"], f"name {PLAIN}'.hidden'"),
    (["--name", ""], f"name {PLAIN}''"),
    (["--set", "dataset=../digits"], f"dataset {PLAIN}'../digits'"),
])
def test_a_name_that_would_leave_its_root_is_refused_before_anything_is_written(tmp_path, capsys, argv, message):
    storage = tmp_path / "nest" / "studies"
    _fails_before_ray(capsys, ["--config", _config(tmp_path), "--storage", str(storage), "--data-root",
                               str(tmp_path / "nest" / "data"), *argv], message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"]  # no storage, data root or "elsewhere"


def test_unwritable_storage_fails_before_ray(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    _fails_before_ray(capsys, ["--config", _config(tmp_path), "--storage", str(blocker / "sub")], "is not writable")


@pytest.mark.ray
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("resources, extra, needed", [({}, ["--use-gpu"], "1"),
                                                      ({"gpus_per_worker": 0.25}, [], "0.25")])
def test_use_gpu_on_a_local_machine_without_one_fails_before_any_trial(tmp_path, capsys, resources, extra, needed):
    argv = ["--config", _config(tmp_path, resources=resources), "--storage", str(tmp_path / "studies"),
            "--name", "gpu", "--data-root", str(tmp_path / "data"), *extra]
    try:
        assert main(argv) == 2
    finally:
        ray.shutdown()
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: num_workers=1 with use_gpu needs {needed} GPU(s) per run; the cluster has 0"
    assert not list((tmp_path / "studies" / "gpu").glob("trial_*"))


def test_dry_run_prints_the_plan_and_trains_nothing(tmp_path, capsys):
    argv = ["--config", _config(tmp_path), "--storage", str(tmp_path / "studies"), "--name", "plan",
            "--data-root", str(tmp_path / "data"), "--dry-run"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "trials: 2 (1 fixed, the rest from optuna)" in out
    assert "search confidence: uniform [0.7, 0.99]" in out
    assert "dry run: nothing was trained" in out
    assert not (tmp_path / "studies" / "plan").exists()
    assert not ray.is_initialized()


def test_grid_repeats_train_with_their_own_seeds(tmp_path, capsys):
    config = _config(tmp_path, space={"variant": {"grid": ["fixmatch", "cadr"]}},
                     search={"algorithm": "grid", "num_samples": 3, "max_concurrent": 1},
                     train={**TINY["train"], "seed": 5})
    argv = ["--config", config, "--storage", str(tmp_path / "studies"), "--data-root", str(tmp_path / "data"),
            "--dry-run"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "trials: 6 (0 fixed, the rest from grid)" in out
    assert "search seed: each of {5, 6, 7}" in out


def test_repeating_a_grid_that_sweeps_seed_is_refused(tmp_path, capsys):
    config = _config(tmp_path, space="ablation", search={"algorithm": "grid", "num_samples": 2, "max_concurrent": 1})
    _fails_before_ray(capsys, ["--config", config, "--storage", str(tmp_path)],
                      "search.num_samples=2 repeats a grid that already sweeps seed")


def _launch(tmp_path, name, *extra, config=None, log=None, env=None):
    """Start the launcher as a subprocess; its output goes to `log` (a pipe nobody reads would
    fill up and stall it) or, when no log is given, to a pipe for communicate()."""
    argv = [sys.executable, "-m", "study.launch", "--config", config or _config(tmp_path),
            "--storage", str(tmp_path / "studies"), "--name", name, "--data-root", str(tmp_path / "data"), *extra]
    return subprocess.Popen(argv, stdout=log or subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})


def _results(trial_dir: Path) -> list[dict]:
    path = trial_dir / "result.json"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


@pytest.mark.ray
@pytest.mark.parametrize("trainer, uri", [("in_trial", True), ("torch_trainer", False)])
def test_a_tiny_study_runs_end_to_end_and_reports_what_tune_recorded(tmp_path, trainer, uri, request):
    # Storage given as a file:// URI goes through the same pyarrow filesystem code as s3:// or gs://.
    storage = f"file://{tmp_path / 'studies'}" if uri else str(tmp_path / "studies")
    # The in-trial study starts its own local Ray, as the default study does; the TorchTrainer
    # study joins a running one, as on a cluster.
    address = [] if trainer == "in_trial" else ["--address", request.getfixturevalue("ray_address")]
    process = _launch(tmp_path, "tiny", "--storage", storage, *address,
                      config=_config(tmp_path, resources={"trainer": trainer}))
    out, _ = process.communicate(timeout=600)
    assert process.returncode == 0, out[-3000:]
    study = tmp_path / "studies" / "tiny"
    trials = sorted(study.glob("trial_*"))
    assert len(trials) == 2
    recorded = {}
    for trial in trials:
        results = _results(trial)
        assert [r["step"] for r in results] == [10, 20]
        # TensorBoard: the training step on the x-axis and the metrics' own names, as a single
        # run writes them; the trial's label among its HParams.
        written = scalars(trial)
        assert sorted(written["test_accuracy"]) == [10, 20] and sorted(written["loss/total"]) == [10, 20]
        assert written["test_accuracy"][20] == pytest.approx(results[-1]["test_accuracy"], rel=1e-6)
        assert not any(tag.startswith("ray/tune/") for tag in written)
        recorded[results[-1]["trial_id"]] = results[-1]
    with open(study / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    for row in rows:
        last = recorded[row["trial_id"]]
        for split in ("valid", "test"):
            for measure in ("accuracy", "gm", "balanced_accuracy"):
                assert float(row[f"{split}_{measure}_last"]) == pytest.approx(last[f"{split}_{measure}"], abs=1e-6)
                assert float(row[f"{split}_{measure}_median_10"]) == pytest.approx(
                    last[f"{split}_{measure}_median_10"], abs=1e-6)
    # Best first by the validation metric; the winner's test numbers stand beside it.
    assert [float(r[METRIC]) for r in rows] == sorted((float(r[METRIC]) for r in rows), reverse=True)
    labels = sorted(row["label"] for row in rows)
    assert labels == ["fixmatch", "paper defaults"]  # a named starting point keeps its name
    text = (study / "report.md").read_text()
    winner = rows[0]
    assert f"- Best: trial {winner['trial_id']} (" in text
    assert (f"{METRIC} {100 * float(winner[METRIC]):.1f}; test accuracy "
            f"{100 * float(winner['test_accuracy_median_10']):.1f}, GM {100 * float(winner['test_gm_median_10']):.1f}"
            ) in text
    assert text.count("|") > 10
    assert (study / "plots" / "history.png").stat().st_size > 0
    record = json.loads((study / "study.json").read_text())
    assert record["dataset"]["name"] == "digits" and record["swept"] == ["confidence", "cai_beta"]
    assert record["versions"]["ray"] == ray.__version__
    assert (record["metric"], record["mode"], record["selected_on"]) == (METRIC, "max", "valid")
    # What Tune itself recorded: the controller's metric, the searcher's, and the Tuner's, which
    # the ASHA scheduler takes (it was given no metric of its own).
    assert tune_recorded_metrics(study) == {"controller": METRIC, "searcher": (METRIC, "max"),
                                            "scheduler": ("AsyncHyperBandScheduler", None, None),
                                            "tuner": (METRIC, "max")}
    assert f"tensorboard --logdir {study}" in out
    # A TorchTrainer trial keeps its Train run (and checkpoints) under train_runs/<trial id>;
    # an in-trial run checkpoints into its Tune trial directory.
    train_runs = sorted(p.name for p in (study / "train_runs").glob("*")) if (study / "train_runs").exists() else []
    if trainer == "torch_trainer":
        assert train_runs == sorted(recorded)
        # The trials' TorchTrainers took their shards from datasets the launcher decoded once.
        assert out.count("decoded once for every trial") == 1
    else:
        assert train_runs == [] and all(list(t.glob("checkpoint_*")) for t in trials)


@pytest.mark.ray
def test_a_study_that_mixes_methods_reports_each_under_its_name(tmp_path, ray_address):
    # The base trains CADR; a trial of another method starts from that method's own defaults.
    space = {"method": {"grid": ["fixmatch", "flexmatch", "freematch", "softmatch", "debiaspl"]}}
    config = _config(tmp_path, space=space, search={"algorithm": "grid", "num_samples": 1, "max_concurrent": 2},
                     train={**TINY["train"], "steps": 10, "eval_every": 10})
    process = _launch(tmp_path, "methods", "--address", ray_address, config=config)
    out, _ = process.communicate(timeout=600)
    assert process.returncode == 0, out[-3000:]
    study = tmp_path / "studies" / "methods"
    with open(study / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(row["method"] for row in rows) == ["CADR", "DebiasPL", "FlexMatch", "FreeMatch", "SoftMatch"]
    for row in rows:
        assert row["status"] == "TERMINATED" and float(row["test_accuracy_last"]) >= 0
        flags = [row[flag] for flag in ("cap", "cai", "cadr")]
        assert flags == (["True"] * 3 if row["method"] == "CADR" else [""] * 3), row
    # Each trial's TensorBoard curves hold its own method's per-class state.
    by_method = {row["method"]: row["trial_id"] for row in rows}
    results = {m: _results(study / f"trial_{trial_id}")[-1] for m, trial_id in by_method.items()}
    assert "p_ema/0" in results["CADR"] and "classwise_acc/0" in results["FlexMatch"]
    assert "qhat/0" in results["DebiasPL"] and "p_model/0" in results["FreeMatch"]
    text = (study / "report.md").read_text()
    for method in by_method:
        assert f"| {method} |" in text


@pytest.mark.ray
def test_trials_that_diverge_are_not_retried_and_the_launch_ends_with_one_line(tmp_path, ray_address):
    config = _config(tmp_path, train={**TINY["train"], "lr": 1e6})
    process = _launch(tmp_path, "diverging", "--address", ray_address, config=config)
    out, _ = process.communicate(timeout=600)
    assert process.returncode == 2, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(
        "error: no trial of study diverging finished; the first failure: training diverged: "), errors
    study = tmp_path / "studies" / "diverging"
    with open(study / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(row["status"] == "ERROR" for row in rows)
    assert all(row["error"].startswith("training diverged: ") for row in rows)
    for trial in study.glob("trial_*"):
        assert [result.get("fatal_error", "")[:18] for result in _results(trial)] == ["training diverged:"]  # once


@pytest.mark.ray
def test_two_launches_of_one_study_started_together_run_it_once(tmp_path, ray_address):
    config = _config(tmp_path, search={**TINY["search"], "fixed_points": []})
    first, second = (_launch(tmp_path, "twice", "--address", ray_address, config=config) for _ in range(2))
    outs = [process.communicate(timeout=600)[0] for process in (first, second)]
    codes = sorted(process.returncode for process in (first, second))
    assert codes == [0, 2], outs
    refused = outs[[first.returncode, second.returncode].index(2)]
    errors = [line for line in refused.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "is being run by another driver" in errors[0], refused[-2000:]
    assert "Traceback" not in refused
    trials = sorted((tmp_path / "studies" / "twice").glob("trial_*"))
    assert len(trials) == 1  # one trial: nobody ran the study twice


def tune_recorded_metrics(study: Path) -> dict:
    """The metric (and mode) Tune's own saved state says the experiment optimised: the controller's
    (experiment_state JSON), the Optuna searcher's (searcher state), and the Tuner's scheduler's."""
    import pickle

    state = json.loads(sorted(study.glob("experiment_state-*.json"))[-1].read_text())
    with open(sorted(study.glob("searcher-state-*.pkl"))[-1], "rb") as f:
        searcher = pickle.load(f)
    with open(study / "tuner.pkl", "rb") as f:
        tune_config = pickle.load(f)["_tune_config"]
    return {"controller": state["runner_data"]["_metric"], "searcher": (searcher["_metric"], searcher["_mode"]),
            "scheduler": (type(tune_config.scheduler).__name__, tune_config.scheduler._metric,
                          tune_config.scheduler._mode),
            "tuner": (tune_config.metric, tune_config.mode)}


@pytest.mark.ray
def test_a_study_without_a_validation_set_warns_once_and_its_report_says_it_selected_on_test(tmp_path, ray_address):
    config = _config(tmp_path, split={**TINY["split"], "valid_size": 0})
    process = _launch(tmp_path, "on-test", "--address", ray_address, config=config)
    out, _ = process.communicate(timeout=600)
    assert process.returncode == 0, out[-3000:]
    warnings = [line for line in out.splitlines() if "selects its winner on the test split" in line]
    assert warnings == ["warning: this study selects its winner on the test split (the split has no validation "
                        "set), so the winner's test number is optimistic; set split.valid_size and a valid_ "
                        "metric to select on validation"]
    study = tmp_path / "studies" / "on-test"
    record = json.loads((study / "study.json").read_text())
    assert (record["metric"], record["selected_on"]) == ("test_balanced_accuracy_median_10", "test")
    assert tune_recorded_metrics(study)["searcher"] == ("test_balanced_accuracy_median_10", "max")
    lines = (study / "report.md").read_text().splitlines()
    assert lines[2].startswith("**Selected on the test split**")
    with open(study / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert all(row["valid_accuracy_median_10"] == "" for row in rows)


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
    from data_prep.convert import prepare

    root = tmp_path_factory.mktemp("data")
    prepare("digits", root)
    return str(root)


def test_a_valid_metric_on_a_split_without_validation_fails_before_ray(tmp_path, capsys, digits_root):
    config = _config(tmp_path, split={**TINY["split"], "valid_size": 5})  # fewer rows than classes: none
    _fails_before_ray(capsys, ["--config", config, "--metric", "valid_gm_median_10", "--storage", str(tmp_path),
                               "--data-root", digits_root],
                      "metric valid_gm_median_10 needs a validation set, but the split has none")


def test_a_validation_request_the_dataset_cannot_supply_fails_before_ray(tmp_path, capsys, digits_root):
    config = _config(tmp_path, split={**TINY["split"], "valid_size": 1500})
    _fails_before_ray(capsys, ["--config", config, "--storage", str(tmp_path), "--data-root", digits_root],
                      "validation rows but digits has only")


@pytest.mark.parametrize("space, message", [
    ({"confidence": {"uniform": [0.0, 0.9]}},
     "space parameter confidence=0.0 would fail in training: confidence must be in (0, 1], got 0.0"),
    ({"cap_momentum": {"uniform": [0.9, 1.0]}},
     "space parameter cap_momentum=1.0 would fail in training: cap_momentum must be in [0, 1), got 1.0"),
    ({"lr": {"choice": [0.03, 0]}}, "space parameter lr=0 would fail in training: lr must be > 0, got 0"),
    ({"upper": {"grid": [5.0, 0.0]}}, "space parameter upper=0.0 would fail in training: upper must be > 0"),
    ({"gamma_l": {"uniform": [10, 50]}}, "space parameter gamma_l: use choice or grid values"),
])
def test_every_value_a_space_can_produce_is_checked_by_training_before_ray(tmp_path, capsys, space, message):
    algorithm = "grid" if "grid" in str(space) else "optuna"
    config = _config(tmp_path, space=space, search={**TINY["search"], "algorithm": algorithm,
                                                    "fixed_points": [] if algorithm == "grid" else
                                                    TINY["search"]["fixed_points"]})
    _fails_before_ray(capsys, ["--config", config, "--storage", str(tmp_path)], message)


def test_a_combination_of_space_values_training_rejects_fails_before_ray(tmp_path, capsys):
    # Each value alone is fine with the base (cap on, cadr off); cap off with cadr on is not.
    space = {"cap": {"choice": [True, False]}, "cadr": {"choice": [False, True]}}
    config = _config(tmp_path, space=space, train={**TINY["train"], "cadr": False})
    _fails_before_ray(capsys, ["--config", config, "--storage", str(tmp_path)],
                      "space values {'cadr': True, 'cap': False} would fail in training together: "
                      "cadr=True requires cap=True")


def test_a_parameter_of_every_variant_that_runs_is_accepted_whatever_the_base_method(tmp_path, capsys, digits_root):
    # The base trains CADR (fixmatch), which has no ema_m; both variants that run have it.
    space = {"variant": {"grid": ["freematch", "softmatch"]}, "ema_m": {"grid": [0.9, 0.99]}}
    config = _config(tmp_path, space=space, search={"algorithm": "grid", "num_samples": 1, "max_concurrent": 1})
    assert main(["--config", config, "--storage", str(tmp_path / "studies"), "--data-root", digits_root,
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "trials: 4 (0 fixed, the rest from grid)" in out and "search ema_m: each of {0.9, 0.99}" in out


@pytest.mark.parametrize("variant", [{"choice": ["freematch", "cadr"]}, {"grid": ["freematch", "cadr"]}])
def test_a_parameter_a_variant_that_runs_does_not_have_fails_before_ray_naming_the_variant(tmp_path, capsys,
                                                                                           variant):
    space = {"variant": variant, "ema_m": {"uniform": [0.9, 0.99]}}
    config = _config(tmp_path, space=space, search={**TINY["search"], "points_to_evaluate": [], "fixed_points": []})
    _fails_before_ray(capsys, ["--config", config, "--storage", str(tmp_path)],
                      "space parameter ema_m=0.9 would fail in training with variant cadr: ema_m: not an option of "
                      "method fixmatch")


def test_a_parameter_no_training_option_or_method_has_fails_before_ray(tmp_path, capsys):
    _fails_before_ray(capsys, ["--config", _config(tmp_path, space={"colour": {"choice": ["red"]}}),
                               "--storage", str(tmp_path)], "unknown space parameter(s) colour (searchable: ")


@pytest.mark.parametrize("where", ["fixed_points", "points_to_evaluate"])
def test_a_search_point_training_rejects_fails_before_ray_naming_it(tmp_path, capsys, where):
    point = {"cai_beta": 0.5, "confidence": 0.0}  # YAML writes keys sorted
    search = {**TINY["search"], where: [point]}
    _fails_before_ray(capsys, ["--config", _config(tmp_path, search=search), "--storage", str(tmp_path)],
                      f"search.{where} entry {point}: confidence must be in (0, 1], got 0.0")


def _terminated_in_experiment_state(study: Path) -> list[str]:
    """Trial directories Tune's saved experiment state records as finished (what --resume keeps)."""
    states = sorted(study.glob("experiment_state-*.json"))
    try:
        entries = json.loads(states[-1].read_text())["trial_data"] if states else []
    except (OSError, ValueError, KeyError):
        return []  # being rewritten; ask again
    trials = [json.loads(entry[0]) for entry in entries]
    return [t["relative_logdir"] for t in trials if t.get("status") == "TERMINATED"]


@pytest.mark.ray
def test_killed_driver_resumes_and_keeps_finished_trials(tmp_path):
    # The Optuna study lives in a database too (search.storage): it must outlive the driver.
    config = _config(tmp_path, search__num_samples=2, search__max_concurrent=1, scheduler={"name": "none"},
                     search__storage="sqlite:///{study}/optuna.db",
                     train={**TINY["train"], "steps": 60, "eval_every": 10})  # every trial runs its 60 steps
    log = open(tmp_path / "first-launch.log", "w")  # noqa: SIM115 (closed after the kill, below)
    # Every process of the Ray the launcher starts inherits its environment: this marks them all.
    marker = f"STUDY_TEST_DRIVER={uuid.uuid4().hex}"
    process = _launch(tmp_path, "killed", config=config, log=log, env=dict([marker.split("=")]))
    study = tmp_path / "studies" / "killed"
    deadline = time.time() + 400
    finished = None
    sockets = set()  # every socket the launcher's own Ray listens on, seen while the study runs
    try:
        while time.time() < deadline and finished is None and process.poll() is None:
            time.sleep(1)
            sockets |= set(listening(processes_with_env(marker)))
            terminated = _terminated_in_experiment_state(study)
            finished = study / terminated[0] if terminated else None
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        log.close()
    assert finished is not None, "no trial finished before the deadline"
    # Local means local: all of it on the loopback interface.
    servers = {name.rsplit("/", 1)[-1] for _, _, _, name in sockets}
    assert {"gcs_server", "raylet"} <= servers, sockets  # (Python processes may not have their titles yet)
    assert {address for address, *_ in sockets} <= {"127.0.0.1", "::1"}, sockets
    # A killed driver leaves nothing of its Ray listening (its agents notice within a minute or so).
    deadline = time.time() + 180
    while (left := listening(processes_with_env(marker))) and time.time() < deadline:
        time.sleep(2)
    assert not left, left
    finished_results = (finished / "result.json").read_text()

    process = _launch(tmp_path, "killed", "--resume", config=config)
    out, _ = process.communicate(timeout=600)
    assert process.returncode == 0, out[-3000:]
    # A trial killed before the driver logged it (no params.json) can leave a directory holding
    # only the checkpoint its actor wrote; Tune runs that suggestion again as a new trial.
    logged = [p for p in study.glob("trial_*") if (p / "params.json").exists()]
    for orphan in set(study.glob("trial_*")) - set(logged):
        assert not (orphan / "result.json").exists()
    trials = sorted(logged)
    assert len(trials) == 3
    assert (finished / "result.json").read_text() == finished_results  # not run again
    for trial in trials:
        assert _results(trial)[-1]["step"] == 60
    with open(study / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    # Optuna's own study holds the searched trials (not the fixed point, outside its space), each
    # finished with the value the report ranks it by, across the restart.
    searched = sorted(float(row[METRIC]) for row in rows if row["label"] != "fixmatch")
    database = optuna.load_study(study_name="killed", storage=f"sqlite:///{study}/optuna.db")
    complete = [t for t in database.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.value for t in complete) == pytest.approx(searched, abs=1e-6)
    assert {tuple(sorted(t.params)) for t in complete} == {("cai_beta", "confidence")}


def test_set_overrides_any_key_after_the_file_and_the_options(tmp_path, capsys, digits_root):
    argv = ["--config", _config(tmp_path), "--storage", str(tmp_path / "studies"), "--data-root", digits_root,
            "--dry-run", "--steps", "5", "--set", "train.steps=7", "--set", "train.batch_size=4",
            "--set", "resources.use_gpu=false", "--set", "resources.cpus_per_worker=null",
            "--set", "search.fixed_points=[]", "--set", "split.n_max=12"]
    assert main(argv) == 0
    plan = yaml.safe_load(capsys.readouterr().out.split("\nstudy directory:")[0].removeprefix("resolved config:\n"))
    assert (plan["train"]["steps"], plan["train"]["batch_size"], plan["train"]["mu"]) == (7, 4, 2)
    assert (plan["resources"]["use_gpu"], plan["resources"]["cpus_per_worker"]) == (False, None)
    assert plan["search"]["fixed_points"] == [] and plan["split"]["n_max"] == 12


@pytest.mark.parametrize("assignment, message", [
    ("train.colour=red", "unknown training option(s): colour"),
    ("resources.gpus=1", "unknown key(s) in 'resources': gpus"),
    ("colour=red", "unknown study key(s): colour"),
    ("space.confidence=0.9", "--set space.confidence: space is 'thresholds', not a mapping"),
    ("train.batch_size", "--set 'train.batch_size': expected KEY=VALUE"),
    ("train..mu=2", "--set 'train..mu=2': expected KEY=VALUE"),
    ("train.mu=[1", "--set train.mu: '[1' is not a YAML value"),
])
def test_a_bad_set_fails_before_ray_in_one_line(tmp_path, capsys, assignment, message):
    _fails_before_ray(capsys, ["--config", _config(tmp_path), "--storage", str(tmp_path), "--set", assignment],
                      message)


@pytest.mark.parametrize("command", ["study.launch", "trainables.run"])
def test_each_flag_says_its_default_once_and_no_bare_type_name(command):
    import importlib

    from trainables.methods import METHODS

    parser = importlib.import_module(command).build_parser()
    for action in parser._actions:
        text = action.help or ""
        # An option several methods declare says each method's default, one after another.
        name = action.dest
        declarations = sum(name in method.options for method in METHODS.values()) or 1
        assert text.count("(default:") <= declarations, (action.option_strings, text)
        assert not any(bare in text for bare in ("a object", "(a str)", "; a str)")), (action.option_strings, text)
    if command == "study.launch":
        space = next(action for action in parser._actions if "--space" in action.option_strings)
        assert space.help.endswith("(default: thresholds; in a compare study each method's own space)")
