"""Data parallelism inside one job: one process per GPU (torchrun or `accelerate launch`).

accelerate's PartialState reads the launcher's environment and starts the process group; lmms_eval
shards the requests by rank and gathers the scored samples on rank 0; each rank appends its own
per-sample file, and rank 0 writes the summary from all of them.
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def state():
    """The process's accelerate PartialState (rank, world size, local rank, device)."""
    import torch
    from accelerate import PartialState

    # without a GPU, accelerate runs several processes only when told it is on the CPU (gloo)
    return PartialState(cpu=not torch.cuda.is_available())


def world() -> tuple[int, int]:
    """(rank, world size)."""
    return state().process_index, state().num_processes


def local_rank() -> int:
    return state().local_process_index


def barrier() -> None:
    state().wait_for_everyone()


def gather(obj) -> list:
    """Every rank's `obj`, in rank order (picklable objects; a collective: every rank calls it)."""
    import torch.distributed as dist

    objects = [None] * state().num_processes
    dist.all_gather_object(objects, obj)
    return objects


def main_process_first():
    """Rank 0 runs the block (writing shared files), then the others (finding them done)."""
    return state().main_process_first()
