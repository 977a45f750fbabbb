"""A run or a study continues under its name only with the config it was started with.

`trainables.run` and `study.launch --resume` both continue what exists under a name: Ray Train
resumes a run from its last checkpoint, Tune restores a study. Neither looks at the options
given again, so a changed one would be silently ignored (or half applied). The config is recorded
when the work starts (a run's `run.json` here, a study's study.json by study/directory.py) and a
rerun with any difference is refused in one line naming the changed keys (README, "Reliability").
"""

import json
import os

import pyarrow as pa
import pyarrow.fs as pafs

from trainables.config import TrainConfig
from trainables.errors import TrainConfigError

RUN_RECORD = "run.json"  # <storage>/<run name>/run.json: the run's training config
SHOWN = 60  # characters of a changed value shown in the refusal
LISTED = 6  # changed keys named in the refusal (another method changes all its options)
MISSING = object()  # a key one side of a comparison does not have


def as_recorded(values: dict) -> dict:
    """A config dict as JSON gives it back (tuples as lists), so a recorded one compares equal."""
    return json.loads(json.dumps(values))


def differences(recorded: dict, now: dict, ignore=()) -> list[str]:
    """`key: <recorded> there, <now> now` for every dotted key whose value differs (sections
    compared key by key; a key only one side has differs too, unless that side leaves it unset:
    a setting added to the project after a study started, left unset, changes nothing), keys in
    `ignore` left out."""
    old, new = _dotted(as_recorded(recorded)), _dotted(as_recorded(now))
    lines = []
    for key in sorted(old.keys() | new.keys()):
        before, after = old.get(key, MISSING), new.get(key, MISSING)
        if (before is MISSING and after is None) or (after is MISSING and before is None):
            continue
        if key.split(".")[0] in ignore:
            continue
        if before != after:
            lines.append(f"{key}: {_shown(old, key)} there, {_shown(new, key)} now")
    return lines


def changed_config(what: str, where: str, record: str, changes: list[str], error: type[Exception]) -> Exception:
    """The one line that refuses to continue `what` (a run, a study) at `where` with a changed config."""
    more = f"; and {len(changes) - LISTED} more" if len(changes) > LISTED else ""
    return error(f"{what} {where} was started with another config ({record}): {'; '.join(changes[:LISTED])}{more}; "
                 f"drop the change to continue it, or start a new {what} under another --name")


def check_rerun(config: TrainConfig, storage_path: str, name: str) -> None:
    """Refuse to continue the run `name` with a training config other than the one it recorded
    (TrainConfigError); a new run, or one that recorded none, passes."""
    fs, path = _run_file(storage_path, name)
    try:
        with fs.open_input_stream(path) as f:
            recorded = json.loads(f.readall())
    except FileNotFoundError:
        return
    except (OSError, pa.ArrowException, ValueError) as exc:
        raise TrainConfigError(f"cannot read {path} ({exc}): delete it to continue the run as it is now, or "
                               "start a new run under another --name") from None
    changes = differences(recorded, config.to_dict())
    if changes:
        raise changed_config("run", _location(storage_path, name), RUN_RECORD, changes, TrainConfigError)


def record_run(config: TrainConfig, storage_path: str, name: str) -> None:
    """Write the run's training config to its run.json, whole (a temporary name, then moved)."""
    fs, path = _run_file(storage_path, name)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(tmp) as f:
            f.write(json.dumps(as_recorded(config.to_dict()), indent=2).encode())
        fs.move(tmp, path)
    except (OSError, pa.ArrowException) as exc:
        raise TrainConfigError(f"cannot write {path} ({exc}); pass another --storage, or free space") from None


def _location(storage_path: str, name: str) -> str:
    return f"{storage_path.rstrip('/')}/{name}"


def _run_file(storage_path: str, name: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of a run's record and its path there (a local path or a URI)."""
    location = f"{_location(storage_path, name)}/{RUN_RECORD}"
    if "://" not in location:
        return pafs.LocalFileSystem(), os.path.abspath(location)
    return pafs.FileSystem.from_uri(location)


def _dotted(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(_dotted(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _shown(values: dict, key: str) -> str:
    if key not in values:
        return "not set"
    text = json.dumps(values[key])
    return text if len(text) <= SHOWN else text[:SHOWN - 3] + "..."
