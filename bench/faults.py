"""Fault suite: provoke each failure the README's "Reliability" section promises to handle, for real.

    python bench/faults.py                        # every scenario (about 20 minutes on 2 CPU cores)
    python bench/faults.py --only divergence killed_worker
    python bench/faults.py --keep                 # keep the temporary directory for a look

Each scenario runs the project's own command lines as subprocesses (`python -m trainables.run`,
`python -m study.launch`, `python -m study.report`, `python -m data_prep`) on the digits dataset
with a small CNN and a few steps, in one temporary directory, and damages real files or kills real
processes. What counts as handled is what the README promises: a failure a user can cause ends the
command with exactly one line starting `error:` that names the problem, exit code 2 and no
traceback; a failure that would recur is not retried; a killed process is recovered from its last
checkpoint; nothing finished is lost.

Processes are only ever killed by PID, and only those this suite started or their descendants
(found through /proc), or those of a cluster it started itself with `ray start` (their command
lines hold its temp dir), so other Ray instances on the machine are never touched. A Ctrl+C goes
to the process group of a launcher the suite started in a session of its own. The storage-full
scenario mounts a small tmpfs, which needs root; without it that row reads "not run".

Output: a Markdown table (scenario, expected, observed, result), then one JSON line. The exit code
is 0 only if every scenario passed (a scenario this machine cannot provide, such as a tmpfs without
root, is reported as not run and does not fail the suite).
"""

import argparse
import contextlib
import csv
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SPLIT = "digits_LT_10.1@50-100"  # long-tailed labels, 100 balanced validation rows
TRAIN = ["--dataset", "digits", "--split", SPLIT, "--model", "cnn_small", "--batch-size", "16", "--mu", "2"]
STUDY = {  # two trials: the FixMatch baseline, then one CADR trial at the paper's thresholds
    "dataset": "digits",
    "split": {"kind": "lt", "n_max": 20, "gamma_l": 10, "seed": 1, "valid_size": 100},
    "train": {"model": "cnn_small", "steps": 20, "eval_every": 10, "batch_size": 8, "mu": 2,
              "cap": True, "cai": True, "cadr": True},
    "space": "thresholds",
    "search": {"algorithm": "optuna", "num_samples": 1, "max_concurrent": 1, "seed": 0,
               "points_to_evaluate": [{"label": "paper defaults", "confidence": 0.95, "cai_beta": 0.5}],
               "fixed_points": [{"label": "fixmatch", "cap": False, "cai": False, "cadr": False}]},
    "scheduler": {"name": "none"},
}
RAY_STARTED = "Started a local Ray instance"
RAY_ACTOR_LINE = re.compile(r"^(\x1b\[[0-9;]*m)*\((?P<who>[^)]*?) ?pid=[^)]*\)")  # Ray forwards its processes' lines


# --- running the project's commands -----------------------------------------------------------------


@dataclass
class Outcome:
    code: int | None
    output: str  # stdout and stderr together, in order

    @property
    def errors(self) -> list[str]:
        return [line for line in self.output.splitlines() if line.startswith("error:")]

    def tracebacks(self) -> tuple[bool, list[str]]:
        """Whether the command itself printed a traceback, and which of Ray's own processes did
        (their lines reach the console prefixed with the process, e.g. `(TrainController pid=12)`)."""
        own, ray = False, []
        for line in self.output.splitlines():
            if "Traceback (most recent call last)" in line:
                if match := RAY_ACTOR_LINE.match(line):
                    ray.append(match.group("who") or "a Ray process")
                else:
                    own = True
        return own, sorted(set(ray))


class Work:
    """The suite's temporary directory and the processes it started."""

    def __init__(self, root: Path):
        self.root = root
        self.started: list[subprocess.Popen] = []
        self._data = None

    def env(self) -> dict:
        env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}  # always a local Ray
        return {**env, "PYTHONUNBUFFERED": "1"}

    def start(self, *argv, log: Path, session=False) -> subprocess.Popen:
        """`python -m ...` in the background, its output to `log`; with `session`, in a session of
        its own (its process group is what a terminal's Ctrl+C reaches)."""
        with open(log, "w") as out:
            process = subprocess.Popen([sys.executable, "-m", *map(str, argv)], cwd=REPO, env=self.env(),
                                       stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=session)
        self.started.append(process)
        return process

    def run(self, *argv, timeout=300) -> Outcome:
        """`python -m ...` to completion (killed, with its descendants, after `timeout` seconds)."""
        log = Path(tempfile.mkstemp(dir=self.root, prefix="log-", suffix=".txt")[1])
        process = self.start(*argv, log=log)
        code = wait(process, timeout)
        return Outcome(code, log.read_text())

    def data(self) -> Path:
        """A data root holding the converted digits dataset (converted once, by data_prep's CLI)."""
        if self._data is None:
            root = self.root / "data"
            done = self.run("data_prep", "convert", "digits", "--data-root", root)
            if done.code != 0:
                raise RuntimeError(f"converting digits failed: {done.output[-500:]}")
            self._data = root
        return self._data

    def data_copy(self, name: str) -> Path:
        """A private copy of the data root, for a scenario that damages it."""
        return Path(shutil.copytree(self.data(), self.root / name))

    def study_config(self, name: str, **train) -> Path:
        raw = json.loads(json.dumps(STUDY))
        raw["train"].update(train)
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    def launch(self, name: str, storage: Path, *extra, config=None, data=None, log=None, background=False):
        argv = ["study.launch", "--config", config or self.study_config(name), "--storage", storage, "--name", name,
                "--data-root", data or self.data(), *extra]
        if background:
            return self.start(*argv, log=log or self.root / f"{name}.log")
        return self.run(*argv)

    def stop_everything(self) -> None:
        """Kill what is left of the processes this suite started (by PID, descendants included)."""
        for process in self.started:
            if process.poll() is None:
                kill_tree(process.pid)
                process.wait()


