"""One harness run: validate the config, load model and task, evaluate through lmms_eval, record.

`run(cfg)` is what `python -m harness ...` calls for every job of a (multi)run.
"""

from __future__ import annotations

import importlib
import re
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

import methods
from harness import distributed
from harness.errors import ConfigError
from harness.identity import digest
from harness.data_files import changed, task_files
from harness.lmms_compat import leaf_tasks, silent_progress, task_config
from harness.quiet import log_file, quiet_libraries
from harness.rundir import RunDir
from harness.summary import summarize, summary_line
from harness.timing import step
from harness.validate import check_config, check_method_family, check_method_fits, read_model_config
from methods.base import Compressor

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class MethodChoice:
    name: str  # registry name (e.g. "pipeline")
    knobs: dict  # what the compressor is built with
    target_retention: float | None  # a retention to reach by calibrating the declared knob
    label: str  # e.g. "tau=0.9", "r=0.25"
    title: str  # what tables call it (a pipeline: "visionzip+fastv")

    def build(self) -> Compressor:
        return methods.build(self.name, **self.knobs)


CONF = REPO_ROOT / "conf"


def compose_config(overrides: list[str]) -> DictConfig:
    """The config `python -m harness <overrides>` would run (for tools outside the Hydra entry point:
    the bench, the micro model's trainer)."""
    from hydra import compose, initialize_config_dir

    import harness.config  # noqa: F401  (schemas and resolvers)

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def method_defaults(name: str) -> dict:
    """The knobs conf/method/<name>.yaml gives a method (for a pipeline's parts)."""
    path = CONF / "method" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"method={name}: unknown method, expected one of {', '.join(methods.known())}")
    node = OmegaConf.merge({"tau": None, "retention": None}, OmegaConf.load(path))
    spec = OmegaConf.to_container(node.method, resolve=True)
    spec.pop("name", None)
    return spec


