"""From ``data.dataset`` and a split name to a dataset: ``"default"`` (the embedded digits) or ``ROOT/<split>``.

A wrong layout is refused with a message that names what was found and the config key that fixes it; the one
tolerated mismatch is ``test`` ↔ ``val`` (ImageNet ships ``val``, CIFAR-style folders ``test``).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from .default import default_dataset
from .folder import ImageFolderDataset, subfolders

logger = logging.getLogger(__name__)
#: Folder names that mark a root as holding splits, not classes.
SPLIT_NAMES = frozenset({"train", "val", "valid", "validation", "test"})
#: A missing split folder that may stand in for the other.
INTERCHANGEABLE = {"test": "val", "val": "test"}
SHOWN = 8  # sub-folders named in an error


def build_dataset(name_or_root: str | os.PathLike, split: str, transform: Callable | None, strict: bool = False,
                  cache: bool = False, *, key: str = "data.train_split / data.val_split", **kwargs: Any) -> Dataset:
    """``"default"`` → :func:`default_dataset`; a folder → ``ImageFolderDataset(ROOT/split)`` (``split=""``: ROOT
    itself). A missing ``ROOT/test`` is replaced by ``ROOT/val`` and vice versa, with a log line. ``key`` is the
    config key that chose ``split``, named in errors. Extra kwargs go to :class:`ImageFolderDataset`."""
    if str(name_or_root) == "default":
        return default_dataset(split, transform)
    root = Path(name_or_root).expanduser()
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise FileNotFoundError(f"data.dataset={name_or_root}: {root} {what}; data.dataset must be an ImageFolder "
                                f"root (ROOT/train/<class>/<image>) or 'default' (the embedded digits)")
    return ImageFolderDataset(split_folder(root, split, key), transform, strict=strict, cache=cache, **kwargs)


def split_folder(root: Path, split: str, key: str) -> Path:
    """``root / split``, its stand-in, or an error that says what ``root`` holds and which setting to change."""
    folder = root / split
    if folder.is_dir():
        return folder
    other = root / INTERCHANGEABLE.get(split, split)
    if other.is_dir():
        logger.info("no %s: using %s", folder, other)
        return other
    found = subfolders(root)
    shown = ", ".join(found[:SHOWN]) + (" …" if len(found) > SHOWN else "")
    head = f"{key}={split!r}: no folder {folder}"
    if not found:
        raise FileNotFoundError(f"{head}, and {root} has no sub-folders; expected {root}/{split}/<class>/<image>")
    if any(name.lower() in SPLIT_NAMES for name in found):
        raise FileNotFoundError(f"{head}; {root} has {shown}: set {key} to one of them")
    raise FileNotFoundError(
        f"{head}; {root} holds class folders ({shown}) directly, not split folders. Either move them into "
        f"{root}/train/<class>/ and {root}/val/<class>/, or set {key}='' to read {root} itself as this split")


__all__ = ["build_dataset", "split_folder"]
