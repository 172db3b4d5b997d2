"""Data-parallel helpers: process-group set-up for torchrun, sharding, metric sync.

Launch with ``torchrun --nproc_per_node N -m fastdense train ...``: torchrun
sets RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT, and
:func:`init_distributed` joins the group through ``env://``. Without those
variables everything runs as a single process and these helpers are no-ops.
"""
from __future__ import annotations

import os
from typing import Iterable, Optional, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def init_distributed(backend: Optional[str] = None, init_method: str = "env://",
                     rank: Optional[int] = None, world_size: Optional[int] = None) -> bool:
    """Join the process group when launched by torchrun (or when rank/world_size are given).

    Returns True when a group of more than one process is running. NCCL is
    used when CUDA is available, gloo otherwise; each process then uses the
    CUDA device of its LOCAL_RANK.
    """
    if is_distributed():
        return dist.get_world_size() > 1
    if rank is None and "RANK" not in os.environ:
        return False
    rank = int(os.environ["RANK"]) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % max(1, torch.cuda.device_count()))))
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)
    return world_size > 1


def cleanup() -> None:
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def shard(indices: Sequence[int]) -> list:
    """This rank's share of a global batch: every world_size-th index from its rank.

    All ranks draw the same global batch from the same seeded sampler and take
    disjoint slices of it, so N processes see exactly the samples one process
    would see with the full batch (the basis of the DDP-equivalence test).
    """
    return list(indices)[rank()::world_size()]


def distributed_sampler(dataset: Dataset, shuffle: bool = True, seed: int = 0,
                        drop_last: bool = False) -> Optional[DistributedSampler]:
    """A DistributedSampler over this group for DataLoader-based loops (None when not distributed)."""
    if not is_distributed():
        return None
    return DistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=shuffle, seed=seed,
                              drop_last=drop_last)


def sync_metrics(metrics: Iterable) -> None:
    """All-reduce every fastdense metric's additive state (a no-op on one process)."""
    for m in metrics:
        m.sync()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    if not is_distributed():
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / world_size()
