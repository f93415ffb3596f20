"""Data parallelism inside one job: one process per GPU (torchrun or `accelerate launch`).

lmms_eval shards the requests by rank and gathers the scored samples on rank 0; each rank appends
its own per-sample file, and rank 0 writes the summary from all of them.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size), starting the process group when launched with several processes."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), size) if size > 1 else (0, 1)


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextmanager
def main_process_first():
    """Rank 0 runs the block (writing shared files), then the others (finding them done)."""
    rank, _ = world()
    if rank != 0:
        barrier()
    yield
    if rank == 0:
        barrier()
