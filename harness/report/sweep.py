"""A multirun's table: each job leaves its results directory (or its error) in Hydra's job
directory, and at the end of the multirun the callback writes the table and plots of them all."""

from __future__ import annotations

from pathlib import Path

from hydra.experimental.callback import Callback


class SweepTable(Callback):
    def on_multirun_end(self, config, **kwargs) -> None:
        from harness.report.loggers import log_sweep
        from harness.report.plots import write_plots
        from harness.report.tables import find_summaries, write_tables

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


def _job_dir() -> Path | None:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    out = Path(HydraConfig.get().runtime.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out


def record_job_error(err: Exception | str) -> bool:
    """In a multirun, leave the error in the job's directory for the sweep table; True if so."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    out = _job_dir()
    if out is None or HydraConfig.get().mode != RunMode.MULTIRUN:
        return False
    overrides = " ".join(HydraConfig.get().overrides.task)
    (out / "error.txt").write_text(f"{overrides}\n{err}\n")
    return True


def record_job_output(run_path: Path) -> None:
    """Leave the run's results path in Hydra's job directory, for the sweep-end table."""
    out = _job_dir()
    if out is not None:
        (out / "run_dir.txt").write_text(str(Path(run_path).resolve()) + "\n")
