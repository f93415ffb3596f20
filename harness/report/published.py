"""Published numbers (harness/report/published.csv) and our runs beside them.

The data file holds one row per published score: model, checkpoint, frames, benchmark, split, method,
retention, score (0-100), source (paper table / page, or official repository file at a commit) and
notes on the setting (an "enhanced" retrained baseline, the frames, the split). A user with real
weights sees at once whether a run reproduces the literature, and in which setting it differs.

    python -m harness.table --published [--model M] [--benchmark B] [--method X]
    python -m harness.table DIR --published
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

DATA = Path(__file__).with_name("published.csv")
RETENTION_MATCH = 0.02  # a run at retention r matches a published row at r +- this
COLUMNS = ["model", "checkpoint", "frames", "benchmark", "split", "method", "retention", "score", "source", "notes"]


def load_published(path: Path = DATA) -> pd.DataFrame:
    """The published rows, checked: every column present, scores on 0-100, retentions in (0, 1]."""
    frame = pd.read_csv(path, dtype={"checkpoint": str, "split": str, "notes": str, "source": str})
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(COLUMNS)}")
    bad = frame[(frame.score < 0) | (frame.score > 100) | (frame.retention <= 0) | (frame.retention > 1)]
    if not bad.empty:
        raise ValueError(f"{path}: row {bad.index[0] + 2}: score must be in [0, 100] and retention in (0, 1]")
    return frame


def _key(name) -> str:
    """Benchmark names compared without case or punctuation (NExT-QA == nextqa)."""
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def same_weights(ours: str | None, published: str | None) -> bool:
    """llava-hf's `<name>-hf` checkpoints are conversions of lmms-lab's `<name>`: the same weights."""
    if not ours or not published or pd.isna(published):
        return False
    strip = lambda path: path.split("/")[-1].removesuffix("-hf").lower()  # noqa: E731
    return ours == published or strip(ours) == strip(published)


def filter_published(frame: pd.DataFrame, model=None, benchmark=None, method=None) -> pd.DataFrame:
    if model:
        frame = frame[frame.model == model]
    if benchmark:
        frame = frame[frame.benchmark.map(_key) == _key(benchmark)]
    if method:
        frame = frame[frame.method == method]
    return frame


def published_table(frame: pd.DataFrame) -> str:
    """Markdown of the published rows, sorted by model, benchmark, method and retention; each row's
    notes as a numbered footnote below the table."""
    if frame.empty:
        return "No published rows match."
    frame = frame.sort_values(["model", "benchmark", "method", "retention"], na_position="first")
    notes, rows = [], []
    for _, r in frame.iterrows():
        mark = ""
        if isinstance(r.notes, str) and r.notes:
            if r.notes not in notes:
                notes.append(r.notes)
            mark = f" [{notes.index(r.notes) + 1}]"
        rows.append({"Model": r.model, "Checkpoint": _text(r.checkpoint), "Frames": _frames(r.frames),
                     "Benchmark": r.benchmark, "Split": _text(r.split), "Method": r.method,
                     "Retention": _pct(r.retention), "Score": f"{r.score:.1f}", "Source": r.source + mark})
    body = pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)
    return body + "\n\n" + "\n".join(f"[{i}] {n}  " for i, n in enumerate(notes, 1)) + "\n"


def run_retention(summary: dict) -> float | None:
    """The retention a run is compared at: the one asked for, else its mean achieved token retention."""
    if summary["method"] == "none":
        return None
    if summary.get("requested_retention") is not None:
        return float(summary["requested_retention"])
    return ((summary.get("retention") or {}).get("rho_tok") or {}).get("mean")


def matches(summary: dict, frame: pd.DataFrame) -> pd.DataFrame:
    """The published rows of a run's model (or of an unsized 'llava_ov' row for a LLaVA-OneVision run),
    benchmark and method, at its retention (within RETENTION_MATCH; `none` matches `none`)."""
    model = summary["model"]
    family_row = "llava_ov" if model.startswith("llava_ov") else None
    rows = frame[frame.model.isin([model, family_row])
                 & (frame.benchmark.map(_key) == _key(summary["task_label"]))
                 & (frame.method == summary["method"])]
    retention = run_retention(summary)
    if retention is None:
        return rows[rows.retention.isna()]
    return rows[(rows.retention - retention).abs() <= RETENTION_MATCH]


def setting_differences(summary: dict, row) -> list[str]:
    """How the published row's setting differs from the run's (what a gap may come from)."""
    out = []
    if row.model != summary["model"]:
        out.append(f"published model '{row.model}' (size not stated)")
    if not isinstance(row.checkpoint, str) or not row.checkpoint:
        out.append("checkpoint not stated")
    elif not same_weights(summary.get("model_path"), row.checkpoint):
        out.append(f"checkpoint {row.checkpoint} (ours {summary.get('model_path')})")
    if pd.isna(row.frames):
        out.append(f"frames not stated (ours {summary.get('frames')})")
    elif int(row.frames) != summary.get("frames"):
        out.append(f"{int(row.frames)} frames (ours {summary.get('frames')})")
    if isinstance(row.split, str) and row.split:
        out.append(f"split {row.split} (ours: lmms_eval task {summary.get('lmms_task')})")
    if summary.get("limit"):
        out.append(f"ours on the first {summary['limit']} samples only")
    return out


def beside_published(summaries: list[dict], frame: pd.DataFrame) -> tuple[pd.DataFrame, list[dict]]:
    """(One row per run and matching published row: our score, the published one, the difference,
    the source and the setting differences; the runs without any published counterpart)."""
    rows, unmatched = [], []
    for s in sorted(summaries, key=lambda s: (s["model"], s["task_label"], s["method"], -(run_retention(s) or 2))):
        found = matches(s, frame)
        if found.empty:
            unmatched.append(s)
            continue
        for _, r in found.iterrows():
            rows.append({"model": s["model"], "benchmark": s["task_label"], "method": s["method"],
                         "setting": s.get("label") or "", "retention": run_retention(s),
                         "ours": s["score"], "published": float(r.score), "difference": s["score"] - float(r.score),
                         "source": r.source, "differences": "; ".join(setting_differences(s, r)),
                         "notes": r.notes if isinstance(r.notes, str) else "", "run_id": s["run_id"]})
    return pd.DataFrame(rows), unmatched


def beside_table(rows: pd.DataFrame, unmatched: list[dict], frame: pd.DataFrame) -> str:
    """Markdown of `beside_published`, the published notes as footnotes, and the unmatched runs named."""
    parts = []
    if rows.empty:
        known = ", ".join(sorted(frame.benchmark.unique()))
        parts.append("None of these runs has a published counterpart (published numbers exist for "
                     f"{', '.join(sorted(frame.model.unique()))} on {known}).")
    else:
        notes = []
        table = []
        for _, r in rows.iterrows():
            mark = ""
            if r.notes:
                if r.notes not in notes:
                    notes.append(r.notes)
                mark = f" [{notes.index(r.notes) + 1}]"
            table.append({"Model": r.model, "Benchmark": r.benchmark,
                          "Method": r.method + (f" ({r.setting})" if r.setting else ""),
                          "Retention": _pct(r.retention), "Ours": f"{r.ours:.1f}", "Published": f"{r.published:.1f}",
                          "Δ": f"{r.difference:+.1f}", "Source": r.source + mark,
                          "Setting differs": r.differences or "–"})
        parts.append(pd.DataFrame(table).to_markdown(index=False, disable_numparse=True))
        parts.append("Δ = ours − published, on 0-100. A gap is only a finding where 'Setting differs' is empty.")
        parts.append("\n".join(f"[{i}] {n}  " for i, n in enumerate(notes, 1)))
    if unmatched:
        names = ", ".join(f"{s['model']}/{s['task_label']}/{s['method']}" + (f" r={run_retention(s):g}" if run_retention(s) else "")
                          for s in unmatched)
        parts.append(f"No published number for: {names}.")
    return "\n\n".join(parts) + "\n"


def _pct(value) -> str:
    return "–" if value is None or pd.isna(value) else f"{100 * value:.4g}%"


def _text(value) -> str:
    return value if isinstance(value, str) and value else "–"


def _frames(value) -> str:
    return "–" if pd.isna(value) else str(int(value))