def wait(process: subprocess.Popen, timeout: float) -> int | None:
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(process.pid)
        process.wait()
        return None


# --- processes, found through /proc ------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state, ppid, ...), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def descendants(pid: int) -> dict[int, str]:
    """Every live descendant of `pid`, with its start time (to recognise it later)."""
    children: dict[int, list[int]] = {}
    starts = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat(int(entry))):
            children.setdefault(int(fields[1]), []).append(int(entry))
            starts[int(entry)] = fields[19]
    found, todo = {}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found[child] = starts[child]
            todo.append(child)
    return found


def kill_known(processes: dict[int, str]) -> int:
    """SIGKILL each process of {pid: start time} that still runs (the same start time: the same
    process); returns how many were still running."""
    alive = 0
    for pid, start in processes.items():
        fields = _stat(pid)
        if fields and fields[19] == start and fields[0] != "Z":
            alive += 1
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return alive


def kill_tree(pid: int) -> None:
    tree = descendants(pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    kill_known(tree)


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


# --- what a result looks like --------------------------------------------------------------------


@dataclass
class Row:
    passed: bool | None  # None: not run, for a reason of this machine's
    observed: str


def one_line_failure(outcome: Outcome, expected: str, *, before_ray=False) -> Row:
    """Exit code 2, exactly one `error:` line containing `expected`, no traceback (and, with
    `before_ray`, no Ray started)."""
    problems = []
    if outcome.code != 2:
        problems.append(f"exit {outcome.code}")
    if len(outcome.errors) != 1:
        problems.append(f"{len(outcome.errors)} error lines")
    elif expected not in outcome.errors[0]:
        problems.append("the line does not say " + repr(expected))
    own_traceback, ray_tracebacks = outcome.tracebacks()
    if own_traceback:
        problems.append("a traceback")
    if before_ray and RAY_STARTED in outcome.output:
        problems.append("Ray was started")
    observed = f"exit {outcome.code}; " + (outcome.errors[0] if outcome.errors else last_lines(outcome.output))
    return Row(not problems, observed + (f" [{', '.join(problems)}]" if problems else "") + ray_note(ray_tracebacks))


def ray_note(processes: list[str]) -> str:
    """A traceback one of Ray's own processes printed on the console: not the command's failure
    line, but a user sees it."""
    return f" (note: Ray's {', '.join(processes)} also printed a traceback)" if processes else ""


def last_lines(text: str, count=2) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return " / ".join(lines[-count:]) or "(no output)"


def results(trial: Path) -> list[dict]:
    path = trial / "result.json"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def terminated_trials(study: Path) -> list[Path]:
    """Trial directories Tune's saved experiment state records as finished."""
    states = sorted(study.glob("experiment_state-*.json"))
    try:
        entries = json.loads(states[-1].read_text())["trial_data"] if states else []
    except (OSError, ValueError, KeyError):
        return []  # being rewritten; ask again
    trials = [json.loads(entry[0]) for entry in entries]
    return [study / t["relative_logdir"] for t in trials if t.get("status") == "TERMINATED"]


def checkpointed(study: Path) -> bool:
    """Whether Tune's saved experiment state names a checkpoint of a trial (what a resume continues from)."""
    states = sorted(study.glob("experiment_state-*.json"))
    try:
        entries = json.loads(states[-1].read_text())["trial_data"] if states else []
        return any(json.loads(entry[1]).get("last_result", {}).get("checkpoint_dir_name") for entry in entries)
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError):
        return False  # being rewritten; ask again


