"""`python -m harness.table DIR [DIR ...] [--out DIR] [--ci] [--throughput]`: the paper-style table of every run
found under the given run, sweep or results directories, as Markdown (printed), LaTeX and CSV
(harness/report/tables.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    from harness.report.tables import summaries_or_none, write_tables

    parser = argparse.ArgumentParser(prog="python -m harness.table", description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", help="run dirs, sweep dirs or results/")
    parser.add_argument("--out", type=Path, help="where to write the tables (default: first path)")
    parser.add_argument("--ci", action="store_true", help="show 95%% bootstrap intervals")
    parser.add_argument("--throughput", action="store_true", help="add each run's samples per second")
    parser.add_argument("--hard-subset", action="store_true",
                        help="each run's score on the samples the baseline at its retention gets wrong")
    parser.add_argument("--baseline", default="uniform", help="the baseline of --hard-subset (default uniform)")
    args = parser.parse_args(argv)
    summaries = summaries_or_none(args.paths)
    if summaries is None:
        return 2
    if args.hard_subset:
        from harness.report.hard_subset import hard_subset, hard_subset_table

        frame = hard_subset(summaries, args.baseline)
        markdown = hard_subset_table(frame, args.baseline)
        out = args.out or Path(args.paths[0])
        (out / "hard_subset.md").write_text(markdown)
        frame.to_csv(out / "hard_subset.csv", index=False)
        print(markdown)
        return 0
    print(write_tables(summaries, args.out or Path(args.paths[0]), ci=args.ci, throughput=args.throughput))
    return 0


if __name__ == "__main__":
    sys.exit(main())
