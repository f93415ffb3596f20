"""Files written so that no reader ever sees half of one, and stable identities of descriptions.

Every file and directory the harness writes for later runs (summaries, calibration results, feature
cache entries, generated videos, model directories) is written under a temporary name unique to
the writing process and renamed into place when complete: a crash or a concurrent writer leaves at
worst a stray temporary file, never a torn one under the real name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def digest(obj) -> str:
    """SHA-1 hex digest of `obj` as canonical JSON (sorted keys; non-JSON values by str())."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed onto `path` when the block succeeds,
    removed when it fails."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | Path, obj) -> Path:
    """Write `obj` as indented JSON to `path` atomically."""
    return write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


@contextmanager
def atomic_directory(directory: str | Path) -> Iterator[Path]:
    """A temporary directory beside `directory` to build in; renamed onto `directory` when the block
    succeeds (if another process finished the same directory first, its copy stays and this one is
    dropped), removed when it fails."""
    directory = Path(directory)
    for stale in directory.parent.glob(f"{directory.name}.building-*"):  # left by a killed process
        if not _alive(stale.name.rsplit("-", 1)[-1]):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = directory.with_name(f"{directory.name}.building-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        try:
            tmp.rename(directory)
        except OSError:  # another process finished first: its copy is the same recipe's
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: str) -> bool:
    """Whether process `pid` (a string of digits) runs on this machine."""
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
