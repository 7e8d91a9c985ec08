"""Image / mask pairs for semantic segmentation: the folder dataset, its seeded splits and the joint transforms.

A split is two folders under the dataset root, images and masks matched by file stem: CamVid's ``{split}/`` +
``{split}annot/``, or, for a dataset without split folders (Kvasir-SEG's ``images/`` + ``masks/``), one pair of
folders split by a seeded permutation into train / val / test counts. A mask is a single-channel PNG of class
indices (mode L or P) of its image's size; values outside ``[0, num_classes)`` other than the ignore index are an
error that names the file. Unreadable files are skipped like the image folders' (the next readable pair is used;
``strict`` raises).

The transforms are torchvision.transforms.v2 pipelines over a ``tv_tensors.Image`` and a ``tv_tensors.Mask``: every
geometric step moves both (the mask with nearest-neighbour resampling), the photometric jitter touches the image
only. Items are ``(image (3, H, W) float normalized, mask (H, W) int64)``.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from .badfiles import BadFiles, BadImageError, RecordsBadFiles, warn_main_rank
from .images import IMG_EXTENSIONS, load_rgb_image
from .splits import _Composed

logger = logging.getLogger(__name__)
PAD = 255                      # mask value of padded pixels during the transforms (uint8), then the ignore index
SPLIT_PARTS = {"train": 0, "val": 1, "valid": 1, "validation": 1, "test": 2}
SHOWN = 5
# mmseg's PhotoMetricDistortion ranges: brightness +-32/255, contrast and saturation 0.5-1.5, hue +-18/180
JITTER = dict(brightness=32 / 255, contrast=0.5, saturation=0.5, hue=0.05)


class BadMaskError(BadImageError):
    """A mask does not fit its image: missing, of another size, not single-channel, or with labels outside the
    classes. Always raised (strict or not): a wrong mask is a dataset error, not a damaged file."""


# ----------------------------------------------------------------------------- files
def _by_stem(folder: Path, what: str) -> dict[str, str]:
    if not folder.is_dir():
        what_is = "is not a folder" if folder.exists() else "does not exist"
        raise FileNotFoundError(f"{what} folder {folder} {what_is}; check data.dataset and seg.image_dir / "
                                f"seg.mask_dir (e.g. '{{split}}' and '{{split}}annot' for CamVid)")
    out: dict[str, str] = {}
    for name in sorted(os.listdir(folder)):
        if name.startswith(".") or not name.lower().endswith(IMG_EXTENSIONS):
            continue
        stem = os.path.splitext(name)[0]
        if stem in out:
            raise BadMaskError(f"two {what} files share the stem {stem!r} in {folder} ({os.path.basename(out[stem])} "
                               f"and {name}); keep one of them")
        out[stem] = str(folder / name)
    if not out:
        raise FileNotFoundError(f"{what} folder {folder} holds no image files ({', '.join(IMG_EXTENSIONS)})")
    return out


def find_pairs(image_dir: Path, mask_dir: Path) -> list[tuple[str, str]]:
    """(image, mask) paths matched by file stem, sorted by stem. An image without a mask is an error; masks without
    an image are logged and left out."""
    images, masks = _by_stem(Path(image_dir), "image"), _by_stem(Path(mask_dir), "mask")
    missing = [s for s in images if s not in masks]
    if missing:
        shown = ", ".join(missing[:SHOWN]) + (" …" if len(missing) > SHOWN else "")
        raise BadMaskError(f"{len(missing)} of the {len(images)} images in {image_dir} have no mask in {mask_dir} "
                           f"(a mask has its image's file stem, e.g. {missing[0]}.png): {shown}. Add the masks, "
                           f"remove those images, or fix seg.mask_dir")
    extra = [s for s in masks if s not in images]
    if extra:
        warn_main_rank(logger, "%d masks in %s have no image in %s and are not used (e.g. %s)", len(extra), mask_dir,
                       image_dir, extra[0])
    return [(images[s], masks[s]) for s in sorted(images)]


def seeded_split(n: int, sizes: Sequence[int], seed: int, split: str) -> list[int]:
    """The sorted indices of `split` (train / val / test) in a seeded permutation of n pairs cut into `sizes`."""
    if split not in SPLIT_PARTS:
        raise ValueError(f"the pairs are split by seg.split_sizes into train / val / test; got the split {split!r} "
                         f"(data.train_split, data.val_split, seg.eval_split)")
    if sum(sizes) > n:
        raise ValueError(f"seg.split_sizes {list(sizes)} add up to {sum(sizes)}, more than the {n} image/mask pairs")
    part = SPLIT_PARTS[split]
    perm = np.random.default_rng(seed).permutation(n)
    start = sum(sizes[:part])
    return sorted(perm[start:start + sizes[part]].tolist())


def split_pairs(root: Path, split: str, image_dir: str, mask_dir: str, split_sizes: Sequence[int] = (),
                split_seed: int = 0) -> list[tuple[str, str]]:
    """The pairs of one split: folders named by `split` ("{split}" in the folder names), or a seeded part of one
    pair of folders (`split_sizes`)."""
    root = Path(root).expanduser()
    templated = "{split}" in image_dir or "{split}" in mask_dir
    pairs = find_pairs(root / image_dir.format(split=split), root / mask_dir.format(split=split))
    if templated:
        return pairs
    if not split_sizes:
        raise ValueError(f"seg.image_dir={image_dir!r} and seg.mask_dir={mask_dir!r} have no '{{split}}': set "
                         f"seg.split_sizes to [train, val, test] counts for a seeded split of the "
                         f"{len(pairs)} pairs")
    if sum(split_sizes) < len(pairs) and split == "train":
        warn_main_rank(logger, "seg.split_sizes %s leave %d of %d pairs unused", list(split_sizes),
                       len(pairs) - sum(split_sizes), len(pairs))
    return [pairs[i] for i in seeded_split(len(pairs), split_sizes, split_seed, split)]


def load_mask(path: str) -> Image.Image:
    """A class-index mask (mode L or P, the palette indices kept); other modes are an error."""
    with Image.open(path) as m:
        m.load()
        if m.mode not in ("L", "P"):
            raise BadMaskError(f"mask {path} has mode {m.mode}; masks must be single-channel PNGs of class indices "
                               f"(mode L or P), not colour-coded images")
        return m.convert("L") if m.mode == "L" else Image.fromarray(np.asarray(m))


def check_labels(mask: Image.Image, path: str, num_classes: int, ignore_index: int) -> None:
    """BadMaskError when the mask holds values outside [0, num_classes) other than ignore_index."""
    counts = np.bincount(np.asarray(mask).ravel(), minlength=256)
    bad = [v for v in np.flatnonzero(counts).tolist() if v >= num_classes and v != ignore_index]
    if bad:
        hint = " (a 0/255 binary mask needs its 255 mapped to 1)" if num_classes == 2 and 255 in bad else ""
        raise BadMaskError(f"mask {path} holds the labels {bad[:10]}, outside [0, {num_classes}) and not the ignore "
                           f"index {ignore_index}{hint}; set num_classes / seg.ignore_index to the dataset's, or fix "
                           f"the mask")


# ----------------------------------------------------------------------------- the dataset
class SegmentationFolder(RecordsBadFiles, Dataset):
    """Image/mask pairs as ``transform(rgb_image, mask)``; see the module doc.

    Args:
        pairs: (image path, mask path) of each sample (`split_pairs`).
        num_classes, ignore_index: mask values allowed (checked as each mask is read).
        transform: a joint transform (`SegTransform`); None returns the PIL image and mask.
        class_names: one per class ([] = "0", "1", ...).
        strict: raise BadImageError at the first unreadable file instead of using the next readable pair.
    """

    def __init__(self, pairs: Sequence[tuple[str, str]], num_classes: int, ignore_index: int = -1,
                 transform: Callable | None = None, class_names: Sequence[str] = (), strict: bool = False,
                 root: str | os.PathLike = "") -> None:
        if not pairs:
            raise ValueError(f"no image/mask pairs in {root or 'the split'}")
        self.pairs, self.num_classes, self.ignore_index = list(pairs), num_classes, ignore_index
        self.transform = transform
        self.classes: list[str] = list(class_names) or [str(c) for c in range(num_classes)]
        self.targets: list[int] = [0] * len(self.pairs)      # one group: held-out splits draw among all pairs
        self.root = Path(root or os.path.dirname(self.pairs[0][0]))
        self.bad = BadFiles(self.root, [p for p, _ in self.pairs], strict)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        img, mask = self.load(range(len(self)), index)
        return (img, mask) if self.transform is None else self.transform(img, mask)

    def load(self, order: Sequence[int], pos: int) -> tuple[Image.Image, Image.Image]:
        """The image and mask of pair ``order[pos]``, or of the next readable pair in ``order`` (wrapping)."""
        n = len(order)
        for step in range(n):
            pair = self.read(order[(pos + step) % n])
            if pair is not None:
                return pair
        raise self.bad.none_readable(n)

    def read(self, i: int) -> tuple[Image.Image, Image.Image] | None:
        """Pair i, checked (size, labels); None when a file cannot be decoded (flagged and logged once)."""
        if i in self.bad:
            return None
        img_path, mask_path = self.pairs[i]
        try:
            img, mask = load_rgb_image(img_path), load_mask(mask_path)
        except (MemoryError, BadMaskError):
            raise
        except Exception as exc:          # a damaged image or mask file: skipped like the image folders'
            self.bad.add(i, exc)
            return None
        self.bad.decoded_one()
        if img.size != mask.size:
            raise BadMaskError(f"mask {mask_path} is {mask.size[0]}×{mask.size[1]} but its image {img_path} is "
                               f"{img.size[0]}×{img.size[1]} (width×height); masks must have their image's size")
        check_labels(mask, mask_path, self.num_classes, self.ignore_index)
        return img, mask


class SegmentationView(Dataset):
    """Pairs ``indices`` of a `SegmentationFolder`, read through it (same files and bad-file record), with a
    transform of its own (a held-out part with the eval transform)."""

    def __init__(self, dataset: SegmentationFolder, indices: Sequence[int], transform: Callable | None = None):
        self.dataset, self.indices = dataset, [int(i) for i in indices]
        self.transform = transform if transform is not None else dataset.transform
        self.classes, self.targets = dataset.classes, [0] * len(self.indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        img, mask = self.dataset.load(_Composed(self.indices, range(len(self))), index)
        return (img, mask) if self.transform is None else self.transform(img, mask)

    num_bad = property(lambda self: self.dataset.num_bad)
    bad_files = property(lambda self: self.dataset.bad_files)

    def report(self) -> str:
        return self.dataset.report()


# ----------------------------------------------------------------------------- joint transforms
class RandomScale(v2.Transform):
    """Resize the image and its mask by one random factor in `scale_range` of their own size (image bilinear with
    antialiasing, mask nearest)."""

    def __init__(self, scale_range: tuple[float, float]):
        super().__init__()
        self.scale_range = scale_range

    def make_params(self, flat_inputs: list) -> dict:
        h, w = TF.get_size(next(x for x in flat_inputs if isinstance(x, tv_tensors.Image)))
        lo, hi = self.scale_range
        r = lo + (hi - lo) * torch.rand(()).item()
        return {"size": [max(1, round(h * r)), max(1, round(w * r))]}

    def transform(self, inpt, params: dict):
        return self._call_kernel(TF.resize, inpt, params["size"], interpolation=v2.InterpolationMode.BILINEAR,
                                 antialias=True)


class SegTransform:
    """A v2 pipeline applied to (PIL RGB image, PIL mask) -> (image tensor, mask (H, W) int64). Padded mask pixels
    (value PAD while transforming) become `ignore_index`."""

    def __init__(self, pipeline: Callable, ignore_index: int):
        self.pipeline, self.ignore_index = pipeline, ignore_index

    def __call__(self, img: Image.Image, mask: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        image = tv_tensors.Image(TF.pil_to_tensor(img))                                     # (3, H, W) uint8
        target = tv_tensors.Mask(torch.from_numpy(np.array(mask, dtype=np.uint8))[None])   # (1, H, W) uint8
        image, target = self.pipeline(image, target)
        out = target[0].as_subclass(torch.Tensor).long()                                    # (H, W)
        if self.ignore_index != PAD:
            out = out.masked_fill(out == PAD, self.ignore_index)
        return image.as_subclass(torch.Tensor), out


def seg_train_transform(crop_size: tuple[int, int], mean: Sequence[float], std: Sequence[float], ignore_index: int,
                        scale_range: tuple[float, float] = (0.5, 2.0), hflip: bool = True, vflip: bool = False,
                        photometric: bool = True) -> SegTransform:
    """Random rescale (relative to the image), random crop (padded: image black, mask ignored), flips, photometric
    jitter of the image only, then float + Normalize."""
    steps = [RandomScale(scale_range),
             v2.RandomCrop(list(crop_size), pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: PAD})]
    steps += [v2.RandomHorizontalFlip()] if hflip else []
    steps += [v2.RandomVerticalFlip()] if vflip else []
    steps += [v2.ColorJitter(**JITTER)] if photometric else []
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return SegTransform(v2.Compose(steps), ignore_index)


def seg_eval_transform(mean: Sequence[float], std: Sequence[float], ignore_index: int) -> SegTransform:
    """The full image at its own size: float + Normalize (the model pads to the patch grid or slides a window)."""
    return SegTransform(v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]),
                        ignore_index)


class PadCollate:
    """Collate that pads images (0) and masks (`ignore_index`) on the bottom/right to the largest size of the
    batch, so evaluation batches may mix image sizes (a class, so loader workers can pickle it)."""

    def __init__(self, ignore_index: int):
        self.ignore_index = ignore_index

    def __call__(self, batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        H, W = max(b[0].shape[-2] for b in batch), max(b[0].shape[-1] for b in batch)
        imgs = torch.zeros(len(batch), batch[0][0].shape[0], H, W, dtype=batch[0][0].dtype)   # (B, 3, H, W)
        masks = torch.full((len(batch), H, W), self.ignore_index, dtype=torch.long)           # (B, H, W)
        for i, (img, mask) in enumerate(batch):
            imgs[i, :, :img.shape[-2], :img.shape[-1]] = img
            masks[i, :mask.shape[-2], :mask.shape[-1]] = mask
        return imgs, masks

__all__ = ["BadMaskError", "SegmentationFolder", "SegmentationView", "RandomScale", "SegTransform", "find_pairs",
           "split_pairs", "seeded_split", "seg_train_transform", "seg_eval_transform", "PadCollate", "load_mask"]
