"""python -m study.report <study dir>: rebuild report.md, report.csv and plots/ of a study (a path or a
URI), and print the trials table."""

import argparse
import sys

from data_prep.cli import ArgumentParser
from study.errors import StudyError
from study.report import format_table, write_report


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m study.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study_dir", help="a study directory (<storage>/<study name>): a path or a URI")
    args = parser.parse_args(argv)
    from study.storage import local_study

    try:
        with local_study(args.study_dir) as local:
            report = write_report(local)
    except StudyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(report))
    where = args.study_dir.rstrip("/")
    print(f"\nwrote {where}/report.md, {where}/report.csv and {where}/plots/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
