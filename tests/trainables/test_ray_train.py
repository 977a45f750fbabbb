"""Specification of data-parallel training on Ray Train (trainables.ray_train.fit): two CPU
workers train on the real digits dataset end to end, report per-class metrics to Ray and to
TensorBoard, checkpoint their full state, resume from it, survive a killed worker, and refuse a
bad configuration before any worker starts. One local Ray instance (2 CPUs) serves the module;
every run has its own name, since a reused name resumes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
from tensorboard_events import event_files, file_scalars, purge_step, scalars

from data_prep import DataPrepError
from data_prep.convert import prepare
from trainables.config import TrainConfig
from trainables.errors import TrainConfigError
from trainables.loop import CHECKPOINT_FILE, train
from trainables.ray_train import fit
from trainables.resources import Resources
from trainables.step import build_state

pytestmark = pytest.mark.ray

NUM_CLASSES, IMAGE_SHAPE = 10, (8, 8, 1)
EVAL_EVERY = 20


@pytest.fixture(scope="module")
def worker_tmp(tmp_path_factory):
    """The Ray workers' temporary directory (TMPDIR), so a test can see what they leave there."""
    return tmp_path_factory.mktemp("worker-tmp")


@pytest.fixture(scope="module")
def local_ray(worker_tmp):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"TMPDIR": str(worker_tmp)}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    prepare("digits", root)
    return root


SPLIT = "digits_LT_10.1@50-100"


@pytest.fixture(scope="module")
def decoded(local_ray, digits_root):
    """The split's Ray datasets, read and decoded once, as a study hands them to its trials: the
    runs below that test something else than reading Parquet skip reading it again (the first
    run reads the files, as `fit` does by default)."""
    from data_prep.loading import ray_datasets

    return {part: data.materialize() for part, data in ray_datasets("digits", SPLIT, str(digits_root)).items()}


def digits_config(root, **overrides) -> TrainConfig:
    # With a validation set (100 balanced rows), so rank 0 evaluates two splits.
    values = dict(dataset="digits", split=SPLIT, data_root=str(root), steps=40,
                  eval_every=EVAL_EVERY, batch_size=16, mu=2, cap=True, cai=True, cadr=True)
    return TrainConfig.from_dict({**values, **overrides})


def unique_name(prefix) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def checkpoint_states(run_dir) -> list[Path]:
    return sorted(Path(run_dir).glob(f"checkpoint_*/{CHECKPOINT_FILE}"))


