"""What data a run answered: the files behind its documents, by content, wherever they live.

A run's samples are resumed only while these files are unchanged: regenerated or edited videos or
question files make the old samples answers to other data, so they are discarded (with a note);
calibration results are reused only for the same calibration documents. A file is identified by
its size and a digest of its first and last 64 KiB (cheap for benchmark videos of hundreds of MB,
and a regenerated or edited file changes them), not by its modification time, and a file under the
task's data directory by its path relative to it: a copied checkout or a moved cache keeps its runs.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from harness.files import digest

EDGE = 64 * 1024  # bytes hashed at each end of a file


def fingerprint(path: str) -> list | None:
    """[size, digest of the first and last EDGE bytes] of a file; None when it is missing."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(EDGE)
            f.seek(max(0, size - EDGE))
            tail = f.read(EDGE)
    except OSError:
        return None
    return [size, hashlib.sha1(head + tail).hexdigest()[:16]]


def relative(path: str, data_dir: str | None) -> str:
    """`path` relative to the data directory when it lies under it (as "<data>/..."), else as given."""
    if data_dir:
        base = os.path.realpath(data_dir)
        full = os.path.realpath(path)
        if full == base or full.startswith(base + os.sep):
            return "<data>/" + os.path.relpath(full, base)
    return path


def absolute(key: str, data_dir: str | None) -> str:
    """The file a `relative` key names, in this checkout."""
    if key.startswith("<data>/"):
        return os.path.join(os.path.realpath(data_dir or "."), key[len("<data>/"):])
    return key


def without_data_dir(obj, data_dir: str | None):
    """`obj` (a task's overrides) with every path under the data directory made relative to it."""
    if isinstance(obj, str):
        return relative(obj, data_dir) if os.path.isabs(obj) else obj
    if isinstance(obj, dict):
        return {k: without_data_dir(v, data_dir) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [without_data_dir(v, data_dir) for v in obj]
    return obj


def _paths(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [p for v in value.values() for p in _paths(v)]
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in _paths(v)]
    return []


def documents(tasks: dict, limit: int | None):
    """(task, doc) of the documents a run evaluates, in order."""
    for task in tasks.values():
        for i, doc in enumerate(task.eval_docs):
            if limit is not None and i >= limit:
                break
            yield task, doc


def visual_paths(task, doc) -> list[str]:
    """The media files a document names (none when its task function fails on it: that sample
    fails on its own when it runs)."""
    try:
        visuals = task.doc_to_visual(doc)
    except (Exception, SystemExit):
        return []
    return [v for v in (visuals if isinstance(visuals, (list, tuple)) else [visuals]) if isinstance(v, str)]


def task_files(tasks: dict, limit: int | None, data_files=None, data_dir: str | None = None) -> dict:
    """{file: fingerprint} of the dataset files given in the task overrides and of every video the
    evaluated documents name (None for a file that is missing), files under `data_dir` relative to it."""
    paths = [str(Path(p).resolve()) for p in _paths(data_files) if Path(p).is_absolute()]
    for task, doc in documents(tasks, limit):
        paths += visual_paths(task, doc)
    return {relative(p, data_dir): fingerprint(p) for p in sorted(set(paths))}


def changed(recorded: dict, data_dir: str | None = None) -> list[str]:
    """The recorded files whose content differs now (or that appeared/vanished)."""
    return [key for key, stamp in recorded.items() if fingerprint(absolute(key, data_dir)) != stamp]


def documents_identity(tasks: dict, size: int, data_dir: str | None = None) -> str:
    """A digest of the first `size` documents (their text fields and their videos' content): what a
    calibration on them is tied to."""
    parts = []
    for task, doc in documents(tasks, size):
        text = {k: v for k, v in doc.items() if isinstance(v, (str, int, float, bool))}
        parts.append([text, [fingerprint(p) for p in visual_paths(task, doc)]])
    return digest(parts)
