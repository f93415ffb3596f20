"""Timing that is honest on both devices: CUDA events on a GPU, perf_counter on CPU."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch


class Stopwatch:
    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"

    @contextmanager
    def __call__(self, name: str, into: dict):
        """Add the seconds spent in the block to `into[name]`."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            end.synchronize()
            into[name] = into.get(name, 0.0) + start.elapsed_time(end) / 1000.0
        else:
            start = time.perf_counter()
            yield
            into[name] = into.get(name, 0.0) + time.perf_counter() - start


@contextmanager
def step(what: str, stream=None):
    """One terminal line for a setup step that takes time: `what ... 1.23 s` when it is done."""
    import sys

    stream = stream or sys.stderr
    start = time.perf_counter()
    yield
    print(f"{what} ... {time.perf_counter() - start:.2f} s", file=stream, flush=True)
