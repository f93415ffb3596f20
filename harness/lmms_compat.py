"""Every use of lmms_eval beyond its documented API, in one place.

The harness needs a few things lmms_eval does not expose publicly: scoring one response the way
its evaluator does (the task's filter ensemble, then process_results), a task's raw YAML config
(to name the dataset in an error), the layout of `get_task_dict`'s result (groups as tuples),
whether a metric's aggregation is a plain mean, and a group's aggregate of its tasks' scores. Each is wrapped here and has a contract test
(tests/test_lmms_compat.py), so an lmms_eval upgrade that changes one fails one clear test instead
of a run. The pinned version is in pyproject.toml.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from lmms_eval.api.instance import Instance


def score_one(task, doc, response) -> dict:
    """lmms_eval's own scoring of one generated response: the task's first filter ensemble (private
    `Task._filters`), then `process_results`, as `evaluator.evaluate` does per instance."""
    inst = Instance(request_type="generate_until", arguments=(), idx=0,
                    metadata={"task": task.config.task, "doc_id": 0, "repeats": 1})
    inst.resps = [response]
    inst.doc = doc
    ensemble = task._filters[0]
    ensemble.apply([inst], [doc])
    return task.process_results(doc, [inst.filtered_resps[ensemble.name]])


def logged_doc(sample: dict) -> dict:
    """The document of one of lmms_eval's logged samples (`results["samples"][task][i]["doc"]`,
    its text fields; media are left out by lmms_eval)."""
    return sample["doc"]


def task_config(manager, name: str) -> dict:
    """The raw config of task `name` as the TaskManager read it (private `_get_config`)."""
    return manager._get_config(name)


def leaf_tasks(task_dict: dict) -> Iterator[tuple[str, object]]:
    """(name, Task) of every task in `get_task_dict`'s result: groups nest as dicts, and a grouped
    task appears as a (group config, Task) tuple whose Task may be None."""
    for name, value in task_dict.items():
        if isinstance(value, dict):
            yield from leaf_tasks(value)
        elif isinstance(value, tuple):
            if value[1] is not None:
                yield name, value[1]
        else:
            yield name, value


def group_scores(per_task: dict, task_dict: dict) -> dict:
    """lmms_eval's results per task with its groups' aggregates added, computed by its evaluator's
    own group code (`evaluator_utils.consolidate_group_results`) from the leaves' results (each
    with its "samples" count) and the groups' configs (their aggregate_metric_list) in `task_dict`."""
    import collections

    from lmms_eval.evaluator_utils import consolidate_group_results

    merged, *_ = consolidate_group_results(collections.defaultdict(dict, per_task), {}, task_dict)
    return dict(merged)


def is_mean(aggregate) -> bool:
    """Whether a task's aggregation function is lmms_eval's registered `mean`."""
    import lmms_eval.api.metrics  # noqa: F401  (registers the built-in aggregations)
    from lmms_eval.api.registry import get_aggregation

    return aggregate is get_aggregation("mean")


@contextmanager
def single_process_view():
    """lmms_eval's evaluator as if one process ran: it reads RANK/WORLD_SIZE from the environment to
    shard documents and gather results, and the harness's model shards whole videos across ranks
    itself and returns every rank's results to each (harness/run/requests.py)."""
    import os

    saved = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE")}
    os.environ.update(RANK="0", WORLD_SIZE="1")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def silent_progress():
    """lmms_eval's own progress bars (building requests, postprocessing) switched off: the harness
    shows one bar over samples. They are the module-level `tqdm` of its task and evaluator modules."""
    import lmms_eval.api.task as task_module
    import lmms_eval.evaluator as evaluator_module

    def hidden(bar):
        def make(*args, **kwargs):
            return bar(*args, **{**kwargs, "disable": True})
        return make

    saved = task_module.tqdm, evaluator_module.tqdm
    task_module.tqdm, evaluator_module.tqdm = hidden(saved[0]), hidden(saved[1])
    try:
        yield
    finally:
        task_module.tqdm, evaluator_module.tqdm = saved
