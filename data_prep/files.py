"""Writing files whole or not at all: the project's one atomic-write helper.

Everything this project writes for a user to trust (split files, reports, plots, checkpoints of
single-process runs, study.json on a local path) goes through `write_atomic`: the bytes go to a
temporary file beside the target, which is renamed into place only when complete. A crash, a
full disk or an interrupted write leaves the previous file (or none), never a partial one.
"""

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path, write: Callable[[BinaryIO], None]) -> Path:
    """Fill a temporary file beside `path` with `write(binary file)`, then rename it to `path`
    (with the permissions the umask gives a new file). Raises OSError; leaves nothing partial."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
