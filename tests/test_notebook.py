"""The results notebook executes on smoke results (table with the per-kind columns, plots,
cost breakdown)."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

from tests.helpers import REPO, run_config

pytestmark = pytest.mark.slow


def test_results_notebook_runs_on_smoke_results(cfg_factory, tmp_path):
    for overrides in (["task.limit=3"], ["+method=uniform", "retention=0.25", "task.limit=3"],
                      ["+method=topk", "retention=0.25", "task.limit=3"]):
        run_config(cfg_factory(*overrides, "task.breakdown=kind"))
    nb = nbformat.read(REPO / "notebooks" / "results.ipynb", as_version=4)
    os.environ["VTC_RESULTS"] = str(tmp_path / "results")
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3",
                       resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    finally:
        del os.environ["VTC_RESULTS"]
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("3 runs under" in o.get("text", "") for o in outputs)
    tables = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    header = tables[0].splitlines()[0]
    assert "| Smoke-MC " in header and "Smoke-MC: colour" in header and "Smoke-MC: direction" in header
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3  # two accuracy plots and the cost breakdown
    hard = tables[-1]  # the hard subset: topk on the questions uniform at the same retention gets wrong
    assert "topk" in hard and "uniform" in hard and "No runs to compare" not in hard
