"""The one exception type for user errors in a study."""


class StudyError(ValueError):
    """A user error in a study's configuration or its storage; printed as one line."""
