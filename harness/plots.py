"""Accuracy-vs-retention and cost plots from run summaries (PNG/PDF).

    python -m harness.plots results/sweeps/<time> [--out DIR] [--format png pdf]

One panel per benchmark, one line per method (the uncompressed `none` score as a dashed line),
against achieved token retention and against the prefill FLOPs ratio; and the mean per-sample
cost of each method split into vision encoder, compressor, prefill and decode.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib.pyplot as plt  # headless: matplotlib falls back to Agg; notebooks: inline
import pandas as pd

from harness.summary import TIMINGS
from harness.table import summaries_or_none

X_AXES = {"rho_tok": "achieved token retention (%)", "rho_flops": "prefill FLOPs ratio (%)"}


def runs_frame(summaries: list[dict]) -> pd.DataFrame:
    rows = []
    for s in summaries:
        ret, t = s["retention"], s["timings"]
        rows.append({"method": s["method"], "label": s["label"], "benchmark": s["task_label"],
                     "model": s["model"], "score": s["score"], "smoke": s["smoke"],
                     "rho_tok": ret["rho_tok"]["mean"] if ret["rho_tok"] else None,
                     "rho_flops": ret["rho_flops"]["mean"] if ret["rho_flops"] else None,
                     **{f"{k}_s": (t.get(k) or {}).get("mean", 0.0) for k in TIMINGS}})
    return pd.DataFrame(rows)


def accuracy_vs_retention(df: pd.DataFrame, x: str = "rho_tok"):
    benchmarks = sorted(df["benchmark"].unique())
    fig, axes = plt.subplots(1, len(benchmarks), figsize=(4.5 * len(benchmarks), 3.6), squeeze=False)
    for ax, bench in zip(axes[0], benchmarks):
        part = df[df["benchmark"] == bench]
        for method, runs in sorted(part.groupby("method")):
            if method == "none":
                ax.axhline(runs["score"].mean(), ls="--", c="grey", label="none (100%)")
                continue
            runs = runs.sort_values(x)
            ax.plot(100 * runs[x], runs["score"], marker="o", label=method)
        ax.set(title=bench, xlabel=X_AXES[x], ylabel="score (0-100)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if df["smoke"].any():
        fig.suptitle("SMOKE (random model): not real accuracy", fontsize=8)
    fig.tight_layout()
    return fig


def cost_breakdown(df: pd.DataFrame):
    cost = df.groupby("method")[[f"{k}_s" for k in TIMINGS]].mean() * 1000
    fig, ax = plt.subplots(figsize=(1.2 * len(cost) + 3, 3.6))
    bottom = pd.Series(0.0, index=cost.index)
    for k in TIMINGS:
        ax.bar(cost.index, cost[f"{k}_s"], bottom=bottom, label=k)
        bottom += cost[f"{k}_s"]
    ax.set(ylabel="mean time per sample (ms)", title="cost per sample")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def write_plots(summaries: list[dict], out_dir: Path, formats=("png", "pdf")) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    df = runs_frame(summaries)
    figures = {f"accuracy_vs_{x}": accuracy_vs_retention(df, x) for x in X_AXES}
    figures["cost_breakdown"] = cost_breakdown(df)
    written = []
    for name, fig in figures.items():
        for fmt in formats:
            fig.savefig(out_dir / f"{name}.{fmt}", dpi=120)
            written.append(out_dir / f"{name}.{fmt}")
        plt.close(fig)
    return written


def main(argv=None) -> int:
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
