"""What every MAL dataset offers, so the engine, the probes and dataset views can treat them alike.

Items are ``(transform(8-bit RGB PIL image), label)``; ``targets`` and ``classes`` need no decoding; ``load(order,
pos)`` gives the untransformed image of ``order[pos]`` (or of the next readable sample in ``order``), which lets
a view read through a dataset with a transform of its own; ``num_bad`` / ``bad_files`` / ``report()`` describe
unreadable files (in-memory data has none).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image
from torch.utils.data import Dataset


class ImageDataset(Dataset):
    """Base of the image datasets: subclasses set ``transform``, ``targets`` and ``classes`` and define ``load``."""

    transform: Callable | None
    targets: list[int]
    classes: list[str]
    num_bad = 0

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img, label = self.load(range(len(self)), index)
        return (self.transform(img) if self.transform is not None else img), label

    def load(self, order: Sequence[int], pos: int) -> tuple[Image.Image, int]:
        """The image and label of sample ``order[pos]``; a sample that cannot be read is replaced by the next
        readable one in ``order``."""
        raise NotImplementedError

    @property
    def bad_files(self) -> list[str]:
        return []

    def report(self) -> str:
        return f"{type(self).__name__}: {len(self)} images, no unreadable files."


__all__ = ["ImageDataset"]
