"""The one exception type for user errors in data preparation and loading."""


class DataPrepError(Exception):
    """A problem with the user's input (a file, a name, a parameter); printed as one line."""
