"""What this tool reads of Ray Tune's files, and how it names trials: one place for the file
names, formats and trial labels that the launcher, the resume logic and the report share.

A study directory, as Tune writes it (study.json and finished/ are the launcher's own):

    experiment_state-<time>.json   the newest one (by name) is what a resume restores: per trial
                                   a JSON pair [trial, run metadata]; the pickled parts are never
                                   decoded here
    searcher-state-*.pkl, tuner.pkl
    trial_<id>/                    params.json, result.json (one JSON object per report, the last
                                   line possibly half-written), error.txt, checkpoint_<n>/
    finished/<trial id>.json       the launcher's record of each ended trial (study/callbacks.py)

Trial labels: `fixed` (a fixed point, run as given), `search` (suggested by the searcher),
`grid` (a grid search's); a starting point or fixed point may carry a label of its own.

A compare study (study/compare.py) keeps one Tune experiment per stage and method in its
directory: search-<method>/ (stage 1), confirm/ (stage 2), and compare.json (the stage-1 winners);
its trials' `stage` tag says search or confirm, their `config` tag defaults or tuned.
"""

import json
import posixpath
import re
from pathlib import Path

import pyarrow.fs as pafs

from study.errors import StudyError
from study.storage import ERRORS, filesystem, join

FIXED, SEARCH, GRID = "fixed", "search", "grid"
STAGE_SEARCH, STAGE_CONFIRM = "search", "confirm"  # a compare study's stages (and confirm/, its experiment)
DEFAULTS, TUNED = "defaults", "tuned"  # a confirmation's `config` tag (and stage 1's first label)
WINNERS_FILE = "compare.json"
GENERIC_LABELS = ("", SEARCH, GRID, FIXED)  # how a trial came to be, not what it trained
FINISHED = "finished"  # <study>/finished/<trial id>.json
STATE_PREFIX, STATE_SUFFIX = "experiment_state-", ".json"
SEARCHER_PREFIX = "searcher-state-"
TUNER_FILE = "tuner.pkl"
CHECKPOINT_PREFIX = "checkpoint_"


def search_experiment(method: str) -> str:
    """Where a compare study's stage 1 for `method` lives."""
    return f"{STAGE_SEARCH}-{method}"


def compare_experiments(methods) -> list[str]:
    """A compare study's Tune experiments, in the order they run."""
    return [search_experiment(method) for method in methods] + ([STAGE_CONFIRM] if methods else [])


def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def newest_state(names) -> str | None:
    """The experiment state a resume restores, among file names (Tune picks the newest by name)."""
    states = sorted(n for n in names if n.startswith(STATE_PREFIX) and n.endswith(STATE_SUFFIX))
    return states[-1] if states else None


def state_trials(state) -> list[tuple[dict, dict]]:
    """The (trial, run metadata) pairs of a parsed experiment state; entries that do not parse
    are skipped."""
    pairs = []
    for entry in state.get("trial_data", []) if isinstance(state, dict) else []:
        parts = list(entry) if isinstance(entry, (list, tuple)) else [entry]
        try:
            parts = [json.loads(part) if isinstance(part, str) else part for part in parts]
        except json.JSONDecodeError:
            continue
        trial, run = (parts + [{}])[:2]
        if isinstance(trial, dict):
            pairs.append((trial, run if isinstance(run, dict) else {}))
    return pairs


# --- on a storage filesystem (the launcher, the resume logic, the callbacks) ----------------------


def checkpoint_names(fs, directory: str) -> list[str]:
    """A trial's checkpoint directories, oldest first ([] if it cannot be listed)."""
    try:
        infos = fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True))
    except ERRORS:
        return []
    return sorted(i.base_name for i in infos
                  if i.type == pafs.FileType.Directory and i.base_name.startswith(CHECKPOINT_PREFIX))


def saved_checkpoints(fs, experiment: str) -> dict | None:
    """{trial id: checkpoint directory of the trial's last result} in the experiment state on
    storage that a resume restores, or None while it cannot be read (being written)."""
    try:
        name = newest_state(i.base_name for i in fs.get_file_info(pafs.FileSelector(experiment)))
        if name is None:
            return {}
        with fs.open_input_stream(posixpath.join(experiment, name)) as f:
            state = json.loads(f.readall())
        return {trial["trial_id"]: run.get("last_result", {}).get("checkpoint_dir_name")
                for trial, run in state_trials(state)}
    except (*ERRORS, KeyError, TypeError, AttributeError, json.JSONDecodeError):
        return None


