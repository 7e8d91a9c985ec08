"""torchrun / DDP plumbing: one process per GPU (NCCL) or per CPU worker (gloo)."""
from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); otherwise a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local)


def device_for(info: DistInfo) -> torch.device:
    return torch.device("cuda", info.local_rank) if torch.cuda.is_available() else torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def gather_objects(obj, info: DistInfo) -> list:
    """One picklable object from every process (a one-element list without DDP)."""
    if not info.enabled:
        return [obj]
    out: list = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


class FlatGradSync:
    """Data-parallel gradients without DDP's hooks: after a step's backward, every gradient is averaged over the
    processes with one all-reduce per dtype, the gradients flattened into one buffer. A CUDA-graphed backward
    cannot run DDP's per-bucket hooks, so graphed steps sync here, between the replay and the optimizer (no
    overlap with the backward, one launch instead of one per bucket). Like DDP, it starts every process from
    rank 0's parameters."""

    def __init__(self, params: Iterable[torch.nn.Parameter], world_size: int):
        self.params = [p for p in params if p.requires_grad]
        self.world_size = world_size
        with torch.no_grad():
            for p in self.params:
                dist.broadcast(p, src=0)

    def __call__(self) -> None:
        """Average the gradients over the processes in place (a parameter without one gets the average too)."""
        for dtype in {p.dtype for p in self.params}:
            group = [p for p in self.params if p.dtype == dtype]
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in group]
            flat = torch.cat([g.reshape(-1) for g in grads])                     # (sum of numel,)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat.div_(self.world_size)
            offset = 0
            for p, g in zip(group, grads):
                avg = flat[offset:offset + g.numel()].view_as(g)
                if p.grad is None:
                    p.grad = avg.clone()
                else:
                    p.grad.copy_(avg)
                offset += g.numel()
