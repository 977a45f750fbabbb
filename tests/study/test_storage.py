"""Study storage paths and files, local and through pyarrow's filesystem (file:// URIs)."""

import errno
import logging
import os
import signal

import pytest

from study.errors import StudyError
from study.storage import exists, join, make_dirs, newest_study, split_uri, write_bytes


@pytest.mark.parametrize("base, joined", [
    ("/data/studies", "/data/studies/s1"),
    ("s3://bucket/studies/", "s3://bucket/studies/s1"),
    ("s3://bucket", "s3://bucket/s1"),
    ("s3://bucket/studies?endpoint_override=minio:9000", "s3://bucket/studies/s1?endpoint_override=minio:9000"),
    ("file:///nfs/studies", "file:///nfs/studies/s1"),
])
def test_join_keeps_a_uris_query_and_split_undoes_it(base, joined):
    assert join(base, "s1") == joined
    assert split_uri(joined) == (base.rstrip("/"), "s1")


def test_files_go_through_the_uri_filesystem_whole(tmp_path):
    storage = f"file://{tmp_path}/studies"
    make_dirs(join(storage, "old"))
    write_bytes(join(storage, "old", "study.json"), b"{}")
    make_dirs(join(storage, "new"))
    write_bytes(join(storage, "new", "study.json"), b'{"name": "new"}')
    make_dirs(join(storage, "no-study"))
    os.utime(tmp_path / "studies" / "old" / "study.json", (1_000_000_000, 1_000_000_000))
    assert (tmp_path / "studies" / "new" / "study.json").read_bytes() == b'{"name": "new"}'
    assert sorted(p.name for p in (tmp_path / "studies" / "new").iterdir()) == ["study.json"]  # no temp left
    assert exists(join(storage, "old", "study.json")) and not exists(join(storage, "nope"))
    assert newest_study(storage) == "new"
    assert newest_study(f"file://{tmp_path}/empty") is None


def test_an_unknown_scheme_is_a_study_error():
    with pytest.raises(StudyError, match="storage nosuch://x cannot be opened"):
        exists("nosuch://x")


def test_a_storage_that_cannot_take_a_write_says_why(tmp_path):
    from study.storage import storage_problem

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert storage_problem(str(tmp_path)) is None
    assert list(tmp_path.iterdir()) == [blocker]  # the probe is gone
    assert storage_problem(str(blocker / "study")) == "Not a directory"


def _raised(*chain: BaseException) -> BaseException:
    """The last exception of `chain`, each raised while handling the one before, as Ray and the
    study raise them: a Tune error from a study error (raised `from None`) from the disk's own."""
    def throw(i):
        if i == 0:
            raise chain[0]
        try:
            throw(i - 1)
        except BaseException as inner:
            raise chain[i] from (inner if isinstance(chain[i], RuntimeError) else None)

    try:
        throw(len(chain) - 1)
    except BaseException as exc:  # noqa: BLE001 (returned for the test)
        return exc


def test_a_full_disk_is_found_however_deep_the_failure_was_raised_from():
    from study.storage_failure import disk_error

    full = OSError(errno.ENOSPC, "No space left on device")
    assert disk_error(_raised(full, StudyError("cannot write x"), RuntimeError("Tune failed"))) == \
        "No space left on device"
    assert disk_error(_raised(OSError(errno.EROFS, "Read-only file system"), EOFError())) == "Read-only file system"
    assert disk_error(_raised(OSError(errno.ENOENT, "No such file or directory"), EOFError())) is None
    assert disk_error(EOFError("Ran out of input")) is None and disk_error(None) is None


def test_a_study_whose_storage_failed_says_why_and_a_whole_one_does_not(tmp_path):
    from study.storage_failure import storage_failure

    study = tmp_path / "study"
    study.mkdir()
    (study / "tuner.pkl").write_bytes(b"whole")
    (study / "experiment_state-2026-01-01_00-00-00.json").write_text('{"trial_data": []}')
    assert storage_failure(str(study)) is None
    assert storage_failure(str(study), EOFError("Ran out of input")) is None  # a bug: its traceback stays
    full = _raised(OSError(errno.ENOSPC, "No space left on device"), EOFError("Ran out of input"))
    assert storage_failure(str(study), full) == "No space left on device"
    (study / "experiment_state-2026-01-02_00-00-00.json").write_text('{"trial_da')  # an upload cut short
    assert storage_failure(str(study)) == "a file of Tune's state was left empty or cut short"
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert storage_failure(str(blocker / "study")) == "Not a directory"


def test_a_failed_save_of_tunes_state_on_a_full_disk_stops_the_study_as_ctrl_c_would():
    from study.storage_failure import DiskErrorWatch

    received = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: received.append(True))  # Tune's, in a study
    watch = DiskErrorWatch()
    logging.getLogger("ray").handlers.insert(0, watch)
    full = _raised(OSError(errno.ENOSPC, "No space left on device"), RuntimeError("Syncing failed"))
    try:
        logging.getLogger("ray.tune.execution.experiment_state").error("Saving failed", exc_info=full)
        assert watch.problem == "No space left on device" and received == []  # not stopping: only noted
        watch.problem, watch.stopping = None, True
        # A trial's own failure (a full node-local disk) is the trial's: Tune retries it.
        logging.getLogger("ray.tune.execution.tune_controller").error("Trial task failed", exc_info=full)
        assert watch.problem is None and received == []
        logging.getLogger("ray.tune.execution.experiment_state").error("Saving failed", exc_info=EOFError())
        assert watch.problem is None and received == []
        for _ in range(2):
            logging.getLogger("ray.tune.execution.experiment_state").error("Saving failed", exc_info=full)
        assert watch.problem == "No space left on device" and received == [True]  # stopped once
    finally:
        logging.getLogger("ray").removeHandler(watch)
        signal.signal(signal.SIGUSR1, previous)
