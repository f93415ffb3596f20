"""A run's directory under results/: config, versions, per-sample lines, summary.

Per-sample records are appended and flushed as each sample completes, so a crash loses nothing
already computed; a re-run with the same config reads them back and skips those samples. A line
cut short by a crash (power cut, kill -9) is dropped with a note and its sample computed again.
While a process writes a run directory it holds an advisory lock on it (`.lock`, one per rank of a
data-parallel run): the lock dies with the process, so kill -9 leaves nothing to clean, and a
second process on the same configuration stops with one line naming the holder instead of writing
the same samples file.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from harness.files import write_json

SAMPLES = "samples.jsonl"


def sample_key(task: str, doc_id, request_type: str, index: int) -> str:
    return f"{task}/{doc_id}/{request_type}/{index}"


def read_samples(path: Path) -> list[dict]:
    """All complete lines of a samples file (a line cut short by a crash is ignored)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def drop_torn_tail(path: Path) -> int:
    """Cut a last line left unfinished by a crash (no newline, or not JSON) off `path`; the number
    of bytes dropped (0: the file ends with a whole record)."""
    if not path.is_file() or path.stat().st_size == 0:
        return 0
    data = path.read_bytes()
    end = data.rstrip(b"\n").rfind(b"\n") + 1  # start of the last line
    last = data[end:]
    try:
        if last.endswith(b"\n"):
            json.loads(last)
            return 0
    except json.JSONDecodeError:
        pass
    with open(path, "r+b") as f:
        f.truncate(end)
    return len(last)


class RunDirBusy(RuntimeError):
    """Another process is writing this run directory."""


class RunDir:
    """`rank` > 0 (data-parallel runs) appends to its own samples file; reads see every rank's."""

    def __init__(self, path: str | Path, rank: int = 0):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self.samples_path = self.path / (SAMPLES if rank == 0 else f"samples.rank{rank}.jsonl")
        self._file = None
        self._lock = None

    def lock(self) -> None:
        """Hold this rank's advisory lock on the directory until `close` (or the process ends);
        RunDirBusy naming the holder if another process holds it."""
        import fcntl
        import socket
        import time

        name = ".lock" if self.rank == 0 else f".lock.rank{self.rank}"
        handle = open(self.path / name, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunDirBusy(f"{self.path} is being written by {holder}; wait for it to finish (a re-run "
                             "then resumes what it wrote) or give another results_dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        self._lock = handle
        torn = drop_torn_tail(self.samples_path)
        if torn:
            print(f"note: dropped a torn last line ({torn} bytes) of {self.samples_path}; its sample runs again",
                  file=sys.stderr)

    def _all_records(self) -> list[dict]:
        files = [self.path / SAMPLES, *sorted(self.path.glob("samples.rank*.jsonl"))]
        return [r for f in files for r in read_samples(f)]

    def clear_samples(self) -> None:
        for f in [self.path / SAMPLES, *self.path.glob("samples.rank*.jsonl")]:
            f.unlink(missing_ok=True)

    def completed(self) -> dict[str, dict]:
        """Successful samples already on disk, by key (failed ones are tried again)."""
        return {r["key"]: r for r in self._all_records() if r.get("status") == "ok"}

    def append(self, record: dict) -> None:
        if self._file is None:
            drop_torn_tail(self.samples_path)  # (done under the lock already; cheap when clean)
            self._file = open(self.samples_path, "a", encoding="utf-8")
        self._file.write(json.dumps(record, default=str) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def samples(self) -> list[dict]:
        """The latest record of every sample key."""
        latest = {}
        for record in self._all_records():
            latest[record["key"]] = record
        return list(latest.values())

    def write(self, name: str, obj) -> Path:
        write_json(self.path / name, obj)
        return self.path / name

    def read(self, name: str):
        path = self.path / name
        return json.loads(path.read_text()) if path.is_file() else None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None
