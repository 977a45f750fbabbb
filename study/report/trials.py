"""Reading a study directory: one `TrialRecord` per trial, from the files Ray Tune writes
(params.json, result.json, error.txt, the experiment_state JSON), never from Tune's pickles.
A trial without results yet is listed, and a result line cut in half is skipped, so a report can
be built while the study is still running."""

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from search_spaces import VARIANTS
from study.config import StudyConfig, StudyError, trial_overrides
from trainables.config import TrainConfig
from trainables.errors import TrainConfigError
from trainables.loop import FATAL_ERROR
from trainables.methods import METHODS

FLAGS = ("cap", "cai", "cadr")  # FixMatch's corrections, a column each in report.csv
STATUSES = ("TERMINATED", "RUNNING", "PENDING", "PAUSED", "ERROR", "LOST")
GENERIC_LABELS = ("", "search", "grid", "fixed")  # how a trial came to be, not what it trained

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
    def wall_time_s(self) -> float | None:
        return self.value("time_total_s")

    def resolve(self, study: StudyConfig | None) -> None:
        """Work out what the trial trained: the study's base config with the trial's params."""
        try:
            self.train = study.train_config(trial_overrides(self.params)) if study else None
        except (StudyError, TrainConfigError, KeyError):
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
    def class_accuracy(self) -> list[float]:
        """Last per-class test accuracies, class 0 first (NaN where a class was not reported)."""
        indices = [int(k.split("/", 1)[1]) for k in self.last if re.fullmatch(r"test_class_accuracy/\d+", k)]
        if not indices:
            return []
        values = [self.value(f"test_class_accuracy/{c}") for c in range(max(indices) + 1)]
        return [math.nan if v is None else v for v in values]


def load_trials(study_dir) -> list[TrialRecord]:
    """Every trial of a study directory, in the order Tune created them (by trial id).

    Statuses come from Tune's newest experiment_state-*.json; a trial it does not list yet is
    ERROR if it left an error file, TERMINATED if its last result is final, RUNNING if it has
    results and PENDING if not. Trials Tune lists but has not started have no directory. A trial
    that ran (it has checkpoints) but whose result or parameter file is empty or unreadable, as a
    failed storage leaves them, is listed as LOST: never dropped silently. A trial that ended has
    the launcher's own record too (<study>/finished/): its parameters and last result stand in for
    Tune's files when those were cut short."""
    study_dir = Path(study_dir)
    states = _experiment_state(study_dir)
    by_dir = {state.get("relative_logdir"): state for state in states if state.get("relative_logdir")}
    planned_steps = _study_json(study_dir).get("config", {}).get("train", {}).get("steps")
    trials, seen = [], set()
    ended = _ended_records(study_dir)
    for path in sorted(p for p in _subdirs(study_dir) if (p / "params.json").is_file()):
        params = _read_json(path / "params.json")
        results = _read_results(path / "result.json")
        ran = any(path.glob("checkpoint_*"))
        record = _behind(ended.get(_trial_id(path.name, results)), params, results)
        if record is not None:  # Tune's copies were cut short after the trial ended: the record is whole
            params = params if isinstance(params, dict) else record["params"]
            reached = record["last_result"]["training_iteration"]
            results = [r for r in results if r.get("training_iteration", 0) < reached] + [record["last_result"]]
        if params is None and not ran:  # being written
            continue
        error = _error_line(path)
        if ran and (params is None or not results):
            trials.append(TrialRecord(_trial_id(path.name, results), _flat_params(params or {}), "LOST", results,
                                      path, "its results were lost (an empty or damaged result or parameter file: "
                                      "a storage failure?); its checkpoints remain"))
            seen.add(trials[-1].trial_id)
            continue
        state = by_dir.get(path.name)
        trial_id = (state or {}).get("trial_id") or _trial_id(path.name, results)
        status = (state["status"] if state and state.get("status") else record["status"] if record is not None
                  else _inferred_status(results, error, planned_steps))
        if results and results[-1].get(FATAL_ERROR):  # a failure that would recur ended the trial
            status, error = "ERROR", str(results[-1][FATAL_ERROR])
        trials.append(TrialRecord(trial_id, _flat_params(params), status, results, path, error))
        seen.add(trial_id)
    for state in states:  # created by Tune, not started yet
        if state.get("trial_id") and state["trial_id"] not in seen:
            trials.append(TrialRecord(state["trial_id"], _flat_params(state.get("config") or {}),
                                      state.get("status") or "PENDING"))
    return sorted(trials, key=lambda t: t.trial_id)


