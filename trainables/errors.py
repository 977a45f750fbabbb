"""The exception types of training: user errors, and failures that would recur on a retry."""


class TrainConfigError(ValueError):
    """An invalid training configuration; the message names the field and what is allowed."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; training stops instead of going on with garbage."""


class CheckpointRefused(TrainConfigError):
    """A checkpoint that cannot be trusted or read: it names the file."""


class TrainingFailed(RuntimeError):
    """A run stopped by a failure that would recur if it were retried (divergence, a refused
    checkpoint, bad data or configuration); the message is that failure's one line."""