def _value(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "/".join(_value(x) for x in v)
    return str(v)


def _label(compressor: Compressor, knobs: dict, direct: bool = False) -> str:
    """The shown knobs (label_knobs) as k=v; knobs left at None (an official default the method
    derives, e.g. a layer scaled to the model's depth) are not shown. `direct`: the retention knob
    was set from `retention=`, so it reads r=..."""
    short = {"retention": "r"}  # r=0.25 reads the same for every method in a table
    if direct and compressor.retention_knob is not None:
        short[compressor.retention_knob.knob] = "r"
    shown = compressor.label_knobs if compressor.label_knobs is not None else knobs.keys()
    return ",".join(f"{short.get(k, k)}={_value(v)}" for k, v in knobs.items() if k in shown and v is not None)


def describe(compressor: Compressor, target: float | None, direct: bool = False) -> str:
    """A run's label: its knobs, or the retention its declared knob was calibrated to (or, `direct`,
    set to)."""
    if compressor.composite:
        tuned = compressor.retention_knob.knob.split(".")[0] if target is not None else None
        return "; ".join(f"r={target:g}" if p.name == tuned else _label(p, p.knobs())
                         for p in compressor.parts)
    return f"r={target:g}" if target is not None else _label(compressor, compressor.knobs(), direct)


def choose_method(cfg: DictConfig) -> MethodChoice:
    """Resolve `method.*` and the top-level `tau`/`retention` shortcuts into a compressor spec,
    validating every knob before any model loads."""
    spec = OmegaConf.to_container(cfg.method, resolve=True)
    if "name" not in spec:
        raise ConfigError("method.name is missing: select a method with +method=<name> "
                          f"({', '.join(methods.known())})")
    name = spec.pop("name")
    if name not in methods.known():
        raise ConfigError(f"method={name}: unknown method, expected one of {', '.join(methods.known())}")
    if methods.REGISTRY[name].composite:  # each part starts from its own conf/method defaults
        stages = spec.get("stages")
        if not isinstance(stages, list) or not stages:
            raise ConfigError(f"method.stages={stages!r}: expected a list of methods, e.g. "
                              "+method=pipeline 'method.stages=[visionzip,fastv]'")
        for part in stages:
            spec[part] = {**method_defaults(part), **(spec.get(part) or {})}
    if cfg.retention is not None and not 0 < cfg.retention <= 1:
        raise ConfigError(f"{name}.retention={cfg.retention:g}: expected a value in (0, 1]")
    if cfg.tau is not None and "tau" not in spec:
        raise ConfigError(f"tau={cfg.tau}: method {name} has no knob tau (tau is Scissor's threshold)")
    try:
        compressor = methods.build(name, **spec)  # validates knob names and ranges now
        mapping = compressor.retention_knob
        target = None
        if cfg.retention is not None and compressor.reference:
            # a sweep over retention includes the reference once: every point is the same run
            print(f"note: method {name} keeps every token; retention={cfg.retention} does not apply "
                  "to it", file=sys.stderr)
        elif cfg.retention is not None:
            if mapping is None:
                raise ConfigError(f"retention={cfg.retention}: method {name} has no retention to set")
            if mapping.direct:
                spec[mapping.knob] = float(cfg.retention)
                compressor = methods.build(name, **spec)
            else:
                if cfg.tau is not None:
                    raise ConfigError(f"give either tau={cfg.tau} or retention={cfg.retention}, not "
                                      "both: retention calibrates tau")
                target = float(cfg.retention)
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(str(err)) from err
    return MethodChoice(name=name, knobs=spec, target_retention=target,
                        label=describe(compressor, target, direct=cfg.retention is not None
                                       and not compressor.reference),
                        title=compressor.title)


def run_id(cfg: DictConfig, choice: MethodChoice) -> str:
    """Readable and unique per setting, so the same config always lands in (and resumes) one dir."""
    identity = {
        "model": {k: cfg.model[k] for k in ("path", "frames", "dtype")}
        | ({"random_init": OmegaConf.to_container(cfg.model.arch, resolve=True)} if cfg.model.random_init else {})
        | ({"arch": OmegaConf.to_container(cfg.model.arch, resolve=True),
            "train": OmegaConf.to_container(cfg.model.train, resolve=True)} if cfg.model.train else {}),
        "task": {"lmms_task": cfg.task.lmms_task, "limit": cfg.task.limit,
                 "overrides": OmegaConf.to_container(cfg.task.overrides, resolve=True)},
        "method": choice.name, "knobs": choice.knobs, "target": choice.target_retention,
        "calibration_size": cfg.task.calibration_size if choice.target_retention else None,
        "seed": cfg.seed,
    }
    label = choice.label.replace("=", "").replace(",", "_").replace("; ", "+") if choice.label else ""
    label = re.sub(r"[^A-Za-z0-9._+-]", "_", label)[:80]  # a directory name, whatever the knob values
    return "-".join(x for x in (cfg.task.name, cfg.model.name, choice.title, label, digest(identity)[:8]) if x)


def versions() -> dict:
    import platform
    import subprocess

    import lmms_eval
    import torch
    import transformers

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    return {
        "harness_git": git("rev-parse", "HEAD"),
        "harness_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "lmms_eval": getattr(lmms_eval, "__version__", None) or _dist_version("lmms_eval"),
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor(),
    }


def _dist_version(name: str):
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def check_task_requirements(cfg: DictConfig) -> None:
    missing = [var for var in cfg.task.required_env if not os.environ.get(var)]
    if missing:
        raise ConfigError(f"task={cfg.task.name} needs the environment variable(s) {', '.join(missing)} "
                          "(its scorer cannot run without them); nothing was run")


def prepare_model(cfg: DictConfig) -> str:
    """The directory of the model the config names, built first when it is an embedded model (the
    tiny one, or one trained by a recipe, model.train) or a random-weight architecture
    (model.random_init)."""
    from harness.models.random_weights import random_model_dir
    from harness.models.tiny import build_tiny_model
    from harness.train_micro import build_micro_model, recipe_of

    if cfg.model.train:
        return str(build_micro_model(*recipe_of(cfg.model), progress=cfg.progress))
    if cfg.model.random_init:
        arch = OmegaConf.to_container(cfg.model.arch, resolve=True)
        try:
            return str(random_model_dir(Path(cfg.cache_dir) / "models", cfg.model.name, arch, cfg.seed,
                                        family=cfg.model.family))
        except (TypeError, ValueError) as err:  # a shape the config classes reject
            raise ConfigError(f"model.arch of {cfg.model.name}: {err}") from err
    if cfg.model.build_tiny:
        build_tiny_model(cfg.model.path, seed=cfg.seed)
    return cfg.model.path


def model_is_built(cfg: DictConfig) -> bool:
    """Whether the model a training recipe (model.train) describes is already in the cache."""
    from harness.train_micro import MARKER, model_dir, recipe_of

    return (model_dir(*recipe_of(cfg.model)) / MARKER).is_file()


def prepare_task_data(cfg: DictConfig) -> None:
    if cfg.task.generator:
        module, _, function = cfg.task.generator.partition(":")
        getattr(importlib.import_module(module), function)(cfg.task.data_dir)


def load_tasks(cfg: DictConfig) -> dict:
    """lmms_eval Task objects for the configured task, with the config's overrides applied."""
    from lmms_eval.tasks import TaskManager, get_task_dict

    # lmms_eval's task modules read HF_HOME (where the videos are), the judge's model name etc.
    # from the environment when they are imported, which is below.
    os.environ.update({k: str(v) for k, v in cfg.task.env.items()})
    include = cfg.task.include_path
    include = str((REPO_ROOT / include).resolve()) if include else None
    manager = TaskManager(verbosity="ERROR", include_path=include)
    if cfg.task.lmms_task not in manager.all_tasks:
        raise ConfigError(f"task.lmms_task={cfg.task.lmms_task}: lmms_eval has no such task"
                          + (f" (also searched {include})" if include else ""))
    spec = {"task": cfg.task.lmms_task, **OmegaConf.to_container(cfg.task.overrides, resolve=True)}
    try:
        return dict(leaf_tasks(get_task_dict([spec], manager)))
    except Exception as err:
        cause = _root_cause(err)
        if not _is_missing_data(cause):
            raise
        try:
            config = {**task_config(manager, cfg.task.lmms_task), **spec}
        except (KeyError, AttributeError, TypeError):  # only for the message: never hide the cause
            config = spec
        raise ConfigError(_missing_data_message(cfg, config, cause)) from err


def _root_cause(err: BaseException) -> BaseException:
    last = getattr(err, "last_attempt", None)  # lmms_eval retries its download (tenacity)
    return last.exception() if last is not None and last.failed else err


def _is_missing_data(err: BaseException) -> bool:
    """A dataset or its videos that are neither on disk nor downloadable (offline, no access)."""
    import datasets
    import huggingface_hub.errors as hub_errors

    return isinstance(err, (hub_errors.LocalEntryNotFoundError, hub_errors.HfHubHTTPError,
                            hub_errors.OfflineModeIsEnabled, datasets.exceptions.DatasetNotFoundError,
                            ConnectionError, FileNotFoundError))


def _missing_data_message(cfg: DictConfig, config: dict, cause: BaseException) -> str:
    path, name = config.get("dataset_path"), config.get("dataset_name")
    cache = (config.get("dataset_kwargs") or {}).get("cache_dir")
    videos = os.path.join(os.environ.get("HF_HOME", "~/.cache/huggingface"), cache) if cache else None
    what = (f"task={cfg.task.name}: the data of lmms_eval task {cfg.task.lmms_task} is not on disk: "
            f"dataset {path}" + (f" (config {name})" if name else "")
            + (f", videos expected under {videos}" if videos else "")
            + f" ({type(cause).__name__}: {(str(cause).splitlines() or [''])[0]}). ")
    if not isinstance(path, str) or os.path.isabs(path) or path in ("json", "csv", "parquet", "text"):
        return what + "Check the task's dataset_path / data_files (task.overrides)."
    return what + (f"Get it on a connected machine with the same HF_HOME: run this task once there "
                   f"(lmms_eval downloads and unpacks it), or `hf download --repo-type dataset {path}` "
                   f"and unpack its video archives under {videos or '$HF_HOME'}; then set HF_HOME "
                   f"(or task.env.HF_HOME) to that directory here.")


def run(cfg: DictConfig) -> Path:
    """Evaluate one configuration; returns its results directory."""
    from lmms_eval import evaluator

    from harness.calibrate import calibrate, calibration_size
    from harness.feature_cache import FeatureCache
    from harness.lmms_model import VTCModel
    from harness.loggers import make_logger
    from harness.models import adapter_class
    check_config(cfg)
    choice = choose_method(cfg)
    check_method_family(choice.build(), cfg.model.family)
    check_task_requirements(cfg)
    quiet_libraries(log_file())
    rank, world_size = distributed.world()
    rid = cfg.run_id or run_id(cfg, choice)
    run_dir = RunDir(Path(cfg.results_dir) / rid, rank=rank)
    done = run_dir.read("summary.json") if cfg.resume else None
    earlier = run_dir.read("config.json")
    if (done is not None and not done["n_failed"] and len(run_dir.completed()) >= done["n_samples"]
            and earlier is not None and not changed(earlier.get("data_files", {}))
            and done.get("breakdown_field") == cfg.task.breakdown):
        # a finished run (e.g. a restarted sweep's earlier point) on unchanged data: nothing to
        # load or compute; runs with failed samples go on, to try those again, and a run asked
        # for another breakdown of its scores resumes (every sample read back) to summarise anew
        if rank == 0:
            print(summary_line(done) + " (already complete)", flush=True)
        return run_dir.path
    with distributed.main_process_first():  # shared files are written once
        if not cfg.resume and rank == 0:
            run_dir.clear_samples()
        if cfg.task.generator:
            with step(f"preparing the data of task {cfg.task.name}"):
                prepare_task_data(cfg)
        if cfg.model.train and not model_is_built(cfg):
            with step(f"training model {cfg.model.name} (harness.train_micro, once; cached)"):
                model_path = prepare_model(cfg)
        elif cfg.model.build_tiny or cfg.model.random_init:
            with step(f"building model {cfg.model.name}" + (" (random weights)" if cfg.model.random_init else "")):
                model_path = prepare_model(cfg)
        else:
            model_path = prepare_model(cfg)
    check_method_fits(choice.build(), read_model_config(model_path))
    with step(f"loading lmms_eval task {cfg.task.lmms_task}"):
        tasks = load_tasks(cfg)
    data_files = task_files(tasks, cfg.task.limit,
                            OmegaConf.to_container(cfg.task.overrides, resolve=True).get("dataset_kwargs"))
    with step(f"loading model {cfg.model.name} ({cfg.model.dtype}, {cfg.model.device})"):
        adapter = adapter_class(cfg.model.family)(model_path, dtype=cfg.model.dtype, device=cfg.model.device,
                                                  attn_implementation=cfg.model.attn_implementation)
    features = (FeatureCache(Path(cfg.cache_dir) / "features", adapter.fingerprint)
                if cfg.feature_cache else None)
    compressor = choice.build()
    compressor.seed = cfg.seed
    calibration = None
    if choice.target_retention is not None:
        calibration = calibrate(
            compressor, choice.target_retention, adapter, tasks, frames=cfg.model.frames,
            size=calibration_size(cfg.task.calibration_size, cfg.task.limit),
            identity={"model": cfg.model.path, "task": cfg.task.lmms_task, "seed": cfg.seed},
            cache_dir=Path(cfg.cache_dir), feature_cache=features)
        for knob, value in calibration["knobs"].items():
            compressor = compressor.with_knob(knob, value)
    knobs = compressor.knobs()

    if earlier is not None and rank == 0 and run_dir.completed():
        # samples on disk that answer another configuration or other data are not resumed:
        # a retention target calibrated to another knob value, regenerated or edited videos
        moved = changed(earlier.get("data_files", {})) + sorted(set(data_files) - set(earlier.get("data_files", {})))
        if earlier["method"]["knobs"] != knobs or moved:
            why = (f"it was run with {earlier['method']['knobs']}, now {knobs}" if not moved else
                   f"{len(moved)} of its data files changed since (e.g. {moved[0]})")
            print(f"note: {len(run_dir.completed())} samples of {run_dir.path.name} were discarded: {why}",
                  file=sys.stderr)
            run_dir.clear_samples()
    distributed.barrier()
    if rank == 0:
        resolved = OmegaConf.to_container(cfg, resolve=True)
        run_dir.write("config.json", {"config": resolved, "world_size": world_size, "method": {
            "name": choice.name, "knobs": knobs, "label": choice.label,
            "target_retention": choice.target_retention, "calibration": calibration,
            "notes": compressor.notes()},
            "data_files": data_files})
        (run_dir.path / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        run_dir.write("versions.json", versions())

    lm = VTCModel(adapter, compressor, run_dir, frames=cfg.model.frames,
                  max_new_tokens=cfg.model.max_new_tokens, tasks=tasks, metric=cfg.task.metric,
                  live_score=cfg.task.live_score, progress=cfg.progress, feature_cache=features)
    with silent_progress():
        results = evaluator.simple_evaluate(
            model=lm, tasks=list(tasks.values()), limit=cfg.task.limit, batch_size=1,
            log_samples=True, bootstrap_iters=0, verbosity="ERROR", random_seed=cfg.seed,
            distributed_executor_backend="torchrun",
            numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed, fewshot_random_seed=cfg.seed)
    run_dir.close()
    if results is None:  # a non-zero rank in a distributed run: rank 0 writes the results
        return run_dir.path
    run_dir.write("lmms_eval_results.json", {k: v for k, v in results.items() if k != "samples"})
    summary = summarize(cfg, choice, knobs, run_dir, results, tasks, compressor.notes())
    run_dir.write("summary.json", summary)
    make_logger(cfg).log_run(cfg, summary, run_dir)
    print(summary_line(summary), flush=True)
    return run_dir.path


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
