"""Accuracy-vs-retention and cost plots from run summaries (PNG/PDF), drawn to be read at small n.

One panel per benchmark and breakdown group, all on the same 0-100 axis, one line per method with
its 95 % CI as error bars, the uncompressed `none` score as a dashed line with its CI as a band,
and the chance level as a dotted line; methods are told apart by colour, marker and line style
(the line style says where the method acts: visual stage solid, prefill dashed, both dash-dot,
decode dotted), points of one retention are dodged sideways a little so identical scores stay
visible, and the legend sits inside the figure. The cost figure shows each part of a sample's
compute time (vision encoder, compressor, prefill, decode) beside the others, never stacked, with
the time to first token in a panel of its own (it contains vision, compressor and prefill); vision
time served by the feature cache is the encoding time measured when the entry was made, hatched.
`python -m harness.plots DIR` writes them (harness/plots.py).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt  # headless: matplotlib falls back to Agg; notebooks: inline
import numpy as np
import pandas as pd

from harness.report.tables import benchmark_columns, runs_frame

X_AXES = {"rho_tok": "achieved token retention (%)", "rho_flops": "prefill FLOPs ratio (%)"}
LINE_STYLES = {"visual": "-", "prefill": "--", "visual+prefill": "-.", "decode": ":", "visual+decode": ":"}
MARKERS = "osD^v<>phP*X8d"
PARTS = ("vision", "compressor", "prefill", "decode")


def method_styles(df: pd.DataFrame) -> dict:
    """method -> (colour, marker, line style), the same in every panel: methods sorted by stage then
    name, colours from tab20 in that order, markers cycling, the line style by stage."""
    methods = (df[df["method"] != "none"][["method", "stage"]].drop_duplicates("method")
               .sort_values(["stage", "method"]))
    colours = plt.get_cmap("tab20")
    return {m: (colours(i % 20), MARKERS[i % len(MARKERS)], LINE_STYLES.get(stage, "-"))
            for i, (m, stage) in enumerate(zip(methods["method"], methods["stage"]))}


def accuracy_vs_retention(df: pd.DataFrame, x: str = "rho_tok", columns: int = 3):
    """The accuracy figure (see the module docstring); `columns` panels a row."""
    panels = benchmark_columns(df)  # in the table's column order
    style = method_styles(df)
    cols = min(columns, len(panels))
    rows = -(-(len(panels) + 1) // cols)  # one more slot for the legend
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.5 * rows), squeeze=False)
    span = 100 * (df[x].max() - df[x].min()) if df[x].notna().any() else 100
    dodge = {m: (i - (len(style) - 1) / 2) * min(0.012 * span, 1.2) / max(1, len(style) / 2)
             for i, m in enumerate(style)}
    for ax, bench in zip(axes.flat, panels):
        part = df[df["benchmark"] == bench]
        for method, runs in part.groupby("method"):
            if method == "none":
                score = runs["score"].mean()
                ax.axhline(score, ls="--", c="0.35", lw=1.2, label="none (no compression)")
                if runs["ci_low"].notna().all():
                    ax.axhspan(runs["ci_low"].mean(), runs["ci_high"].mean(), color="0.85", zorder=0)
                continue
            runs = runs.sort_values(x)
            colour, marker, line = style[method]
            xs = 100 * runs[x] + dodge[method]
            err = None
            if runs["ci_low"].notna().all():
                err = np.vstack([runs["score"] - runs["ci_low"], runs["ci_high"] - runs["score"]])
            ax.errorbar(xs, runs["score"], yerr=err, marker=marker, ms=4.5, c=colour, ls=line, lw=1.2,
                        elinewidth=0.8, capsize=2, alpha=0.9, label=method)
        chance = part["chance"].dropna()
        if len(chance):
            ax.axhline(chance.iloc[0], ls=":", c="0.5", lw=1, label="chance")
        ax.set(title=bench, xlabel=X_AXES[x], ylabel="score (0-100)", ylim=(0, 102))
        ax.grid(alpha=0.3)
    slots = list(axes.flat)[len(panels):]
    for ax in slots:
        ax.axis("off")
    handles = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    notes = ["bars: 95% bootstrap CI; grey band: none's CI", "line style: - visual, -- prefill, "
             "-. both, : decode stage", "points dodged sideways (<=1.2 pt) to stay visible"]
    setups = sorted(set(df["caveats"]) - {""})
    title = "; ".join(setups) + (": not real accuracy" if any("SMOKE" in c for c in setups) else "")
    legend_ax = slots[0] if slots else None
    if legend_ax is not None:
        legend_ax.legend(handles.values(), handles.keys(), loc="upper left", fontsize=7.5, ncol=2,
                         frameon=False, title="\n".join(notes), title_fontsize=7)
    else:
        fig.legend(handles.values(), handles.keys(), loc="lower center", fontsize=7.5,
                   ncol=min(6, len(handles)), frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def cost_breakdown(df: pd.DataFrame):
    """Mean compute time per sample of each part, side by side per method, and the time to first
    token in its own panel (see the module docstring)."""
    whole = df[df["whole"]]
    cost = whole.groupby("method")[[f"{k}_s" for k in (*PARTS, "ttft")]].mean() * 1000
    cached = whole.groupby("method")["vision_cached"].all()
    order = cost.sort_values("ttft_s").index
    fig, (parts_ax, ttft_ax) = plt.subplots(1, 2, figsize=(min(16.0, max(8.0, 0.6 * len(order) + 5)), 4.6),
                                            gridspec_kw={"width_ratios": [3, 1.2]})
    width = 0.8 / len(PARTS)
    positions = np.arange(len(order))
    for i, part in enumerate(PARTS):
        values = cost.loc[order, f"{part}_s"]
        bars = parts_ax.bar(positions + (i - 1.5) * width, values, width, label=part)
        if part == "vision":
            for bar, method in zip(bars, order):
                if cached[method]:
                    bar.set_hatch("///")
    parts_ax.set_xticks(positions, order, rotation=45, ha="right", fontsize=8)
    parts_ax.set(ylabel="mean compute time per sample (ms)", title="where a sample's time goes")
    parts_ax.legend(fontsize=8, title="hatched: vision from the feature cache\n(its measured encoding time)",
                    title_fontsize=7)
    ttft_ax.barh(np.arange(len(order)), cost.loc[order, "ttft_s"], color="0.45")
    ttft_ax.set_yticks(np.arange(len(order)), order, fontsize=8)
    ttft_ax.set(xlabel="ms", title="time to first token\n(vision + compressor + prefill)")
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
