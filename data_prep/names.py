"""Names that become paths: a study, dataset, split or run name is one entry under its root.

A user-supplied name is joined to a root (a data root, a dataset's splits/, a study storage, a
run storage). A plain name stays inside that root: it is not empty, holds no path separator and
does not start with '.' (which also refuses '.', '..' and hidden entries). The rule is here once;
each place a name enters checks it with `plain_name` (or its Option, trainables/options.py).
"""

from pathlib import Path

from data_prep.errors import DataPrepError

SEPARATORS = ("/", "\\", "\0")
PLAIN_NAME = "a plain name, one entry under its root (not empty, no '/' or '\\', not starting with '.')"


def is_plain_name(name) -> bool:
    return isinstance(name, str) and bool(name) and not name.startswith(".") and \
        not any(separator in name for separator in SEPARATORS)


def plain_name(name, what: str, error: type[Exception] = DataPrepError) -> str:
    """`name` if it is a plain name, else `error`: "dataset name must be a plain name, ..., got '../x'"."""
    if not is_plain_name(name):
        raise error(f"{what} must be {PLAIN_NAME}, got {name!r}")
    return name


def entry(root, name, what: str) -> Path:
    """root/name for a plain `name` (DataPrepError otherwise): never a path outside `root`."""
    return Path(root) / plain_name(name, what)
