"""Hydra callback: at the end of a multirun, write the table of the runs it made."""

from __future__ import annotations

from pathlib import Path

from hydra.experimental.callback import Callback


class SweepTable(Callback):
    def on_multirun_end(self, config, **kwargs) -> None:
        from harness.loggers import log_sweep
        from harness.plots import write_plots
        from harness.table import find_summaries, write_tables

        sweep_dir = Path(config.hydra.sweep.dir)
        pointers = sorted(sweep_dir.glob("*/run_dir.txt"))
        errors = [p.read_text().strip().replace("\n", ": ", 1) for p in sorted(sweep_dir.glob("*/error.txt"))]
        if pointers:
            summaries = find_summaries([Path(p.read_text().strip()) for p in pointers])
            markdown = write_tables(summaries, sweep_dir)
            write_plots(summaries, sweep_dir)
            print(f"\nSweep table ({sweep_dir}/table.md, .tex, .csv; plots *.png, *.pdf):\n\n{markdown}",
                  flush=True)
            if config.logger.name == "wandb":
                log_sweep(config.logger, Path(config.results_dir), sweep_dir, summaries)
        if errors:
            (sweep_dir / "errors.txt").write_text("\n".join(errors) + "\n")
            print(f"{len(errors)} sweep point(s) did not run (listed in {sweep_dir}/errors.txt):\n  "
                  + "\n  ".join(errors), flush=True)
