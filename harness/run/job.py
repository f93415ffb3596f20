"""The edge: a composed Hydra config becomes the objects one run is made of.

`job_from_config` is called once per run (`python -m harness`, the bench, tests); everything below
it receives these typed objects (the model's and task's settings, the method, the run's switches),
never the Hydra config itself. Every field is checked here, before anything loads.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from harness.errors import ConfigError
from harness.run.config import Config, EngineConf, LoggerConf, ModelConf, TaskConf
from harness.run.method import MethodChoice, choose_method
from harness.run.validate import check_config, check_method_family


@dataclass
class Job:
    """One run as objects."""

    model: ModelConf
    task: TaskConf
    method: MethodChoice
    engine: EngineConf
    logger: LoggerConf
    seed: int
    results_dir: Path
    cache_dir: Path
    feature_cache: bool  # reuse encoded videos across runs (cache_dir/features)
    run_id: str | None  # None: derived from the settings (harness.run.identity.run_id)
    resume: bool
    progress: bool
    resolved: dict  # the whole resolved config, recorded with the run


def check_known_keys(cfg: DictConfig) -> None:
    """A top-level key the schema does not have is an error, also when added with `+` (Hydra's own
    hint for a misspelt key is to add it, which would run the default silently)."""
    import dataclasses
    import difflib

    known = [f.name for f in dataclasses.fields(Config)]
    for key in cfg:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            raise ConfigError(f"{key}={cfg[key]!r}: not a setting of the harness"
                              + (f" (did you mean {close[0]}?)" if close else "")
                              + f"; its top-level settings are {', '.join(known)}")


def job_from_config(cfg: DictConfig) -> Job:
    """The checked objects of a composed config (ConfigError naming the first bad field)."""
    if "hydra" in cfg:  # composed with return_hydra_config: Hydra's own node is not the run's
        cfg = cfg.copy()
        with open_dict(cfg):
            del cfg["hydra"]
    check_known_keys(cfg)
    config: Config = OmegaConf.to_object(cfg)
    check_config(config.model, config.task, config.seed, config.engine)
    method = choose_method(config.method, config.tau, config.retention)
    check_method_family(method.compressor, config.model.family)
    return Job(model=config.model, task=config.task, method=method, engine=config.engine, logger=config.logger,
               seed=config.seed, results_dir=Path(config.results_dir), cache_dir=Path(config.cache_dir),
               feature_cache=config.feature_cache, run_id=config.run_id, resume=config.resume,
               progress=sys.stderr.isatty() if config.progress is None else config.progress, resolved=OmegaConf.to_container(cfg, resolve=True))
