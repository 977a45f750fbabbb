"""TensorBoard events of study trials: the same tags and x-axis as `python -m trainables.run`.

Tune's own TensorBoard logger plots each result against Tune's iteration (1, 2, ...) under
`ray/tune/...`; a single run plots against the training step under the metric's own name. This
logger writes a trial's results the way a single run does (`test_accuracy`, `loss/total`,
`valid_class_accuracy/3`, ... against `step`), so trials and runs compare in one TensorBoard, and
adds the trial's parameters and final metrics as HParams when it ends.
"""

import math

from ray.tune.logger import LoggerCallback

# What Tune adds to every result: bookkeeping, not a metric of the training.
TUNE_KEYS = {"done", "training_iteration", "trial_id", "date", "timestamp", "time_this_iter_s", "time_total_s",
             "pid", "hostname", "node_ip", "time_since_restore", "iterations_since_restore", "config",
             "checkpoint_dir_name", "should_checkpoint", "experiment_tag", "step"}


class StudyTensorBoard(LoggerCallback):
    """One tensorboardX writer per trial, in the trial's directory."""

    _SAVED_FILE_TEMPLATES = ["events.out.tfevents.*"]  # what Tune copies to the study's storage

    def __init__(self):
        self._writers, self._last = {}, {}

    def log_trial_start(self, trial):
        from tensorboardX import SummaryWriter

        if trial in self._writers:
            self._writers[trial].close()
        trial.init_local_path()
        self._writers[trial] = SummaryWriter(trial.local_path, flush_secs=30)
        self._last[trial] = {}

    def log_trial_result(self, iteration, trial, result):
        if trial not in self._writers:
            self.log_trial_start(trial)
        step = result.get("step", result.get("training_iteration"))
        scalars = {key: value for key, value in result.items() if key not in TUNE_KEYS and _is_scalar(value)}
        for key, value in scalars.items():
            self._writers[trial].add_scalar(key, value, global_step=step)
        self._writers[trial].flush()
        self._last[trial] = scalars

    def log_trial_end(self, trial, failed=False):
        writer = self._writers.pop(trial, None)
        if writer is None:
            return
        last = self._last.pop(trial, {})
        params = {key: value for key, value in (trial.evaluated_params or {}).items()
                  if isinstance(value, (str, bool, int, float))}
        if params and last:
            writer.add_hparams(params, {f"final/{key}": value for key, value in last.items()}, name="hparams")
        writer.close()


def _is_scalar(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
