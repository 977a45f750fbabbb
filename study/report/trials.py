"""Reading a study directory: one `TrialRecord` per trial, from the files Ray Tune writes
(params.json, result.json, error.txt, the experiment_state JSON), never from Tune's pickles.
A trial without results yet is listed, and a result line cut in half is skipped, so a report can
be built while the study is still running."""

import math
from dataclasses import dataclass, field
from pathlib import Path

from data_prep.errors import DataPrepError
from search_spaces import VARIANTS
from study.config import StudyConfig
from study.directory import read_study_json
from study.errors import StudyError
from study.tune_files import (
    GENERIC_LABELS,
    ended_records,
    error_line,
    flat_params,
    read_json,
    read_results,
    state_trials_in,
    trial_id_of,
)
from trainables.config import TrainConfig
from trainables.errors import TrainConfigError
from trainables.loop import FATAL_ERROR
from trainables.methods import METHODS
from trainables.metrics import class_metric_name

FLAGS = ("cap", "cai", "cadr")  # FixMatch's corrections, a column each in report.csv
STOPPED_EARLY = "STOPPED_EARLY"  # ended by the scheduler (ASHA, median stopping) before its planned steps
STATUSES = ("TERMINATED", STOPPED_EARLY, "RUNNING", "PENDING", "PAUSED", "ERROR", "LOST")
UNFINISHED = ("RUNNING", "PENDING", "PAUSED")  # a trial a --resume runs (on)

@dataclass
class TrialRecord:
    """One Tune trial as its files describe it. `results` are the result.json lines in order."""

    trial_id: str
    params: dict
    status: str
    results: list[dict] = field(default_factory=list)
    path: Path | None = None
    error: str | None = None  # the exception line of error.txt
    train: TrainConfig | None = None  # what the trial trained, resolved from study.json and its params
    planned_steps: int | None = None  # the steps it was to train (None: not known)

    @property
    def last(self) -> dict:
        return self.results[-1] if self.results else {}

    def value(self, key: str) -> float | None:
        """The last reported value of `key`; None if never reported or not a finite number."""
        value = self.last.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return None
        return float(value)

    @property
    def steps(self) -> int | None:
        steps = self.last.get("step", self.last.get("training_iteration"))
        return int(steps) if isinstance(steps, (int, float)) else None

    @property
    def status_text(self) -> str:
        """The status as the report shows it: a trial the scheduler stopped says at which step."""
        if self.status == STOPPED_EARLY:
            return f"{STOPPED_EARLY} at step {self.steps} of {self.planned_steps}"
        return self.status

    @property
    def wall_time_s(self) -> float | None:
        return self.value("time_total_s")

    def resolve(self, study: StudyConfig | None) -> None:
        """Work out what the trial trained: the study's base config with the trial's params."""
        try:
            self.train = study.train_config(self.params) if study else None
        except (StudyError, TrainConfigError, DataPrepError, KeyError):
            self.train = None  # params from another version of the tool: name it from its params

    @property
    def flags(self) -> dict:
        """FixMatch's correction flags the trial trained with (None for other methods)."""
        if self.train is not None:
            options = self.train.method.options
            return {name: options.get(name) for name in FLAGS}
        params = {**self.params, **VARIANTS.get(self.params.get("variant"), {})}
        return {name: params.get(name) for name in FLAGS}

    @property
    def method(self) -> str:
        """The registry's name for what the trial trained (e.g. "CADR", "FlexMatch")."""
        if self.train is not None:
            return self.train.method.label
        params = {**self.params, **VARIANTS.get(self.params.get("variant"), {})}
        name = params.get("method", "fixmatch")
        return METHODS[name].label(params) if name in METHODS else str(name)

    @property
    def label(self) -> str:
        return str(self.params.get("label", ""))

    @property
    def group(self) -> str:
        """What repeats over seeds: the variant, else a fixed point's own label, else the method's
        report name (e.g. CADR, FlexMatch)."""
        if "variant" in self.params:
            return str(self.params["variant"])
        return self.label if self.label not in GENERIC_LABELS else self.method

    @property
    def stage(self) -> str:
        """A compare study's stage (search or confirm), else ""."""
        return str(self.params.get("stage", ""))

    @property
    def config_tag(self) -> str:
        """A compare study's configuration: defaults or tuned (stage 2); defaults or searched (stage 1)."""
        if "config" in self.params:
            return str(self.params["config"])
        if self.stage == "search":
            return "defaults" if self.label == "defaults" else "searched"
        return ""

    @property
    def seed(self):
        """The training seed: the trial's own, else the study's."""
        return self.params.get("seed", self.train.seed if self.train is not None else None)

    @property
    def class_accuracy(self) -> list[float]:
        """Last per-class test accuracies, class 0 first (NaN where a class was not reported)."""
        prefix = class_metric_name("test", "")
        indices = [int(k.removeprefix(prefix)) for k in self.last if k.startswith(prefix) and k[len(prefix):].isdigit()]
        if not indices:
            return []
        values = [self.value(class_metric_name("test", c)) for c in range(max(indices) + 1)]
        return [math.nan if v is None else v for v in values]


