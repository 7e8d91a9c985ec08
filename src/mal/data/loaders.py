"""In-order evaluation loaders, and how many loader workers this machine can run.

Training batches come from the engine's own DataLoader (:class:`mal.engine.sampling.StepSampler`); this module
builds the loaders that read every sample once, in order, sharded over processes without padding.
"""
from __future__ import annotations

import functools
import logging
import os

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

logger = logging.getLogger(__name__)
MAX_AUTO_WORKERS = 8


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_num_workers() -> int:
    """Loader workers for ``data.num_workers: -1``: one CPU left to the main process, at most 8."""
    return max(0, min(MAX_AUTO_WORKERS, available_cpus() - 1))


def cap_num_workers(requested: int) -> int:
    """``requested`` loader workers, at most one per CPU; a lowered count is logged once per process."""
    cpus = available_cpus()
    if requested <= cpus:
        return requested
    _log_capped(requested, cpus)
    return cpus


@functools.lru_cache(maxsize=None)
def _log_capped(requested: int, cpus: int) -> None:
    logger.info("data.num_workers=%d but this machine has %d CPUs: using %d loader workers", requested, cpus, cpus)


class ShardedEvalSampler(Sampler[int]):
    """Rank r of W reads indices r, r+W, r+2W, ...: every sample exactly once over all ranks (no padding, so
    metrics summed over ranks are exact); shard sizes differ by at most one."""

    def __init__(self, dataset_len: int, num_replicas: int, rank: int) -> None:
        self.dataset_len, self.num_replicas, self.rank = dataset_len, num_replicas, rank

    def __iter__(self):
        return iter(range(self.rank, self.dataset_len, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.dataset_len, self.num_replicas))


def build_loader(dataset: Dataset, batch_size: int, *, num_workers: int, distributed: bool = False,
                 persistent_workers: bool = False, train: bool = False, collate_fn=None) -> DataLoader:
    """An in-order evaluation loader over every sample (this process's shard when ``distributed``, which needs
    torch.distributed initialised). ``num_workers`` is capped at the machine's CPUs. ``train`` must stay False:
    training loaders are the engine's. ``collate_fn``: the DataLoader's (None: the default)."""
    if train:
        raise ValueError("build_loader makes in-order evaluation loaders; training batches come from "
                         "mal.engine.sampling.StepSampler")
    world, rank = 1, 0
    if distributed:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("build_loader(distributed=True) needs torch.distributed to be initialised first")
        world, rank = dist.get_world_size(), dist.get_rank()
    num_workers = cap_num_workers(num_workers)
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardedEvalSampler(len(dataset), world, rank),
                      num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                      persistent_workers=persistent_workers and num_workers > 0, collate_fn=collate_fn)


__all__ = ["build_loader", "default_num_workers", "cap_num_workers", "available_cpus", "ShardedEvalSampler"]
