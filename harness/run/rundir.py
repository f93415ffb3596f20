"""A run's directory under results/: config, versions, per-sample lines, summary.

Per-sample records are appended and flushed as each sample completes, so a crash loses nothing
already computed; a re-run with the same config reads them back and skips those samples.
"""

from __future__ import annotations

import json
import os
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


class RunDir:
    """`rank` > 0 (data-parallel runs) appends to its own samples file; reads see every rank's."""

    def __init__(self, path: str | Path, rank: int = 0):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.samples_path = self.path / (SAMPLES if rank == 0 else f"samples.rank{rank}.jsonl")
        self._file = None

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
            self._file = open(self.samples_path, "a+", encoding="utf-8")
            if self._file.tell() > 0:  # a crash may have cut the last line: start a fresh one
                self._file.seek(self._file.tell() - 1)
                if self._file.read(1) != "\n":
                    self._file.write("\n")
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
