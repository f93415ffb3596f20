"""Accuracy-vs-retention and cost plots from run summaries (PNG/PDF).

    python -m harness.plots results/sweeps/<time> [--out DIR] [--format png pdf]

One panel per benchmark, one line per method (the uncompressed `none` score as a dashed line),
against achieved token retention and against the prefill FLOPs ratio; and the mean per-sample
cost of each method split into vision encoder, compressor, prefill and decode.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt  # headless: matplotlib falls back to Agg; notebooks: inline
import pandas as pd

from harness.report.summary import TIMINGS
from harness.report.tables import benchmark_columns, runs_frame

X_AXES = {"rho_tok": "achieved token retention (%)", "rho_flops": "prefill FLOPs ratio (%)"}


def accuracy_vs_retention(df: pd.DataFrame, x: str = "rho_tok", columns: int = 3):
    """One panel per benchmark and breakdown group (`columns` a row), one line per method in a
    colour and marker of its own across panels, `none` dashed; one legend for the figure."""
    panels = benchmark_columns(df)  # in the table's column order
    methods = sorted(set(df["method"]) - {"none"})
    colours = plt.get_cmap("tab20" if len(methods) > 10 else "tab10")
    style = {m: (colours(i % colours.N), "osD^v<>ph*"[i % 10]) for i, m in enumerate(methods)}
    cols = min(columns, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols + 2.2, 3.4 * rows), squeeze=False)
    for ax, bench in zip(axes.flat, panels):
        part = df[df["benchmark"] == bench]
        for method, runs in sorted(part.groupby("method")):
            if method == "none":
                ax.axhline(runs["score"].mean(), ls="--", c="grey", label="none (100%)")
                continue
            runs = runs.sort_values(x)
            colour, marker = style[method]
            ax.plot(100 * runs[x], runs["score"], marker=marker, ms=4, c=colour, label=method)
        ax.set(title=bench, xlabel=X_AXES[x], ylabel="score (0-100)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    handles = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(handles.values(), handles.keys(), loc="center right", fontsize=8)
    setups = sorted(set(df["caveats"]) - {""})
    if setups:
        fig.suptitle("; ".join(setups) + (": not real accuracy" if any("SMOKE" in c for c in setups) else ""),
                     fontsize=8)
    fig.tight_layout(rect=(0, 0, 1 - 2.0 / fig.get_figwidth(), 1))
    return fig


def cost_breakdown(df: pd.DataFrame):
    cost = df[df["whole"]].groupby("method")[[f"{k}_s" for k in TIMINGS]].mean() * 1000
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
