"""Specification of an interrupted study (study/interrupt.py) and of --resume: SIGTERM or Ctrl+C
(SIGINT to the launcher's process group) ends the launch with 128 + the signal's number after Tune
saves its state, one line naming the exact --resume command, and a report marked unfinished; that
command continues the study from its checkpoints, and a resume with a changed config is refused."""

import csv
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import yaml

from study.launch import main
from study.tune_files import saved_checkpoints

# Two searched trials, one at a time; the first far longer than the test lasts, so every signal
# lands while it trains, however fast the machine (a short one once ended before the signal).
STEPS = 100_000
STUDY = {
    "dataset": "digits",
    "split": {"kind": "lt", "n_max": 20, "gamma_l": 10, "seed": 1, "valid_size": 100},
    "train": {"model": "cnn_small", "steps": STEPS, "eval_every": 10, "batch_size": 8, "mu": 2,
              "cap": True, "cai": True, "cadr": True},
    "space": "thresholds",
    "search": {"algorithm": "optuna", "num_samples": 2, "max_concurrent": 1, "seed": 0},
    "scheduler": {"name": "none"},
}
PROGRESS = re.compile(rf"\] step (\d+)/{STEPS} ")  # a trial's progress line (trainables/evaluation.py)


def start(argv: list[str], log: Path) -> subprocess.Popen:
    """The launcher in a session of its own: its process group is what a terminal's Ctrl+C reaches."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "study.launch", *argv], stdout=out, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)


def wait_for_checkpoint(study: Path, process: subprocess.Popen) -> None:
    """Until Tune's saved state names a checkpoint of a trial (what a resume continues from)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if any((saved_checkpoints(pafs.LocalFileSystem(), str(study)) or {}).values()):
            return
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint in Tune's saved state (launcher exit {process.poll()})")


def ended(process: subprocess.Popen, log: Path) -> tuple[int, str]:
    try:
        return process.wait(timeout=300), log.read_text()
    finally:
        if process.poll() is None:  # only what this test started: the launcher's own process group
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


@pytest.mark.ray
def test_an_interrupted_study_ends_128_plus_the_signal_and_its_resume_command_continues_it(tmp_path, capsys):
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(STUDY))
    study = tmp_path / "studies" / "cut"
    argv = ["--config", str(config), "--storage", str(tmp_path / "studies"), "--name", "cut",
            "--data-root", str(tmp_path / "data")]
    command = shlex.join(["python", "-m", "study.launch", *argv, "--resume"])

    # SIGTERM (as `kill PID` or `ray job stop` sends it) while the first trial trains.
    first = start(argv, tmp_path / "first.log")
    wait_for_checkpoint(study, first)
    first.send_signal(signal.SIGTERM)
    code, out = ended(first, tmp_path / "first.log")
    assert code == 143, out[-3000:]
    assert error_lines(out) == [f"error: study cut was interrupted (SIGTERM) before it finished; Tune saved its "
                                f"state; its report marks it unfinished; continue it with: {command}"], out[-3000:]
    assert "Traceback" not in out
    report = (study / "report.md").read_text().splitlines()
    assert report[2] == (f"**Unfinished**: 0 of 2 planned trials ended (1 RUNNING); the study was interrupted (or "
                         f"is still running). Continue it with `{command}`; the numbers below are those of the "
                         "trials so far.")
    with open(study / "report.csv") as f:
        assert [row["status"] for row in csv.DictReader(f)] == ["RUNNING"]
    reached = max(int(step) for step in PROGRESS.findall(out))

    # A resume with a changed config is refused before anything runs, naming what changed.
    capsys.readouterr()
    assert main([*argv, "--resume", "--set", "train.steps=300", "--set", "search.max_concurrent=2"]) == 2
    assert capsys.readouterr().err == (
        f"error: study {study} was started with another config (study.json): search.max_concurrent: 1 there, 2 now; "
        f"train.steps: {STEPS} there, 300 now; drop the change to continue it, or start a new study under another "
        "--name\n")
    # Where the study lives may be spelled otherwise: that changes nothing it runs.
    elsewhere = [*argv[:3], str(tmp_path / "studies") + "/", *argv[4:]]
    assert main([*elsewhere, "--resume", "--dry-run"]) == 0, capsys.readouterr().err

    # The printed command continues the study from its checkpoint; Ctrl+C reaches the whole group.
    resumed = start(shlex.split(command)[3:], tmp_path / "resumed.log")
    deadline = time.monotonic() + 300
    while not PROGRESS.search((tmp_path / "resumed.log").read_text()) and time.monotonic() < deadline \
            and resumed.poll() is None:
        time.sleep(0.2)
    os.killpg(resumed.pid, signal.SIGINT)
    code, out = ended(resumed, tmp_path / "resumed.log")
    assert code == 130, out[-3000:]
    assert error_lines(out) == [f"error: study cut was interrupted (SIGINT) before it finished; Tune saved its "
                                f"state; its report marks it unfinished; continue it with: {command}"], out[-3000:]
    steps = [int(step) for step in PROGRESS.findall(out)]
    assert steps and 10 < steps[0] <= reached + 10, out[-3000:]  # from its checkpoint, not from the start
