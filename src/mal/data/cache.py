"""The decoded uint8 cache of a small image folder: every image decoded once into one ``(N, H, W, 3)`` tensor.

With a cache folder the array is also stored as ``.npy`` (plus the bad-file flags in ``.json``) under a name that
fingerprints the file list (paths, labels, sizes, mtimes), and a later run over unchanged files loads it instead
of decoding again. Writes are atomic (temp file + rename), so ranks may race to store the same cache.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from .badfiles import BadFiles

logger = logging.getLogger(__name__)
FORMAT_VERSION = 1  # bump when decoding changes, so caches stored by older code are not reused
DECODE_THREADS = min(4, os.cpu_count() or 1)  # Pillow releases the GIL; more threads only add contention


class Folder(Protocol):
    """What the cache reads of an image folder (`ImageFolderDataset`): its files, root, bad-file record and reader."""
    samples: list[tuple[str, int]]
    root: Path
    bad: BadFiles

    def __len__(self) -> int: ...

    def read(self, i: int) -> Image.Image | None: ...


def fingerprint(ds: Folder) -> str:
    """A hash of the cache format and of every file's relative path, label, size and mtime."""
    h = hashlib.sha256(f"mal-cache-v{FORMAT_VERSION}\n".encode())
    for path, label in ds.samples:
        st = os.stat(path)
        h.update(f"{os.path.relpath(path, ds.root)}\t{label}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def decoded_images(ds: Folder, cache_dir: str | os.PathLike | None, progress: bool) -> torch.Tensor:
    """The dataset's images as one uint8 tensor, loaded from ``cache_dir`` when stored there, else decoded (and
    stored). Unreadable files are flagged in ``ds.bad`` and left black in the tensor."""
    npy = None
    if cache_dir is not None:
        npy = Path(cache_dir).expanduser() / f"{ds.root.parent.name}-{ds.root.name}-{fingerprint(ds)}.npy"
        stored = _load(npy, len(ds))
        if stored is not None:
            images, bad = stored
            ds.bad.restore(bad)
            return images
    images = _decode_all(ds, progress)
    if npy is not None:
        _save(npy, images, ds.bad.indices(), ds.root)
    return images


def _decode_all(ds: Folder, progress: bool) -> torch.Tensor:
    from tqdm.auto import tqdm

    n, out = len(ds), None
    pool = ThreadPoolExecutor(max_workers=DECODE_THREADS)
    try:
        decoded = tqdm(pool.map(ds.read, range(n)), total=n, desc=f"cache {ds.root.name}", disable=not progress,
                       unit="img")
        for i, img in enumerate(decoded):
            if img is None:
                continue
            if out is None:
                out = torch.zeros(n, img.height, img.width, 3, dtype=torch.uint8)
            elif (img.height, img.width) != tuple(out.shape[1:3]):
                raise ValueError(
                    f"data.cache=true needs all images the same size, but {ds.samples[i][0]} is "
                    f"{img.width}×{img.height} and earlier ones are {out.shape[2]}×{out.shape[1]} (width×height). "
                    f"Set data.cache=false, or resize the dataset offline.")
            out[i].numpy()[...] = np.asarray(img)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # an error does not wait for the rest to decode
    if out is None:
        raise ds.bad.none_readable(n)
    return out


def _load(npy: Path, n: int) -> tuple[torch.Tensor, list[int]] | None:
    meta = npy.with_suffix(".json")
    if not (npy.is_file() and meta.is_file()):
        return None
    arr = np.load(npy)
    if arr.ndim != 4 or arr.shape[0] != n or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        logger.warning("ignoring malformed image cache %s", npy)
        return None
    logger.info("loaded image cache %s %s", npy, tuple(arr.shape))
    return torch.from_numpy(arr), json.loads(meta.read_text())["bad"]


def _save(npy: Path, images: torch.Tensor, bad: list[int], root: Path) -> None:
    npy.parent.mkdir(parents=True, exist_ok=True)
    meta = npy.with_suffix(".json")
    tag = f".tmp{os.getpid()}"
    tmp_npy, tmp_meta = npy.with_name(npy.name + tag), meta.with_name(meta.name + tag)
    with open(tmp_npy, "wb") as f:
        np.save(f, images.numpy())
    tmp_meta.write_text(json.dumps({"root": str(root), "shape": list(images.shape), "bad": bad}))
    os.replace(tmp_npy, npy)
    os.replace(tmp_meta, meta)
    logger.info("saved image cache %s", npy)


__all__ = ["decoded_images", "fingerprint"]