def wait_for(condition, process: subprocess.Popen, timeout: float, interval=1.0):
    """Poll `condition()` until it returns something truthy, the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if found := condition():
            return found
        time.sleep(interval)
    return None


def report_rows(study: Path) -> list[dict]:
    try:
        with open(study / "report.csv") as f:
            return list(csv.DictReader(f))
    except OSError:
        return []


# --- the scenarios ----------------------------------------------------------------------------------


def divergence(work: Work) -> Row:
    done = work.run("trainables.run", *TRAIN, "--data-root", work.data(), "--lr", "1e6", "--cap", "--cai",
                    "--cadr", "--steps", "20", "--eval-every", "10", "--storage", work.root / "diverging")
    row = one_line_failure(done, "error: training diverged")
    retried = "[FailurePolicy] RETRY" in done.output or done.output.count("Started training worker group") > 1
    return Row(row.passed and not retried, row.observed + ("; retried" if retried else "; not retried"))


def finished_run(work: Work, storage: Path) -> list[Path]:
    """A finished 20-step run named `base` under `storage` (trained once, then copied); its
    checkpoint files."""
    base = work.root / "base-run"
    if not base.exists():
        done = work.run("trainables.run", *TRAIN, "--data-root", work.data(), "--steps", "20", "--eval-every", "10",
                        "--storage", base, "--name", "base")
        if done.code != 0:
            raise RuntimeError(f"the run to resume from failed: {last_lines(done.output)}")
    shutil.copytree(base, storage)  # checkpoints are named relative to the run directory
    return sorted(storage.glob("base/checkpoint_*/state.pt"))


def resume(work: Work, storage: Path, *changed) -> Outcome:
    """The finished run again under its name: with its own options it loads its checkpoint."""
    return work.run("trainables.run", *TRAIN, "--data-root", work.data(), "--steps", "20", "--eval-every", "10",
                    *changed, "--storage", storage, "--name", "base")


def names_a_file(row: Row, outcome: Outcome, files: list[Path]) -> Row:
    named = bool(outcome.errors) and any(f"checkpoint {path} " in outcome.errors[0] for path in files)
    return Row(row.passed and named, row.observed + ("" if named else " [names none of the damaged files]"))


class RunsCode:
    """Unpickled by a plain torch.load, this would create a file: what an attacker could plant."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def pickled_checkpoint(work: Work) -> Row:
    import torch

    storage = work.root / "pickled"
    files = finished_run(work, storage)
    marker = work.root / "code-ran"
    for path in files:
        torch.save({"step": RunsCode(marker)}, path)
    done = resume(work, storage)
    row = names_a_file(one_line_failure(done, "holds something other than tensors"), done, files)
    if marker.exists():
        return Row(False, row.observed + " [the planted code ran]")
    return row


def truncated_checkpoint(work: Work) -> Row:
    storage = work.root / "truncated"
    files = finished_run(work, storage)
    for path in files:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    done = resume(work, storage)
    return names_a_file(one_line_failure(done, "cannot be read"), done, files)


def unwritable_storage(work: Work) -> Row:
    blocker = work.root / "a-file"
    blocker.write_text("")
    done = work.launch("unwritable", blocker / "studies")
    return one_line_failure(done, "is not writable", before_ray=True)


def parquet_file(data: Path) -> Path:
    return sorted((data / "digits" / "train").glob("*.parquet"))[0]


def changed_dataset(work: Work) -> Row:
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = work.data_copy("data-changed")
    path = parquet_file(data)
    table = pq.read_table(path)
    labels = table.column("label").to_pylist()
    labels[0] = (labels[0] + 1) % 10  # one image gets another class, in a valid Parquet file
    field = table.schema.field("label")
    pq.write_table(table.set_column(table.schema.get_field_index("label"), field, pa.array(labels, field.type)), path)
    done = work.launch("changed", work.root / "studies", data=data)
    return one_line_failure(done, "Parquet files changed since conversion", before_ray=True)


