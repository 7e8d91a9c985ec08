"""The on-disk cache of clean and corrupted test images, so each corrupted set is made once per machine.

Layout, under the cache folder (default ``~/.cache/mal/corruptions``)::

    <set>-<fingerprint>/clean.npy                 uint8 (N, H, W, 3): resized + center-cropped, not normalized
    <set>-<fingerprint>/labels.npy                int64 (N,)
    <set>-<fingerprint>/meta.json                 what the images are (dataset, split, transform, shape)
    <set>-<fingerprint>/<backend>/<name>-<s>.npy  uint8 (N, H, W, 3): corruption <name> at severity <s>

The fingerprint covers the file list with sizes and mtimes (the decode cache's key of mal.data), the
resize/crop geometry and Pillow's version, so a changed image set or resolution never reuses old arrays;
``<backend>`` is the corruption package and its version. Every file is written under a temporary name, then
renamed. Worker processes are spawned (not forked: the parent holds torch and OpenCV thread pools).
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL
from tqdm.auto import tqdm

from . import corruptions as C

log = logging.getLogger("mal")
CACHE_VERSION = 1
CHUNK = 16            # images per task handed to a worker process


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/mal/corruptions, i.e. ~/.cache/mal/corruptions by default."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mal" / "corruptions"


def cpu_workers() -> int:
    """The CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass
class ImageSet:
    """Clean test images at model resolution, as cached: `images` is a read-only memory map."""
    folder: Path
    images: np.ndarray          # (N, H, W, 3) uint8
    labels: np.ndarray          # (N,) int64

    def corrupted_path(self, corruption: str, severity: int, backend: str) -> Path:
        return self.folder / backend / f"{corruption}-{severity}.npy"


def fingerprint(dataset, geometry: str) -> tuple[str, str]:
    """(readable name, hash) of a test set as the model sees it: its files (or pixels) and the resize/crop."""
    h = hashlib.sha256(f"mal-corruptions-v{CACHE_VERSION}\n{geometry}\nPillow {PIL.__version__}\n".encode())
    if hasattr(dataset, "_cache_key"):                      # ImageFolderDataset: paths, labels, sizes, mtimes
        h.update(dataset._cache_key().encode())
        name = f"{dataset.root.parent.name}-{dataset.root.name}"
    elif hasattr(dataset, "images"):                        # ArrayImageDataset (the default digits): pixels
        h.update(np.ascontiguousarray(dataset.images.numpy()).tobytes())
        h.update(np.asarray(dataset.targets, dtype=np.int64).tobytes())
        name = "arrays"
    else:
        raise ValueError(f"robustness evaluation reads ImageFolder trees and the default dataset, not "
                         f"{type(dataset).__name__}; pass --data with an ImageFolder root")
    return name, h.hexdigest()[:16]


def _save_atomic(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def clean_set(folder: Path, decode: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]], meta: dict,
              shape: tuple[int, int, int, int]) -> ImageSet:
    """The cached clean images of `folder`, of `shape` (N, H, W, 3); when the cache lacks them, they are decoded
    first through `decode` (in-order batches of uint8 (B, H, W, 3) images and their labels) into a memory map."""
    clean, labels = folder / "clean.npy", folder / "labels.npy"
    if not clean.is_file() or not labels.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = clean.with_name(f"clean.npy.tmp{os.getpid()}")
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)    # (N, H, W, 3)
        targets, n = [], 0
        try:
            for x, y in decode():                                                         # (B, H, W, 3), (B,)
                array[n:n + len(x)] = x
                targets.append(np.asarray(y, dtype=np.int64))
                n += len(x)
            if n != shape[0]:
                raise RuntimeError(f"decoded {n} test images, expected {shape[0]}")
            array.flush()
            del array
            _save_atomic(labels, np.concatenate(targets))
            (folder / "meta.json").write_text(json.dumps({**meta, "shape": list(shape)}, indent=2))
            os.replace(tmp, clean)
        finally:
            if tmp.exists():
                tmp.unlink()
        log.info("cached %d clean test images in %s", n, folder)
    return ImageSet(folder, np.load(clean, mmap_mode="r"), np.load(labels))


