"""Scores on the questions a simple baseline gets wrong: a sharper comparison of compressors.

Many benchmark questions survive any compression (a plain downsampling baseline still answers them:
VTC-Bench, arXiv 2510.07143), so they say nothing about a compressor. For each run this view takes
the run of the baseline method (default `uniform`) at the same retention and the same setting (model,
task, limit), the samples that baseline answers wrong (per-sample score below full credit), and the
run's score on just those, beside its score on all samples and the subset's size. Needs per-sample
scores (tasks scored as samples complete: `task.live_score`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from harness.report.summary import bootstrap_ci
from harness.run.rundir import RunDir

MATCH = 0.02  # achieved token retentions this close count as the same retention


def requested_retention(summary: dict) -> float | None:
    """The retention a run was asked for (`retention=`), else None."""
    if summary.get("requested_retention") is not None:
        return summary["requested_retention"]
    if summary.get("target_retention") is not None:
        return summary["target_retention"]
    label = summary.get("label") or ""
    for part in label.replace(";", ",").split(","):
        if part.strip().startswith("r="):
            return float(part.strip()[2:])
    return None


def baseline_for(run: dict, baselines: list[dict]) -> dict | None:
    """The baseline run of the same setting at the same retention: the same requested retention if
    both have one, else the closest achieved token retention within MATCH."""
    same = [b for b in baselines if b.get("setting") == run.get("setting")]
    wanted = requested_retention(run)
    for b in same:
        if wanted is not None and requested_retention(b) == wanted:
            return b
    achieved = (run["retention"].get("rho_tok") or {}).get("mean")
    if achieved is None or not same:
        return None
    best = min(same, key=lambda b: abs((b["retention"].get("rho_tok") or {}).get("mean", 9) - achieved))
    close = abs((best["retention"].get("rho_tok") or {}).get("mean", 9) - achieved) <= MATCH
    return best if close else None


def per_sample_scores(summary: dict) -> dict[str, float]:
    """{sample key: score} of a run's answered samples (only samples scored as they completed)."""
    return {r["key"]: float(r["score"]) for r in RunDir(Path(summary["results_dir"])).samples()
            if r.get("status") == "ok" and r.get("score") is not None}


def hard_subset(summaries: list[dict], baseline: str = "uniform", seed: int = 0) -> pd.DataFrame:
    """One row per run (the baseline's own and `none` excluded): its full score, the baseline run it
    is compared with, the size of that baseline's wrong-answer subset and the run's score on it."""
    baselines = [s for s in summaries if s["method"] == baseline]
    rows = []
    for run in summaries:
        if run["method"] in (baseline, "none"):
            continue
        base = baseline_for(run, baselines)
        row = {"model": run["model"], "benchmark": run["task_label"], "method": run["method"],
               "setting": run["label"] or "", "retention": (run["retention"].get("rho_tok") or {}).get("mean"),
               "score": run["score"], "baseline_run": base["run_id"] if base else None,
               "hard_n": None, "hard_score": None, "hard_ci_low": None, "hard_ci_high": None}
        if base is not None:
            full = float(base.get("scale") or 1.0)
            wrong = {k for k, v in per_sample_scores(base).items() if v < full}
            mine = per_sample_scores(run)
            values = [100.0 * mine[k] / full for k in sorted(wrong) if k in mine]
            row["hard_n"] = len(values)
            if values:
                row["hard_score"] = float(np.mean(values))
                ci = bootstrap_ci(values, seed=seed)
                row["hard_ci_low"], row["hard_ci_high"] = ci if ci else (None, None)
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    # as the paper table reads: by model, benchmark and method, the highest retention first
    return frame.sort_values(["model", "benchmark", "method", "retention"], ascending=[True, True, True, False],
                             kind="stable").reset_index(drop=True)


def hard_subset_table(frame: pd.DataFrame, baseline: str) -> str:
    """Markdown: each run's full score beside its score on the questions `baseline` gets wrong."""
    if frame.empty:
        return f"No runs to compare with {baseline} (give runs of other methods and of {baseline})."
    out = pd.DataFrame({
        "Model": frame["model"], "Benchmark": frame["benchmark"],
        "Method": frame["method"] + frame["setting"].map(lambda s: f" ({s})" if s else ""),
        "Retention": frame["retention"].map(lambda r: "–" if pd.isna(r) else f"{100 * r:.1f}%"),
        "All": frame["score"].map(lambda v: f"{v:.1f}"),
        f"Hard (wrong for {baseline})": [
            "–" if pd.isna(h) else f"{h:.1f}" + (f" [{lo:.1f}, {hi:.1f}]" if not pd.isna(lo) else "")
            for h, lo, hi in zip(frame["hard_score"], frame["hard_ci_low"], frame["hard_ci_high"])],
        "n hard": frame["hard_n"].map(lambda n: "–" if pd.isna(n) else str(int(n))),
    })
    notes = [f"Hard = score on the samples the {baseline} run of the same setting and retention answers "
             "wrong (its per-sample score below full credit), with a 95 % bootstrap CI; n hard = their number. "
             f"'–': no {baseline} run at that retention (run it: +method={baseline} retention=<r>)."]
    return out.to_markdown(index=False, disable_numparse=True) + "\n\n" + "\n".join(f"{n}  " for n in notes) + "\n"
