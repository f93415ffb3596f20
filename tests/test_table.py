"""Tables and plots from constructed run summaries: deltas to `none`, row order, missing and
failed cells, the per-kind breakdown columns and panels, and the setup notes."""

import pandas as pd
import pytest

from harness.report.plots import accuracy_vs_retention
from harness.report.tables import MISSING, footnotes, paper_table, runs_frame


def summary(method, label, score, rho, *, task="Synthetic-MC", by=None, failed=0, model="micro",
            caveats=("synthetic task", "trained micro model")):
    return {"method": method, "label": label, "model": model, "family": "llava_onevision",
            "task_label": task, "score": score, "score_ci95": [score - 5, score + 5],
            "retention": {"rho_tok": {"mean": rho}, "rho_flops": {"mean": rho * 0.9}},
            "agreement_with_none": 1.0 if method == "none" else 0.5, "n_failed": failed,
            "caveats": list(caveats), "judge": None,
            "score_by": {k: {"score": v, "score_ci95": [v - 1, v + 1], "n": 60} for k, v in (by or {}).items()},
            "timings": {}}


RUNS = [
    summary("uniform", "r=0.1", 50.0, 0.1, by={"flash": 60.0, "small": 40.0}),
    summary("none", "", 99.0, 1.0, by={"flash": 98.0, "small": 100.0}),
    summary("divprune", "r=0.1", 80.0, 0.1, by={"flash": 90.0, "small": 70.0}, failed=2),
    summary("uniform", "r=0.5", 75.0, 0.5, by={"flash": 80.0, "small": 70.0}),
]


def test_rows_none_first_then_by_retention_with_deltas_to_none():
    table = paper_table(runs_frame(RUNS))
    assert list(table["Method"]) == ["none", "uniform (r=0.5)", "divprune (r=0.1)", "uniform (r=0.1)"]
    row = table.set_index("Method").loc["uniform (r=0.5)"]
    assert row["Synthetic-MC"] == "75.0 (-24.0)"
    assert row["Synthetic-MC: small"] == "70.0 (-30.0)"
    assert table.set_index("Method").loc["none", "Synthetic-MC"] == "99.0"  # the reference has no delta
    assert row["Retention"] == "50.0%" and row["FLOPs"] == "45.0%"


def test_breakdown_columns_follow_their_benchmark_and_stay_out_of_the_average():
    table = paper_table(runs_frame(RUNS))
    assert list(table.columns) == ["Family", "Model", "Method", "Retention", "FLOPs", "Synthetic-MC",
                                   "Synthetic-MC: flash", "Synthetic-MC: small", "Avg.", "Agree"]
    # Avg. is over whole benchmarks only: with one benchmark it is that benchmark's score
    assert (table["Avg."].str.split(" ").str[0] == table["Synthetic-MC"].str.rstrip("*").str.split(" ").str[0]).all()


def test_failed_samples_are_starred_and_missing_cells_are_dashes():
    runs = RUNS + [summary("none", "", 70.0, 1.0, task="Smoke-MC", caveats=("SMOKE: random model",))]
    table = paper_table(runs_frame(runs)).set_index("Method")
    assert table.loc["divprune (r=0.1)", "Synthetic-MC"] == "80.0 (-19.0)*"
    assert table.loc["divprune (r=0.1)", "Smoke-MC"] == MISSING  # not run there
    assert table.loc["divprune (r=0.1)", "Avg."] == MISSING  # an average over a missing benchmark


def test_setup_notes_name_what_the_scores_are():
    notes = footnotes(runs_frame(RUNS + [summary("none", "", 25.0, 1.0, task="Smoke-MC", model="tiny",
                                            caveats=("SMOKE: random model",))]))
    assert any("Setup: synthetic task, trained micro model" in n for n in notes)
    assert any(n.startswith("SMOKE setup") for n in notes)
    assert any("question type or by its tasks (task.breakdown)" in n for n in notes)
    assert not any("task.breakdown" in n for n in footnotes(runs_frame([summary("none", "", 99.0, 1.0)])))


def test_plots_draw_one_panel_per_kind():
    df = runs_frame(RUNS)
    assert set(df["benchmark"]) == {"Synthetic-MC", "Synthetic-MC: flash", "Synthetic-MC: small"}
    whole = df[df["whole"]]
    assert len(whole) == len(RUNS) and whole["caveats"].eq("synthetic task, trained micro model").all()
    fig = accuracy_vs_retention(df)
    titles = sorted(ax.get_title() for ax in fig.axes if ax.get_title())
    assert titles == ["Synthetic-MC", "Synthetic-MC: flash", "Synthetic-MC: small"]
    assert "synthetic task, trained micro model" in fig._suptitle.get_text()
    # each panel's uniform line goes through that kind's scores, in retention order (dodged sideways
    # by at most 1.2 points so identical points stay visible), on the one 0-100 axis of every panel
    small = next(ax for ax in fig.axes if ax.get_title() == "Synthetic-MC: small")
    line = next(c for c in small.containers if c.get_label() == "uniform").lines[0]
    assert list(line.get_ydata()) == pytest.approx([40.0, 70.0])
    assert list(line.get_xdata()) == pytest.approx([10.0, 50.0], abs=1.2)
    assert all(ax.get_ylim() == (0, 102) for ax in fig.axes if ax.get_title())


def test_a_summary_without_breakdown_is_one_column():
    df = runs_frame([summary("none", "", 99.0, 1.0), summary("uniform", "r=0.5", 70.0, 0.5)])
    assert isinstance(df, pd.DataFrame) and df["whole"].all()
    assert "Synthetic-MC: flash" not in paper_table(df).columns
