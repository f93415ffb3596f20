"""`python -m harness.table DIR [DIR ...] [--out DIR] [--ci] [--throughput]`: the paper-style table of every run
found under the given run, sweep or results directories, as Markdown (printed), LaTeX and CSV
(harness/report/tables.py). `--hard-subset [--baseline M]`: scores on the questions the baseline gets
wrong (harness/report/hard_subset.py). `--published` alone prints the published numbers
(harness/report/published.csv); with DIRs it puts the runs beside the matching published rows."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    from harness.report.tables import summaries_or_none, write_tables

    parser = argparse.ArgumentParser(prog="python -m harness.table", description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="*", help="run dirs, sweep dirs or results/")
    parser.add_argument("--out", type=Path, help="where to write the tables (default: first path)")
    parser.add_argument("--ci", action="store_true", help="show 95%% bootstrap intervals")
    parser.add_argument("--throughput", action="store_true", help="add each run's samples per second")
    parser.add_argument("--hard-subset", action="store_true",
                        help="each run's score on the samples the baseline at its retention gets wrong")
    parser.add_argument("--baseline", default="uniform", help="the baseline of --hard-subset (default uniform)")
    parser.add_argument("--published", action="store_true",
                        help="the published numbers; with DIRs, the runs beside the matching published rows")
    parser.add_argument("--model", help="with --published alone: only this model (e.g. llava_ov_7b)")
    parser.add_argument("--benchmark", help="with --published alone: only this benchmark (e.g. VideoMME)")
    parser.add_argument("--method", help="with --published alone: only this method (e.g. fastv)")
    args = parser.parse_args(argv)
    if args.published and not args.paths:
        from harness.report.published import filter_published, load_published, published_table

        print(published_table(filter_published(load_published(), args.model, args.benchmark, args.method)))
        return 0
    if not args.paths:
        parser.error("give run, sweep or results directories (or --published alone)")
    summaries = summaries_or_none(args.paths)
    if summaries is None:
        return 2
    out = args.out or Path(args.paths[0])
    out.mkdir(parents=True, exist_ok=True)
    if args.published:
        from harness.report.published import beside_published, beside_table, load_published

        published = load_published()
        rows, unmatched = beside_published(summaries, published)
        markdown = beside_table(rows, unmatched, published)
        (out / "published.md").write_text(markdown)
        rows.to_csv(out / "published.csv", index=False)
        print(markdown)
        return 0
    if args.hard_subset:
        from harness.report.hard_subset import hard_subset, hard_subset_table

        frame = hard_subset(summaries, args.baseline)
        markdown = hard_subset_table(frame, args.baseline)
        (out / "hard_subset.md").write_text(markdown)
        frame.to_csv(out / "hard_subset.csv", index=False)
        print(markdown)
        return 0
    print(write_tables(summaries, out, ci=args.ci, throughput=args.throughput))
    return 0


if __name__ == "__main__":
    sys.exit(main())
