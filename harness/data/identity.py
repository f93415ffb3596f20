"""What data a run answered: the files behind its documents, by size and modification time.

A run's samples are resumed only while these files are unchanged: regenerated or edited videos or
question files make the old samples answers to other data, so they are discarded (with a note).
"""

from __future__ import annotations

import os
from pathlib import Path


def _stat(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _paths(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [p for v in value.values() for p in _paths(v)]
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in _paths(v)]
    return []


def task_files(tasks: dict, limit: int | None, data_files=None) -> dict[str, list[int] | None]:
    """{path: [size, mtime_ns]} of the dataset files given in the task overrides and of every video
    the evaluated documents name (None for a file that is missing)."""
    paths = [str(Path(p).resolve()) for p in _paths(data_files) if Path(p).is_absolute()]
    for task in tasks.values():
        for i, doc in enumerate(task.eval_docs):
            if limit is not None and i >= limit:
                break
            try:
                visuals = task.doc_to_visual(doc)
            except (Exception, SystemExit):  # that sample fails on its own when it runs
                continue
            paths += [v for v in (visuals if isinstance(visuals, (list, tuple)) else [visuals])
                      if isinstance(v, str)]
    return {p: _stat(p) for p in sorted(set(paths))}


def changed(recorded: dict) -> list[str]:
    """The recorded files whose size or modification time differ now (or that appeared/vanished)."""
    return [p for p, stat in recorded.items() if _stat(p) != stat]
