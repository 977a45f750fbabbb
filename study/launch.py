"""python -m study.launch: run a study (Ray Tune + Optuna over data-parallel FixMatch trainings).

With no arguments it runs the default study: digits with long-tailed labels, an Optuna sweep of
the CAI thresholds with CADR, plus the FixMatch baseline and CADR at the paper's defaults.

    python -m study.launch                                  # the default study
    python -m study.launch --config examples/digits_thresholds.yaml --num-samples 8
    python -m study.launch --config examples/paper/cifar10_lt_50.yaml --set train.batch_size=16 --set train.mu=2
    python -m study.launch --list-spaces
    python -m study.launch --name my-study --resume         # continue an interrupted study
    ray job submit --address http://HEAD:8265 --working-dir . -- python -m study.launch --config FILE
"""

import argparse
import errno
import json
import logging
import os
import platform
import signal
import sys
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import yaml

from data_prep import DataPrepError
from data_prep.cli import ArgumentParser
from data_prep.parquet import default_data_root, verify_dataset
from search_spaces import SPACES, SpaceError
from search_spaces.spaces import describe
from study.claim import DriverClaim
from study.config import StudyError, default_name, load, optuna_storage, planned_trials, select_metric, validate
from study.storage import exists, is_uri, join, local_study, make_dirs, newest_study, storage_problem, write_bytes
from trainables.cluster import can_grow, check_placement, connect, node_resources
from trainables.errors import TrainConfigError

USER_ERRORS = (StudyError, DataPrepError, TrainConfigError, SpaceError)
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)  # the storage, not the study, failed


def build_parser():
    parser = ArgumentParser(prog="python -m study.launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="study YAML file (default: the built-in default study)")
    parser.add_argument("--space", help="named search space(s), joined with '+' (see --list-spaces)")
    parser.add_argument("--num-samples", type=int, help="searched trials (grid spaces: grid repeats)")
    parser.add_argument("--max-concurrent", type=int, help="trials running at once")
    parser.add_argument("--scheduler", choices=("asha", "median", "none"), help="early stopping")
    parser.add_argument("--metric", help="what the study searches, prunes and ranks on (default: "
                        "valid_balanced_accuracy_median_10; any {valid,test}_{accuracy,gm,balanced_accuracy}"
                        "[_median_10|_median_20])")
    parser.add_argument("--storage", help="where studies live: a local path or a URI Ray accepts")
    parser.add_argument("--name", help="study name (default: <dataset>-<space>-<time>)")
    parser.add_argument("--num-workers", type=int, help="data-parallel workers per trial")
    parser.add_argument("--use-gpu", action="store_true", default=None, help="one GPU per worker")
    parser.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    parser.add_argument("--data-root", help="where datasets live (default: $ML_DATA or ./data)")
    parser.add_argument("--steps", type=int, help="training steps per trial")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="set any key of the study config, dotted (train.batch_size=8, resources.use_gpu=false; "
                        "VALUE is read as YAML); repeatable, applied after the file and the options above")
    parser.add_argument("--resume", action="store_true", help="continue the study --name (default: the latest)")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the plan; train nothing")
    parser.add_argument("--list-spaces", action="store_true", help="print the named search spaces and exit")
    return parser


def _overrides(args) -> dict:
    return {
        "space": args.space, "search.num_samples": args.num_samples, "search.max_concurrent": args.max_concurrent,
        "scheduler.name": args.scheduler, "metric": args.metric, "storage": args.storage,
        "name": args.name, "resources.num_workers": args.num_workers, "resources.use_gpu": args.use_gpu,
        "address": args.address, "data_root": args.data_root, "train.steps": args.steps,
    }


def apply_sets(config, assignments):
    """--set KEY=VALUE: each dotted key set in the config (the file with the other options applied),
    its value read as YAML; the result goes through the same checks as a study file."""
    from study.config import from_dict

    if not assignments:
        return config
    raw = config.to_dict()
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        key = key.strip()
        if not sep or not key or "" in key.split("."):
            raise StudyError(f"--set {assignment!r}: expected KEY=VALUE with a dotted KEY, e.g. train.batch_size=8")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise StudyError(f"--set {key}: {text!r} is not a YAML value") from None
        target = raw
        *parents, leaf = key.split(".")
        for depth, parent in enumerate(parents):
            target = target.setdefault(parent, {})  # a new section: an unknown key the checks below name
            if not isinstance(target, dict):
                raise StudyError(f"--set {key}: {'.'.join(parents[:depth + 1])} is {target!r}, not a mapping")
        target[leaf] = value
    return from_dict(raw)


