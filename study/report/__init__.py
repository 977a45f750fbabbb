"""Study reports: report.md, report.csv and plots/*.png, read from a study directory.

    python -m study.report results/digits-thresholds-20250101-120000

Everything comes from the files Ray Tune writes (params.json, result.json, error.txt, the
experiment_state JSON) and the launcher's study.json, so a report can be rebuilt at any time,
on any machine, with no Ray cluster, also while the study is still running: a trial without
results yet is listed last, and a result line cut in half is skipped. Every output is written
to a temporary file and renamed into place, so a report being rebuilt never looks complete
while it is half-written.

Trials are ranked by the study's metric (`metric` in study.json, by default the validation
split's balanced accuracy, median of the last 10 evaluations): the same number the search
optimised and the scheduler pruned on. The report gives the test metrics of the trial chosen on
validation beside it; a study that selected on the test split says so in its first lines.
Accuracy, GM and balanced accuracy are fractions in the CSV (as reported) and percentages in the
markdown.
"""

import csv
import io

from study.report.markdown import compare_to_baseline, format_markdown, format_table
from study.report.plots import write_plots
from study.report.ranking import METRIC_COLUMNS, Report, build_report
from study.report.trials import FLAGS, TrialRecord, load_trials
from study.storage import write_bytes

__all__ = ["METRIC_COLUMNS", "Report", "TrialRecord", "build_report", "compare_to_baseline", "format_markdown",
           "format_table", "load_trials", "write_report"]


def write_report(study_dir) -> Report:
    """Rebuild plots/*.png, report.csv and report.md (in that order, each atomically)."""
    report = build_report(study_dir)
    write_plots(report)
    write_bytes(str(report.study_dir / "report.csv"), _csv(report).encode())
    write_bytes(str(report.study_dir / "report.md"), format_markdown(report).encode())
    return report


def _csv(report: Report) -> str:
    rows = report.rows()
    columns = ["trial_id", "label", "method", "stage", "group", "config", "seed", *FLAGS, *report.param_columns,
               *METRIC_COLUMNS,
               "steps", "wall_time_s", "status", "error"]
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    return out.getvalue()
