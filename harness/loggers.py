"""Experiment loggers: `logger=none` (default) or `logger=wandb` (offline unless told otherwise)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf


class NoLogger:
    def log_run(self, cfg, summary: dict, run_dir) -> None:
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


class WandbLogger:
    """One W&B run per harness run: config, summary metrics and the per-sample table."""

    def __init__(self, conf):
        self.conf = conf

    def log_run(self, cfg, summary: dict, run_dir) -> None:
        import wandb

        directory = Path(self.conf.dir or Path(cfg.results_dir) / "wandb")
        directory.mkdir(parents=True, exist_ok=True)
        run = wandb.init(project=self.conf.project, entity=self.conf.entity, mode=self.conf.mode,
                         group=self.conf.group, name=summary["run_id"], dir=str(directory),
                         config=OmegaConf.to_container(cfg, resolve=True), reinit="finish_previous")
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


def make_logger(cfg):
    if cfg.logger.name == "none":
        return NoLogger()
    if cfg.logger.name == "wandb":
        return WandbLogger(cfg.logger)
    raise ValueError(f"logger.name={cfg.logger.name}: expected none or wandb")