def truncated_dataset(work: Work) -> Row:
    data = work.data_copy("data-truncated")
    path = parquet_file(data)
    contents = path.read_bytes()
    path.write_bytes(contents[: len(contents) // 2])
    done = work.run("trainables.run", *TRAIN, "--data-root", data, "--steps", "20", "--eval-every", "10",
                    "--storage", work.root / "runs-truncated-data")
    row = one_line_failure(done, "corrupt or truncated Parquet file", before_ray=True)
    named = bool(done.errors) and str(path) in done.errors[0]
    return Row(row.passed and named, row.observed + ("" if named else " [does not name the file]"))


def impossible_resources(work: Work) -> Row:
    import torch

    if torch.cuda.is_available():
        return Row(None, "not run (this machine has a GPU, so --use-gpu is possible)")
    done = work.run("trainables.run", *TRAIN, "--data-root", work.data(), "--steps", "20", "--eval-every", "10",
                    "--use-gpu", "--storage", work.root / "runs-gpu")
    return one_line_failure(done, "use_gpu")


def second_driver(work: Work) -> Row:
    storage = work.root / "studies"
    config = work.study_config("twice", steps=60)
    first = work.launch("twice", storage, config=config, background=True)
    study = storage / "twice"
    running = wait_for(lambda: (study / "study.json").exists(), first, timeout=240)  # past its claim and Ray
    if not running:
        return Row(False, f"the first launch never got going (exit {wait(first, 60)})")
    # While it runs: the same launch again, and a --resume (a second driver of the running study).
    again = work.launch("twice", storage, config=config, log=work.root / "twice-again.log", background=True)
    resumed = work.launch("twice", storage, "--resume", config=config, log=work.root / "twice-resume.log",
                          background=True)
    codes = [wait(again, 120), wait(resumed, 120)]
    first_still_running = first.poll() is None
    again_row = one_line_failure(Outcome(codes[0], (work.root / "twice-again.log").read_text()), "already exists")
    resume_row = one_line_failure(Outcome(codes[1], (work.root / "twice-resume.log").read_text()),
                                  "is being run by another driver")
    code = wait(first, 300)
    trials = [t for t in study.glob("trial_*") if (t / "params.json").exists()]
    complete = all(results(t) and results(t)[-1]["step"] == 60 for t in trials)
    observed = (f"same launch again: {again_row.observed}; --resume: {resume_row.observed}; "
                f"first: {'still running then, ' if first_still_running else 'ALREADY ENDED then, '}"
                f"exit {code}, {len(trials)} trials of 60 steps")
    return Row(again_row.passed and resume_row.passed and first_still_running and code == 0 and len(trials) == 2
               and complete, observed)


def killed_worker(work: Work) -> Row:
    storage, steps = work.root / "runs-killed-worker", 300
    run = storage / "killed"
    launcher = work.start("trainables.run", *TRAIN, "--data-root", work.data(), "--steps", steps,
                          "--eval-every", "20", "--storage", storage, "--name", "killed",
                          log=work.root / "killed-worker.log")

    def checkpointed_worker():
        try:
            snapshot = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
        except (OSError, ValueError):
            return None
        checkpoints = [entry["metrics"]["step"] for entry in snapshot.get("checkpoint_results", [])]
        workers = [pid for pid in descendants(launcher.pid) if "RayTrainWorker" in cmdline(pid)]
        return (workers[0], max(checkpoints)) if checkpoints and workers else None

    found = wait_for(checkpointed_worker, launcher, timeout=300, interval=0.05)
    if found is None:
        code = wait(launcher, 60)
        return Row(False, f"no worker found after a checkpoint (the run ended with exit {code} first)")
    pid, at_step = found
    os.kill(pid, signal.SIGKILL)
    code = wait(launcher, 400)
    output = (work.root / "killed-worker.log").read_text()
    finished = f"step                               {steps}" in output
    restarted = len(list((run / "tensorboard").glob("events.out.tfevents.*"))) >= 2  # a second worker group
    observed = (f"killed worker pid {pid} after the step-{at_step} checkpoint; exit {code}; "
                f"{'finished' if finished else 'did not finish'} {steps} steps; "
                f"{'restarted from its checkpoint' if restarted else 'no restart seen'}")
    own_traceback, ray_tracebacks = Outcome(code, output).tracebacks()
    return Row(code == 0 and finished and restarted and at_step < steps and not own_traceback,
               observed + ray_note(ray_tracebacks))


def killed_driver(work: Work) -> Row:
    storage = work.root / "studies"
    config = work.study_config("killed", steps=40)
    launcher = work.launch("killed", storage, config=config, background=True)
    study = storage / "killed"
    finished = wait_for(lambda: terminated_trials(study), launcher, timeout=300)
    tree = descendants(launcher.pid)
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    if not finished:
        kill_known(tree)
        return Row(False, "no trial finished before the driver ended or the deadline")
    time.sleep(5)  # Ray's own processes share the driver's fate
    left = kill_known(tree)
    kept = (finished[0] / "result.json").read_text()
    done = work.launch("killed", storage, "--resume", config=config)
    trials = [t for t in study.glob("trial_*") if (t / "params.json").exists()]
    unchanged = (finished[0] / "result.json").read_text() == kept
    complete = all(results(t) and results(t)[-1]["step"] == 40 for t in trials)
    rows = report_rows(study)
    observed = (f"killed the driver after trial {finished[0].name.split('_')[1]} finished"
                f"{f' ({left} of its processes outlived it)' if left else ''}; resume: exit {done.code}; finished "
                f"trial's result.json {'unchanged' if unchanged else 'CHANGED'}; {len(rows)} of {len(trials)} "
                f"trials in report.csv")
    passed = done.code == 0 and unchanged and complete and len(trials) == 2 and len(rows) == len(trials)
    return Row(passed, observed + ("" if done.code == 0 else f" ({last_lines(done.output)})"))


def names_inside_roots(work: Work) -> Row:
    """Names that would leave their root, given to each command that makes a path of one."""
    under = work.root / "names"  # every storage and data root of this scenario: nothing may appear
    outcomes = {
        "study.launch --name ../../elsewhere": work.run(
            "study.launch", "--config", work.study_config("names"), "--storage", under / "studies", "--name",
            "../../elsewhere", "--data-root", work.data()),
        "trainables.run --name ../elsewhere": work.run(
            "trainables.run", *TRAIN, "--data-root", work.data(), "--storage", under / "runs", "--name",
            "../elsewhere"),
        "data_prep convert imagefolder --name ../elsewhere": work.run(
            "data_prep", "convert", "imagefolder", "--source", work.data(), "--name", "../elsewhere", "--data-root",
            under / "data"),
    }
    rows = {what: one_line_failure(outcome, "must be a plain name", before_ray=True)
            for what, outcome in outcomes.items()}
    written = [str(path) for path in (under, work.root / "elsewhere") if path.exists()]
    observed = "; ".join(f"{what}: {row.observed}" for what, row in rows.items())
    return Row(all(row.passed for row in rows.values()) and not written,
               observed + (f" [written: {', '.join(written)}]" if written else "; nothing written"))


def changed_config_resume(work: Work) -> Row:
    """A finished study resumed with another train.steps, and a finished run rerun under its name
    with another --lr: both refused before Ray starts, naming the changed key; nothing runs."""
    storage = work.root / "studies"
    config = work.study_config("changed")
    first = work.launch("changed", storage, config=config)
    if first.code != 0:
        return Row(False, f"the study to resume did not finish: exit {first.code} ({last_lines(first.output)})")
    trials = sorted((storage / "changed").glob("trial_*/result.json"))
    before = [path.read_text() for path in trials]
    study = one_line_failure(work.launch("changed", storage, "--resume", "--set", "train.steps=30", config=config),
                             "train.steps: 20 there, 30 now", before_ray=True)
    runs = work.root / "runs-changed"
    finished_run(work, runs)
    run = one_line_failure(resume(work, runs, "--lr", "0.1"), "lr: 0.03 there, 0.1 now", before_ray=True)
    unchanged = [path.read_text() for path in trials] == before
    return Row(study.passed and run.passed and unchanged,
               f"--resume --set train.steps=30: {study.observed}; trainables.run --name base --lr 0.1: "
               f"{run.observed}; {'the finished trials unchanged' if unchanged else 'the finished trials CHANGED'}")


def interrupted(outcome: Outcome, code: int, signame: str) -> Row:
    """Exit 128 + the signal, one `error:` line naming it and the --resume command, no traceback."""
    problems = [f"exit {outcome.code}"] if outcome.code != code else []
    line = outcome.errors[0] if len(outcome.errors) == 1 else ""
    if f"was interrupted ({signame})" not in line or "continue it with: python -m study.launch " not in line:
        problems.append(f"{len(outcome.errors)} error lines, none saying interrupted ({signame}) and the command")
    own_traceback, ray_tracebacks = outcome.tracebacks()
    if own_traceback:
        problems.append("a traceback")
    observed = f"exit {outcome.code}; " + (line or last_lines(outcome.output))
    return Row(not problems, observed + (f" [{', '.join(problems)}]" if problems else "") + ray_note(ray_tracebacks))


def interrupted_study(work: Work) -> Row:
    """Ctrl+C (SIGINT to the launcher's process group) mid-study, then SIGTERM (as `kill` or `ray job
    stop` sends it) of the study resumed with the printed command, then that command to the end."""
    storage, name, steps = work.root / "studies", "sweep", 200
    study = storage / name
    argv = ["study.launch", "--config", work.study_config(name, steps=steps), "--storage", storage, "--name", name,
            "--data-root", work.data()]
    progress = re.compile(rf"\] step (\d+)/{steps} ")

    def stopped(argv, log: Path, signum: int, group: bool, ready) -> Outcome:
        launcher = work.start(*argv, log=log, session=True)
        if not wait_for(lambda: ready(log), launcher, timeout=300, interval=0.2):
            return Outcome(wait(launcher, 60), log.read_text())
        if group:  # the launcher's own session: what a terminal's Ctrl+C reaches
            os.killpg(launcher.pid, signum)
        else:
            os.kill(launcher.pid, signum)
        return Outcome(wait(launcher, 300), log.read_text())

    # Once a checkpoint is in Tune's saved state, the resumed trial goes on from it (past step 10).
    first = stopped(argv, work.root / "interrupted.log", signal.SIGINT, group=True,
                    ready=lambda log: checkpointed(study))
    sigint = interrupted(first, 130, "SIGINT")
    report = (study / "report.md").read_text().splitlines() if (study / "report.md").exists() else []
    marked = len(report) > 2 and report[2].startswith("**Unfinished**: ")
    command = first.errors[0].split("continue it with: ", 1)[-1] if first.errors else ""
    again = shlex.split(command)[2:] if command.startswith("python -m study.launch ") else argv
    second = stopped(again, work.root / "interrupted-again.log", signal.SIGTERM, group=False,
                     ready=lambda log: progress.search(log.read_text()))
    sigterm = interrupted(second, 143, "SIGTERM")
    resumed_at = [int(step) for step in progress.findall(second.output)][:1]
    done = work.run(*again)
    rows = report_rows(study)
    finished = (done.code == 0 and len(rows) == 2 and all(row["status"] == "TERMINATED" and row["steps"] == str(steps)
                                                         for row in rows)
                and "Unfinished" not in (study / "report.md").read_text())
    observed = (f"Ctrl+C: {sigint.observed}; report.md {'marked' if marked else 'NOT marked'} unfinished at the top; "
                f"the printed command, resumed at step {resumed_at[0] if resumed_at else '?'}, then SIGTERM: "
                f"{sigterm.observed}; the printed command again: exit {done.code}, {len(rows)} trials "
                + (f"TERMINATED at step {steps}" if finished else f"({last_lines(done.output)})"))
    return Row(sigint.passed and marked and sigterm.passed and bool(resumed_at) and resumed_at[0] > 10 and finished,
               observed)


def infinite_option(work: Work) -> Row:
    split = work.run("data_prep", "split", "digits", "--kind", "lt", "--n-max", "50", "--gamma-l", "inf",
                     "--data-root", work.data())
    run = work.run("trainables.run", *TRAIN, "--data-root", work.data(), "--lr", "nan", "--steps", "20",
                   "--storage", work.root / "runs-nan")
    rows = [one_line_failure(split, "gamma_l must be a finite number", before_ray=True),
            one_line_failure(run, "lr must be a finite number", before_ray=True)]
    return Row(all(row.passed for row in rows), f"--gamma-l inf: {rows[0].observed}; --lr nan: {rows[1].observed}")


# --- Ray clusters of this suite's own, started with `ray start` ----------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """A Ray cluster started with `ray start` (a head, then a node per entry of `cpus`), token
    authentication on; every process of it holds its temp dir in its command line, which is how
    it is stopped (never `ray stop`, which would stop other instances too)."""

    def __init__(self, work: Work, cpus: list[int]):
        import secrets

        self.temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must stay short
        self.port, self.dashboard = free_port(), free_port()
        self.env = {**work.env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        ray = str(Path(sys.executable).with_name("ray"))
        for i, count in enumerate(cpus):
            node = ["--num-cpus", str(count), "--temp-dir", self.temp_dir, "--disable-usage-stats",
                    "--dashboard-agent-listen-port", str(free_port())]
            head = ["--head", "--port", str(self.port), "--include-dashboard", "true", "--dashboard-host",
                    "127.0.0.1", "--dashboard-port", str(self.dashboard)]
            subprocess.run([ray, "start", *(head if i == 0 else ["--address", f"127.0.0.1:{self.port}"]), *node],
                           env=self.env, check=True, capture_output=True, timeout=180)

    def submit(self, work: Work, *argv, timeout=900) -> Outcome:
        """`ray job submit ... -- python -m <argv>` as the README says, retried while the head's
        agent is not yet registered (nothing has run then)."""
        ray = str(Path(sys.executable).with_name("ray"))
        command = [ray, "job", "submit", "--address", f"http://127.0.0.1:{self.dashboard}", "--working-dir",
                   str(REPO), "--", sys.executable, "-m", *map(str, argv)]
        deadline = time.monotonic() + 120
        while True:
            done = subprocess.run(command, env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
            output = done.stdout + done.stderr
            Path(tempfile.mkstemp(dir=work.root, prefix="job-", suffix=".txt")[1]).write_text(output)
            if "No available agent to submit job" not in output or time.monotonic() > deadline:
                return Outcome(done.returncode, output)
            time.sleep(2)

    def stop(self) -> None:
        for _ in range(2):
            for pid in filter(str.isdigit, os.listdir("/proc")):
                if self.temp_dir in cmdline(int(pid)) and int(pid) != os.getpid():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
            time.sleep(1)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def small_nodes_cluster(work: Work) -> Row:
    """The shape that used to hang: nodes of 1, 1 and 2 CPUs, trials of 2 workers of 0.5 CPU each,
    submitted with `ray job submit`; then workers no node can hold, refused at once."""
    cluster = Cluster(work, [1, 1, 2])
    try:
        config = work.study_config("nodes")
        raw = yaml.safe_load(config.read_text())
        raw["resources"] = {"num_workers": 2, "cpus_per_worker": 0.5, "trainer": "torch_trainer"}
        config.write_text(yaml.safe_dump(raw))
        storage = work.root / "studies-cluster"
        argv = ["study.launch", "--config", config, "--storage", storage, "--data-root", work.data()]
        began = time.monotonic()
        ran = cluster.submit(work, *argv, "--name", "nodes", timeout=600)
        ran_s = time.monotonic() - began
        rows = report_rows(storage / "nodes")
        finished = ran.code == 0 and len(rows) == 2 and all(r["status"] == "TERMINATED" for r in rows)
        began = time.monotonic()
        refused = cluster.submit(work, *argv, "--name", "too-big", "--set", "resources.cpus_per_worker=3",
                                 timeout=300)
        refused_s = time.monotonic() - began
        # `ray job submit` streams the driver's output, then repeats its last lines in Ray's
        # failure summary with the driver's exit code: the streamed part is what the driver said.
        streamed, _, summary = refused.output.partition("Status message:")
        code = re.search(r"failed with exit code (\d+)", summary)
        row = one_line_failure(Outcome(int(code.group(1)) if code else None, streamed),
                               "each worker reserves 3 CPU, more than any node of the cluster has")
        refused_ok = refused.code != 0 and row.passed and not (storage / "too-big").exists()
        observed = (f"2 workers of 0.5 CPU: job exit {ran.code}, {len(rows)} trials "
                    f"{'all TERMINATED' if finished else 'NOT all finished'} in {ran_s:.0f} s; workers of 3 CPU: job "
                    f"failed after {refused_s:.0f} s, the driver's {row.observed}")
        return Row(finished and refused_ok and refused_s < 60, observed)
    finally:
        cluster.stop()


def another_ray_instance(work: Work) -> Row:
    """Another Ray runs on this machine: a run without --address starts its own and never attaches
    to it (nor stops it)."""
    cluster = Cluster(work, [1])
    try:
        done = work.run("trainables.run", *TRAIN, "--data-root", work.data(), "--steps", "20", "--eval-every", "10",
                        "--storage", work.root / "runs-beside")
        other_alive = any(cluster.temp_dir in cmdline(int(pid)) and "gcs_server" in cmdline(int(pid))
                          for pid in filter(str.isdigit, os.listdir("/proc")))
        own = RAY_STARTED in done.output
        observed = (f"exit {done.code}; {'started its own Ray' if own else 'did NOT start its own Ray'}; the other "
                    f"instance {'still runs' if other_alive else 'is GONE'}")
        if done.code != 0:
            observed += f" ({last_lines(done.output)})"
        return Row(done.code == 0 and own and other_alive and not done.tracebacks()[0], observed)
    finally:
        cluster.stop()


def _loopback(address: str) -> bool:
    return address in ("127.0.0.1", "::1")


def listening(pids: set[int]) -> list[tuple[str, int, str]]:
    """(address, port, process) of the TCP sockets in LISTEN state that `pids` own (from /proc)."""
    import ipaddress

    owners = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:["):
                        owners[link[8:-1]] = pid
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in owners:  # LISTEN
                raw = bytes.fromhex(fields[1].split(":")[0])
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # host-order words
                address = ipaddress.ip_address(raw)
                address = address.ipv4_mapped or address if address.version == 6 else address
                pid = owners[fields[9]]
                found.append((str(address), int(fields[1].split(":")[1], 16), cmdline(pid).split(" ")[0]))
    return found


def local_only(work: Work) -> Row:
    """A study's own Ray, token authentication disabled: what listens where, mid-study; then the
    driver is killed and nothing of its Ray may go on listening."""
    config = work.study_config("local", steps=300)
    log = work.root / "local.log"
    argv = ["study.launch", "--config", config, "--storage", work.root / "studies", "--name", "local",
            "--data-root", work.data()]
    with open(log, "w") as out:
        launcher = subprocess.Popen([sys.executable, "-m", *map(str, argv)], cwd=REPO, stdout=out,
                                    stderr=subprocess.STDOUT, env={**work.env(), "RAY_AUTH_MODE": "disabled"})
    work.started.append(launcher)
    seen, tree = set(), {}
    training = lambda: "step 20/300" in log.read_text()  # noqa: E731
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and launcher.poll() is None and not training():
        time.sleep(1)
    for _ in range(5):  # a few looks while trials run
        tree = {**tree, **descendants(launcher.pid)}
        seen |= set(listening({launcher.pid, *tree}))
        time.sleep(1)
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    began, left = time.monotonic(), None
    while time.monotonic() - began < 180:
        left = listening(set(tree))
        if not left:
            break
        time.sleep(2)
    gone_s = time.monotonic() - began
    kill_known(tree)
    exposed = sorted({f"{a}:{port} ({name.rsplit('/', 1)[-1]})" for a, port, name in seen if not _loopback(a)})
    servers = {name.rsplit("/", 1)[-1] for _, _, name in seen}
    observed = (f"{len(seen)} listening sockets mid-study, " + (f"NOT loopback: {', '.join(exposed)}" if exposed
                else "every one on 127.0.0.1") + "; after SIGKILL of the driver: "
                + (f"{len(left)} still listening after {gone_s:.0f} s" if left else
                   f"none listening after {gone_s:.0f} s"))
    return Row(not exposed and not left and {"gcs_server", "raylet"} <= servers, observed)


def storage_full(work: Work) -> Row:
    if os.geteuid() != 0:
        return Row(None, "not run (needs root for a small tmpfs)")
    mount = work.root / "small-disk"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        return Row(None, f"not run (cannot mount a tmpfs: {mounted.stderr.strip()})")
    try:
        return fill_storage_mid_study(work, mount)
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def fill_storage_mid_study(work: Work, mount: Path) -> Row:
    steps = 150
    config = work.study_config("full", steps=steps)
    study = mount / "studies" / "full"
    launcher = work.launch("full", mount / "studies", "--num-samples", "2", config=config, background=True)

    def one_finished_one_under_way():  # Tune records a trial as finished while the next one checkpoints
        finished = terminated_trials(study)
        under_way = [t for t in study.glob("trial_*") if t not in finished and any(t.glob("checkpoint_*"))]
        return finished if finished and under_way else None

    finished = wait_for(one_finished_one_under_way, launcher, timeout=300, interval=0.2)
    if not finished:
        return Row(False, f"no trial was under way after a finished one when the disk was to fill "
                          f"(exit {wait(launcher, 30)})")
    kept = [t.name.split("_")[1] for t in finished]
    filler = mount / "filler"
    with open(filler, "wb") as f:  # another writer takes every free byte
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError:
            pass
    tree = descendants(launcher.pid)
    code = wait(launcher, 300)
    left = kill_known(tree)
    launch = one_line_failure(Outcome(code, (work.root / "full.log").read_text()), "No space left on device")
    while_full = work.run("study.report", study)
    filler.unlink()
    freed = work.run("study.report", study)
    trials = [t for t in study.glob("trial_*") if (t / "params.json").exists()]
    rows = report_rows(study)
    listed = freed.code == 0 and len(rows) == len(trials) >= 2
    by_id = {row["trial_id"]: row for row in rows}
    lost = [trial for trial in kept if by_id.get(trial, {}).get("status") != "TERMINATED"]
    full_ok = (while_full.code == 0 and not while_full.tracebacks()[0]) or one_line_failure(while_full, "").passed
    said = "" if while_full.code == 0 else f" ({(while_full.errors or [last_lines(while_full.output)])[0]})"
    statuses = ", ".join(f"{row['status']} at step {row['steps'] or '?'}" for row in rows)
    # With space again, --resume either continues (every finished trial kept as it was, the rest
    # run to the end) or refuses in one line naming what is damaged.
    before = {trial: by_id[trial] for trial in kept if trial in by_id}
    resumed = work.launch("full", mount / "studies", "--resume", "--num-samples", "2", config=config)
    after = {row["trial_id"]: row for row in report_rows(study)}
    if resumed.code == 0:
        same = ("status", "steps", "valid_balanced_accuracy_median_10", "test_accuracy_median_10")
        resume_ok = (all({k: after.get(trial, {}).get(k) for k in same} == {k: row[k] for k in same}
                         for trial, row in before.items())
                     and all(row["status"] == "TERMINATED" and row["steps"] == str(steps) for row in after.values()))
        found = ", ".join(f"{row['status']} at step {row['steps']}" for row in after.values())
        resume_said = (f"exit 0, {len(after)} trials, all TERMINATED at step {steps}, the finished ones unchanged"
                       if resume_ok else f"exit 0 but {found}")
    else:
        refusal = one_line_failure(resumed, "cannot resume")
        resume_ok, resume_said = refusal.passed, refusal.observed
    observed = (f"launch: {launch.observed}{f'; {left} processes left running' if left else ''}; "
                f"report while full: exit {while_full.code}{said}; report after freeing space: exit {freed.code}, "
                f"{len(rows)} of {len(trials)} trials ({statuses}); "
                + (f"{len(lost)} of the {len(kept)} trial(s) finished before the disk filled LOST" if lost else
                   f"the {len(kept)} trial(s) finished before the disk filled kept")
                + f"; --resume: {resume_said}")
    return Row(launch.passed and full_ok and listed and not lost and resume_ok, observed)


SCENARIOS = [  # name, what the README promises, the function that provokes it
    ("divergence", "trainables.run: exit 2, one `error: training diverged` line, not retried", divergence),
    ("pickled_checkpoint", "resume: exit 2, one line naming the checkpoint file; its code never runs",
     pickled_checkpoint),
    ("truncated_checkpoint", "resume: exit 2, one line naming the checkpoint file", truncated_checkpoint),
    ("unwritable_storage", "study.launch: exit 2, one line, before Ray starts", unwritable_storage),
    ("changed_dataset", "study.launch refuses: exit 2, one line, before Ray starts", changed_dataset),
    ("truncated_dataset", "trainables.run: exit 2, one line naming the file, before Ray starts", truncated_dataset),
    ("impossible_resources", "trainables.run --use-gpu without a GPU: exit 2, one line", impossible_resources),
    ("second_driver", "a second launch and a `--resume` of a running study refused: exit 2, one line each; "
     "the first finishes (exit 0)", second_driver),
    ("infinite_option", "`data_prep split --gamma-l inf`, `trainables.run --lr nan`: exit 2, one line each, "
     "before Ray starts", infinite_option),
    ("small_nodes_cluster", "`ray job submit` to nodes of 1, 1 and 2 CPUs, trials of 2 workers of 0.5 CPU: "
     "the study finishes; workers bigger than every node: refused in one line within a minute",
     small_nodes_cluster),
    ("another_ray_instance", "trainables.run beside another Ray instance: starts its own, exit 0, the other "
     "untouched", another_ray_instance),
    ("local_only", "a study's own Ray with token authentication disabled listens on 127.0.0.1 only; a "
     "SIGKILLed driver leaves nothing listening", local_only),
    ("killed_worker", "trainables.run continues from its checkpoint and finishes: exit 0", killed_worker),
    ("killed_driver", "--resume: exit 0, the finished trial kept as it was, every trial in report.csv",
     killed_driver),
    ("storage_full", "study.launch: exit 2, one line; study.report still lists every trial, the finished ones "
     "kept; with space again, --resume finishes the study or refuses in one line", storage_full),
    ("names_inside_roots", "a study, run or dataset name with `..` or a separator: exit 2, one line each, before "
     "Ray starts; nothing written", names_inside_roots),
    ("changed_config_resume", "`--resume` of a finished study with another train.steps, and a rerun of a finished "
     "run with another --lr: exit 2, one line naming the changed key, before Ray starts; nothing runs",
     changed_config_resume),
    ("interrupted_study", "Ctrl+C mid-study: exit 130, one line with the exact --resume command, report marked "
     "unfinished; SIGTERM of the resumed study: exit 143, the same line; that command then finishes the study "
     "(exit 0)", interrupted_study),
]


# --- the suite ---------------------------------------------------------------------------------------


def cell(text: str, work: Work) -> str:
    return text.replace(str(work.root), "$TMP").replace("|", "\\|").replace("\n", " ")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=[name for name, _, _ in SCENARIOS], help="these scenarios")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    chosen = [s for s in SCENARIOS if not args.only or s[0] in args.only]
    root = Path(tempfile.mkdtemp(prefix="faults-"))
    work = Work(root)
    started = time.monotonic()
    outcomes = []
    try:
        for name, expected, scenario in chosen:
            began = time.monotonic()
            try:
                row = scenario(work)
            except Exception as exc:  # the suite's own trouble: that scenario fails, the others still run
                row = Row(False, f"suite error: {type(exc).__name__}: {exc}")
            finally:
                work.stop_everything()
            outcomes.append((name, expected, row, time.monotonic() - began))
            print(f"{name}: {'pass' if row.passed else 'not run' if row.passed is None else 'FAIL'} "
                  f"({time.monotonic() - began:.0f} s)", file=sys.stderr, flush=True)
    finally:
        work.stop_everything()
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    print("| scenario | expected | observed | result |")
    print("|---|---|---|---|")
    for name, expected, row, _ in outcomes:
        result = "pass" if row.passed else "not run" if row.passed is None else "**FAIL**"
        print(f"| {name} | {cell(expected, work)} | {cell(row.observed, work)} | {result} |")
    failed = [name for name, _, row, _ in outcomes if row.passed is False]
    summary = {"scenarios": len(outcomes), "passed": sum(row.passed is True for _, _, row, _ in outcomes),
               "not_run": [name for name, _, row, _ in outcomes if row.passed is None], "failed": failed,
               "seconds": {name: round(seconds) for name, _, _, seconds in outcomes},
               "wall_s": round(time.monotonic() - started)}
    print(json.dumps(summary))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
