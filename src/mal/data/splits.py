"""Held-out splits of a labelled dataset, and views of a dataset through a list of its indices.

``holdout_split`` draws, per class, a seeded random fraction of the samples; it depends only on the labels, the
fraction and the seed. ``IndexedView`` reads through its dataset (same files, bad-file record and decode cache)
with a transform of its own, so a held-out part can be evaluated while the rest trains with augmentation.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from .base import ImageDataset


def holdout_split(targets: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices), both sorted: disjoint, together every index of ``targets``.

    Class c with n_c samples gives ``round(fraction * n_c)`` of them, drawn with a generator seeded by (seed, c);
    at least 1 when ``fraction > 0`` and n_c >= 2, and never all of them (a class of one sample stays in train).
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the held-out fraction must be in [0, 1), got {fraction}")
    if seed < 0:
        raise ValueError(f"the held-out split's seed must be >= 0, got {seed}")
    held = _draw_per_class(targets, lambda n: min(n - 1, max(round(fraction * n), 1 if fraction > 0 else 0)), seed)
    held_set = set(held)
    return [i for i in range(len(targets)) if i not in held_set], held


def _draw_per_class(targets: Sequence[int], count: Callable[[int], int], seed: int) -> list[int]:
    """Sorted positions of ``count(n_c)`` samples of each class c, drawn with a generator seeded by (seed, c)."""
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, label in enumerate(targets):
        by_class[int(label)].append(i)
    drawn: list[int] = []
    for label, members in by_class.items():
        pick = np.random.default_rng([seed, label]).permutation(len(members))[:count(len(members))]
        drawn += [members[j] for j in pick]
    return sorted(drawn)


def labelled_subset(targets: Sequence[int], indices: Sequence[int], fraction: float, seed: int) -> list[int]:
    """The part of ``indices`` whose labels a low-label run trains on, sorted: ``fraction`` of each class, at
    least one image, drawn as ``holdout_split`` draws (seeded per class, independent of the other classes). The
    subsets are nested: a smaller fraction's images are part of every larger one's."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"the labelled fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return list(indices)
    picked = _draw_per_class([targets[i] for i in indices], lambda n: max(round(fraction * n), 1), seed)
    return [indices[j] for j in picked]


class _Composed(Sequence[int]):
    """``indices[order[k]]`` for every k, without building the list."""

    def __init__(self, indices: Sequence[int], order: Sequence[int]) -> None:
        self.indices, self.order = indices, order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, k):  # Sequence's int / slice overloads; only ints are used
        return self.indices[self.order[k]]


class IndexedView(ImageDataset):
    """Samples ``indices`` of ``dataset``, read through it, with ``transform`` (default: the dataset's).

    ``classes``, ``num_bad``, ``bad_files`` and ``report()`` are the dataset's (its whole file list); ``targets``
    are the view's. An unreadable file is replaced by the next readable sample of the view, never by one outside
    it. The wrapped dataset's own transform is left as it is.
    """

    def __init__(self, dataset: ImageDataset, indices: Sequence[int], transform: Callable | None = None) -> None:
        self.dataset = dataset
        self.indices = indices if isinstance(indices, range) else [int(i) for i in indices]
        self.transform = transform if transform is not None else dataset.transform
        self.targets: list[int] = [dataset.targets[i] for i in self.indices]

    def load(self, order: Sequence[int], pos: int) -> tuple[Image.Image, int]:
        return self.dataset.load(_Composed(self.indices, order), pos)

    @property
    def classes(self) -> list[str]:
        return self.dataset.classes

    @property
    def num_bad(self) -> int:
        return self.dataset.num_bad

    @property
    def bad_files(self) -> list[str]:
        return self.dataset.bad_files

    def report(self) -> str:
        return self.dataset.report()


__all__ = ["holdout_split", "labelled_subset", "IndexedView"]
