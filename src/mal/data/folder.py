"""The ImageFolder dataset: ``root/<class>/<image>`` read as 8-bit RGB, with unreadable files skipped and counted.

A bad file is replaced by the next readable file in index order (image and label together), so a run never stops
on one broken JPEG and its data order stays deterministic; ``strict=True`` raises instead. ``cache=True`` decodes a
small dataset once into memory (:mod:`mal.data.cache`).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from PIL import Image

from .badfiles import BadFiles, RecordsBadFiles, warn_main_rank
from .base import ImageDataset
from .cache import decoded_images
from .images import IMG_EXTENSIONS, load_rgb_image

logger = logging.getLogger(__name__)
LAYOUT = "expected an ImageFolder layout ROOT/<class>/<image file> (e.g. train/cat/0001.jpg)"
SHOWN = 20  # empty class folders named in the warning


def subfolders(path: Path) -> list[str]:
    """The names of the visible sub-folders of ``path``, sorted."""
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def _images_under(folder: Path) -> list[str]:
    """Every image file below ``folder`` (recursive, links followed), sorted per directory."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames)
                     if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith("."))
    return found


def scan_folder(root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """(sorted class names, (path, label) samples); empty class folders are kept as classes and reported."""
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise FileNotFoundError(f"image folder {root} {what}; {LAYOUT}.")
    classes = subfolders(root)
    if not classes:
        raise ValueError(f"image folder {root} has no class sub-folders; {LAYOUT}.")
    samples: list[tuple[str, int]] = []
    empty: list[str] = []
    for label, name in enumerate(classes):
        found = _images_under(root / name)
        if not found:
            empty.append(name)
        samples += [(p, label) for p in found]
    if not samples:
        raise ValueError(f"image folder {root} has {len(classes)} class folder(s) but no image files "
                         f"({', '.join(IMG_EXTENSIONS)}); {LAYOUT}.")
    if empty:
        shown = ", ".join(empty[:SHOWN]) + (" …" if len(empty) > SHOWN else "")
        warn_main_rank(logger, "%d empty class folder(s) in %s, kept as classes without images so labels agree with the "
                       "other splits: %s", len(empty), root, shown)
    return classes, samples


class ImageFolderDataset(RecordsBadFiles, ImageDataset):
    """``root/<class>/<image>`` as ``(transform(rgb_pil_image), label)``; labels follow the sorted class names.

    Args:
        root: one sub-folder per class.
        transform: applied to the 8-bit RGB PIL image; ``None`` returns the image.
        strict: raise :class:`BadImageError` at the first unreadable file instead of skipping it.
        cache: decode every image once into a uint8 tensor (all images must share one size), e.g. CIFAR's 32×32.
        cache_dir: with ``cache``, store the decoded array there and reuse it while the files are unchanged.
        progress: a progress bar while caching.

    ``targets`` (one label per file) needs no decoding. ``num_bad`` / ``bad_files`` count and name the files
    found unreadable so far, in any process.
    """

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None, strict: bool = False,
                 cache: bool = False, *, cache_dir: str | os.PathLike | None = None, progress: bool = True) -> None:
        self.root = Path(root).expanduser()
        self.classes, self.samples = scan_folder(self.root)
        self.targets: list[int] = [label for _, label in self.samples]
        self.transform = transform
        self.bad = BadFiles(self.root, [p for p, _ in self.samples], strict)
        self._cache = None
        if cache:
            self._cache = decoded_images(self, cache_dir, progress)

    def load(self, order: Sequence[int], pos: int) -> tuple[Image.Image, int]:
        """The image and label of sample ``order[pos]``, or, when that file is unreadable, of the next readable
        sample in ``order`` (wrapping around)."""
        n = len(order)
        for step in range(n):
            i = order[(pos + step) % n]
            img = self.read(i)
            if img is not None:
                return img, self.targets[i]
        raise self.bad.none_readable(n)

    def read(self, i: int) -> Image.Image | None:
        """Sample ``i``'s 8-bit RGB image, or None when the file is unreadable (flagged and logged once)."""
        if i in self.bad:
            return None
        if self._cache is not None:
            return Image.fromarray(self._cache[i].numpy())
        try:
            img = load_rgb_image(self.samples[i][0])
        except MemoryError:
            raise
        except Exception as exc:  # any decoder error: one bad file must never stop a long run
            self.bad.add(i, exc)
            return None
        self.bad.decoded_one()
        return img


__all__ = ["ImageFolderDataset", "scan_folder", "subfolders"]
