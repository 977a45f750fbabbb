"""The one exception type for user errors in training configuration."""


class TrainConfigError(ValueError):
    """An invalid training configuration; the message names the field and what is allowed."""
