"""The evaluation engine's scheduling: requests grouped by video, shards of whole videos for data
parallelism, videos decoded ahead in a bounded background pool, and where the time went.

What the model does with a group (one encoding, one visual stage and, where the method allows it,
one prefill of the prompt up to the end of the video tokens for all its questions) is in
harness/models/base.py (`VideoLLM.answer_group`); the request loop that drives both is
harness/run/requests.py.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Hashable


@dataclass
class Group:
    """The requests (indices into lmms_eval's list) that ask about one video, in lmms_eval's order."""

    video: Hashable  # the video's path (or an error key for a document whose visual failed)
    requests: list[int] = field(default_factory=list)


def group_by_video(videos: list[Hashable], grouped: bool = True) -> list[Group]:
    """Groups of request indices by video, videos in order of first appearance (grouped=False: one
    group per request, in order, which is the naive loop)."""
    if not grouped:
        return [Group(video, [i]) for i, video in enumerate(videos)]
    groups: OrderedDict = OrderedDict()
    for i, video in enumerate(videos):
        groups.setdefault(video, Group(video)).requests.append(i)
    return list(groups.values())


def shard(groups: list[Group], rank: int, world_size: int) -> list[Group]:
    """This rank's share of whole groups: largest groups first to the least loaded rank (ties: the
    lower rank), so every video's questions stay on one rank and the ranks' request counts differ
    by at most the largest group; within a rank the groups keep their order."""
    if world_size == 1:
        return list(groups)
    load = [0] * world_size
    owner = {}
    for i in sorted(range(len(groups)), key=lambda i: (-len(groups[i].requests), i)):
        target = min(range(world_size), key=lambda r: (load[r], r))
        owner[i] = target
        load[target] += len(groups[i].requests)
    return [g for i, g in enumerate(groups) if owner[i] == rank]


class Prefetcher:
    """Loads the inputs of upcoming videos in a background thread, at most `depth` ahead of the one
    in use (depth 0: each loads when asked, in the caller's thread). `get(key)` returns its input or
    raises the exception its loading raised, so a bad video fails only its own requests. `waited`
    holds the seconds the caller spent waiting for inputs that were not ready."""

    def __init__(self, keys: list[Hashable], load: Callable, depth: int):
        self.keys, self.load, self.depth = list(keys), load, depth
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") if depth > 0 else None
        self.futures: dict[Hashable, Future] = {}
        self.submitted = 0  # keys[:submitted] have been handed to the pool
        self.used = 0  # keys[:used] have been asked for (in order)
        self.waited = 0.0

    def get(self, key: Hashable):
        """The loaded input of `key`, the next of `keys` (the `depth` after it start loading)."""
        if self.used < len(self.keys) and self.keys[self.used] == key:
            self.used += 1
        while self.pool is not None and self.submitted < min(len(self.keys), self.used + self.depth):
            upcoming = self.keys[self.submitted]
            self.futures.setdefault(upcoming, self.pool.submit(self.load, upcoming))
            self.submitted += 1
        future = self.futures.pop(key, None)
        started = time.perf_counter()
        try:
            return future.result() if future is not None else self.load(key)
        finally:
            if future is not None:
                self.waited += time.perf_counter() - started

    def close(self) -> None:
        if self.pool is not None:
            for future in self.futures.values():
                future.cancel()
            self.pool.shutdown(wait=True)
            self.futures.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
