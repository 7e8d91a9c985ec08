"""MAE's image transforms: pretraining crops, fine-tuning augmentation (timm), the evaluation resize + crop.

Mixup and cutmix act on batches and stay in the training loop. Pretraining batches leave the loader as uint8 and
are normalized on the device (`normalize_uint8`): a quarter of the bytes through the workers, the pinned copy and
the host-to-device transfer. ``IMAGENET_MEAN`` / ``IMAGENET_STD`` are the one definition of the default
normalization.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def pretrain_transform(img_size: int, scale: tuple[float, float] = (0.2, 1.0)) -> Callable:
    """RandomResizedCrop (bicubic) + horizontal flip -> a uint8 (3, H, W) tensor; `normalize_uint8` finishes it
    on the device as ToTensor + Normalize would."""
    return T.Compose([T.RandomResizedCrop(img_size, scale=scale, interpolation=InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(), T.PILToTensor()])


def normalize_uint8(x: torch.Tensor, mean: Sequence[float] | torch.Tensor,
                    std: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """uint8 images (..., 3, H, W) -> float32 (x / 255 - mean) / std: ToTensor + Normalize's arithmetic in their
    order, so the result is the same to the bit on any device. In a training loop pass mean and std as (3, 1, 1)
    tensors already on x's device: building them from lists copies host memory to the GPU and waits for it."""
    m, s = (torch.as_tensor(v, dtype=torch.float32, device=x.device).reshape(-1, 1, 1) for v in (mean, std))
    return x.float().div(255).sub(m).div(s)


def finetune_transform(img_size: int, mean: Sequence[float], std: Sequence[float],
                       auto_augment: str | None = "rand-m9-mstd0.5-inc1", re_prob: float = 0.25,
                       scale: tuple[float, float] = (0.08, 1.0)) -> Callable:
    """timm's training transform as MAE fine-tunes: RandomResizedCrop (bicubic), flip, RandAugment (no colour
    jitter), ToTensor, Normalize, random erasing of one pixel-noise patch with probability ``re_prob``."""
    from timm.data import create_transform

    return create_transform(input_size=img_size, is_training=True, scale=scale, hflip=0.5, color_jitter=None,
                            auto_augment=auto_augment, interpolation="bicubic", re_prob=re_prob, re_mode="pixel",
                            re_count=1, mean=tuple(mean), std=tuple(std))


def eval_transform(img_size: int, mean: Sequence[float], std: Sequence[float], crop_pct: float = 0.875) -> Callable:
    """Resize the short side to ``img_size / crop_pct`` (bicubic), center-crop ``img_size``, ToTensor, Normalize.
    ``crop_pct=1.0`` on square images is a plain resize (e.g. CIFAR 32 → 48); 0.875 is ImageNet's 224 / 256."""
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    resize = round(img_size / crop_pct)  # round(), not int(): 48 / 1.0 must stay 48
    return T.Compose([T.Resize(resize, interpolation=InterpolationMode.BICUBIC), T.CenterCrop(img_size),
                      T.ToTensor(), T.Normalize(mean, std)])


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "pretrain_transform", "normalize_uint8", "finetune_transform",
           "eval_transform"]