def recorded_a_state(experiment: str) -> bool:
    """Whether Tune saved an experiment state there: a driver stopped before its first save (it
    saves once trials start) leaves only tuner.pkl, and nothing of that experiment ran."""
    fs, path = filesystem(experiment)
    try:
        return newest_state(i.base_name for i in fs.get_file_info(pafs.FileSelector(path))) is not None
    except ERRORS:
        return False


def damaged_state(study_dir: str) -> str | None:
    """The first of Tune's files a resume reads that is empty or not whole (the newest experiment
    state must parse as JSON), or None, also when the study cannot be listed (an unreachable
    storage says so itself). Nothing is unpickled to check."""
    fs, path = filesystem(study_dir)
    try:
        files = {i.base_name: i for i in fs.get_file_info(pafs.FileSelector(path))}
    except ERRORS:
        return None
    state = newest_state(files)
    searchers = sorted(name for name in files if name.startswith(SEARCHER_PREFIX))
    for name in [TUNER_FILE, *([state] if state else []), *searchers[-1:]]:
        if name in files and not files[name].size:
            return join(study_dir, name)
    if state:
        try:
            with fs.open_input_stream(posixpath.join(path, state)) as f:
                json.loads(f.readall())
        except (*ERRORS, UnicodeDecodeError, json.JSONDecodeError):
            return join(study_dir, state)
    return None


# --- in a local study directory (the report) ------------------------------------------------------


def read_json(path: Path):
    """A JSON file's content, or None if it is missing, vanished or half-written."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    except OSError as exc:
        raise StudyError(f"cannot read {path}: {exc.strerror}") from None


def state_trials_in(study_dir: Path) -> list[dict]:
    """The trials of the newest experiment state ([] if there is none yet or it is being
    rewritten)."""
    name = newest_state(p.name for p in study_dir.glob(f"{STATE_PREFIX}*{STATE_SUFFIX}"))
    state = read_json(study_dir / name) if name else None
    return [trial for trial, _ in state_trials(state)]


def read_results(path: Path) -> list[dict]:
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


def error_line(trial_dir: Path) -> str | None:
    """The exception line (last non-empty line) of error.txt; '' if only error.pkl exists."""
    try:
        lines = [line.strip() for line in (trial_dir / "error.txt").read_text(errors="replace").splitlines()]
    except FileNotFoundError:
        return "" if (trial_dir / "error.pkl").exists() else None
    except OSError as exc:
        raise StudyError(f"cannot read {trial_dir / 'error.txt'}: {exc.strerror}") from None
    return next((line for line in reversed(lines) if line), "")


def trial_id_of(dir_name: str, results: list[dict]) -> str:
    for result in results:
        if result.get("trial_id"):
            return str(result["trial_id"])
    match = re.search(r"(?:^|_)([0-9a-f]{5,}_\d{5})(?:_|$)", dir_name)  # Tune's <trainable>_<id>_<tag>
    if match:
        return match.group(1)
    return dir_name.removeprefix("trial_")  # trial_dirname's


def flat_params(params: dict) -> dict:
    # A TorchTrainer run under Tune nests the trial's config under train_loop_config.
    nested = params.get("train_loop_config")
    rest = {k: v for k, v in params.items() if k != "train_loop_config"}
    return {**nested, **rest} if isinstance(nested, dict) else rest


def ended_records(study_dir: Path) -> dict[str, dict]:
    """{trial id: record} from <study>/finished/; a record that does not parse is ignored."""
    records = {}
    for path in sorted((study_dir / FINISHED).glob("*.json")):
        record = read_json(path)
        if (isinstance(record, dict) and isinstance(record.get("params"), dict)
                and isinstance(record.get("last_result"), dict)
                and isinstance(record["last_result"].get("training_iteration"), int)):
            records[path.stem] = record
    return records
