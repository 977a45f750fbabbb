"""The one exception type for user errors in search spaces."""


class SpaceError(ValueError):
    """An invalid search space; the message names the parameter and what is allowed."""
