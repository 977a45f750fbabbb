"""When the storage fails mid-study: a full, read-only or failing disk, seen in the failure itself
or in a failed save of Tune's state, stops the study at once and ends it in one line that says
whether it can be resumed (README, "Reliability")."""

import errno
import logging
import os
import signal

from study.errors import StudyError
from study.storage import storage_problem
from study.tune_files import damaged_state

STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)  # the storage, not the study, failed


def storage_failure(study_dir: str, exc: BaseException | None = None) -> str | None:
    """Why the study's storage failed, or None: it cannot take a small write now, the failure
    (`exc`, or one it was raised from) is a full, read-only or failing disk, or a file of Tune's
    state that a resume reads is empty or cut short (Tune logs a failed upload and goes on)."""
    problem = storage_problem(study_dir) or disk_error(exc)
    if problem is None:
        damaged = damaged_state(study_dir)
        problem = "a file of Tune's state was left empty or cut short" if damaged else None
    return problem


def disk_error(exc: BaseException | None) -> str | None:
    """The strerror of a full, read-only or failing disk among `exc` and what it was raised
    from (a Ray task's error included), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
            return os.strerror(exc.errno)  # pyarrow's strerror holds its own detail too
        exc = exc.__cause__ or exc.__context__ or getattr(exc, "cause", None)
    return None


class DiskErrorWatch(logging.Handler):
    """Remembers the first full, read-only or failing disk in a failed save of Tune's experiment
    state (Tune logs it, with the exception, and goes on) and, while `stopping`, stops the study
    as Ctrl+C would: Tune ends its loop and saves its state, the unfinished trials stay unfinished,
    and --resume continues them. (Tune stops the same way on SIGUSR1, whose handler it installs
    whatever TUNE_DISABLE_SIGINT_HANDLER says.) A trial's own failures, a full node-local disk
    among them, are the trial's: Tune retries it and the report lists it."""

    SAVES = ("ray.tune.execution.experiment_state", "ray.tune.tune")  # where Tune logs a failed save

    def __init__(self):
        super().__init__(logging.ERROR)
        self.problem = None
        self.stopping = False

    def emit(self, record: logging.LogRecord) -> None:
        if self.problem is None and record.exc_info and record.name in self.SAVES:
            self.problem = disk_error(record.exc_info[1])
            tune_listens = signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, signal.SIG_IGN, None)
            if self.problem and self.stopping and tune_listens:  # (else SIGUSR1 would end the process)
                os.kill(os.getpid(), signal.SIGUSR1)


def storage_failed(study_dir: str, problem: str) -> StudyError:
    """The one line a study ends with when its storage failed mid-study."""
    damaged = damaged_state(study_dir)
    then = (f"Tune's state {damaged} was cut short, so the study cannot be resumed: once there is space, "
            "`python -m study.report` lists every trial (the finished ones kept), and the study can run again "
            "under another --name" if damaged else
            "fix it or free space, then continue with --resume (finished trials are not run again; "
            "`python -m study.report` lists every trial and marks any whose results were lost)")
    return StudyError(f"the storage of study {study_dir} failed mid-study ({problem}); {then}")
