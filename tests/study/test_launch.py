"""python -m study.launch: validation before Ray, dry runs, a real tiny study, resume after a kill."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import torch
import yaml

from search_spaces import SPACES, get_space, validate_space
from study.launch import main

TINY = {
    "dataset": "digits",
    "split": {"kind": "lt", "n_max": 20, "gamma_l": 10, "seed": 1},
    "train": {"model": "cnn_small", "steps": 20, "eval_every": 10, "batch_size": 8, "mu": 2,
              "cap": True, "cai": True, "cadr": True},
    "space": "thresholds",
    "search": {"algorithm": "optuna", "num_samples": 1, "max_concurrent": 2, "seed": 0,
               "fixed_points": [{"label": "fixmatch", "cap": False, "cai": False, "cadr": False}]},
    "scheduler": {"name": "none", "metric": "accuracy", "mode": "max"},
}


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
def test_every_named_space_validates(name):
    validate_space(get_space(name), {"cap": True, "cai": True, "cadr": True})


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
                      "unknown metric 'f1'")


def test_unknown_trainer_fails_before_ray(tmp_path, capsys):
    _fails_before_ray(capsys, ["--config", _config(tmp_path, resources={"trainer": "threads"}),
                               "--storage", str(tmp_path)], "unknown resources.trainer 'threads'")


def test_in_trial_with_two_workers_fails_before_ray(tmp_path, capsys):
    config = _config(tmp_path, resources={"trainer": "in_trial"})
    _fails_before_ray(capsys, ["--config", config, "--num-workers", "2", "--storage", str(tmp_path)],
                      "in_trial runs one worker")


def test_unwritable_storage_fails_before_ray(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    _fails_before_ray(capsys, ["--config", _config(tmp_path), "--storage", str(blocker / "sub")], "is not writable")


@pytest.mark.ray
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_use_gpu_on_a_local_machine_without_one_fails_before_any_trial(tmp_path, capsys):
    argv = ["--config", _config(tmp_path), "--storage", str(tmp_path / "studies"), "--name", "gpu",
            "--data-root", str(tmp_path / "data"), "--use-gpu"]
    try:
        assert main(argv) == 2
    finally:
        ray.shutdown()
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: use_gpu with num_workers=1 needs 1 GPU(s) per trial; this machine has 0"
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


def _launch(tmp_path, name, *extra, config=None, log=None):
    """Start the launcher as a subprocess; its output goes to `log` (a pipe nobody reads would
    fill up and stall it) or, when no log is given, to a pipe for communicate()."""
    argv = [sys.executable, "-m", "study.launch", "--config", config or _config(tmp_path),
            "--storage", str(tmp_path / "studies"), "--name", name, "--data-root", str(tmp_path / "data"), *extra]
    return subprocess.Popen(argv, stdout=log or subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _results(trial_dir: Path) -> list[dict]:
    path = trial_dir / "result.json"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


@pytest.mark.ray
@pytest.mark.parametrize("trainer, uri", [("in_trial", True), ("torch_trainer", False)])
def test_a_tiny_study_runs_end_to_end_and_reports_what_tune_recorded(tmp_path, trainer, uri):
    # Storage given as a file:// URI goes through the same pyarrow filesystem code as s3:// or gs://.
    storage = f"file://{tmp_path / 'studies'}" if uri else str(tmp_path / "studies")
    process = _launch(tmp_path, "tiny", "--storage", storage, config=_config(tmp_path, resources={"trainer": trainer}))
    out, _ = process.communicate(timeout=600)
    assert process.returncode == 0, out[-3000:]
    study = tmp_path / "studies" / "tiny"
    trials = sorted(study.glob("trial_*"))
    assert len(trials) == 2
    recorded = {}
    for trial in trials:
        results = _results(trial)
        assert [r["step"] for r in results] == [10, 20]
        assert list(trial.glob("events.out.tfevents.*"))
        recorded[results[-1]["trial_id"]] = results[-1]
    with open(study / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    for row in rows:
        last = recorded[row["trial_id"]]
        assert float(row["accuracy"]) == pytest.approx(last["accuracy"], abs=1e-6)
        assert float(row["gm_median_10"]) == pytest.approx(last["gm_median_10"], abs=1e-6)
    labels = sorted(row["label"] for row in rows)
    assert labels == ["fixmatch", "search"]
    assert (study / "report.md").read_text().count("|") > 10
    assert (study / "plots" / "history.png").stat().st_size > 0
    record = json.loads((study / "study.json").read_text())
    assert record["dataset"]["name"] == "digits" and record["swept"] == ["confidence", "cai_beta"]
    assert record["versions"]["ray"] == ray.__version__
    assert f"tensorboard --logdir {study}" in out
    # A TorchTrainer trial keeps its Train run (and checkpoints) under train_runs/<trial id>;
    # an in-trial run checkpoints into its Tune trial directory.
    train_runs = sorted(p.name for p in (study / "train_runs").glob("*")) if (study / "train_runs").exists() else []
    if trainer == "torch_trainer":
        assert train_runs == sorted(recorded)
    else:
        assert train_runs == [] and all(list(t.glob("checkpoint_*")) for t in trials)


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
    config = _config(tmp_path, search__num_samples=2, search__max_concurrent=1,
                     train={**TINY["train"], "steps": 60, "eval_every": 10})
    log = open(tmp_path / "first-launch.log", "w")
    process = _launch(tmp_path, "killed", config=config, log=log)
    study = tmp_path / "studies" / "killed"
    deadline = time.time() + 400
    finished = None
    try:
        while time.time() < deadline and finished is None and process.poll() is None:
            time.sleep(2)
            terminated = _terminated_in_experiment_state(study)
            finished = study / terminated[0] if terminated else None
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        log.close()
    assert finished is not None, "no trial finished before the deadline"
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
        assert len(list(csv.DictReader(f))) == 3
