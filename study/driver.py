"""Running a checked study: on the cluster it names (or a new local Ray), its trials through a
Tuner, then its report. The launcher (study/launch.py) hands over a config that is checked, with
its data converted and its splits cut; everything from here on needs Ray."""

import logging
import os
import sys
import tempfile

from study.config import StudyConfig
from study.console import OneLineLogs, print_plan, print_summary
from study.directory import write_study_json
from study.errors import StudyError
from study.interrupt import StopOnSignal
from study.storage import join, local_study
from study.storage_failure import DiskErrorWatch, storage_failed, storage_failure
from study.trial import check_trials_fit
from trainables.cluster import can_grow, connect, node_resources


def _write_report(study_dir: str, interrupted: bool):
    """Write the study's report; an interrupted study whose trials had yet to report has none (None)."""
    from study.report import write_report

    try:
        with local_study(study_dir) as mirror:
            return write_report(mirror)
    except StudyError:
        if interrupted:
            return None
        raise


def drive(config: StudyConfig, space: dict, study_dir: str, *, resume: bool, info, splits: dict,
          resume_command: str) -> int:
    """Run (or resume) the study and write its report; the exit code (128 + the signal's number
    when SIGINT or SIGTERM interrupted it: study/interrupt.py)."""
    import ray
    import ray.data

    from study.compare import run_stages
    from study.splits import decode_once
    from study.tuner import study_tuner

    # `ray job submit` sets RAY_ADDRESS for the driver: then the study runs on that cluster.
    # Without --address or RAY_ADDRESS this starts a new local Ray, on 127.0.0.1 only: it never
    # attaches to another instance it happens to find on the machine.
    local = connect(config.address)
    ray.data.DataContext.get_current().enable_progress_bars = False
    for handler in logging.getLogger("ray").handlers:
        handler.addFilter(OneLineLogs())
    cluster = ray.cluster_resources()
    cluster_cpus = cluster.get("CPU", 1)
    if local or not can_grow():  # an autoscaler may add the nodes a trial needs; a fixed cluster never will
        check_trials_fit(config, cluster, node_resources(), local)
    if not resume:
        write_study_json(study_dir, config, space, info, splits, resume_command)
    print_plan(config, space, study_dir)
    # The study's loggers are its own (study/tuner.py): Tune adds none, so its TensorBoard logger
    # does not also write events against its iteration count (nor print a second command).
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    # In-trial runs load their arrays in the trial process (a reused trial actor keeps them).
    datasets = None if config.resources.in_trial() else decode_once(config, splits)
    if config.compare.methods:
        def run_trials():
            return run_stages(config, study_dir, cluster_cpus, datasets)
    else:
        tuner = study_tuner(config, space, study_dir, cluster_cpus, datasets, resume=resume)

        def run_trials():
            tuner.fit()
            return None
    # Under `ray job submit` the current directory is the job's copy of the project, which Ray
    # deletes and unpacks again when the trials' workers start; Tune's last bookkeeping then fails
    # on a current directory that no longer exists. Every path the study uses is absolute by now.
    os.chdir(tempfile.gettempdir())
    watch = DiskErrorWatch()  # first: OneLineLogs drops the exception from the record
    logging.getLogger("ray").handlers.insert(0, watch)
    interruption, report, stopped_in = StopOnSignal(), None, None
    try:
        with interruption:
            watch.stopping = True
            stopped_in = run_trials()
            watch.stopping = False
        ray.shutdown()  # the workers' last log lines arrive before the summary, not after it
        problem = watch.problem or storage_failure(study_dir)
        if problem is None:
            report = _write_report(study_dir, interrupted=interruption.signum is not None)
    except KeyboardInterrupt:
        if interruption.signum is None:
            raise
        ray.shutdown()  # a second signal (or one before Tune listened): stopped at once
        problem = None
    except Exception as exc:
        problem = watch.problem or storage_failure(study_dir, exc)
        if problem is None:
            raise  # a bug (its traceback is the report), or a user error's one line
    finally:
        logging.getLogger("ray").removeHandler(watch)
    if problem is not None:
        raise storage_failed(study_dir, problem)
    if report is not None:
        print_summary(report, study_dir)
    if interruption.signum is not None:
        print(interruption.line(config.name, resume_command, reported=report is not None), file=sys.stderr)
        return interruption.exit_code
    if stopped_in is not None:  # a compare stage whose trials did not all end
        print(f"error: the study stopped in its {stopped_in} stage before its trials ended; continue it: "
              f"{resume_command}", file=sys.stderr)
        return 2
    if report.best is None:  # every trial failed: say why in one line
        failure = next((t.error for t in report.trials if t.status == "ERROR" and t.error), None)
        why = f"; the first failure: {failure}" if failure else ""
        print(f"error: no trial of study {config.name} finished{why} "
              f"(every trial is in {join(study_dir, 'report.md')})", file=sys.stderr)
        return 2
    return 0
