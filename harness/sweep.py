"""Hydra callback: at the end of a multirun, write the table of the runs it made."""

from __future__ import annotations

from pathlib import Path

from hydra.experimental.callback import Callback


class SweepTable(Callback):
    def on_multirun_end(self, config, **kwargs) -> None:
        from harness.table import find_summaries, write_tables

        sweep_dir = Path(config.hydra.sweep.dir)
        pointers = sorted(sweep_dir.glob("*/run_dir.txt"))
        if not pointers:
            return
        summaries = find_summaries([Path(p.read_text().strip()) for p in pointers])
        markdown = write_tables(summaries, sweep_dir)
        print(f"\nSweep table ({sweep_dir}/table.md, .tex, .csv):\n\n{markdown}", flush=True)
