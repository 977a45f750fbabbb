"""A study on object storage for real: an S3-compatible server (moto) on localhost, reached
through pyarrow's S3 filesystem with an endpoint override as a MinIO or Ceph user would; the
driver killed after the first trial finished, the study resumed and its report written there."""

import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pyarrow.fs as pafs
import pytest
import yaml
from stacks import python_stacks

STUDY = {
    "dataset": "digits",
    "split": {"kind": "lt", "n_max": 20, "gamma_l": 10, "seed": 1, "valid_size": 100},
    "train": {"model": "cnn_small", "steps": 60, "eval_every": 10, "batch_size": 8, "mu": 2,
              "cap": True, "cai": True, "cadr": True},
    "space": {"seed": {"grid": [0, 1, 2]}},
    "search": {"algorithm": "grid", "num_samples": 1, "max_concurrent": 1},
    "scheduler": {"name": "none"},
}


@pytest.fixture
def s3(monkeypatch):
    """A moto S3 server on a free local port with one bucket; yields (storage URI, filesystem)."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    # Credentials as for any S3 service; the launcher's subprocesses and Ray's workers inherit them.
    for name, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    endpoint = f"127.0.0.1:{port}"
    fs = pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", region="us-east-1",
                           allow_bucket_creation=True)
    fs.create_dir("studies-bucket")
    try:
        yield f"s3://studies-bucket/studies?endpoint_override={endpoint}&scheme=http&region=us-east-1", fs
    finally:
        server.stop()


def _read(fs, path: str) -> str:
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def _finished_trials(fs, study: str) -> list[str]:
    """Trial directories the experiment state on the bucket records as finished."""
    selector = pafs.FileSelector(study, allow_not_found=True)
    states = sorted(i.path for i in fs.get_file_info(selector) if i.base_name.startswith("experiment_state-"))
    try:
        entries = json.loads(_read(fs, states[-1]))["trial_data"] if states else []
    except (OSError, ValueError, KeyError):
        return []  # being rewritten; ask again
    trials = [json.loads(entry[0]) for entry in entries]
    return [t["relative_logdir"] for t in trials if t.get("status") == "TERMINATED"]


def _launch(tmp_path, storage, *extra, log=None):
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(STUDY))
    argv = [sys.executable, "-m", "study.launch", "--config", str(config), "--storage", storage, "--name", "s3-study",
            "--data-root", str(tmp_path / "data"), *extra]
    return subprocess.Popen(argv, stdout=log or subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.ray
def test_a_study_on_s3_survives_a_killed_driver_and_reports_there(tmp_path, s3):
    storage, fs = s3
    study = "studies-bucket/studies/s3-study"
    with open(tmp_path / "first-launch.log", "w") as log:
        process = _launch(tmp_path, storage, log=log)
        deadline, finished = time.time() + 400, []
        try:
            while time.time() < deadline and not finished and process.poll() is None:
                time.sleep(2)
                finished = _finished_trials(fs, study)
        finally:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
    assert finished, (tmp_path / "first-launch.log").read_text()[-3000:]
    finished_results = _read(fs, f"{study}/{finished[0]}/result.json")

    with open(tmp_path / "resume.log", "w") as log:
        process = _launch(tmp_path, storage, "--resume", log=log)
        try:
            process.wait(timeout=600)
        except subprocess.TimeoutExpired:
            (tmp_path / "resume-stacks.txt").write_text(python_stacks(process.pid))  # where it stood
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
    out = (tmp_path / "resume.log").read_text()
    stacks = tmp_path / "resume-stacks.txt"
    assert process.returncode == 0, (stacks.read_text() if stacks.exists() else "") + out[-6000:]
    assert _read(fs, f"{study}/{finished[0]}/result.json") == finished_results  # kept, not run again
    rows = list(csv.DictReader(io.StringIO(_read(fs, f"{study}/report.csv"))))
    assert sorted(row["seed"] for row in rows) == ["0", "1", "2"]
    assert all(row["status"] == "TERMINATED" and row["steps"] == "60" for row in rows)
    assert "## " in _read(fs, f"{study}/report.md")
    record = json.loads(_read(fs, f"{study}/study.json"))
    assert record["dataset"]["name"] == "digits"
    assert "report: s3://studies-bucket/studies/s3-study/report.md?endpoint_override=" in out

    # The report rebuilds from the bucket alone, as from any machine with credentials for it.
    fs.delete_file(f"{study}/report.md")
    rebuilt = subprocess.run([sys.executable, "-m", "study.report", storage.replace("/studies?", "/studies/s3-study?")],
                             capture_output=True, text=True, timeout=300)
    assert rebuilt.returncode == 0, rebuilt.stdout[-2000:] + rebuilt.stderr[-2000:]
    assert "## " in _read(fs, f"{study}/report.md")
