"""What a study prints: its plan before it starts, Ray's driver-side log records as one line
each, and the summary at the end."""

import logging

import yaml

from study.checks import planned_trials
from study.searcher import optuna_storage
from study.storage import join


def print_plan(config, space, study_dir) -> None:
    print("resolved config:")
    print(yaml.safe_dump(config.to_dict(), sort_keys=False).rstrip())
    print(f"\nstudy directory: {study_dir}")
    if config.compare.methods:
        print(compare_budget(config))
        for method, method_space in space.items():
            ranges = "; ".join(f"{name} {dist.describe()}" for name, dist in method_space.items())
            print(f"  {method} searches: {ranges}")
        print(f"at most {config.search.max_concurrent} at once; stage 1 selects on {config.metric} ({config.mode})")
        return
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


def compare_budget(config) -> str:
    """The budget of a compare study, the same for every method, in one line."""
    compare, split = config.compare, config.split_spec().default_name(config.dataset)
    return (f"compare {len(compare.methods)} methods ({', '.join(compare.methods)}), each with the same budget: "
            f"stage 1 {compare.trials_per_method} trials ({config.search.algorithm}, its reference defaults first) "
            f"of {config.train.steps} steps, scheduler {config.scheduler.name}, split {split}; "
            f"stage 2 its winner{' and its defaults' if compare.confirm_defaults else ''} with seeds "
            f"{', '.join(map(str, compare.confirm_seeds))}"
            f"{' on the unlabeled shapes ' + ', '.join(compare.unlabeled) if compare.unlabeled else ''}: "
            f"{planned_trials(config, {})} trials in all")


def compare_lines(report) -> str:
    """A compare study's verdict on the console: the leader and each sentence against it."""
    comparison = report.comparison
    lines = [f"leader (best mean {comparison.metric} over the confirmation seeds, tuned): {comparison.leader.label}"]
    lines += [comparison.sentence(other) for other in comparison.differences]
    return "\n".join(lines)


def print_summary(report, study_dir: str) -> None:
    """The report's table, where the report is, and how to compare the trials in TensorBoard."""
    from study.report import format_table

    print(format_table(report))
    comparison = report.comparison
    if comparison is not None:
        print(f"\n{compare_lines(report)}")
    if report.shapes is not None:
        leaders = ", ".join(f"{result.shape} {report.shapes.methods[result.leader]}" for result in report.shapes.shapes
                            if result.leader)
        print(f"leader on each unlabeled shape (best mean {report.shapes.metric}, tuned): {leaders}")
    print(f"\nreport: {join(study_dir, 'report.md')}")
    # TensorBoard reads paths, gs:// and s3:// (with their extras; an S3 endpoint from S3_ENDPOINT).
    logdir = study_dir.removeprefix("file://").split("?")[0]
    print(f"compare trials: tensorboard --logdir {logdir}")
