"""A synthetic segmentation set for the tests: squares and discs on a noisy background, with their masks."""
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("background", "square", "disc")
IGNORE = 255                # a one-pixel ring around every disc is left unlabelled (ignored)
COLORS = np.array([[70, 160, 70], [200, 60, 60], [60, 80, 200]], dtype=np.float64)


def shapes_image(rng: np.random.Generator, size: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 (size, size, 3), mask uint8 (size, size)): 1-3 squares or discs, each class with its own colour
    plus noise."""
    mask = np.zeros((size, size), np.uint8)
    yy, xx = np.mgrid[:size, :size]
    for _ in range(rng.integers(1, 4)):
        cls, r = int(rng.integers(1, 3)), int(rng.integers(5, 11))
        cy, cx = rng.integers(r, size - r, 2)
        if cls == 1:
            inside = (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
        else:
            d = np.hypot(yy - cy, xx - cx)
            mask[(d > r) & (d <= r + 1) & (mask == 0)] = IGNORE
            inside = d <= r
        mask[inside] = cls
    color = COLORS[np.where(mask == IGNORE, 0, mask)]
    img = np.clip(color + rng.normal(0, 25, color.shape), 0, 255).astype(np.uint8)
    return img, mask


def write_shapes(root: Path, splits: dict[str, int], seed: int = 0, size: int = 48) -> Path:
    """root/{split}/*.png images and root/{split}annot/*.png masks (CamVid's layout)."""
    rng = np.random.default_rng(seed)
    for split, n in splits.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        (root / f"{split}annot").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img, mask = shapes_image(rng, size)
            Image.fromarray(img).save(root / split / f"{i:04d}.png")
            Image.fromarray(mask).save(root / f"{split}annot" / f"{i:04d}.png")
    return root