def load_trials(study_dir, planned_steps: int | None = None) -> list[TrialRecord]:
    """Every trial of a study directory, in the order Tune created them (by trial id).

    Statuses come from Tune's newest experiment_state-*.json; a trial it does not list yet is
    ERROR if it left an error file, TERMINATED if its last result is final, RUNNING if it has
    results and PENDING if not. A TERMINATED trial whose last step is short of the steps it
    planned was stopped by the scheduler: STOPPED_EARLY. Trials Tune lists but has not started
    have no directory. A trial that ran (it has checkpoints) but whose result or parameter file
    is empty or unreadable, as a failed storage leaves them, is listed as LOST: never dropped
    silently. A trial that ended has the launcher's own record too (<study>/finished/): its
    parameters and last result stand in for Tune's files when those were cut short."""
    study_dir = Path(study_dir)
    states = state_trials_in(study_dir)
    by_dir = {state.get("relative_logdir"): state for state in states if state.get("relative_logdir")}
    if planned_steps is None:
        planned_steps = read_study_json(study_dir).get("config", {}).get("train", {}).get("steps")
    trials, seen = [], set()
    ended = ended_records(study_dir)
    for path in sorted(p for p in _subdirs(study_dir) if (p / "params.json").is_file()):
        params = read_json(path / "params.json")
        results = read_results(path / "result.json")
        ran = any(path.glob("checkpoint_*"))
        record = _behind(ended.get(trial_id_of(path.name, results)), params, results)
        if record is not None:  # Tune's copies were cut short after the trial ended: the record is whole
            params = params if isinstance(params, dict) else record["params"]
            reached = record["last_result"]["training_iteration"]
            results = [r for r in results if r.get("training_iteration", 0) < reached] + [record["last_result"]]
        if params is None and not ran:  # being written
            continue
        error = error_line(path)
        if ran and (params is None or not results):
            trials.append(TrialRecord(trial_id_of(path.name, results), flat_params(params or {}), "LOST", results,
                                      path, "its results were lost (an empty or damaged result or parameter file: "
                                      "a storage failure?); its checkpoints remain"))
            seen.add(trials[-1].trial_id)
            continue
        state = by_dir.get(path.name)
        trial_id = (state or {}).get("trial_id") or trial_id_of(path.name, results)
        status = (state["status"] if state and state.get("status") else record["status"] if record is not None
                  else _inferred_status(results, error, planned_steps))
        if results and results[-1].get(FATAL_ERROR):  # a failure that would recur ended the trial
            status, error = "ERROR", str(results[-1][FATAL_ERROR])
        params = flat_params(params)
        planned = params.get("steps", planned_steps)  # a trial's own steps where the space sweeps them
        if status == "TERMINATED" and planned is not None and results and results[-1].get("step", planned) < planned:
            status = STOPPED_EARLY
        trials.append(TrialRecord(trial_id, params, status, results, path, error, planned_steps=planned))
        seen.add(trial_id)
    for state in states:  # created by Tune, not started yet
        if state.get("trial_id") and state["trial_id"] not in seen:
            params = flat_params(state.get("config") or {})
            trials.append(TrialRecord(state["trial_id"], params, state.get("status") or "PENDING",
                                      planned_steps=params.get("steps", planned_steps)))
    return sorted(trials, key=lambda t: t.trial_id)


def _behind(record: dict | None, params, results: list[dict]) -> dict | None:
    """The trial's record, if Tune's files are behind it (an empty or unreadable params.json, or
    results that stop before the record's last one), else None: a resumed trial's files go on
    past the record of how it ended before."""
    if record is None:
        return None
    reached = max((r.get("training_iteration", 0) for r in results), default=0)
    return record if not isinstance(params, dict) or reached < record["last_result"]["training_iteration"] else None


def _inferred_status(results, error, planned_steps) -> str:
    if error is not None:
        return "ERROR"
    if not results:
        return "PENDING"
    last = results[-1]
    finished = last.get("done") is True or (planned_steps is not None and last.get("step", 0) >= planned_steps)
    return "TERMINATED" if finished else "RUNNING"


def _subdirs(study_dir: Path) -> list[Path]:
    try:
        return [p for p in study_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    except OSError as exc:
        raise StudyError(f"cannot list {study_dir}: {exc.strerror}") from None
