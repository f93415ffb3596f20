"""Paper-style result tables from run directories: Markdown, LaTeX (booktabs) and CSV.

Rows are model family x model x method x setting (each model's `none` row on top), columns are
benchmarks and their average, plus the
achieved retention and FLOPs ratio; each score also shows its delta to `none`. Missing cells stay
visibly missing ("–"), never zero.

    python -m harness.table results/sweeps/2026-11-21_12-00-00 [--out DIR] [--ci]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

MISSING = "–"


def find_summaries(paths) -> list[dict]:
    """summary.json of every run dir given, found below a given dir, or listed by a sweep dir."""
    found = {}
    for path in map(Path, paths):
        candidates = list(path.glob("**/summary.json")) if path.is_dir() else []
        for pointer in path.glob("**/run_dir.txt") if path.is_dir() else []:
            candidates.append(Path(pointer.read_text().strip()) / "summary.json")
        if path.is_file() and path.name == "summary.json":
            candidates.append(path)
        for c in candidates:
            if c.is_file():
                # where the run is now (a copied or moved results directory still reads its samples)
                found[c.resolve()] = {**json.loads(c.read_text()), "results_dir": str(c.resolve().parent)}
    if not found:
        raise FileNotFoundError(f"no summary.json under {', '.join(map(str, paths))}")
    return list(found.values())


def summaries_or_none(paths) -> list[dict] | None:
    """For the command lines: the summaries, or None after printing one error line."""
    try:
        return find_summaries(paths)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return None


def runs_frame(summaries: list[dict]) -> pd.DataFrame:
    """One row per run and benchmark (plus one per breakdown group, `whole` False): method, setting,
    score, CI, retention, FLOPs, agreement, failures, caveats, and the mean seconds per sample of each
    timed part (`<part>_s`, on the whole-benchmark rows). Tables, plots and loggers all read this."""
    from harness.report.summary import TIMINGS

    rows = []
    for s in summaries:
        ret, timings = s["retention"], s["timings"]
        row = {
            "method": s["method"], "setting": s["label"] or "", "model": s["model"],
            "family": s.get("family", "llava_onevision"),  # summaries from before model families
            "benchmark": s["task_label"], "whole": True, "score": s["score"],
            "ci_low": (s.get("score_ci95") or [None, None])[0],
            "ci_high": (s.get("score_ci95") or [None, None])[1],
            "rho_tok": ret["rho_tok"]["mean"] if ret["rho_tok"] else None,
            "rho_flops": ret["rho_flops"]["mean"] if ret["rho_flops"] else None,
            "agreement": s.get("agreement_with_none"),
            "failed": s["n_failed"], "caveats": ", ".join(s.get("caveats") or []), "judge": s.get("judge"),
            "chance": s.get("chance"), "stage": stage_of(s), "setting_id": s.get("setting"),
            "vision_cached": bool(s.get("n_vision_cached")) and s.get("n_vision_cached") >= s["n_samples"] - s["n_failed"],
            "samples_per_s": (s.get("throughput") or {}).get("samples_per_s"),
            **{f"{k}_s": (timings.get(k) or {}).get("mean", 0.0) for k in TIMINGS},
        }
        rows.append(row)
        # a benchmark broken down by a document field (task.breakdown) adds one column per group
        for group, part in (s.get("score_by") or {}).items():
            ci = part.get("score_ci95") or [None, None]
            rows.append({**row, "benchmark": breakdown_column(s["task_label"], group), "whole": False,
                         "score": part["score"], "ci_low": ci[0], "ci_high": ci[1]})
    return pd.DataFrame(rows)


def stage_of(summary: dict) -> str:
    """Where a run's method acts, e.g. "encoder", "visual", "visual+decode" ("-" for `none`)."""
    stages = summary.get("stages")
    if stages is None:  # a summary from before stages were recorded
        import methods

        name = summary["method"].split("+")[0]
        stages = sorted(methods.REGISTRY[name].stages) if name in methods.known() else []
    from methods.core.base import STAGES

    stages = [s for s in STAGES if s in stages]
    return "-" if summary["method"] == "none" else "+".join(stages) or "-"