def _behind(record: dict | None, params, results: list[dict]) -> dict | None:
    """The trial's record, if Tune's files are behind it (an empty or unreadable params.json, or
    results that stop before the record's last one), else None: a resumed trial's files go on
    past the record of how it ended before."""
    if record is None:
        return None
    reached = max((r.get("training_iteration", 0) for r in results), default=0)
    return record if not isinstance(params, dict) or reached < record["last_result"]["training_iteration"] else None


def _ended_records(study_dir: Path) -> dict[str, dict]:
    """{trial id: record} from <study>/finished/, the launcher's own record of each trial as it
    ended (study/tune.py, RecordEndedTrials); a record that does not parse is ignored."""
    records = {}
    for path in sorted((study_dir / "finished").glob("*.json")):
        record = _read_json(path)
        if (isinstance(record, dict) and isinstance(record.get("params"), dict)
                and isinstance(record.get("last_result"), dict)
                and isinstance(record["last_result"].get("training_iteration"), int)):
            records[path.stem] = record
    return records


def _flat_params(params: dict) -> dict:
    # A TorchTrainer run under Tune nests the trial's config under train_loop_config.
    nested = params.get("train_loop_config")
    rest = {k: v for k, v in params.items() if k != "train_loop_config"}
    return {**nested, **rest} if isinstance(nested, dict) else rest


def _inferred_status(results, error, planned_steps) -> str:
    if error is not None:
        return "ERROR"
    if not results:
        return "PENDING"
    last = results[-1]
    finished = last.get("done") is True or (planned_steps is not None and last.get("step", 0) >= planned_steps)
    return "TERMINATED" if finished else "RUNNING"


def _trial_id(dir_name: str, results: list[dict]) -> str:
    for result in results:
        if result.get("trial_id"):
            return str(result["trial_id"])
    match = re.search(r"(?:^|_)([0-9a-f]{5,}_\d{5})(?:_|$)", dir_name)  # Tune's <trainable>_<id>_<tag>
    if match:
        return match.group(1)
    return dir_name.removeprefix("trial_")  # the launcher names trial directories trial_<id>


def _experiment_state(study_dir: Path) -> list[dict]:
    """The per-trial JSON of Tune's newest experiment state, or [] if there is none (yet) or it
    is being rewritten. Plain JSON only: the pickled fields Tune embeds are never decoded."""
    files = sorted(study_dir.glob("experiment_state-*.json"))  # Tune picks the newest by name too
    state = _read_json(files[-1]) if files else None
    if not isinstance(state, dict):
        return []
    trials = []
    for entry in state.get("trial_data", []):
        # Tune 2.x stores each trial as [trial JSON, run metadata JSON], both JSON strings.
        trial = entry[0] if isinstance(entry, (list, tuple)) and entry else entry
        try:
            trial = json.loads(trial) if isinstance(trial, str) else trial
        except json.JSONDecodeError:
            continue
        if isinstance(trial, dict):
            trials.append(trial)
    return trials


def _read_results(path: Path) -> list[dict]:
    """result.json: one JSON object per report. A line still being written is skipped."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise StudyError(f"cannot read {path}: {exc.strerror}") from None
    results = []
    for line in text.splitlines():
        try:
            result = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(result, dict):
            results.append(result)
    return results


def _error_line(trial_dir: Path) -> str | None:
    """The exception line (last non-empty line) of error.txt; '' if only error.pkl exists."""
    try:
        lines = [line.strip() for line in (trial_dir / "error.txt").read_text(errors="replace").splitlines()]
    except FileNotFoundError:
        return "" if (trial_dir / "error.pkl").exists() else None
    except OSError as exc:
        raise StudyError(f"cannot read {trial_dir / 'error.txt'}: {exc.strerror}") from None
    return next((line for line in reversed(lines) if line), "")


def _read_json(path: Path):
    """A JSON file's content, or None if it is missing, vanished or half-written."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    except OSError as exc:
        raise StudyError(f"cannot read {path}: {exc.strerror}") from None


def _study_json(study_dir: Path) -> dict:
    path = study_dir / "study.json"
    if not path.exists():
        return {}
    study = _read_json(path)
    if not isinstance(study, dict):
        raise StudyError(f"{path} is not a valid study file (expected a JSON object)")
    return study


def _subdirs(study_dir: Path) -> list[Path]:
    try:
        return [p for p in study_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    except OSError as exc:
        raise StudyError(f"cannot list {study_dir}: {exc.strerror}") from None


