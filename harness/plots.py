"""`python -m harness.plots DIR [DIR ...] [--out DIR] [--format png pdf svg]`: accuracy against
achieved retention and against the prefill FLOPs ratio, and the cost per sample, of every run found
under the given directories (harness/report/plots.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    from harness.report.plots import write_plots
    from harness.report.tables import summaries_or_none

    parser = argparse.ArgumentParser(prog="python -m harness.plots", description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="+", help="run dirs, sweep dirs or results/")
    parser.add_argument("--out", type=Path, help="where to write (default: first path)")
    parser.add_argument("--format", nargs="+", default=["png", "pdf"], choices=["png", "pdf", "svg"])
    args = parser.parse_args(argv)
    summaries = summaries_or_none(args.paths)
    if summaries is None:
        return 2
    for path in write_plots(summaries, args.out or Path(args.paths[0]), args.format):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
