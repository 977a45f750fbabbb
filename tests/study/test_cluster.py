"""The cluster path for real: a multi-node Ray cluster started on this machine (a head and two
worker raylets, each with its own CPUs, token authentication on), a study submitted to it with
`ray job submit` as the README says, each trial data-parallel over 2 workers."""

import contextlib
import csv
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(temp_dir: str) -> None:
    """Stop the processes of this cluster only: those whose command line holds its temp dir."""
    def ours():
        pids = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if temp_dir in cmdline and int(pid) != os.getpid():
                pids.append(int(pid))
        return pids

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in ours():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.time() + 10
        while ours() and time.time() < deadline:
            time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster():
    """A head with 1 CPU and two worker nodes with 1 CPU each; yields (dashboard address, GCS
    address, env)."""
    temp_dir = tempfile.mkdtemp(prefix="ray-cluster-")  # short: Ray's socket paths must stay short
    port, dashboard = _free_port(), _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    common = ["--num-cpus", "1", "--temp-dir", temp_dir, "--disable-usage-stats"]

    def node():  # each node's agent on its own free port: the default one may be another Ray's
        return [*common, "--dashboard-agent-listen-port", str(_free_port())]

    try:
        subprocess.run([RAY, "start", "--head", "--port", str(port), "--include-dashboard", "true",
                        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), *node()],
                       env=env, check=True, capture_output=True, timeout=180)
        for _ in range(2):
            subprocess.run([RAY, "start", "--address", f"127.0.0.1:{port}", *node()],
                           env=env, check=True, capture_output=True, timeout=180)
        yield f"http://127.0.0.1:{dashboard}", f"127.0.0.1:{port}", env
    finally:
        _stop(temp_dir)


STUDY = {
    "dataset": "digits",
    "split": {"kind": "lt", "n_max": 20, "gamma_l": 10, "seed": 1, "valid_size": 100},
    "train": {"model": "cnn_small", "steps": 20, "eval_every": 10, "batch_size": 8, "mu": 2,
              "cap": True, "cai": True, "cadr": True},
    "space": {"seed": {"grid": [0]}},  # one trial: what is tested is where its two workers run
    "search": {"algorithm": "grid", "num_samples": 1, "max_concurrent": 1},
    "scheduler": {"name": "none"},
    "resources": {"num_workers": 2, "cpus_per_worker": 1, "trainer": "torch_trainer"},
}


@pytest.mark.ray
def test_a_study_submitted_to_a_multi_node_cluster_runs_two_workers_per_trial(tmp_path, cluster):
    address, _, env = cluster
    # Each worker reserves a whole CPU and every node has one, so the two workers of a trial can
    # only run on two different nodes (the trial's own driver and Ray Data share the third).
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(STUDY))
    storage, data = tmp_path / "studies", tmp_path / "data"
    argv = [RAY, "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
            sys.executable, "-m", "study.launch", "--config", str(config), "--storage", str(storage),
            "--name", "cluster", "--data-root", str(data)]
    deadline = time.time() + 120
    while True:
        submitted = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
        out = submitted.stdout + submitted.stderr
        (tmp_path / "job.log").write_text(out)
        # The head accepts jobs once its dashboard agent has registered, a little after `ray start`
        # returns; until then the submission is refused, and nothing has run.
        if "No available agent to submit job" not in out or time.time() > deadline:
            break
        time.sleep(2)
    assert submitted.returncode == 0, out[-3000:]
    assert "succeeded" in out
    with open(storage / "cluster" / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["seed"] for row in rows] == ["0"]
    assert all(row["status"] == "TERMINATED" and row["steps"] == "20" for row in rows)
    assert (storage / "cluster" / "report.md").is_file()
    # The trial's Train run: one worker group of 2, on the cluster the job was submitted to.
    assert len(list((storage / "cluster" / "train_runs").iterdir())) == 1


@pytest.mark.ray
def test_what_no_node_can_hold_is_refused_at_once_not_waited_for(tmp_path, cluster):
    """3 CPUs in all, 1 per node: workers of 2 CPUs fit the total and no node. Ray would queue them
    forever; the study and the run each refuse in one line before any trial or worker starts."""
    _, gcs, env = cluster
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(STUDY))
    storage, data = tmp_path / "studies", tmp_path / "data"
    refusal = ("error: each worker reserves 2 CPU, more than any node of the cluster has (its 3 node(s): 1 CPU; "
               "1 CPU; 1 CPU); reserve less, or add a larger node (if an autoscaler will add nodes, set "
               "STUDY_CLUSTER_GROWS=1)")
    launch = subprocess.run(
        [sys.executable, "-m", "study.launch", "--config", str(config), "--storage", str(storage), "--name", "big",
         "--data-root", str(data), "--address", gcs, "--set", "resources.cpus_per_worker=2"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert launch.returncode == 2, launch.stdout[-2000:] + launch.stderr[-2000:]
    # Exactly one error line: Ray may still print its own lines around it (on a cluster the driver
    # also gets the cluster's event messages).
    assert [line for line in launch.stderr.splitlines() if line.startswith("error:")] == [refusal]
    assert "Traceback" not in launch.stderr
    assert not (storage / "big").exists()  # nothing left looking started
    split = next((data / "digits" / "splits").glob("*.json")).stem  # the split the launch cut
    run = subprocess.run(
        [sys.executable, "-m", "trainables.run", "--dataset", "digits", "--split", split, "--data-root", str(data),
         "--num-workers", "2", "--cpus-per-worker", "2", "--storage", str(tmp_path / "runs"), "--address", gcs],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    assert [line for line in run.stderr.splitlines() if line.startswith("error:")] == [refusal]
    assert "Traceback" not in run.stderr
