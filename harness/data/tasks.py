"""lmms_eval tasks: their data prepared, their requirements checked, their Task objects loaded.

A task is lmms_eval's own (videomme, mlvu, ...) or a local YAML directory (harness/data/lmms_tasks,
via `TaskManager(include_path=...)`); built-in names win clashes, so local tasks carry a vtc_ prefix.
A task may be an lmms_eval group (mvbench): its leaf tasks run together in one run, and the group
itself is kept (`Tasks.task_dict`) so that the summary scores it by lmms_eval's own group code.
Data that is neither on disk nor downloadable ends in one error saying where it was expected and
how to get it, never in zero scores.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from harness.errors import ConfigError
from harness.lmms_compat import leaf_tasks, task_config

REPO_ROOT = Path(__file__).resolve().parents[2]


def check_task_requirements(task) -> None:
    """Environment variables the task's scorer needs (an API key for a judge), before anything runs."""
    missing = [var for var in task.required_env if not os.environ.get(var)]
    if missing:
        raise ConfigError(f"task={task.name} needs the environment variable(s) {', '.join(missing)} "
                          "(its scorer cannot run without them); nothing was run")


def prepare_task_data(task) -> None:
    """Write a generated task's data (task.generator) under task.data_dir unless it is there."""
    if task.generator:
        module, _, function = task.generator.partition(":")
        getattr(importlib.import_module(module), function)(task.data_dir)


class Tasks(dict):
    """name -> lmms_eval Task of every leaf task of a TaskConf (one, or a group's tasks), in
    lmms_eval's order; `task_dict` is `get_task_dict`'s result, groups and their configs kept."""

    def __init__(self, task_dict: dict):
        super().__init__(leaf_tasks(task_dict))
        self.task_dict = task_dict


def load_tasks(task) -> Tasks:
    """lmms_eval Task objects of a TaskConf, with its overrides applied (for a group: the group
    config's fields, e.g. aggregate_metric_list, to the group, the others to each of its tasks)."""
    from lmms_eval.tasks import TaskManager, get_task_dict

    # lmms_eval's task modules read HF_HOME (where the videos are), the judge's model name etc.
    # from the environment when they are imported, which is below.
    os.environ.update({k: str(v) for k, v in task.env.items()})
    include = task.include_path
    include = str((REPO_ROOT / include).resolve()) if include else None
    manager = TaskManager(verbosity="ERROR", include_path=include)
    if task.lmms_task not in manager.all_tasks:
        raise ConfigError(f"task.lmms_task={task.lmms_task}: lmms_eval has no such task"
                          + (f" (also searched {include})" if include else ""))
    spec = {"task": task.lmms_task, **task.overrides}
    try:
        return Tasks(get_task_dict([spec], manager))
    except Exception as err:
        cause = _root_cause(err)
        if not _is_missing_data(cause):
            raise
        try:
            config = _message_config(manager, task.lmms_task, spec)
        except (KeyError, AttributeError, TypeError, IndexError):  # only for the message: never hide the cause
            config = spec
        raise ConfigError(_missing_data_message(task, config, cause)) from err


def _message_config(manager, name: str, spec: dict) -> dict:
    """The config that names a task's dataset; for a group, its first task's, with the number of
    the group's tasks (each reads its own config of the dataset)."""
    config = task_config(manager, name)
    if "group" not in config:
        return {**config, **spec}
    first = config["task"][0]
    return {**task_config(manager, first), **spec, "dataset_name": None, "group_size": len(config["task"])}


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


def _missing_data_message(task, config: dict, cause: BaseException) -> str:
    path, name = config.get("dataset_path"), config.get("dataset_name")
    kwargs = config.get("dataset_kwargs") or {}
    cache, revision = kwargs.get("cache_dir"), kwargs.get("revision")
    videos = os.path.join(os.environ.get("HF_HOME", "~/.cache/huggingface"), cache) if cache else None
    group = config.get("group_size")
    what = (f"task={task.name}: the data of lmms_eval "
            + (f"group {task.lmms_task} ({group} tasks, one config each)" if group else f"task {task.lmms_task}")
            + f" is not on disk: dataset {path}" + (f" (config {name})" if name else "")
            + (f" (revision {revision})" if revision else "")
            + (f", videos expected under {videos}" if videos else "")
            + f" ({type(cause).__name__}: {(str(cause).splitlines() or [''])[0]}). ")
    if not isinstance(path, str) or os.path.isabs(path) or path in ("json", "csv", "parquet", "text"):
        return what + "Check the task's dataset_path / data_files (task.overrides)."
    return what + (f"Get it on a connected machine with the same HF_HOME: run this task once there "
                   f"(lmms_eval downloads and unpacks it), or `hf download --repo-type dataset {path}"
                   + (f" --revision {revision}" if revision else "") + "` "
                   f"and unpack its video archives under {videos or '$HF_HOME'}; then set HF_HOME "
                   f"(or task.env.HF_HOME) to that directory here.")
