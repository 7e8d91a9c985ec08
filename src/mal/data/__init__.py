"""Images for MAL: decoding, datasets (an ImageFolder tree or the embedded digits), splits, transforms, loaders.

images      any Pillow mode → 8-bit RGB                  base       ImageDataset, what every dataset offers
folder      ImageFolderDataset (bad files skipped)        badfiles   BadImageError and the bad-file record
cache       the decoded uint8 cache of a small folder     default    the embedded MNIST digits
splits      holdout_split, labelled_subset, IndexedView   transforms MAE's pretrain / fine-tune / eval transforms
loaders     in-order evaluation loaders, worker counts    resolve    build_dataset: "default" or ROOT/<split>
segmentation  image/mask pairs (SegmentationFolder), their seeded splits and joint v2 transforms
"""
from .badfiles import BadImageError
from .default import ArrayImageDataset, default_dataset
from .folder import ImageFolderDataset
from .images import IMG_EXTENSIONS, load_rgb_image, to_rgb8
from .loaders import build_loader, cap_num_workers, default_num_workers
from .resolve import build_dataset
from .segmentation import (BadMaskError, PadCollate, SegmentationFolder, SegmentationView, seg_eval_transform,
                           seg_train_transform, split_pairs)
from .splits import IndexedView, holdout_split, labelled_subset
from .transforms import (IMAGENET_MEAN, IMAGENET_STD, eval_transform, finetune_transform, normalize_uint8,
                         pretrain_transform)

__all__ = [
    "IMG_EXTENSIONS", "IMAGENET_MEAN", "IMAGENET_STD",
    "BadImageError",
    "to_rgb8", "load_rgb_image",
    "ImageFolderDataset", "ArrayImageDataset", "default_dataset", "build_dataset",
    "holdout_split", "labelled_subset", "IndexedView",
    "pretrain_transform", "normalize_uint8", "finetune_transform", "eval_transform",
    "build_loader", "default_num_workers", "cap_num_workers",
    "BadMaskError", "SegmentationFolder", "SegmentationView", "split_pairs", "seg_train_transform",
    "seg_eval_transform", "PadCollate",
]