def _study_dir(config, resume: bool) -> str:
    storage = config.storage if is_uri(config.storage) else os.path.abspath(config.storage)
    make_dirs(storage)
    if config.name is None:
        if resume:
            config.name = newest_study(storage)
            if config.name is None:
                raise StudyError(f"--resume: no study found under {storage}; pass --name")
        else:
            config.name = default_name(config)
    study_dir = join(storage, config.name)
    found = exists(join(study_dir, "study.json"))
    if resume and not found:
        raise StudyError(f"--resume: no study at {study_dir}")
    if not resume and found:
        raise StudyError(f"study {study_dir} already exists: pass --resume to continue it, or another --name")
    return study_dir


def _versions() -> dict:
    versions = {"python": platform.python_version()}
    for package in ("mnar-ssl-study", "ray", "torch", "torchvision", "optuna", "numpy", "pyarrow"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def write_study_json(study_dir, config, space, info, splits) -> None:
    """study.json: the resolved config, the metric the study selects on, versions, dataset and split
    checksums (atomic write)."""
    record = {
        "name": config.name, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "metric": config.metric, "mode": config.mode, "selected_on": config.metric.split("_", 1)[0],
        "config": config.to_dict(), "swept": list(space),
        "space": {name: dist.describe() for name, dist in space.items()},
        "versions": _versions(),
        "dataset": {"name": info.name, "checksum": info.checksum, "source_sha256": info.meta["source_sha256"],
                    "num_classes": info.num_classes, "classes": info.meta["classes"]},
        "splits": splits,
    }
    make_dirs(study_dir)
    write_bytes(join(study_dir, "study.json"), json.dumps(record, indent=2).encode())


def print_plan(config, space, study_dir) -> None:
    print("resolved config:")
    print(yaml.safe_dump(config.to_dict(), sort_keys=False).rstrip())
    print(f"\nstudy directory: {study_dir}")
    print(f"trials: {planned_trials(config, space)} "
          f"({len(config.search.fixed_points)} fixed, the rest from {config.search.algorithm})")
    for point in config.search.fixed_points:
        print(f"  fixed: {point}")
    for point in config.search.points_to_evaluate:
        print(f"  first searched point: {point}")
    for name, dist in space.items():
        print(f"  search {name}: {dist.describe()}")
    print(f"at most {config.search.max_concurrent} at once, scheduler {config.scheduler.name}; "
          f"searches, prunes and ranks on {config.metric} ({config.mode})")
    database = optuna_storage(config, study_dir)
    if database:
        print(f"Optuna study {config.name} in {database} (watch it: optuna-dashboard {database})")


class OneLineLogs(logging.Filter):
    """Ray's driver-side log records as one line each: a failed trial's traceback is in its
    error.txt and the report, a failed sync's in Ray's logs; the console names the problem."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage().strip()
        record.msg, record.args = (message.splitlines()[0] if message else ""), ()
        record.exc_info = record.exc_text = record.stack_info = None
        return True


def check_trials_fit(config, cluster: dict, nodes: list[dict], local: bool) -> None:
    """A trial that the cluster's nodes can never hold would wait forever: refuse it (on a
    cluster that cannot grow; see trainables/cluster.py)."""
    from study.tune import trial_resources

    res = config.resources
    needed = res.gpus() * res.num_workers
    if needed and cluster.get("GPU", 0) < needed:
        raise StudyError(f"use_gpu with num_workers={res.num_workers} needs {needed:g} GPU(s) per trial; "
                         f"the cluster has {cluster.get('GPU', 0):g}")
    resources = trial_resources(config, cluster.get("CPU", 1))
    per_worker = {"CPU": resources["cpus_per_worker"], "GPU": resources["gpus_per_worker"]}
    # A TorchTrainer trial's driver reserves its own share; the workers read data decoded once,
    # by the launcher, so Ray Data's tasks need no CPU of their own then.
    driver = {} if res.in_trial() else {"a trial's driver (resources.trial_cpus)": {"CPU": res.trial_cpus}}
    check_placement(resources["num_workers"], per_worker, driver, nodes, local)


def storage_failure(study_dir: str, exc: BaseException | None = None) -> str | None:
    """Why the study's storage failed, or None: it cannot take a small write now, the failure
    (`exc`, or one it was raised from) is a full, read-only or failing disk, or a file of Tune's
    state that a resume reads is empty or cut short (Tune logs a failed upload and goes on)."""
    from study.tune import damaged_state

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


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.list_spaces:
        for name in SPACES:
            print(describe(name))
        return 0
    try:
        return _run(args)
    except USER_ERRORS as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from data_prep.convert import prepare

    config = apply_sets(load(args.config, _overrides(args)), args.set)
    # Trials run in other processes and directories: give them an absolute data root.
    config.data_root = os.path.abspath(config.data_root or default_data_root())
    space = validate(config)
    study_dir = _study_dir(config, args.resume)
    converted = not (Path(config.data_root) / config.dataset / "dataset.json").is_file()
    info = prepare(config.dataset, config.data_root)
    verify_dataset(info)  # once per study: trials trust it (a changed or damaged file fails here)
    images = sum(p["count"] for p in info.partitions.values())
    print(f"dataset {info.name}: {'converted now into' if converted else 'found at'} {info.path} ({images} images, "
          "checksum verified)")
    from study.tune import prepare_splits

    splits = prepare_splits(config, space)
    for name, split in splits.items():
        created = split.pop("created")
        valid = f", {split['valid']} validation ({split['valid_kind']})" if split["valid"] else ", no validation set"
        print(f"split {name}: {'cut now' if created else 'found'} in {info.path / 'splits'} ({split['labeled']} "
              f"labeled, {split['unlabeled']} unlabeled{valid})")
    warning = select_metric(config, has_validation=all(s["valid"] > 0 for s in splits.values()))
    if warning:
        print(warning, file=sys.stderr)
    if args.dry_run:
        print_plan(config, space, study_dir)
        print("dry run: nothing was trained")
        return 0

    with DriverClaim(study_dir):  # one driver per study, from here to the report
        return _drive(args, config, space, study_dir, info, splits)


def _drive(args, config, space, study_dir, info, splits) -> int:
    import ray
    import ray.data

    from study.report import format_table, write_report
    from study.tune import build_tuner, decode_once, restore_tuner

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
    if not args.resume:
        write_study_json(study_dir, config, space, info, splits)
    print_plan(config, space, study_dir)
    # The study's loggers are its own (study/tune.py): Tune adds none, so its TensorBoard logger
    # does not also write events against its iteration count (nor print a second command).
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    # In-trial runs load their arrays in the trial process (a reused trial actor keeps them).
    datasets = None if config.resources.in_trial() else decode_once(config, splits)
    tuner = restore_tuner(config, study_dir, cluster_cpus, datasets) if args.resume else \
        build_tuner(config, space, study_dir, cluster_cpus, datasets)
    # Under `ray job submit` the current directory is the job's copy of the project, which Ray
    # deletes and unpacks again when the trials' workers start; Tune's last bookkeeping then fails
    # on a current directory that no longer exists. Every path the study uses is absolute by now.
    os.chdir(tempfile.gettempdir())
    watch = DiskErrorWatch()  # first: OneLineLogs drops the exception from the record
    logging.getLogger("ray").handlers.insert(0, watch)
    try:
        watch.stopping = True
        tuner.fit()
        watch.stopping = False
        ray.shutdown()  # the workers' last log lines arrive before the summary, not after it
        problem = watch.problem or storage_failure(study_dir)
        if problem is None:
            with local_study(study_dir) as local:
                report = write_report(local)
    except Exception as exc:
        problem = watch.problem or storage_failure(study_dir, exc)
        if problem is None:
            raise  # a bug (its traceback is the report), or a user error's one line
    finally:
        logging.getLogger("ray").removeHandler(watch)
    if problem is not None:
        from study.tune import damaged_state

        damaged = damaged_state(study_dir)
        then = (f"Tune's state {damaged} was cut short, so the study cannot be resumed: once there is space, "
                "`python -m study.report` lists every trial (the finished ones kept), and the study can run again "
                "under another --name" if damaged else
                "fix it or free space, then continue with --resume (finished trials are not run again; "
                "`python -m study.report` lists every trial and marks any whose results were lost)")
        raise StudyError(f"the storage of study {study_dir} failed mid-study ({problem}); {then}")
    print(format_table(report))
    print(f"\nreport: {join(study_dir, 'report.md')}")
    # TensorBoard reads paths, gs:// and s3:// (with their extras; an S3 endpoint from S3_ENDPOINT).
    logdir = study_dir.removeprefix("file://").split("?")[0]
    print(f"compare trials: tensorboard --logdir {logdir}")
    if report.best is None:  # every trial failed: say why in one line
        failure = next((t.error for t in report.trials if t.status == "ERROR" and t.error), None)
        why = f"; the first failure: {failure}" if failure else ""
        print(f"error: no trial of study {config.name} finished{why} "
              f"(every trial is in {join(study_dir, 'report.md')})",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
