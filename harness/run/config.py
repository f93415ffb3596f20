"""Typed schema of the Hydra config: a misspelt key or a wrong type fails before any model loads.

The YAML files under conf/ hold the defaults of models, tasks and loggers; these dataclasses fix
names and types. A method's knobs are declared once, on its dataclass in methods/: the node
`method_knobs/<name>` each conf/method/<name>.yaml selects is made here from that declaration, so
`method.<knob>=v` overrides a known knob without `+` and `--cfg job` shows every knob with its
default. The named sweeps are the files of sweeps/, registered as the config group `sweep`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf


@dataclass
class ModelConf:
    name: str = MISSING  # short name used in run ids and tables
    family: str = "llava_onevision"  # the adapter (harness/models): llava_onevision | qwen2_5_vl
    path: str = MISSING  # local Hugging Face model directory, or a hub id
    caveat: Optional[str] = None  # what the model is, shown beside its scores everywhere
    # ("SMOKE: random model", "trained micro model"); random_init adds "random weights"
    build_tiny: bool = False  # build the embedded smoke model at `path` when it is absent
    frames: int = 8  # frames sampled uniformly per video
    dtype: str = "float32"  # float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    attn_implementation: str = "sdpa"
    max_new_tokens: int = 16
    random_init: bool = False  # build `arch` with random weights instead of loading `path`
    arch: Dict[str, Any] = field(default_factory=dict)  # the family's config fields (published shapes)
    train: Dict[str, Any] = field(default_factory=dict)  # a training recipe: the model is trained on
    # first use (harness.train_micro) and cached under cache_dir/models, keyed by arch + recipe


@dataclass
class TaskConf:
    name: str = MISSING  # short name used in run ids and tables
    lmms_task: str = MISSING  # lmms_eval task name
    label: str = MISSING  # column header in result tables
    metric: str = MISSING  # lmms_eval metric reported as the score
    scale: float = 1.0  # the metric's native maximum (1 or 100); scores are shown on 0-100
    include_path: Optional[str] = None  # directory of local lmms_eval task YAMLs
    overrides: Dict[str, Any] = field(default_factory=dict)  # task-config fields to override
    generator: Optional[str] = None  # "module:function" that writes the task's data if missing
    data_dir: Optional[str] = None  # where the generator writes
    limit: Optional[int] = None  # evaluate only the first N samples (of each task of a group)
    live_score: bool = True  # score each sample as it completes (off for API-judged tasks)
    required_env: List[str] = field(default_factory=list)  # e.g. an API key for a judge
    env: Dict[str, str] = field(default_factory=dict)  # set before the task loads (HF_HOME, ...)
    judge: Optional[str] = None  # the model that scores answers (GPT-judged tasks); recorded
    caveat: Optional[str] = None  # what the task is, shown beside its scores ("synthetic task")
    # scores are also reported per value of a document field (kind, duration group) or, for an
    # lmms_eval group, per leaf task ("lmms_task": MVBench's 20 tasks)
    breakdown: Optional[str] = None
    calibration_size: int = 32  # documents used to calibrate a knob to a target retention
    chance: Optional[float] = None  # the score of guessing (0-100), shown beside scores; null: open-ended


@dataclass
class LoggerConf:
    name: str = "none"  # none | wandb
    project: str = "vtc-harness"
    entity: Optional[str] = None
    mode: str = "offline"  # offline | online | disabled
    group: Optional[str] = None
    dir: Optional[str] = None


@dataclass
class EngineConf:
    group_by_video: bool = True  # answer a video's requests together (one read, encoding, visual stage)
    share_prefix: bool = True  # prefill [head + video] once per video where the method allows it
    prefetch: int = 4  # videos read ahead in a background thread (0: in line)


@dataclass
class Config:
    model: ModelConf = field(default_factory=ModelConf)
    task: TaskConf = field(default_factory=TaskConf)
    engine: EngineConf = field(default_factory=EngineConf)
    method: Dict[str, Any] = field(default_factory=lambda: {"name": "none"})
    logger: LoggerConf = field(default_factory=LoggerConf)
    tau: Optional[float] = None  # Scissor's similarity threshold (top-level shortcut)
    retention: Optional[float] = None  # target token retention (top-level shortcut)
    seed: int = 0
    results_dir: str = "results"
    cache_dir: str = ".cache"
    feature_cache: bool = True  # reuse pooled vision features across runs (cache_dir/features)
    run_id: Optional[str] = None  # default: derived from the config, so a re-run resumes
    resume: bool = True
    progress: Optional[bool] = None  # progress bars; null: when the output is a terminal


REPO_ROOT = Path(__file__).resolve().parents[2]
CONF = REPO_ROOT / "conf"
SWEEPS = REPO_ROOT / "sweeps"


def method_node(name: str) -> dict:
    """The config node of method `name`: its name and every knob at its declared default."""
    import methods

    return {"name": name, **methods.REGISTRY[name].defaults()}


def register_configs() -> None:
    import methods

    if not OmegaConf.has_resolver("abspath"):
        OmegaConf.register_new_resolver("abspath", lambda p: str(Path(p).expanduser().resolve()))
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(group="model", name="model_schema", node=ModelConf)
    cs.store(group="task", name="task_schema", node=TaskConf)
    cs.store(group="logger", name="logger_schema", node=LoggerConf)
    cs.store(group="engine", name="engine_schema", node=EngineConf)
    for name in methods.known():
        cs.store(group="method_knobs", name=name, node=method_node(name))
    for sweep in sorted(SWEEPS.glob("*.yaml")):  # +sweep=<file name>, applied at the top level
        cs.store(group="sweep", name=sweep.stem, node=OmegaConf.load(sweep), package="_global_")


def compose_config(overrides: list[str]):
    """The config `python -m harness <overrides>` would run (for tools outside the Hydra entry point:
    the bench, the micro model's trainer, tests)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


register_configs()
