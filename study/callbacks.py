"""The study's own Tune callbacks: a search that agrees with the trial list, checkpoints deleted
only once no resume can need them, and a whole record of each trial the moment it ends (file
names: study/tune_files.py)."""

import json
import posixpath
import sys

from ray import tune

from study.storage import ERRORS, write_whole
from study.tune_files import FINISHED, checkpoint_names, saved_checkpoints

CHECKPOINTS_TO_KEEP = 2  # per in-trial run, and any a resume may still need (KeepResumableCheckpoints)


class ReconcileSearch(tune.Callback):
    """Before each step of Tune's controller, the study's search agrees with the trial list
    (study/searcher.py, `reconcile_search`): after a resume whose search state is older than the
    trials, nothing waits on a trial that ended and nothing runs twice. It holds the Tuner's own
    search object: both are pickled together in the Tuner's state, so a restored Tuner's callback
    holds the restored search."""

    def __init__(self, search_alg):
        self.search_alg = search_alg

    def on_step_begin(self, iteration, trials, **info):
        from study.searcher import reconcile_search

        reconcile_search(self.search_alg, trials)


class KeepResumableCheckpoints(tune.Callback):
    """Delete an in-trial run's old checkpoints (all but its newest `keep`), but never one that the
    experiment state on storage may still resume the trial from.

    Tune's own CheckpointConfig(num_to_keep) deletes old checkpoints as soon as a new one is
    registered, while the experiment state that `--resume` reads (it names each trial's checkpoint)
    is written every few seconds and uploaded in the background: a driver killed in between leaves
    a state naming a deleted checkpoint, and the resumed trial fails. So Tune keeps every checkpoint
    and this callback deletes them once the state on storage has moved past them. That state only
    moves forward, and resumes a trial from the checkpoint of its last result, or from the one
    before if Tune had yet to register that checkpoint: both are kept, and all later ones."""

    def __init__(self, keep: int):
        self.keep = keep
        self.runs = {}  # trial id -> (filesystem, trial directory, checkpoint names, oldest first)

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        names = self._track(trial)
        names[:] = sorted({*names, posixpath.basename(checkpoint.path)})
        self._prune()

    def on_experiment_end(self, trials, **info):
        # Tune has just uploaded its final experiment state. Trials that finished before a killed
        # driver could delete their old checkpoints are pruned here too.
        for trial in trials:
            if trial.has_reported_at_least_once:
                self._track(trial)
        self._prune()

    def _track(self, trial) -> list[str]:
        if trial.trial_id not in self.runs:  # a resumed trial also has its earlier run's checkpoints
            fs = trial.storage.storage_filesystem
            self.runs[trial.trial_id] = (fs, trial.path, checkpoint_names(fs, trial.path))
        return self.runs[trial.trial_id][2]

    def _prune(self):
        if not self.runs:
            return
        fs, directory, _ = next(iter(self.runs.values()))
        saved = saved_checkpoints(fs, posixpath.dirname(directory))
        if saved is None:
            return
        for trial_id, (fs, directory, names) in self.runs.items():
            needed = names.index(saved[trial_id]) - 1 if saved.get(trial_id) in names else 0
            for name in names[:max(0, min(needed, len(names) - self.keep))]:
                try:
                    fs.delete_dir(posixpath.join(directory, name))
                except FileNotFoundError:
                    pass
                except ERRORS:
                    continue  # kept: tried again at the next checkpoint
                names.remove(name)


def _plain(value):
    """For json.dumps: numpy scalars and arrays (and tensors) as numbers and lists, anything else
    unknown as its text."""
    for convert in ("item", "tolist"):
        try:
            return getattr(value, convert)()
        except (AttributeError, TypeError, ValueError, RuntimeError):
            continue
    return str(value)


class RecordEndedTrials(tune.Callback):
    """Write each trial's parameters, status and last result, whole (temporary name, then moved),
    to <study>/finished/<trial id>.json the moment it ends. Tune uploads its own copies of
    params.json and result.json again at every sync, overwriting them in place: when the storage
    fills up, a finished trial's files can be left empty. The study's record is written when the
    trial ends (again only if a resume runs it again), so the report still has what the trial
    reached (study/report/trials.py)."""

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._record(trial, "TERMINATED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._record(trial, "ERROR")

    def _record(self, trial, status: str) -> None:
        """Best effort: a record that cannot be written is said on the console, and Tune goes on
        (its own save on the same storage fails too, and the launcher stops the study then)."""
        record = {"trial_id": trial.trial_id, "status": status, "params": trial.config,
                  "last_result": {k: v for k, v in (trial.last_result or {}).items() if k != "config"}}
        # Where Tune keeps the study now (a resumed study may have moved since it started).
        fs, directory = trial.storage.storage_filesystem, posixpath.join(trial.storage.experiment_fs_path, FINISHED)
        try:
            fs.create_dir(directory, recursive=True)
            write_whole(fs, posixpath.join(directory, f"{trial.trial_id}.json"),
                        json.dumps(record, default=_plain, allow_nan=True).encode())
        except ERRORS as exc:
            print(f"warning: trial {trial.trial_id} ended {status}, but its record in {directory} could not be "
                  f"written ({exc})", file=sys.stderr)
