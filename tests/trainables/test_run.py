"""Specification of the `python -m trainables.run` CLI's user errors: exit code 2, one line on
stderr starting with "error:", no traceback, no training."""

import subprocess
import sys

import pytest

from data_prep.convert import prepare
from trainables.config import TrainConfig
from trainables.run import main
from trainables.same_config import record_run


def test_cli_reports_a_bad_option_value_as_one_error_line_before_ray_starts(capsys, tmp_path):
    code = main(["--steps", "0", "--storage", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert (code, err) == (2, "error: steps must be >= 1, got 0\n")
    assert not (tmp_path / "runs").exists()


@pytest.mark.ray
def test_cli_reports_a_split_of_another_dataset_as_one_error_line(tmp_path):
    # A subprocess: the CLI starts (and leaves) its own local Ray instance, whose log lines go to
    # the same stderr; the error must still be exactly one line, the last one.
    pytest.importorskip("ray")
    prepare("digits", tmp_path / "data")
    argv = ["--dataset", "digits", "--split", "mnist5k_LT_10.1@50", "--data-root", tmp_path / "data",
            "--num-workers", "2", "--storage", tmp_path / "runs"]
    done = subprocess.run([sys.executable, "-m", "trainables.run", *map(str, argv)], capture_output=True,
                          text=True, timeout=180)
    lines = done.stderr.splitlines()
    assert done.returncode == 2, done.stderr
    assert [line for line in lines if line.startswith("error:")] == [
        "error: split 'mnist5k_LT_10.1@50' is for dataset 'mnist5k', not 'digits'"], done.stderr
    assert lines[-1].startswith("error:") and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", ["../elsewhere", "a/b", "..", ".hidden", ""])
def test_a_run_name_that_would_leave_the_storage_is_one_error_line_before_anything_is_written(capsys, tmp_path,
                                                                                              name):
    code = main(["--name", name, "--storage", str(tmp_path / "runs")])
    assert (code, capsys.readouterr().err) == (2, "error: name must be a plain name, one entry under its root (not "
                                                  f"empty, no '/' or '\\', not starting with '.'), got {name!r}\n")
    assert list(tmp_path.iterdir()) == []


def test_a_rerun_under_an_existing_name_with_other_options_is_refused_naming_them(capsys, tmp_path):
    import ray

    prepare("digits", tmp_path / "data")
    options = ["--data-root", str(tmp_path / "data"), "--split", "digits_LT_10.1@50", "--steps", "20"]
    first = TrainConfig.from_dict({"data_root": str(tmp_path / "data"), "split": "digits_LT_10.1@50", "steps": 20})
    record_run(first, str(tmp_path / "runs"), "base")  # what the first run wrote before it trained
    capsys.readouterr()
    code = main([*options, "--steps", "40", "--lr", "0.1", "--storage", str(tmp_path / "runs"), "--name", "base"])
    assert (code, capsys.readouterr().err) == (2, (
        f"error: run {tmp_path / 'runs'}/base was started with another config (run.json): lr: 0.03 there, 0.1 now; "
        "steps: 20 there, 40 now; drop the change to continue it, or start a new run under another --name\n"))
    assert not ray.is_initialized()
    assert sorted(p.name for p in (tmp_path / "runs" / "base").iterdir()) == ["run.json"]  # nothing else written


def test_storage_under_a_file_is_one_error_line_before_ray_starts(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    prepare("digits", tmp_path / "data")
    capsys.readouterr()  # the conversion's progress bar
    code = main(["--data-root", str(tmp_path / "data"), "--split", "digits_LT_10.1@50",
                 "--storage", str(blocker / "sub")])
    err = capsys.readouterr().err
    assert (code, err) == (2, f"error: storage {blocker / 'sub'} is not writable (Not a directory); "
                              "pass another --storage\n")


def test_a_setting_added_since_a_config_was_recorded_is_a_change_only_when_it_is_set():
    from trainables.same_config import differences

    recorded = {"split": {"kind": "lt", "gamma_u": None}, "train": {"lr": 0.03}, "space": {"seed": [0, 1]}}
    assert differences(recorded, {"split": {"kind": "lt", "gamma_u": None, "unlabeled": None},
                                  "train": {"lr": 0.03}, "space": {"seed": [0, 1]}}) == []
    assert differences(recorded, {**recorded, "space": {"seed": [0, 2]}}) == ["space.seed: [0, 1] there, [0, 2] now"]
    recorded = {"split": recorded["split"], "train": recorded["train"]}
    assert differences(recorded, {"split": {"kind": "lt", "unlabeled": "uniform"}, "train": {"lr": 0.03}}) == [
        "split.unlabeled: not set there, \"uniform\" now"]
    assert differences(recorded, {"split": {"kind": "lt", "gamma_u": 10}, "train": {"lr": 0.1}}) == [
        "split.gamma_u: null there, 10 now", "train.lr: 0.03 there, 0.1 now"]
    assert differences({**recorded, "train": {"lr": 0.03, "momentum": 0.9}}, recorded) == [
        "train.momentum: 0.9 there, not set now"]