def breakdown_column(benchmark: str, group: str) -> str:
    return f"{benchmark}: {group}"


def benchmark_columns(df: pd.DataFrame) -> list[str]:
    """Whole benchmarks in name order, each followed by its breakdown groups in the order the runs
    report them."""
    columns = []
    for benchmark in sorted(df.loc[df["whole"], "benchmark"].unique()):
        columns.append(benchmark)
        columns += [b for b in df.loc[~df["whole"], "benchmark"].unique()
                    if b.startswith(breakdown_column(benchmark, ""))]
    return columns


def paper_table(df: pd.DataFrame, ci: bool = False, throughput: bool = False) -> pd.DataFrame:
    """Rows = method x setting (none first), columns = benchmarks, Avg., Retention, FLOPs."""
    benchmarks = benchmark_columns(df)
    keys = ["family", "model", "method", "setting"]
    scores = df.pivot_table(index=keys, columns="benchmark", values="score", aggfunc="first")
    scores = scores.reindex(columns=benchmarks)
    whole = sorted(df.loc[df["whole"], "benchmark"].unique())
    avg = scores[whole].mean(axis=1, skipna=False)  # an average over a missing benchmark is missing
    meta = df.groupby(keys).agg(rho_tok=("rho_tok", "mean"), rho_flops=("rho_flops", "mean"),
                                samples_per_s=("samples_per_s", "mean"),
                                agreement=("agreement", "mean"), failed=("failed", "sum"))
    order = sorted(scores.index, key=lambda k: (k[:2], k[2] != "none", -(meta.loc[k, "rho_tok"] or 0), k))
    none_rows = {k[:2]: scores.loc[k] for k in scores.index if k[2] == "none"}
    none_avg = {k[:2]: avg.loc[k] for k in scores.index if k[2] == "none"}
    cis = df.set_index(keys + ["benchmark"])[["ci_low", "ci_high"]]
    out = []
    for key in order:
        family, model, method, setting = key
        row = {"Family": family, "Model": model, "Method": method + (f" ({setting})" if setting else ""),
               "Retention": _pct(meta.loc[key, "rho_tok"]), "FLOPs": _pct(meta.loc[key, "rho_flops"])}
        for b in benchmarks:
            cell = _cell(scores.loc[key, b], none_rows.get((family, model), {}).get(b), method == "none")
            if ci and (key + (b,)) in cis.index and pd.notna(cis.loc[key + (b,), "ci_low"]):
                cell += f" [{cis.loc[key + (b,), 'ci_low']:.1f}, {cis.loc[key + (b,), 'ci_high']:.1f}]"
            failed = df[(df.model == model) & (df.method == method) & (df.setting == setting)
                        & (df.benchmark == b)]["failed"].sum()
            row[b] = cell + ("*" if failed else "")
        row["Avg."] = _cell(avg.loc[key], none_avg.get((family, model)), method == "none")
        row["Agree"] = _pct(meta.loc[key, "agreement"])
        if throughput:  # the engine's samples per second of the run (its own machine and load)
            rate = meta.loc[key, "samples_per_s"]
            row["samples/s"] = MISSING if rate is None or pd.isna(rate) else f"{rate:.2f}"
        out.append(row)
    return pd.DataFrame(out)


def _pct(x) -> str:
    return MISSING if x is None or pd.isna(x) else f"{100 * x:.1f}%"


def _cell(score, reference, is_reference: bool) -> str:
    if score is None or pd.isna(score):
        return MISSING
    if is_reference or reference is None or pd.isna(reference):
        return f"{score:.1f}"
    return f"{score:.1f} ({score - reference:+.1f})"


