"""A study's directory: where it is, whether it exists, and its study.json (the resolved config,
the metric it selects on, versions, dataset and split checksums)."""

import json
import os
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from study.checks import planned_trials
from study.config import StudyConfig, default_name, with_metric
from study.errors import StudyError
from study.storage import exists, is_uri, join, make_dirs, newest_study, read_bytes, write_bytes
from study.tune_files import read_json
from trainables.metrics import split_of
from trainables.same_config import changed_config, differences

STUDY_FILE = "study.json"
WHERE_IT_RUNS = ("name", "storage", "address")  # config keys a --resume may change: not what the study runs


def locate(config: StudyConfig, resume: bool) -> tuple[StudyConfig, str]:
    """The config with its name (a new one, or with --resume and no name the newest study) and
    the study directory: refused if a new study's exists already, or a resumed one's does not or
    was started with another config."""
    storage = config.storage if is_uri(config.storage) else os.path.abspath(config.storage)
    make_dirs(storage)
    name = config.name
    if name is None:
        if resume:
            name = newest_study(storage)
            if name is None:
                raise StudyError(f"--resume: no study found under {storage}; pass --name")
        else:
            name = default_name(config)
    study_dir = join(storage, name)
    found = exists(join(study_dir, STUDY_FILE))
    if resume and not found:
        raise StudyError(f"--resume: no study at {study_dir}")
    if not resume and found:
        raise StudyError(f"study {study_dir} already exists: pass --resume to continue it, or another --name")
    config = config.replace(name=name)
    if resume:
        check_unchanged(config, study_dir)
    return config, study_dir


def check_unchanged(config: StudyConfig, study_dir: str) -> None:
    """Refuse to resume a study with a config other than the one its study.json recorded: Tune
    restores the study as it was, so a change would be ignored, or applied to some trials only.
    Where the study lives and which cluster runs it (WHERE_IT_RUNS) may change."""
    try:
        recorded = json.loads(read_bytes(join(study_dir, STUDY_FILE)))
        splits = recorded["splits"]
        has_validation = bool(splits) and all(split["valid"] > 0 for split in splits.values())
        recorded_config = recorded["config"]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise StudyError(f"{join(study_dir, STUDY_FILE)} is not a study record this version can compare the config "
                         "with; start a new study under another --name") from None
    # The metric as the first launch resolved it (it depends on whether the splits have a validation set).
    config, _ = with_metric(config, has_validation)
    changes = differences(recorded_config, config.to_dict(), ignore=WHERE_IT_RUNS)
    if changes:
        raise changed_config("study", study_dir, STUDY_FILE, changes, StudyError)


def versions() -> dict:
    found = {"python": platform.python_version()}
    for package in ("mnar-ssl-study", "ray", "torch", "torchvision", "optuna", "numpy", "pyarrow"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def write_study_json(study_dir: str, config: StudyConfig, space: dict, info, splits: dict,
                     resume_command: str) -> None:
    """study.json: the resolved config, the metric the study selects on, the trials it plans and
    the command that resumes it, versions, dataset and split checksums (written whole or not at all)."""
    record = {
        "name": config.name, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "planned_trials": planned_trials(config, space), "resume_command": resume_command,
        "metric": config.metric, "mode": config.mode, "selected_on": split_of(config.metric),
        "config": config.to_dict(), **_space_record(config, space),
        "versions": versions(),
        "dataset": {"name": info.name, "checksum": info.checksum, "source_sha256": info.meta["source_sha256"],
                    "num_classes": info.num_classes, "classes": info.meta["classes"]},
        "splits": splits,
    }
    make_dirs(study_dir)
    write_bytes(join(study_dir, STUDY_FILE), json.dumps(record, indent=2).encode())


def _space_record(config: StudyConfig, space: dict) -> dict:
    """What the study sweeps: its parameters and their ranges (a compare study: per method)."""
    if config.compare.methods:
        return {"swept": sorted({name for method_space in space.values() for name in method_space}),
                "space": {method: {name: dist.describe() for name, dist in method_space.items()}
                          for method, method_space in space.items()}}
    return {"swept": list(space), "space": {name: dist.describe() for name, dist in space.items()}}


def read_study_json(study_dir: Path) -> dict:
    """A local study directory's study.json ({} if it has none)."""
    path = Path(study_dir) / STUDY_FILE
    if not path.exists():
        return {}
    study = read_json(path)
    if not isinstance(study, dict):
        raise StudyError(f"{path} is not a valid study file (expected a JSON object)")
    return study
