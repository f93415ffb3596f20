"""Experiment loggers: `logger=none` (default) or `logger=wandb` (offline unless told otherwise)."""

from __future__ import annotations

from pathlib import Path


def sweep_name() -> str | None:
    """The multirun's directory name, so W&B groups a sweep's runs into one study."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return "sweep-" + Path(HydraConfig.get().sweep.dir).name
    return None


class NoLogger:
    def log_run(self, config: dict, summary: dict, run_dir) -> None:
        pass


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, name + "/"))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[name] = v
    return out


def quiet_wandb() -> None:
    """W&B's own terminal lines (about 25 a run) off: the run's summary line is the output, and W&B
    keeps its log in its run directory (`debug.log`)."""
    import os

    os.environ.setdefault("WANDB_SILENT", "true")


class WandbLogger:
    """One W&B run per harness run: config, summary metrics and the per-sample table."""

    def __init__(self, conf, results_dir: Path):
        self.conf, self.results_dir = conf, Path(results_dir)

    def log_run(self, config: dict, summary: dict, run_dir) -> None:
        """config: the run's resolved config (recorded as the W&B run's config)."""
        quiet_wandb()
        import wandb

        directory = Path(self.conf.dir or self.results_dir / "wandb")
        directory.mkdir(parents=True, exist_ok=True)
        run = wandb.init(project=self.conf.project, entity=self.conf.entity, mode=self.conf.mode,
                         group=self.conf.group or sweep_name(), name=summary["run_id"],
                         job_type="run", dir=str(directory),
                         config=config, reinit="finish_previous")
        run.summary.update(flatten(summary))
        columns = ["key", "status", "prediction", "target", "score", "rho_tok", "rho_flops",
                   "vision_s", "compressor_s", "prefill_s", "decode_s"]
        table = wandb.Table(columns=columns)
        for r in run_dir.samples():
            ret, t = r.get("retention") or {}, r.get("timings") or {}
            table.add_data(r["key"], r["status"], r.get("prediction"), str(r.get("target")),
                           r.get("score"), ret.get("rho_tok"), ret.get("rho_flops"), t.get("vision"),
                           t.get("compressor"), t.get("prefill"), t.get("decode"))
        run.log({"samples": table})
        run.finish()


def log_sweep(conf, results_dir: Path, sweep_dir: Path, summaries: list[dict]) -> None:
    """One W&B run for the whole sweep: the combined table and accuracy-vs-retention plots."""
    quiet_wandb()
    import wandb

    from harness.report.tables import runs_frame

    directory = Path(conf.dir or results_dir / "wandb")
    directory.mkdir(parents=True, exist_ok=True)
    name = "sweep-" + sweep_dir.name
    run = wandb.init(project=conf.project, entity=conf.entity, mode=conf.mode, group=conf.group or name,
                     name=name, job_type="sweep", dir=str(directory), reinit="finish_previous")
    df = runs_frame(summaries)
    run.log({"sweep/runs": wandb.Table(dataframe=df)})
    for bench, part in df.groupby("benchmark"):
        methods = sorted(part["method"].unique())
        lines = [part[part["method"] == m].sort_values("rho_tok") for m in methods]
        run.log({f"sweep/{bench}/accuracy_vs_retention": wandb.plot.line_series(
            xs=[(100 * ln["rho_tok"]).tolist() for ln in lines], ys=[ln["score"].tolist() for ln in lines],
            keys=methods, title=f"{bench}: score vs token retention", xname="token retention (%)")})
    for png in sorted(sweep_dir.glob("*.png")):
        run.log({f"sweep/plots/{png.stem}": wandb.Image(str(png))})
    run.finish()


def make_logger(conf, results_dir: Path):
    """The logger a LoggerConf names."""
    if conf.name == "none":
        return NoLogger()
    if conf.name == "wandb":
        return WandbLogger(conf, results_dir)
    raise ValueError(f"logger.name={conf.name}: expected none or wandb")