def with_references(summaries: list[dict]) -> tuple[list[dict], list[str]]:
    """The summaries, plus the `none` run of every setting that lacks one among them when the results
    directory of its runs holds it (agreement filled in where it was missing), and a note for each
    setting whose `none` run was found there or is nowhere."""
    from harness.report.summary import find_reference_run, with_reference
    from harness.run.rundir import RunDir

    summaries, notes = list(summaries), []
    covered = {s.get("setting") for s in summaries if s["method"] == "none"}
    for setting in sorted({s["setting"] for s in summaries if s.get("setting")} - covered):
        runs = [s for s in summaries if s.get("setting") == setting]
        roots = sorted({Path(s["results_dir"]).parent for s in runs})
        found = next((ref for root in roots if (ref := find_reference_run(setting, root))), None)
        what = f"{runs[0]['model']} on {runs[0]['task_label']}"
        if found is None:
            notes.append(f"No `none` run of {what} (this setting) was found in {', '.join(map(str, roots))}: "
                         "deltas and Agree stay empty; run the same model, task and limit with +method=none "
                         "there, then make the table again.")
            continue
        reference = json.loads((found / "summary.json").read_text())
        summaries.append(reference)
        notes.append(f"The `none` row of {what} is the run {found.name} (not among the runs given).")
        for i, s in enumerate(summaries):
            if s.get("setting") == setting and s["method"] != "none" and s.get("agreement_with_none") is None:
                summaries[i] = with_reference(s, RunDir(s["results_dir"]).samples(), found.parent)
    return summaries, notes


def footnotes(df: pd.DataFrame) -> list[str]:
    has_none = (df["method"] == "none").any()
    notes = [("Scores on 0-100; (±x) is the difference to the uncompressed `none` row of the same model. "
              if has_none else "Scores on 0-100. ")
             + "Retention = mean achieved token retention rho_tok; FLOPs = prefill FLOPs ratio to `none`; "
             "Agree = share of answers equal to `none`'s. Scores are accuracies unless the benchmark says "
             "otherwise; chance is the score of guessing."]
    for benchmark, judges in df.dropna(subset=["judge"]).groupby("benchmark")["judge"]:
        notes.append(f"{benchmark} is scored by a GPT judge: {', '.join(sorted(set(judges)))}.")
    if df["failed"].sum():
        notes.append("* this benchmark had failed samples (counted as wrong); see the run's summary.json.")
    for setup in sorted(set(df["caveats"]) - {""}):
        if "SMOKE" in setup:
            notes.append("SMOKE setup: a randomly initialised model and a generated task; "
                         "these numbers only show that the harness runs.")
        else:
            notes.append(f"Setup: {setup} (the harness's embedded setting, not a published benchmark)."
                         if "synthetic" in setup else f"Setup: {setup}.")
    if (~df["whole"]).any():
        notes.append("Columns 'benchmark: group' break a benchmark down by its documents' "
                     "question type or by its tasks (task.breakdown); Avg. is over whole benchmarks.")
    return notes


def write_tables(summaries: list[dict], out_dir: Path, ci: bool = False, throughput: bool = False) -> str:
    """Write table.md, table.tex, table.csv (and runs.csv with every run) to out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries, found = with_references(summaries)
    df = runs_frame(summaries)
    table = paper_table(df, ci=ci, throughput=throughput)
    notes = footnotes(df) + found
    markdown = table.to_markdown(index=False, disable_numparse=True) + "\n\n" + "\n".join(f"{n}  " for n in notes) + "\n"
    (out_dir / "table.md").write_text(markdown)
    styler = table.style.hide(axis="index").format(escape="latex").format_index(escape="latex", axis=1)
    latex = styler.to_latex(hrules=True, column_format="l" * len(table.columns))
    (out_dir / "table.tex").write_text(latex + "".join(f"% {n}\n" for n in notes))
    table.to_csv(out_dir / "table.csv", index=False)
    df.to_csv(out_dir / "runs.csv", index=False)
    return markdown