def load_state(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_state(got, want, where="state"):
    """Nested dicts/lists of tensors and numbers are equal, exactly."""
    if isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for key in want:
            assert_same_state(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same_state(g, w, f"{where}[{i}]")
    elif isinstance(want, torch.Tensor):
        assert torch.equal(got.cpu(), want.cpu()), where
    else:
        assert got == want, where


@pytest.fixture(scope="module")
def first_run(local_ray, digits_root, tmp_path_factory):
    """A 40-step, 2-worker run, and a snapshot of what it left on disk (later tests resume it)."""
    storage, name = tmp_path_factory.mktemp("runs"), unique_name("digits")
    config = digits_config(digits_root)
    result = fit(config, Resources(num_workers=2), storage_path=storage, name=name)
    run_dir = storage / name
    return {
        "config": config, "storage": storage, "name": name, "result": result,
        "checkpoints": checkpoint_states(run_dir),
        "last_state": load_state(Path(result.checkpoint.path) / CHECKPOINT_FILE) if result.checkpoint else None,
        "scalars": scalars(run_dir / "tensorboard"),
    }


def test_two_worker_training_on_digits_reports_per_class_metrics_checkpoints_and_tensorboard(first_run):
    result = first_run["result"]
    assert result.error is None
    metrics = result.metrics
    assert metrics["step"] == 40
    for key in ("loss/total", "mask_rate"):
        assert key in metrics, key
    for split in ("valid", "test"):
        assert 0 <= metrics[f"{split}_gm"] <= metrics[f"{split}_balanced_accuracy"] <= 1
        assert 0 <= metrics[f"{split}_accuracy"] <= 1
    # A balanced validation set: plain accuracy is the mean of the per-class recalls.
    assert metrics["valid_accuracy"] == pytest.approx(metrics["valid_balanced_accuracy"], abs=1e-12)
    per_class = [f"{split}_class_accuracy/{c}" for split in ("valid", "test") for c in range(NUM_CLASSES)]
    prior = [f"p_ema/{c}" for c in range(NUM_CLASSES)]
    assert all(0 <= metrics[k] <= 1 for k in per_class)
    assert sum(metrics[k] for k in prior) == pytest.approx(1.0, abs=1e-5)
    # One checkpoint per report (two kept), the last one at the last step.
    assert len(first_run["checkpoints"]) == 2
    assert first_run["last_state"]["step"] == 40
    # Rank 0 wrote every reported scalar at every report, per class included.
    written = first_run["scalars"]
    for key in ("step", "valid_balanced_accuracy", "test_accuracy", "test_gm", *per_class, *prior):
        assert sorted(written.get(key, {})) == [20, 40], key
        assert written[key][40] == pytest.approx(metrics[key], rel=1e-6, abs=1e-7), key


def test_reported_checkpoints_leave_no_local_copies_behind(local_ray, first_run, worker_tmp):
    assert first_run["result"].error is None
    assert local_ray.get(local_ray.remote(tempfile.gettempdir).remote()) == str(worker_tmp)  # where they would be
    assert list(worker_tmp.glob("fixmatch-ckpt-*")) == []  # each is a full model + EMA + optimizer


def test_checkpoint_holds_step_p_ema_and_optimizer_state_and_loads_back_exactly(first_run):
    saved = first_run["last_state"]
    assert saved["step"] == 40
    reported = first_run["result"].metrics
    p_ema = saved["method_state"]["p_ema"]
    assert saved["method"] == "fixmatch"
    assert p_ema.tolist() == pytest.approx([reported[f"p_ema/{c}"] for c in range(NUM_CLASSES)])
    assert not torch.allclose(p_ema, torch.full((NUM_CLASSES,), 1 / NUM_CLASSES))
    assert saved["scheduler"]["last_epoch"] == 40
    state = build_state(first_run["config"], NUM_CLASSES, IMAGE_SHAPE, torch.device("cpu"))
    momentum = [s["momentum_buffer"] for s in saved["optimizer"]["state"].values()]
    assert len(momentum) == len(list(state.model.parameters()))
    assert all(buffer.abs().sum() > 0 for buffer in momentum)

    state.load_state_dict(saved)
    assert state.step == 40
    assert torch.equal(state.method.state["p_ema"], p_ema)
    # The batch samplers' places in their epochs are the loop's, which attaches its samplers to
    # the state before loading (a resume that continues exactly: tests/trainables/test_train.py).
    assert set(saved["samplers"]) == {"labeled", "unlabeled"} and state.samplers == {}
    assert_same_state({**state.state_dict(), "samplers": saved["samplers"]}, saved)


@pytest.fixture(scope="module")
def one_worker_run(local_ray, digits_root, decoded, tmp_path_factory):
    """A 30-step, 1-worker run without TensorBoard (CTAugment on, so its state is checkpointed too)."""
    config = digits_config(digits_root, steps=30, eval_every=10, augment="d.d.cta")
    storage, name = tmp_path_factory.mktemp("one-worker"), unique_name("one")
    result = fit(config, Resources(num_workers=1), storage_path=storage, name=name, tensorboard=False,
                 datasets=decoded)
    return {"config": config, "result": result, "run_dir": storage / name}


def test_one_ray_train_worker_and_the_in_process_runner_train_identically(one_worker_run):
    # The same loop on both paths: Ray Data shards (one worker holds them all) and the in-process
    # loader give the same rows in the same order, so the same seed gives the same weights.
    config, result = one_worker_run["config"], one_worker_run["result"]
    assert result.error is None
    ray_state = load_state(Path(result.checkpoint.path) / CHECKPOINT_FILE)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the Ray worker runs
    try:
        local = train(TrainConfig.from_dict({**config.to_dict(), "device": "cpu"}), progress=False)
    finally:
        torch.set_num_threads(threads)
    assert_same_state(local["state"].state_dict()["model"], ray_state["model"])
    assert_same_state(local["state"].state_dict()["method_state"], ray_state["method_state"])
    assert_same_state(local["state"].state_dict()["augment"], ray_state["augment"])
    for key in ("valid_balanced_accuracy", "test_accuracy", "test_gm"):
        assert local["metrics"][key] == result.metrics[key], key


def registered_checkpoint_steps(run_dir) -> list[int]:
    """Steps of the checkpoints Ray Train's controller has registered (what a restart resumes from)."""
    try:
        snapshot = json.loads((Path(run_dir) / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return []
    return [entry["metrics"]["step"] for entry in snapshot.get("checkpoint_results", [])]


def parent_pid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def started_by_this_process(pid: int) -> bool:
    """Whether this test process is an ancestor of `pid` (Ray's raylet, a child of the driver,
    forks the workers), so another Ray cluster on the machine is never touched."""
    while pid > 1:
        pid = parent_pid(pid)
        if pid == os.getpid():
            return True
    return False


def train_worker_pids() -> list[int]:
    """PIDs of this test's live Ray Train worker processes (their title names the actor class)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if b"RayTrainWorker" in Path(f"/proc/{entry}/cmdline").read_bytes() and \
                        started_by_this_process(int(entry)):
                    pids.append(int(entry))
            except OSError:  # it exited meanwhile
                continue
    return sorted(pids)


def kill_one_worker_after_a_checkpoint(run_dir) -> dict:
    """A thread that kills one of this test's two Train workers once the controller has
    registered a checkpoint of the run; the dict it fills holds the registered steps
    ("checkpoints") and the killed "pid"; set its "stop" event once the run has ended."""
    killed = {"stop": threading.Event()}

    def watch():
        # Watches as long as the run lasts, however slowly a loaded machine gets to its first
        # checkpoint: a fixed deadline here once expired before it.
        while not killed["stop"].is_set():
            registered = registered_checkpoint_steps(run_dir)
            if registered and len(pids := train_worker_pids()) == 2:
                killed["checkpoints"] = registered
                os.kill(pids[0], signal.SIGKILL)
                killed["pid"] = pids[0]
                return
            time.sleep(0.05)

    killed["thread"] = threading.Thread(target=watch, daemon=True)
    killed["thread"].start()
    return killed


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds worker processes through /proc")
def test_killed_worker_restarts_from_the_last_checkpoint_and_finishes(local_ray, digits_root, decoded, tmp_path):
    storage, name, steps = tmp_path / "runs", unique_name("killed"), 200
    run_dir = storage / name
    killed = kill_one_worker_after_a_checkpoint(run_dir)
    try:
        result = fit(digits_config(digits_root, steps=steps), Resources(num_workers=2), storage_path=storage,
                     name=name, max_failures=2, datasets=decoded)
    finally:
        killed["stop"].set()
    killed["thread"].join()
    assert "pid" in killed, "no worker was killed"
    assert max(killed["checkpoints"]) < steps  # the kill landed mid-run
    assert result.error is None
    assert result.metrics["step"] == steps

    files = event_files(run_dir / "tensorboard")
    assert len(files) >= 2, "the worker group did not restart"
    resumed_from = purge_step(files[1]) - 1
    assert resumed_from >= min(killed["checkpoints"]) and resumed_from % EVAL_EVERY == 0  # a checkpoint
    assert max(file_scalars(files[0])["step"]) >= resumed_from  # its evaluation was reported before
    assert min(file_scalars(files[1])["step"]) == resumed_from + EVAL_EVERY
    reported = sorted(scalars(run_dir / "tensorboard")["step"])
    assert reported == list(range(EVAL_EVERY, steps + 1, EVAL_EVERY))  # no gap, ends at `steps`


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds worker processes through /proc")
def test_a_run_that_failed_continues_under_its_name_at_the_saved_step_with_its_state(local_ray, digits_root,
                                                                                    decoded, tmp_path):
    # A run whose worker dies with no retries left fails; the same command (same config, same
    # name) continues it from the last checkpoint the controller registered, state and all.
    storage, name, steps = tmp_path / "runs", unique_name("failed"), 200
    run_dir, config = storage / name, digits_config(digits_root, steps=steps)
    killed = kill_one_worker_after_a_checkpoint(run_dir)
    try:
        with pytest.raises(local_ray.train.WorkerGroupError):
            fit(config, Resources(num_workers=2), storage_path=storage, name=name, max_failures=0, datasets=decoded)
    finally:
        killed["stop"].set()
    killed["thread"].join()
    assert "pid" in killed, "no worker was killed"
    first = scalars(run_dir / "tensorboard")
    saved = max(registered_checkpoint_steps(run_dir))
    assert saved < steps

    result = fit(config, Resources(num_workers=2), storage_path=storage, name=name, datasets=decoded)
    assert result.error is None and result.metrics["step"] == steps
    files = event_files(run_dir / "tensorboard")
    assert len(files) == 2  # the failed run's writer, then the continued one's
    assert purge_step(files[1]) == saved + 1  # hides what the failed run wrote after its checkpoint
    assert sorted(file_scalars(files[1])["step"]) == list(range(saved + EVAL_EVERY, steps + 1, EVAL_EVERY))
    assert sorted(scalars(run_dir / "tensorboard")["step"]) == list(range(EVAL_EVERY, steps + 1, EVAL_EVERY))
    # The continued run carried the saved state on: its metric history starts with the failed
    # run's evaluations, its schedule counts on from the saved step.
    final = load_state(Path(result.checkpoint.path) / CHECKPOINT_FILE)
    assert final["step"] == steps and final["scheduler"]["last_epoch"] == steps
    history = final["tracker"]["history"]["test_accuracy"]
    assert len(history) == steps // EVAL_EVERY
    before = [first["test_accuracy"][s] for s in range(EVAL_EVERY, saved + 1, EVAL_EVERY)]
    assert history[:len(before)] == pytest.approx(before, rel=1e-6)


@pytest.mark.parametrize("change, resources, error, message", [  # message: a regular expression
    ({"batch_size": 18}, {"num_workers": 3, "cpus_per_worker": 1.0}, TrainConfigError,
     r"3 workers of 1 CPU each do not fit on the cluster's nodes at once \(its 1 node\(s\): 2 CPU\)"),
    ({"batch_size": 18}, {"num_workers": 0}, TrainConfigError, "num_workers must be >= 1, got 0"),
    ({"batch_size": 15}, {"num_workers": 2}, TrainConfigError,
     "batch_size=15 is not divisible by num_workers=2"),
    ({"model": "no_such_net"}, {"num_workers": 2}, TrainConfigError, "model.*'no_such_net'"),
    ({"split": "mnist5k_LT_10.1@50"}, {"num_workers": 2}, DataPrepError,
     r"split 'mnist5k_LT_10\.1@50' is for dataset 'mnist5k', not 'digits'"),
], ids=["more_workers_than_the_node_holds", "no_workers", "batch_not_divisible", "unknown_model",
        "split_of_another_dataset"])
def test_bad_configuration_fails_before_any_worker_starts(local_ray, digits_root, tmp_path, change, resources,
                                                          error, message):
    with pytest.raises(error, match=message):
        fit(digits_config(digits_root, **change), Resources(**resources), storage_path=tmp_path,
            name=unique_name("bad"))
    # Refused before its run.json was written, which comes before Ray Train starts anything.
    assert list(tmp_path.iterdir()) == []


def run_cli(*argv, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainables.run", *map(str, argv)], capture_output=True,
                          text=True, timeout=timeout)


def test_a_diverging_run_ends_with_one_line_and_exit_2_without_retries(local_ray, digits_root, tmp_path):
    # While this module's own Ray instance runs: the CLI starts its own instead of failing to
    # choose between them (Ray's own placement-group cleaner may still log that it cannot).
    done = run_cli("--dataset", "digits", "--split", SPLIT, "--data-root", digits_root,
                   "--lr", "1e6", "--cap", "--cai", "--cadr", "--steps", "40", "--eval-every", "20",
                   "--batch-size", "16", "--mu", "2", "--storage", tmp_path, "--name", "diverging")
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2, done.stderr[-3000:]
    # CAP's pseudo-inverse is the first to meet the NaN logits: it still reads as divergence.
    assert len(errors) == 1 and errors[0].startswith("error: training diverged: the logits became NaN or infinite")
    assert "[FailurePolicy] RETRY" not in done.stderr + done.stdout  # divergence recurs: not retried
    recorded = json.loads((tmp_path / "diverging" / "run.json").read_text())  # what a rerun must match
    assert (recorded["lr"], recorded["steps"], recorded["cadr"]) == (1e6, 40, True)


def test_a_checkpoint_that_holds_more_than_tensors_is_refused_naming_the_file(local_ray, one_worker_run, digits_root,
                                                                               tmp_path):
    # A run that checkpointed, under the name the CLI resumes: a copy of the module's 1-worker run
    # (Ray Train's snapshot names its checkpoints relative to the run directory).
    run_dir = Path(shutil.copytree(one_worker_run["run_dir"], tmp_path / "refused"))
    checkpoint = run_dir / Path(one_worker_run["result"].checkpoint.path).name / CHECKPOINT_FILE
    assert checkpoint.is_file()

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'owned'}",))

    torch.save({"step": RunsCode()}, checkpoint)  # what an attacker with write access could plant
    done = run_cli("--dataset", "digits", "--split", SPLIT, "--data-root", digits_root,
                   "--steps", "30", "--eval-every", "10", "--augment", "d.d.cta", "--batch-size", "16", "--mu", "2",
                   "--cap", "--cai", "--cadr", "--storage", tmp_path, "--name", "refused",  # the run's own config
                   "--address", local_ray.get_runtime_context().gcs_address)  # this module's Ray, as a cluster
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(errors) == 1 and errors[0].startswith(
        f"error: checkpoint {checkpoint} holds something other than tensors and plain data"), errors
    assert "weights_only=False" not in done.stderr  # torch's advice to load it anyway never reaches the user
    assert not (tmp_path / "owned").exists()
    assert run_dir.is_dir()
