"""Deterministic data order: a step's global batch is a slice of a (seed, epoch) permutation, and every sample's
augmentation is seeded by (seed, epoch, index). So a run's weights do not depend on the number of processes,
the gradient accumulation or on being killed and resumed."""
from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

SEED_STRIDE = 1_000_003


class SeededDataset(Dataset):
    """Wraps a dataset; item (epoch, i) seeds python/numpy/torch RNGs from (seed, epoch, i) before loading i."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        s = (self.seed * SEED_STRIDE + epoch) * SEED_STRIDE + index
        random.seed(s)
        np.random.seed(s % 2**32)
        torch.manual_seed(s)
        return self.dataset[index]


class StepSampler(Sampler):
    """This process's share of the (seed, epoch) permutations, resumable at a micro-batch offset.

    Each epoch keeps a whole number of global batches; process r takes positions r, r+W, r+2W, ...,
    so optimizer step s always trains on positions [s*B, (s+1)*B) of its epoch's permutation. One pass runs
    from `set_epoch`'s (epoch, start) to the end of epoch `until - 1`, so that one DataLoader iterator feeds a
    whole run and its workers prefetch across epoch boundaries instead of restarting at each.
    """

    def __init__(self, n: int, global_batch: int, world: int, rank: int, seed: int):
        self.n, self.global_batch, self.world, self.rank, self.seed = n, global_batch, world, rank, seed
        self.usable = n // global_batch * global_batch
        self.epoch, self.start, self.until = 0, 0, 1

    def set_epoch(self, epoch: int, start: int = 0, until: int | None = None) -> None:
        """Begin at this process's `start`-th sample of `epoch`; end after epoch `until - 1` (default: this one)."""
        self.epoch, self.start = epoch, start
        self.until = epoch + 1 if until is None else max(until, epoch + 1)

    def __iter__(self):
        for epoch in range(self.epoch, self.until):
            g = torch.Generator().manual_seed(self.seed + epoch)
            perm = torch.randperm(self.n, generator=g)[:self.usable]
            mine = perm[self.rank::self.world][self.start if epoch == self.epoch else 0:].tolist()
            yield from ((epoch, i) for i in mine)

    def __len__(self) -> int:
        return (self.until - self.epoch) * (self.usable // self.world) - self.start


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def rng_state(gen: torch.Generator) -> dict[str, Any]:
    """Every RNG a resumed run must continue: python, numpy, torch, CUDA and the step draws' generator."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [], "draws": gen.get_state()}


def set_rng_state(state: dict[str, Any], gen: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    gen.set_state(state["draws"])


@contextmanager
def one_intra_op_thread() -> Iterator[None]:
    """Run the block on one intra-op thread, then restore the count. For a step's random draws on the host: their
    small tensor ops each open a parallel region, and while loader workers hold the cores every region waits for
    descheduled threads (`benchmarks/mask_draw.py`: tens of ms per draw at k = 1, under 1 ms on one thread)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


__all__ = ["SeededDataset", "StepSampler", "one_intra_op_thread", "seed_everything", "rng_state", "set_rng_state"]