def corrupt_chunk(clean_path: str, start: int, stop: int, corruption: str, severity: int) -> tuple[int, np.ndarray]:
    """Corrupt images start..stop-1 of a cached clean set (a worker's task): (start, uint8 (stop-start, H, W, 3))."""
    clean = np.load(clean_path, mmap_mode="r")              # (N, H, W, 3)
    out = np.empty((stop - start, *clean.shape[1:]), dtype=np.uint8)
    for i in range(start, stop):
        seed = C.image_seed(i, corruption, severity)
        out[i - start] = C.corrupt_image(np.array(clean[i]), corruption, severity, seed)
    return start, out


def _worker_init() -> None:
    """One thread per worker process (the pool already uses every core); import the package once, up front."""
    C._corrupt_fn()
    try:
        import cv2
        cv2.setNumThreads(1)
    except ImportError:
        pass


def missing_pairs(image_set: ImageSet, pairs: Iterable[tuple[str, int]], backend: str) -> list[tuple[str, int]]:
    return [(c, s) for c, s in pairs if not image_set.corrupted_path(c, s, backend).is_file()]


def ensure_corrupted(image_set: ImageSet, pairs: list[tuple[str, int]], backend: str, workers: int,
                     progress: bool = True) -> int:
    """Make every (corruption, severity) array that the cache lacks; returns how many were made.

    `workers` processes share the work in chunks of CHUNK images (0 or 1: in this process). Each array is filled
    in a memory-mapped temporary file and renamed when complete, so an interrupted run leaves no partial array.
    """
    todo = missing_pairs(image_set, pairs, backend)
    if not todo:
        return 0
    n = len(image_set.images)
    clean_path = str(image_set.folder / "clean.npy")
    bar = tqdm(total=n * len(todo), desc="corrupting", unit="img", disable=not progress)
    pool = None
    if workers > 1:
        workers = min(workers, -(-n * len(todo) // CHUNK))
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init)
    try:
        for corruption, severity in todo:
            bar.set_postfix_str(f"{corruption} {severity}")
            _make_one(image_set, corruption, severity, backend, clean_path, pool, workers, bar)
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return len(todo)


def _make_one(image_set: ImageSet, corruption: str, severity: int, backend: str, clean_path: str,
              pool: ProcessPoolExecutor | None, workers: int, bar) -> None:
    """Write one corrupted array: chunks in the pool (or here), into a temporary memory map, then rename."""
    path = image_set.corrupted_path(corruption, severity, backend)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    n = len(image_set.images)
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=image_set.images.shape)  # (N, H, W, 3)
    try:
        bounds = [(a, min(a + CHUNK, n)) for a in range(0, n, CHUNK)]
        if pool is None:
            results = (corrupt_chunk(clean_path, a, b, corruption, severity) for a, b in bounds)
        else:
            results = _as_completed(pool, 4 * workers, [(clean_path, a, b, corruption, severity) for a, b in bounds])
        for start, chunk in results:
            out[start:start + len(chunk)] = chunk
            bar.update(len(chunk))
        out.flush()
        del out
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _as_completed(pool: ProcessPoolExecutor, limit: int, tasks: list[tuple]):
    """Results of corrupt_chunk over `tasks` as they finish, with at most `limit` tasks in flight (bounded memory)."""
    pending, queue = set(), list(reversed(tasks))
    while queue or pending:
        while queue and len(pending) < limit:
            pending.add(pool.submit(corrupt_chunk, *queue.pop()))
        done, pending = wait(pending, return_when=FIRST_COMPLETED)
        for fut in done:
            yield fut.result()


__all__ = ["CACHE_VERSION", "ImageSet", "default_cache_dir", "cpu_workers", "fingerprint", "clean_set",
           "corrupt_chunk", "missing_pairs", "ensure_corrupted"]
