"""Every script in benchmarks/ imports against the current code (its timings are run by hand, so a
renamed helper would otherwise break it unnoticed) and has a --quick mode or its own options."""

import importlib.util
from pathlib import Path

import pytest

from tests.helpers import REPO

SCRIPTS = sorted((REPO / "benchmarks").glob("bench_*.py"))


def test_there_are_benchmark_scripts():
    assert len(SCRIPTS) >= 12


@pytest.mark.parametrize("path", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_benchmark_script_imports(path: Path):
    spec = importlib.util.spec_from_file_location(f"benchmark_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # top-level imports only: main() runs under __main__
    assert callable(module.main)
