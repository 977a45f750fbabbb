"""Where a study lives: a local directory or a URI (s3://, gs://, file://, ...) that pyarrow, and so
Ray Tune, can open.

Tune writes trial results and checkpoints there itself. The launcher and the report use this
module for their own files: study.json is written under a temporary name and moved into place;
reports of a URI study are built on a local mirror of its small files (no checkpoints) and the
finished report files are uploaded.
"""

import contextlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.fs as pafs

from data_prep.files import write_atomic
from study.errors import StudyError

FIX_STORAGE = "; pass another --storage, or make it writable"
WRITE_AGAIN = "; free space on the storage (or fix its permissions) and run the command again"

SKIPPED = ("checkpoint_",)  # model checkpoints: large and not needed for reports
ERRORS = (pa.ArrowException, OSError, ValueError)


def is_uri(path: str) -> bool:
    return "://" in str(path)


def join(base: str, *names: str) -> str:
    """base/name/...; a URI keeps its query (e.g. s3://bucket/studies?endpoint_override=...)."""
    if is_uri(base):
        parts = urlsplit(base)
        return urlunsplit(parts._replace(path="/".join([parts.path.rstrip("/"), *names])))
    return "/".join([str(base).rstrip("/"), *names])


def split_uri(location: str) -> tuple[str, str]:
    """(parent, name) of a path or URI, the inverse of join(parent, name)."""
    if not is_uri(location):
        return os.path.dirname(location), os.path.basename(location)
    parts = urlsplit(location)
    parent, _, name = parts.path.rstrip("/").rpartition("/")
    return urlunsplit(parts._replace(path=parent)), name


def filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of a local path or URI, and the path inside it."""
    if not is_uri(location):
        return pafs.LocalFileSystem(), os.path.abspath(location)
    try:
        return pafs.FileSystem.from_uri(location)
    except ERRORS as exc:
        raise StudyError(f"storage {location} cannot be opened: {exc}") from None


def exists(location: str) -> bool:
    fs, path = filesystem(location)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except ERRORS as exc:
        raise StudyError(f"cannot read {location}: {exc}") from None


def make_dirs(location: str) -> None:
    """Create a directory (and parents); a StudyError if the storage refuses."""
    if not is_uri(location):
        try:
            Path(location).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StudyError(f"storage {location} is not writable ({exc.strerror}){FIX_STORAGE}") from None
        if not os.access(location, os.W_OK | os.X_OK):
            raise StudyError(f"storage {location} is not writable{FIX_STORAGE}")
        return
    fs, path = filesystem(location)
    try:
        fs.create_dir(path, recursive=True)
    except ERRORS as exc:
        raise StudyError(f"storage {location} is not writable ({exc}){FIX_STORAGE}") from None


def write_bytes(location: str, data: bytes) -> None:
    """Write a file whole: to a temporary name beside it, then moved into place."""
    if not is_uri(location):
        try:
            write_atomic(location, lambda f: f.write(data))
        except OSError as exc:
            raise StudyError(f"cannot write {location}: {exc.strerror or exc}{WRITE_AGAIN}") from None
        return
    fs, path = filesystem(location)
    try:
        write_whole(fs, path, data)
    except ERRORS as exc:
        raise StudyError(f"cannot write {location}: {exc}{WRITE_AGAIN}") from None


def read_bytes(location: str) -> bytes | None:
    """A file's bytes (a path or a URI), or None if there is no such file; StudyError if it cannot
    be read."""
    fs, path = filesystem(location)
    try:
        with fs.open_input_stream(path) as f:
            return f.readall()
    except FileNotFoundError:
        return None
    except ERRORS as exc:
        raise StudyError(f"cannot read {location}: {exc}") from None


def write_whole(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write a file on a pyarrow filesystem whole: to a temporary name beside it, then moved into
    place (a rename on local disks; on object stores the object appears complete or not at all)."""
    parent, name = path.rsplit("/", 1)
    tmp = f"{parent}/.{name}.{os.getpid()}.tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def storage_problem(location: str, probe_bytes: int = 1 << 16) -> str | None:
    """Why the storage at `location` cannot take a small write now (full, read-only, gone), or
    None if it can: the probe file is written, then removed."""
    probe = join(location, f".probe-{os.getpid()}")
    try:
        write_bytes(probe, b"\0" * probe_bytes)
    except StudyError as exc:
        return str(exc).removesuffix(WRITE_AGAIN).rsplit(": ", 1)[-1]
    fs, path = filesystem(probe)
    with contextlib.suppress(*ERRORS):
        fs.delete_file(path)
    return None


def newest_study(storage: str) -> str | None:
    """The name of the study under `storage` whose study.json changed last, if any."""
    fs, path = filesystem(storage)
    try:
        entries = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        candidates = [fs.get_file_info(f"{e.path}/study.json") for e in entries if e.type == pafs.FileType.Directory]
    except ERRORS as exc:
        raise StudyError(f"cannot list {storage}: {exc}") from None
    studies = [info for info in candidates if info.type == pafs.FileType.File]
    if not studies:
        return None
    newest = max(studies, key=lambda info: info.mtime_ns or 0)
    return newest.path.rstrip("/").split("/")[-2]


@contextmanager
def local_study(study_dir: str):
    """Yield a local directory holding the study: the directory itself, or for a URI a temporary
    mirror of everything but checkpoints. Files the block writes at the top level or in plots/
    are uploaded when it ends without error."""
    if not is_uri(study_dir):
        yield Path(study_dir)
        return
    fs, path = filesystem(study_dir)
    with tempfile.TemporaryDirectory(prefix="study-mirror-") as tmp:
        mirror = Path(tmp)
        _download(fs, path, mirror)
        before = _snapshot(mirror)
        yield mirror
        for relative, _ in sorted(set(_snapshot(mirror).items()) - set(before.items())):
            if "/" in relative:
                make_dirs(join(study_dir, os.path.dirname(relative)))
            write_bytes(join(study_dir, relative), (mirror / relative).read_bytes())


def _download(fs, path: str, mirror: Path) -> None:
    try:
        found = fs.get_file_info(path).type == pafs.FileType.Directory
    except ERRORS as exc:
        raise StudyError(f"cannot read {path}: {exc}") from None
    if not found:
        raise StudyError(f"no study at {path}")
    try:
        for info in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
            relative = info.path[len(path.rstrip("/")) + 1:]
            if info.type != pafs.FileType.File or any(part.startswith(SKIPPED) for part in relative.split("/")):
                continue
            target = mirror / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            with fs.open_input_stream(info.path) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
    except ERRORS as exc:
        raise StudyError(f"cannot read {path}: {exc}") from None


def _snapshot(mirror: Path) -> dict[str, tuple[int, int]]:
    """Top-level files and plots/*, by relative path: (size, mtime) to spot what was written."""
    files = [p for p in mirror.iterdir() if p.is_file()] + list((mirror / "plots").glob("*"))
    return {str(p.relative_to(mirror)): (p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.is_file()}
